"""Tiny hand-written logs, `sdm preprocess` on them, and its output read back in raw ids.

Times in the hand-written logs are unix milliseconds around `BASE_MS`, so that every boundary
(a gap of 10 minutes minus one millisecond, a window of exactly 7 days) can be written exactly.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import polars as pl
import pytest

from helpers.cli import Outcome, invoke

DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"

BASE_MS = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC
SECOND_MS = 1_000
MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
STAGES = ("events", "sessions", "long_term", "splits")
KEEP_ALL_ITEMS = ("--min-item-count", "1")


def write_log(
    path: Path,
    rows: Iterable[Sequence[object]],
    header: Sequence[str] | None = ("user", "item", "time"),
    sep: str = ",",
    newline: str = "\n",
) -> Path:
    """Write rows as delimited text (gzip'd when the name ends in .gz); None is an empty field."""
    lines = [] if header is None else [sep.join(header)]
    lines += [sep.join("" if value is None else str(value) for value in row) for row in rows]
    data = "".join(line + newline for line in lines).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path


def preprocess(logs: Path, out: Path, *options: object) -> Outcome:
    """`sdm preprocess LOGS --out OUT OPTIONS`, which must succeed."""
    outcome = invoke("preprocess", logs, "--out", out, *options)
    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr
    return outcome


def stage_states(stdout: str) -> dict[str, str]:
    """{stage: "cached" | "built"} from the per-stage lines `sdm preprocess` prints."""
    states = {}
    for line in stdout.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in STAGES and words[1] in ("cached", "built"):
            states[words[0]] = words[1]
    return states


def inspect_user(out: Path, user: str) -> dict:
    """`sdm inspect OUT --user USER --json`, parsed."""
    outcome = invoke("inspect", out, "--user", user, "--json")
    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr
    return json.loads(outcome.stdout)


def sessions_of(out: Path, user: str) -> list[list[str]]:
    """The user's sessions as lists of raw item ids, in time order."""
    return [session["items"] for session in inspect_user(out, user)["sessions"]]


def vocabulary(out: Path, name: str) -> dict[int, str]:
    frame = pl.read_parquet(out / "events" / "vocab" / f"{name}.parquet")
    return dict(zip(frame.get_column("id").to_list(), frame.get_column("raw").to_list(), strict=True))


def raw_events(out: Path) -> pl.DataFrame:
    """The kept events in stored order with raw user and item ids: user, item, time (ms)."""
    events = pl.read_parquet(out / "events" / "events.parquet")
    users, items = vocabulary(out, "user"), vocabulary(out, "item")
    return events.select(
        pl.col("user").replace_strict(users, return_dtype=pl.String),
        pl.col("item").replace_strict(items, return_dtype=pl.String),
        "time",
    )


def stats(out: Path, stage: str = "events") -> dict:
    return json.loads((out / stage / "manifest.json").read_text())["stats"]


def snapshot(paths: Iterable[Path]) -> dict[Path, tuple[bytes, int]]:
    """Bytes and modification time of files, to prove they were not touched."""
    return {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in paths}


def stage_frames(out: Path) -> dict[str, pl.DataFrame]:
    """Every Parquet file of a preprocess output, keyed by its path relative to OUT."""
    return {
        str(path.relative_to(out)): pl.read_parquet(path)
        for stage in STAGES
        for path in sorted((out / stage).rglob("*.parquet"))
    }


def require_dataset(folder: str) -> Path:
    path = DATASETS / folder
    if not path.is_dir():
        pytest.skip(f"dataset folder {path} is absent")
    return path
