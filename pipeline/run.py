"""`sdm preprocess`: run the four stages (PIPELINE), reusing each one whose inputs and parameters are unchanged.

What each stage writes is the data contract (pipeline/contract.py). With N > 1 user buckets
(pipeline/buckets.py), events.parquet and every table of the last three stages is a directory of N
part files (read as one table), and OUT/buckets/ caches each bucket of each per-user stage plus
the global session numbering (session_starts/).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
from filelock import FileLock, Timeout

from pipeline.buckets import (
    BUCKETS_DIR,
    Layout,
    PartBuild,
    bucket_count,
    bucket_lock,
    ensure_part,
    link_parts,
    part_dir,
    write_table,
)
from pipeline.cache import (
    build_stage,
    file_digest,
    is_current,
    is_plain_name,
    manifest_digest,
    package_version,
    read_manifest,
)
from pipeline.config import PreprocessConfig
from pipeline.contract import STAGE_TABLES, STAGES, DataDir, long_term_column
from pipeline.errors import InputError
from pipeline.diagnostics import TIME_UNITS_MS, empty_long_term_sessions, session_measures, time_resolution
from pipeline.events import build_events
from pipeline.long_term import build_long_term
from pipeline.reading import count_rows, input_files, scan_table
from pipeline.sessions import (
    assign_sessions,
    first_sessions,
    session_counts,
    summarise_sessions,
)
from pipeline.splits import build_splits
from pipeline.storage import ensure_output_dir, remove_leftovers

if TYPE_CHECKING:
    from pipeline.engine import EngineOptions

SESSION_STARTS = "session_starts"
LOCK_NAME = ".sdm.lock"


@dataclass
class StageReport:
    name: str
    cached: bool
    seconds: float
    stats: dict[str, Any]


StageCallback = Callable[[str], None]


def input_fingerprints(config: PreprocessConfig) -> dict[str, Any]:
    """Content digests of the inputs; a log of several files is the list of theirs, in read order."""
    logs = [file_digest(path) for path in input_files(config.logs)]
    return {
        "logs": logs[0] if len(logs) == 1 else logs,
        **{name: (file_digest(path) if path is not None else None) for name, path in (("items", config.items), ("users", config.users))},
    }


def choose_layout(config: PreprocessConfig, out: Path, inputs: dict[str, Any], concurrent: int = 1) -> Layout:
    """--buckets, else the memory rule on the number of input rows (from the events manifest when
    it describes these very inputs, else counted), with the limit shared by `concurrent` bucket
    builds running at once."""
    if config.buckets is not None:
        return Layout(config.buckets)
    manifest = read_manifest(out / "events")
    if manifest is not None and manifest["fingerprint"].get("inputs") == inputs:
        rows = manifest["stats"]["rows_read"]
    else:
        rows = count_rows(scan_table(config.logs, sep=config.sep, header=config.header, columns=config.columns), config.header)
    return Layout(bucket_count(rows, config.memory_limit // concurrent))


def events_stage(config: PreprocessConfig, layout: Layout) -> Callable[[Path], dict[str, Any]]:
    def build(directory: Path) -> dict[str, Any]:
        tables = build_events(config, layout, directory)
        write_table(tables.items, directory / "items.parquet")
        write_table(tables.users, directory / "users.parquet")
        for field in tables.profile_fields:
            if not is_plain_name(field):
                raise InputError(f"{config.users}: column {field!r} cannot name a file (it holds a path separator); rename it")
        for name, vocabulary in tables.vocabularies.items():
            write_table(vocabulary, directory / "vocab" / f"{name}.parquet")
        return {**tables.stats, "side_features": tables.side_features, "profile_fields": tables.profile_fields}

    return build


@dataclass
class Sources:
    """Where a bucket of the per-user stages reads its inputs: the stage directories themselves
    with one bucket, the cached parts of OUT/buckets with several."""

    out: Path
    layout: Layout

    def events(self, bucket: int) -> Path:
        return self.layout.table(self.out / "events", "events", bucket)

    def table(self, stage: str, name: str, bucket: int) -> Path:
        if self.layout.n_buckets == 1:
            return DataDir(self.out).table(stage, name)
        return part_dir(self.out, stage, bucket) / f"{name}.parquet"

    def session_starts(self) -> pl.DataFrame | None:
        if self.layout.n_buckets == 1:
            return None  # all users in one frame: sessions are numbered globally as they are
        return pl.read_parquet(self.out / BUCKETS_DIR / SESSION_STARTS / "first_sessions.parquet")


def session_starts_stage(config: PreprocessConfig, sources: Sources) -> Callable[[Path], dict[str, Any]]:
    """Every user's first session number, from each bucket's session counts."""

    def build(directory: Path) -> dict[str, Any]:
        counts = pl.concat([
            session_counts(pl.scan_parquet(sources.events(bucket)), config.session_gap_ms, config.max_session_length)
            for bucket in range(sources.layout.n_buckets)
        ])
        write_table(first_sessions(counts), directory / "first_sessions.parquet")
        return {"sessions": int(counts.get_column("sessions").sum())}

    return build


# Each per-user stage: build(config, sources, bucket) -> PartBuild writing the bucket's tables as
# <name>.parquet into a directory and returning additive counts; summarise(config, counts) -> the
# stage's stats for all buckets.


def sessions_part(config: PreprocessConfig, sources: Sources, bucket: int) -> PartBuild:
    def build(directory: Path) -> dict[str, Any]:
        events = pl.read_parquet(sources.events(bucket))
        session_events = assign_sessions(events, config.session_gap_ms, config.max_session_length, sources.session_starts())
        sessions = summarise_sessions(session_events)
        write_table(session_events, directory / "events.parquet")
        write_table(sessions, directory / "sessions.parquet")
        return {"sessions": sessions.height, "session_events": session_events.height, **session_measures(session_events, sessions)}

    return build


def summarise_sessions_stage(config: PreprocessConfig, counts: list[dict[str, Any]]) -> dict[str, Any]:
    sessions = sum(part["sessions"] for part in counts)
    events = sum(part["session_events"] for part in counts)
    times_on_unit = {f"times_on_{unit}": sum(part[f"times_on_{unit}"] for part in counts) for unit in TIME_UNITS_MS}
    return {
        "sessions": sessions,
        "mean_session_length": events / max(sessions, 1),
        "single_item_share": sum(part["single_item_sessions"] for part in counts) / max(sessions, 1),
        "repeat_share": sum(part["repeat_events"] for part in counts) / max(events, 1),
        "time_resolution": time_resolution(times_on_unit, events),
        "max_session_length": config.max_session_length,
    }


def long_term_part(config: PreprocessConfig, sources: Sources, bucket: int) -> PartBuild:
    def build(directory: Path) -> dict[str, Any]:
        side_features = read_manifest(sources.out / "events")["stats"]["side_features"]
        long_term = build_long_term(
            pl.read_parquet(sources.table("sessions", "events", bucket), columns=["user", "item", "time", "session"]),
            pl.read_parquet(sources.table("sessions", "sessions", bucket), columns=["session", "user", "start", "end", "length"]),
            pl.read_parquet(DataDir(sources.out).items),
            side_features,
            config.long_window_ms,
            config.max_long,
        )
        write_table(long_term, directory / "long_term.parquet")
        features = ["item", *side_features]
        return {
            "sessions": long_term.height,
            "empty_long_term_sessions": empty_long_term_sessions(long_term),
            "features": features,
            **{f"total_long_{feature}": int(long_term.get_column(long_term_column(feature)).list.len().sum()) for feature in features},
        }

    return build


def summarise_long_term_stage(config: PreprocessConfig, counts: list[dict[str, Any]]) -> dict[str, Any]:
    features = counts[0]["features"]
    sessions = max(sum(part["sessions"] for part in counts), 1)
    return {
        "features": features,
        "window_days": "none" if config.long_window_ms is None else config.long_window_ms / 86_400_000,
        "empty_long_term_share": sum(part["empty_long_term_sessions"] for part in counts) / sessions,
        **{f"mean_long_{feature}": sum(part[f"total_long_{feature}"] for part in counts) / sessions for feature in features},
    }


def splits_part(config: PreprocessConfig, sources: Sources, bucket: int) -> PartBuild:
    def build(directory: Path) -> dict[str, Any]:
        splits = build_splits(
            pl.read_parquet(sources.table("sessions", "events", bucket)),
            pl.read_parquet(sources.table("sessions", "sessions", bucket)),
            config,
            read_manifest(sources.out / "events")["stats"]["time_max_ms"],
        )
        for name, frame in splits.items():
            write_table(frame, directory / f"{name}.parquet")
        train = splits["train"]
        return {
            "train_sessions": train.height,
            "train_targets": int((train.get_column("items").list.len() - 1).sum() + (train.get_column("next_item") != 0).sum()),
            "valid_cases": splits["valid"].height,
            "test_cases": splits["test"].height,
            "test_targets": int(splits["test"].get_column("targets").list.len().sum()),
        }

    return build


def summarise_splits_stage(config: PreprocessConfig, counts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"split": config.split, **{name: sum(part[name] for part in counts) for name in counts[0]}}


@dataclass(frozen=True)
class Stage:
    """One stage: its directory under OUT, the stages it reads (their manifests are part of its
    fingerprint), the tables it writes, and for a per-user stage how one bucket's part is built
    and how the parts' counts add up to the stage's stats."""

    name: str
    upstream: tuple[str, ...]
    build_part: Callable[[PreprocessConfig, Sources, int], PartBuild] | None = None
    summarise: Callable[[PreprocessConfig, list[dict[str, Any]]], dict[str, Any]] | None = None

    @property
    def tables(self) -> tuple[str, ...]:
        return STAGE_TABLES[self.name]  # the data contract's names


# The pipeline, in build order. The events stage is the global step (events_stage); the others are
# per user, so they can be built bucket by bucket.
PIPELINE = (
    Stage("events", ()),
    Stage("sessions", ("events",), sessions_part, summarise_sessions_stage),
    Stage("long_term", ("events", "sessions"), long_term_part, summarise_long_term_stage),
    Stage("splits", ("sessions",), splits_part, summarise_splits_stage),
)
STAGE = {stage.name: stage for stage in PIPELINE}
PER_USER_STAGES = tuple(stage.name for stage in PIPELINE if stage.build_part is not None)


def run_preprocess(
    config: PreprocessConfig,
    *,
    force: bool = False,
    on_stage_start: StageCallback | None = None,
    bucket: tuple[int, int] | None = None,
    engine: EngineOptions | None = None,
) -> list[StageReport]:
    """Build (or reuse) every stage under config.out; return what happened to each.
    With `bucket` = (K, N): only the global step and user bucket K of N, for a later run to publish.
    With `engine`: the global step and every bucket as tasks of that engine (pipeline/engine.py)."""
    out = config.out
    input_files(config.logs)  # the log exists (a file, a directory of files or a glob)
    for path in (config.items, config.users):
        if path is not None and not path.is_file():
            raise InputError(f"{path}: no such file")
    if bucket is not None and config.buckets not in (None, bucket[1]):
        raise InputError(f"--bucket {bucket[0]}/{bucket[1]} and --buckets {config.buckets} disagree")
    if engine is not None:
        from pipeline.engine import check_engine

        check_engine(engine, config, bucket)
    created = ensure_output_dir(out)
    try:
        if bucket is not None:
            return _run_bucket(config, force, on_stage_start, *bucket)
        with FileLock(out / LOCK_NAME, timeout=0):
            for stage in STAGES:  # temporaries a killed run left next to a stage that is now reused
                remove_leftovers(out, stage)
            if engine is not None:
                from pipeline.engine import run_on_engine

                return run_on_engine(config, engine, force, on_stage_start)
            return _run_stages(config, force, on_stage_start)
    except Timeout:
        raise InputError(f"{out}: another sdm process is writing this directory; wait for it or use another --out") from None
    except BaseException:
        if created and not any(read_manifest(out / stage) for stage in STAGES):
            shutil.rmtree(out, ignore_errors=True)  # a first run that built nothing leaves nothing
        raise


class Plan:
    """The fingerprints of a run: stages as before, plus, with several buckets, the global session
    numbering and every (stage, bucket) part."""

    def __init__(self, config: PreprocessConfig, layout: Layout, inputs: dict[str, Any]) -> None:
        self.config, self.layout, self.inputs = config, layout, inputs
        self.out = config.out
        self.sources = Sources(config.out, layout)

    def stage_fingerprint(self, stage: str) -> dict[str, Any]:
        return {
            "version": package_version(),
            "params": self.config.stage_params(stage),
            "inputs": self.inputs if stage == "events" else {},
            **({"buckets": self.layout.n_buckets} if stage == "events" else {}),
            "upstream": {name: manifest_digest(self.out / name) for name in STAGE[stage].upstream},
        }

    def session_starts_fingerprint(self) -> dict[str, Any]:
        return {
            "version": package_version(),
            "params": self.config.stage_params("sessions"),
            "upstream": {"events": manifest_digest(self.out / "events")},
        }

    def part_fingerprint(self, stage: str, bucket: int) -> dict[str, Any]:
        upstream = {"events": manifest_digest(self.out / "events")}
        if stage == "sessions":
            upstream[SESSION_STARTS] = manifest_digest(self.out / BUCKETS_DIR / SESSION_STARTS)
        else:
            upstream["sessions"] = manifest_digest(part_dir(self.out, "sessions", bucket))
        return {
            "version": package_version(),
            "params": self.config.stage_params(stage),
            "bucket": [bucket, self.layout.n_buckets],
            "upstream": upstream,
        }

    def global_step(self, force: bool, on_stage_start: StageCallback | None) -> list[StageReport]:
        """The events stage and, with several buckets, the global session numbering."""
        reports = [self.build_if_stale(self.out, "events", self.stage_fingerprint("events"), events_stage(self.config, self.layout), force, on_stage_start)]
        if self.layout.n_buckets > 1:
            build = session_starts_stage(self.config, self.sources)
            self.build_if_stale(self.out / BUCKETS_DIR, SESSION_STARTS, self.session_starts_fingerprint(), build, force, None)
        return reports

    def part(self, stage: str, bucket: int, force: bool) -> dict[str, Any]:
        """The manifest of one bucket of a per-user stage, built unless cached (or forced)."""
        fingerprint = self.part_fingerprint(stage, bucket)
        build = STAGE[stage].build_part(self.config, self.sources, bucket)
        if force:
            return build_stage(part_dir(self.out, stage, bucket).parent, part_dir(self.out, stage, bucket).name, fingerprint, build)
        return ensure_part(self.out, stage, bucket, fingerprint, build)

    def stage_build(self, stage: str, force: bool) -> Callable[[Path], dict[str, Any]]:
        """One bucket: build the stage in memory. Several: make sure every bucket's part is built
        (waiting for a bucket job still at it), then link the parts into the stage directory."""
        summarise = STAGE[stage].summarise
        if self.layout.n_buckets == 1:
            part = STAGE[stage].build_part(self.config, self.sources, 0)
            return lambda directory: summarise(self.config, [part(directory)])

        def build(directory: Path) -> dict[str, Any]:
            counts = []
            for bucket in range(self.layout.n_buckets):
                with bucket_lock(self.out, bucket):
                    counts.append(self.part(stage, bucket, force)["stats"])
            link_parts(self.out, stage, STAGE[stage].tables, self.layout, directory)
            return summarise(self.config, counts)

        return build

    @staticmethod
    def build_if_stale(
        parent: Path, name: str, fingerprint: dict[str, Any], build: Callable[[Path], dict[str, Any]],
        force: bool, on_stage_start: StageCallback | None,
    ) -> StageReport:
        if not force and is_current(parent / name, fingerprint):
            return StageReport(name, True, 0.0, read_manifest(parent / name)["stats"])
        if on_stage_start is not None:
            on_stage_start(name)
        started = time.perf_counter()
        manifest = build_stage(parent, name, fingerprint, build)
        return StageReport(name, False, time.perf_counter() - started, manifest["stats"])


def _run_stages(config: PreprocessConfig, force: bool, on_stage_start: StageCallback | None) -> list[StageReport]:
    inputs = input_fingerprints(config)
    plan = Plan(config, choose_layout(config, config.out, inputs), inputs)
    return plan.global_step(force, on_stage_start) + publish_stages(plan, force, on_stage_start)


def publish_stages(
    plan: Plan, force: bool, on_stage_start: StageCallback | None, *, parts_built: bool = False
) -> list[StageReport]:
    """The per-user stages, each from its buckets' parts (built here where missing or forced,
    unless `parts_built`: an engine's tasks have just built or forced them all)."""
    return [
        plan.build_if_stale(plan.out, stage, plan.stage_fingerprint(stage), plan.stage_build(stage, force and not parts_built), force, on_stage_start)
        for stage in PER_USER_STAGES
    ]


