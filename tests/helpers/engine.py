"""Bucket tasks for the engine tests, one that kills its own worker process and one that meets bad
input, run on Dask workers (which import them from here: a cluster started by the tests has
their sys.path)."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

import pipeline.run
from pipeline.errors import InputError
from pipeline.run import Plan, StageReport, build_bucket

KILLED_BUCKET = 1
MARKER = "killed-worker"  # next to OUT: the process id of the worker that died


def build_bucket_dying_once(plan: Plan, bucket: int, force: bool) -> list[StageReport]:
    """Bucket KILLED_BUCKET's first attempt kills its worker process (SIGKILL) in the middle of
    writing the bucket's long-term part, after its sessions part is complete; every other
    attempt is the real build."""
    marker = plan.out.parent / MARKER
    if bucket == KILLED_BUCKET and not marker.exists():
        marker.write_text(str(os.getpid()))
        # in this worker process only, which dies with it
        pipeline.run.STAGE["long_term"] = replace(pipeline.run.STAGE["long_term"], build_part=dying_part)
    return build_bucket(plan, bucket, force)


def dying_part(*_: object) -> pipeline.run.PartBuild:
    def build(directory: Path) -> dict:
        (directory / "long_term.parquet").write_bytes(b"PAR1 half a file")
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable: the process is dead")

    return build


ATTEMPTS = "attempts"  # next to OUT: one line per attempt of a bucket task


def build_bucket_refusing_bucket_0(plan: Plan, bucket: int, force: bool) -> list[StageReport]:
    """Bucket 0 is bad input, as a bucket of a malformed log would be; each attempt is counted."""
    if bucket != 0:
        return build_bucket(plan, bucket, force)
    with open(plan.out.parent / ATTEMPTS, "a") as attempts:
        attempts.write(f"{os.getpid()}\n")
    raise InputError("bucket 0: bad input")
