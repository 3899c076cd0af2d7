"""Running `sdm` as a real process and comparing what it leaves with an uninterrupted run: shared by
the kill harness (test_kills.py) and the lock and Ctrl-C tests (test_concurrency.py), whose
uninterrupted reference runs are session fixtures in conftest.py.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.cache import MANIFEST
from pipeline.config import PreprocessConfig
from pipeline.run import run_preprocess
from sdm.training.checkpoint import BEST, CONFIG, HISTORY, LAST, load_checkpoint
from sdm.training.train import TrainConfig
from helpers.cli import child_env
from helpers.training import TEST_THREADS, TrainedRun, states_equal, train_recording, without_timing

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data"
LOCK = ".sdm.lock"
# `sdm` as the console script runs it, from this checkout.
SDM = [sys.executable, "-c", "import sys; from cli.app import main; sys.argv[0] = 'sdm'; main()"]
# Tiny training, so that one run takes a few seconds: most of it is spent in epochs and checkpoints.
TRAIN_EPOCHS = 4
TRAIN_OPTIONS = {"epochs": TRAIN_EPOCHS, "patience": TRAIN_EPOCHS, "dim": 8, "heads": 2, "lstm_layers": 1,
                 "batch_size": 64, "threads": TEST_THREADS, "seed": 5}
PREPROCESS_FILES = {"logs": SAMPLE / "events.csv", "items": SAMPLE / "items.csv", "users": SAMPLE / "users.csv"}


def option_args(options: dict[str, object]) -> list[str]:
    return [arg for name, value in options.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


TRAIN_ARGS = [*option_args(TRAIN_OPTIONS), "--quiet"]
PREPROCESS_ARGS = ["--items", str(PREPROCESS_FILES["items"]), "--users", str(PREPROCESS_FILES["users"])]


def start_sdm(*args: object) -> subprocess.Popen:
    """`sdm ARGS` in a child process (Ctrl-C restored to its default, which a shell may have
    ignored for background jobs)."""
    return subprocess.Popen(
        [*SDM, *map(str, args)], cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def signal_after_start(process: subprocess.Popen, directory: Path, delay: float, signum: int = signal.SIGKILL) -> bool:
    """Send `signum` `delay` seconds after the process took its lock in `directory` (its work
    begins there); True when the signal reached a running process."""
    deadline = time.monotonic() + 120
    while not (directory / LOCK).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    if process.poll() is not None:
        return False
    process.send_signal(signum)
    process.wait(timeout=60)
    return True


def copy_without_lock(source: Path, target: Path) -> Path:
    """A copy of an output directory for the next attempt; without the lock file, so that its
    appearance marks the moment the next process starts work."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(LOCK))
    return target


def visible_files(directory: Path) -> list[str]:
    """Files below `directory` by relative path; hidden entries (the lock, temporaries) are left out."""
    return sorted(
        str(path.relative_to(directory)) for path in directory.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )


def assert_same_file(actual: Path, expected: Path) -> None:
    if expected.suffix == ".parquet":
        assert pl.read_parquet(actual).equals(pl.read_parquet(expected)), actual
    elif expected.suffix == ".json":
        assert json.loads(actual.read_text()) == json.loads(expected.read_text()), actual
    else:
        assert actual.read_bytes() == expected.read_bytes(), actual


def assert_complete_or_absent(out: Path, reference: Path) -> list[str]:
    """Every directory with a manifest (a stage, or a cached bucket part) holds exactly the
    reference's files, each readable and equal; a stage directory without a manifest is an
    error. Returns the complete directories."""
    complete = []
    for manifest in sorted(out.rglob(MANIFEST)):
        directory = manifest.parent
        relative = directory.relative_to(out)
        if any(part.startswith(".") for part in relative.parts):
            continue  # a temporary directory: invisible to every reader, removed by the next run
        assert visible_files(directory) == visible_files(reference / relative), relative
        for name in visible_files(directory):
            assert_same_file(directory / name, reference / relative / name)
        complete.append(str(relative))
    for stage in ("events", "sessions", "long_term", "splits"):
        assert not (out / stage).exists() or (out / stage / MANIFEST).is_file(), f"{stage} without a manifest"
    return complete


def assert_same_output(out: Path, reference: Path) -> None:
    assert visible_files(out) == visible_files(reference)
    for name in visible_files(reference):
        assert_same_file(out / name, reference / name)
    leftovers = [path.name for path in out.iterdir() if path.name.startswith(".") and path.name != LOCK]
    assert leftovers == [], leftovers


def uninterrupted_preprocess(out: Path) -> tuple[Path, float]:
    """An uninterrupted preprocess of the sample data, and how long its work took in-process."""
    started = time.perf_counter()
    run_preprocess(PreprocessConfig(out=out, **PREPROCESS_FILES))
    return out, time.perf_counter() - started


@dataclass
class TrainReference:
    run: TrainedRun
    seconds: float  # the in-process run's duration (loading data, all epochs)


def uninterrupted_training(data: Path, out: Path) -> TrainReference:
    started = time.perf_counter()
    run = train_recording(TrainConfig(data=str(data), out=str(out), **TRAIN_OPTIONS))
    assert len(run.history) == TRAIN_EPOCHS
    return TrainReference(run, time.perf_counter() - started)


def assert_checkpoints_are_true(run: Path, reference: TrainedRun) -> None:
    """Whatever a killed run left is a state the uninterrupted run went through: config.json as
    the reference's, last.pt the model, history and counters after its epoch, best.pt the model of
    an epoch up to one later, history.json the history of last.pt's epoch or the one before."""
    expected_history = without_timing(reference.history)
    if (run / CONFIG).is_file():
        saved, original = (json.loads(path.read_text()) for path in (run / CONFIG, reference.path / CONFIG))
        assert {**saved, "train": {**saved["train"], "out": ""}} == {**original, "train": {**original["train"], "out": ""}}
    last_epoch = -1
    if (run / LAST).is_file():
        last = load_checkpoint(run / LAST)
        last_epoch = last["epoch"]
        assert states_equal(last["model"], reference.snapshots[last_epoch].model)
        assert without_timing(json.loads(last["history"])) == expected_history[: last_epoch + 1]
    if (run / BEST).is_file():
        best = load_checkpoint(run / BEST)
        assert best["epoch"] <= last_epoch + 1
        assert states_equal(best["model"], reference.snapshots[best["epoch"]].model)
    if (run / HISTORY).is_file():
        history = without_timing(json.loads((run / HISTORY).read_text())["epochs"])
        assert len(history) in (last_epoch, last_epoch + 1) and history == expected_history[: len(history)]


def assert_same_run(run: Path, reference: TrainedRun) -> None:
    assert visible_files(run) == visible_files(reference.path)
    for name in (LAST, BEST):
        assert states_equal(load_checkpoint(run / name)["model"], load_checkpoint(reference.path / name)["model"]), name
    assert without_timing(json.loads((run / HISTORY).read_text())["epochs"]) == without_timing(reference.history)
    leftovers = [path.name for path in run.iterdir() if path.name.startswith(".") and path.name != LOCK]
    assert leftovers == [], leftovers


def train_args(data: Path, run: Path) -> Sequence[object]:
    """`sdm train` continuing whatever `run` holds: --resume once config.json exists."""
    return ("train", "--data", data, "--out", run, *TRAIN_ARGS, *(["--resume"] if (run / CONFIG).is_file() else []))