def build_bucket(plan: Plan, bucket: int, force: bool, on_stage_start: StageCallback | None = None) -> list[StageReport]:
    """The parts of user bucket `bucket` of every per-user stage, each built unless cached (or
    forced), under the bucket's lock: a second builder of the same bucket waits, then reuses."""
    reports = []
    with bucket_lock(plan.out, bucket):
        for stage in PER_USER_STAGES:
            name = f"{stage} {bucket}/{plan.layout.n_buckets}"
            cached = not force and is_current(part_dir(plan.out, stage, bucket), plan.part_fingerprint(stage, bucket))
            if not cached and on_stage_start is not None:
                on_stage_start(name)
            started = time.perf_counter()
            manifest = plan.part(stage, bucket, force)
            reports.append(StageReport(name, cached, 0.0 if cached else time.perf_counter() - started, manifest["stats"]))
    return reports


def _run_bucket(
    config: PreprocessConfig, force: bool, on_stage_start: StageCallback | None, bucket: int, n_buckets: int
) -> list[StageReport]:
    """The global step (once: sibling jobs wait on the lock and then find it cached), then the
    parts of bucket `bucket` of every per-user stage. --force rebuilds only this bucket's parts,
    so that N forced jobs do not each redo the global step."""
    inputs = input_fingerprints(config)
    plan = Plan(config, Layout(n_buckets), inputs)
    with FileLock(config.out / LOCK_NAME):
        reports = plan.global_step(False, on_stage_start)
    return reports + build_bucket(plan, bucket, force, on_stage_start)


def load_summary(out: Path) -> dict[str, dict[str, Any]]:
    """The stats of every complete stage in a preprocess output directory."""
    if not out.is_dir():
        raise InputError(f"{out}: no such directory; run `sdm preprocess LOGS --out {out}` first")
    summary = {stage: manifest["stats"] for stage in STAGES if (manifest := read_manifest(out / stage)) is not None}
    if not summary:
        raise InputError(f"{out}: not a preprocess output (no stage manifests); run `sdm preprocess LOGS --out {out}`")
    return summary
