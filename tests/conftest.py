"""Helpers shared by the preprocessing tests: write a tiny log, run `sdm`, read the result back.

Times in the hand-written logs are unix milliseconds around `BASE_MS`, so that every boundary
(a gap of 10 minutes minus one millisecond, a window of exactly 7 days) can be written exactly.
"""

from __future__ import annotations

import os

# As `sdm` itself does (cli.app.main): idle OpenMP threads sleep instead of spinning, which on a
# shared machine made two-thread training several times slower. Set before anything loads torch;
# child `sdm` processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib
import gzip
import io
import json
import sys
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import polars as pl
import pytest
from typer.testing import CliRunner

import cli.app

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"

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


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def invoke(*args: object) -> Outcome:
    """Run the Typer app in-process (fast; an InputError surfaces as an exception, exit code 1)."""
    result = CliRunner().invoke(cli.app.app, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Outcome(result.exit_code, result.stdout, result.stderr)


def run_main(*args: object) -> Outcome:
    """Run the `sdm` entry point (`cli.app.main`) in-process, as the console script does: bad
    input gives exit code 2 and a message on stderr, an escaping exception a traceback."""
    stdout, stderr = io.StringIO(), io.StringIO()
    exit_code = 0
    with (
        mock.patch.object(sys, "argv", ["sdm", *(str(arg) for arg in args)]),
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        try:
            cli.app.main()
        except SystemExit as exit_:
            exit_code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        except Exception:  # escaped main(): the interpreter would print it and exit with 1
            traceback.print_exc()
            exit_code = 1
    return Outcome(exit_code, stdout.getvalue(), stderr.getvalue())


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


# Data and runs shared by the training, evaluation and serving tests, built once per session.
@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training_helpers import preprocess_sample

    return preprocess_sample(tmp_path_factory.mktemp("sample") / "data")


@pytest.fixture(scope="session")
def tiny_log(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from training_helpers import write_tiny_log

    return write_tiny_log(tmp_path_factory.mktemp("tiny_raw"))


@pytest.fixture(scope="session")
def tiny_data(tiny_log: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training_helpers import preprocess_tiny

    return preprocess_tiny(tiny_log, tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def sample_run(sample_data: Path, tmp_path_factory: pytest.TempPathFactory):
    from training_helpers import train_sample_run

    return train_sample_run(sample_data, tmp_path_factory.mktemp("sample_run") / "sdm")


@pytest.fixture(scope="session")
def preprocess_reference(tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted preprocess of the sample data: (output directory, seconds its work took)."""
    from process_harness import uninterrupted_preprocess

    return uninterrupted_preprocess(tmp_path_factory.mktemp("preprocess_reference") / "out")


@pytest.fixture(scope="session")
def train_reference(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted tiny training run (process_harness.TrainReference) on tiny_data."""
    from process_harness import uninterrupted_training

    return uninterrupted_training(tiny_data, tmp_path_factory.mktemp("train_reference") / "run")


@pytest.fixture
def single_thread():
    """One intra-op thread for tests of tiny tensors: a second thread only adds synchronisation,
    which on a busy machine costs more than the work itself."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
