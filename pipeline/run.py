"""`sdm preprocess`: run the four stages, reusing each one whose inputs and parameters are unchanged.

Output layout (each stage directory is complete, with its manifest, or absent):

    OUT/events/     events.parquet items.parquet users.parquet vocab/<name>.parquet
    OUT/sessions/   events.parquet (events with session, position) sessions.parquet
    OUT/long_term/  long_term.parquet (one list column per feature)
    OUT/splits/     train.parquet valid.parquet test.parquet
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from filelock import FileLock, Timeout

from pipeline.cache import build_stage, file_digest, is_current, manifest_digest, package_version, read_manifest
from pipeline.config import PreprocessConfig
from pipeline.errors import InputError
from pipeline.events import build_events
from pipeline.long_term import build_long_term, long_term_column
from pipeline.sessions import assign_sessions, summarise_sessions
from pipeline.splits import build_splits

STAGES = ("events", "sessions", "long_term", "splits")
LOCK_NAME = ".sdm.lock"


@dataclass
class StageReport:
    name: str
    cached: bool
    seconds: float
    stats: dict[str, Any]


StageCallback = Callable[[str], None]


def make_output_dir(out: Path) -> bool:
    """Create --out if needed; True when this run created it."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: the output path is a file; choose a directory with --out")
    if out.is_dir():
        return False
    try:
        out.mkdir(parents=True)
    except OSError as error:
        raise InputError(f"{out}: cannot create the output directory ({error.strerror})") from None
    return True


def input_fingerprints(config: PreprocessConfig) -> dict[str, str | None]:
    return {
        name: (file_digest(path) if path is not None else None)
        for name, path in (("logs", config.logs), ("items", config.items), ("users", config.users))
    }


def _write(frame: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path, statistics=True)


def events_stage(config: PreprocessConfig) -> Callable[[Path], dict[str, Any]]:
    def build(directory: Path) -> dict[str, Any]:
        tables = build_events(config)
        _write(tables.events, directory / "events.parquet")
        _write(tables.items, directory / "items.parquet")
        _write(tables.users, directory / "users.parquet")
        for name, vocabulary in tables.vocabularies.items():
            _write(vocabulary, directory / "vocab" / f"{name}.parquet")
        return {
            **tables.stats,
            "side_features": tables.side_features,
            "profile_fields": tables.profile_fields,
            "time_min_ms": int(tables.events.get_column("time").min()),
            "time_max_ms": int(tables.events.get_column("time").max()),
        }

    return build


def sessions_stage(config: PreprocessConfig, out: Path) -> Callable[[Path], dict[str, Any]]:
    def build(directory: Path) -> dict[str, Any]:
        events = pl.read_parquet(out / "events" / "events.parquet")
        session_events = assign_sessions(events, config.session_gap_ms, config.max_session_length)
        sessions = summarise_sessions(session_events)
        _write(session_events, directory / "events.parquet")
        _write(sessions, directory / "sessions.parquet")
        return {"sessions": sessions.height, "mean_session_length": float(sessions.get_column("length").mean())}

    return build


def long_term_stage(config: PreprocessConfig, out: Path) -> Callable[[Path], dict[str, Any]]:
    def build(directory: Path) -> dict[str, Any]:
        side_features = read_manifest(out / "events")["stats"]["side_features"]
        long_term = build_long_term(
            pl.read_parquet(out / "sessions" / "events.parquet"),
            pl.read_parquet(out / "sessions" / "sessions.parquet"),
            pl.read_parquet(out / "events" / "items.parquet"),
            side_features,
            config.long_window_ms,
            config.max_long,
        )
        _write(long_term, directory / "long_term.parquet")
        features = ["item", *side_features]
        return {
            "features": features,
            **{
                f"mean_long_{feature}": float(long_term.get_column(long_term_column(feature)).list.len().mean())
                for feature in features
            },
        }

    return build


def splits_stage(config: PreprocessConfig, out: Path) -> Callable[[Path], dict[str, Any]]:
    def build(directory: Path) -> dict[str, Any]:
        splits = build_splits(
            pl.read_parquet(out / "sessions" / "events.parquet"),
            pl.read_parquet(out / "sessions" / "sessions.parquet"),
            config,
        )
        for name, frame in splits.items():
            _write(frame, directory / f"{name}.parquet")
        train = splits["train"]
        return {
            "split": config.split,
            "train_sessions": train.height,
            "train_targets": int((train.get_column("items").list.len() - 1).sum() + (train.get_column("next_item") != 0).sum()),
            "valid_cases": splits["valid"].height,
            "test_cases": splits["test"].height,
            "test_targets": int(splits["test"].get_column("targets").list.len().sum()),
        }

    return build


def run_preprocess(
    config: PreprocessConfig, *, force: bool = False, on_stage_start: StageCallback | None = None
) -> list[StageReport]:
    """Build (or reuse) every stage under config.out; return what happened to each."""
    out = config.out
    for path in (config.logs, config.items, config.users):
        if path is not None and not path.is_file():
            raise InputError(f"{path}: no such file")
    created = make_output_dir(out)
    try:
        with FileLock(out / LOCK_NAME, timeout=0):
            return _run_stages(config, force, on_stage_start)
    except Timeout:
        raise InputError(f"{out}: another sdm process is writing this directory; wait for it or use another --out") from None
    except BaseException:
        if created and not any(read_manifest(out / stage) for stage in STAGES):
            shutil.rmtree(out, ignore_errors=True)  # a first run that built nothing leaves nothing
        raise


def _run_stages(config: PreprocessConfig, force: bool, on_stage_start: StageCallback | None) -> list[StageReport]:
    out = config.out
    builders = {
        "events": events_stage(config),
        "sessions": sessions_stage(config, out),
        "long_term": long_term_stage(config, out),
        "splits": splits_stage(config, out),
    }
    upstream = {"events": (), "sessions": ("events",), "long_term": ("events", "sessions"), "splits": ("sessions",)}
    inputs = input_fingerprints(config)
    reports = []
    for stage in STAGES:
        fingerprint = {
            "version": package_version(),
            "params": config.stage_params(stage),
            "inputs": inputs if stage == "events" else {},
            "upstream": {name: manifest_digest(out / name) for name in upstream[stage]},
        }
        if not force and is_current(out / stage, fingerprint):
            reports.append(StageReport(stage, True, 0.0, read_manifest(out / stage)["stats"]))
            continue
        if on_stage_start is not None:
            on_stage_start(stage)
        started = time.perf_counter()
        manifest = build_stage(out, stage, fingerprint, builders[stage])
        reports.append(StageReport(stage, False, time.perf_counter() - started, manifest["stats"]))
    return reports


def load_summary(out: Path) -> dict[str, dict[str, Any]]:
    """The stats of every complete stage in a preprocess output directory."""
    if not out.is_dir():
        raise InputError(f"{out}: no such directory; run `sdm preprocess LOGS --out {out}` first")
    summary = {stage: manifest["stats"] for stage in STAGES if (manifest := read_manifest(out / stage)) is not None}
    if not summary:
        raise InputError(f"{out}: not a preprocess output (no stage manifests); run `sdm preprocess LOGS --out {out}`")
    return summary
