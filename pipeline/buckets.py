"""User buckets: the per-user stages built one slice of users at a time.

Sessions, long-term sets and splits only ever look at one user's events, so users are hashed into
N buckets and every bucket is built on its own, in memory that shrinks with N. Only the global
steps (dictionaries, filters, vocabularies) see every event, and those are streaming aggregations.

Layout. With one bucket (the in-memory fast path) a table is one file, `OUT/<stage>/<table>.parquet`.
With N > 1 it is a directory of N files, `OUT/<stage>/<table>.parquet/part-00007.parquet` for
bucket 7, which `pl.read_parquet` and `pl.scan_parquet` read as one table (files in name order).
Every value is the same for any N; only the order of rows differs (bucket by bucket).

The number of buckets is the smallest N for which one bucket's share of the events fits the
memory limit at the measured peak cost per event:

    N = ceil(rows * TYPED_EVENT_BYTES * PEAK_OVERHEAD / memory_limit)

TYPED_EVENT_BYTES is the width of a row of the typed events table (events.EVENT_SCHEMA, 32 bytes)
and PEAK_OVERHEAD the peak RSS of a one-bucket `sdm preprocess` divided by the size of its typed
events table, measured on `sdm synth` logs with items and users files (benchmarks/preprocess.py).
`rows` counts input rows, before any filter, so N errs on the safe side.

Bucket builds. A bucket of a per-user stage is cached on its own in `OUT/buckets/<stage>/part-K`,
built atomically by cache.build_stage with a fingerprint of its parameters, its upstream
manifests and "K/N"; a stage is then published by hard-linking its N parts into the stage
directory (no copy). `sdm preprocess ... --bucket K/N` builds the global step and bucket K only,
so that buckets can run as separate jobs; a final run without --bucket finds them cached.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from filelock import FileLock

from pipeline.cache import build_stage, is_current, read_manifest
from pipeline.errors import InputError

TYPED_EVENT_BYTES = 32  # user u32, item u32, time i64, session_key u64, behavior u32, order u32
PEAK_OVERHEAD = 6.0  # peak RSS / typed events table: 3.9 for one bucket at 10M events, kept high for the global step
BUCKETS_DIR = "buckets"
PART_NAME = "part-{:05d}"


def bucket_count(rows: int, memory_limit: int) -> int:
    """The number of user buckets for `rows` input rows under `memory_limit` bytes (rule above)."""
    return max(1, math.ceil(rows * TYPED_EVENT_BYTES * PEAK_OVERHEAD / memory_limit))


def bucket_of(user_codes: pl.Expr, n_buckets: int) -> pl.Expr:
    """The bucket of each event from its user's 64-bit hash (rows without a user go to bucket 0)."""
    return (user_codes % n_buckets).fill_null(0).cast(pl.UInt32)


def parse_bucket(text: str) -> tuple[int, int]:
    """'3/8' -> (3, 8): bucket 3 of 8, counted from 0."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match.group(1)) < int(match.group(2)) or int(match.group(2)) < 2:
        raise InputError(f"--bucket {text!r}: expected K/N with 0 <= K < N and N >= 2, e.g. 3/8")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class Layout:
    """Where bucket `k` of a table lives in a stage directory."""

    n_buckets: int

    def table(self, directory: Path, name: str, bucket: int) -> Path:
        if self.n_buckets == 1:
            return directory / f"{name}.parquet"
        return directory / f"{name}.parquet" / f"{PART_NAME.format(bucket)}.parquet"

    def write(self, frame: pl.DataFrame, directory: Path, name: str, bucket: int) -> None:
        write_table(frame, self.table(directory, name, bucket))


# Stage tables are a cache the next stage reads back straight away: zstd's fastest level writes
# them in about 60% of the time of polars' default level, for files 2-3% larger (each table of
# a 2M-event log; reading is as fast).
PARQUET_COMPRESSION = {"compression": "zstd", "compression_level": 1}


def write_table(frame: pl.DataFrame, path: Path) -> None:
    """A stage table (or a bucket's part of one), with the statistics that filtered scans use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path, statistics=True, **PARQUET_COMPRESSION)


def part_dir(out: Path, stage: str, bucket: int) -> Path:
    return out / BUCKETS_DIR / stage / PART_NAME.format(bucket)


def bucket_lock(out: Path, bucket: int) -> FileLock:
    """Held while a bucket's parts are built: a second builder of the same bucket waits for it."""
    (out / BUCKETS_DIR).mkdir(parents=True, exist_ok=True)
    return FileLock(out / BUCKETS_DIR / f".{PART_NAME.format(bucket)}.lock")


PartBuild = Callable[[Path], dict[str, Any]]


def ensure_part(out: Path, stage: str, bucket: int, fingerprint: dict[str, Any], build: PartBuild) -> dict[str, Any]:
    """The manifest of bucket `bucket` of `stage`, built (tables written as <name>.parquet in the
    part directory) unless a part with this fingerprint is already there."""
    directory = part_dir(out, stage, bucket)
    if is_current(directory, fingerprint):
        return read_manifest(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    return build_stage(directory.parent, directory.name, fingerprint, build)


def link_parts(out: Path, stage: str, tables: tuple[str, ...], layout: Layout, into: Path) -> None:
    """Hard-link every part's tables into a stage directory being built (a copy where the file
    system has no hard links)."""
    for bucket in range(layout.n_buckets):
        for name in tables:
            source = part_dir(out, stage, bucket) / f"{name}.parquet"
            target = layout.table(into, name, bucket)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
