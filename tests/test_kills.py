"""SIGKILL at random moments (issue 8): `sdm preprocess` and `sdm train` are killed as real
processes at seeded random moments while they work. After every kill nothing may look complete
that is not (a stage with a manifest holds exactly the uninterrupted run's files; a checkpoint
that loads holds exactly the uninterrupted run's state at its epoch), and the next run (the same
command, or `--resume`) must end with output identical to an uninterrupted run.

The killed process starts from a fresh output directory, from a complete one rebuilt with
--force (preprocess), or from what the previous kill left (so that kills also land in runs that
continue a killed one). The full harness (20 kills each) is marked slow; a quick variant with 3
kills each runs in the default suite.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import polars as pl
import pytest

from helpers.cli import run_sdm
from helpers.training import states_equal
from helpers.processes import (
    LOCK,
    PREPROCESS_ARGS,
    PREPROCESS_FILES,
    assert_checkpoints_are_true,
    assert_complete_or_absent,
    assert_same_output,
    assert_same_run,
    copy_without_lock,
    signal_after_start,
    start_sdm,
    train_args,
    TrainReference,
    visible_files,
)
from sdm.training.checkpoint import HISTORY, LAST, load_checkpoint


QUICK_KILLS, FULL_KILLS = 3, 20


# --- preprocess -------------------------------------------------------------------------------------


def kill_preprocess_repeatedly(kills: int, seed: int, work: Path, reference: Path, seconds: float) -> int:
    rng = random.Random(seed)
    landed, attempts, previous_kill = 0, 0, None
    while landed < kills:
        attempts += 1
        assert attempts <= 4 * kills, f"only {landed} of {attempts} kills landed while the process worked"
        out = work / f"attempt{attempts}"
        start = rng.choice(["fresh", "force", "after-kill"] if previous_kill else ["fresh", "force"])
        extra: list[str] = []
        if start == "force":
            copy_without_lock(reference, out)
            extra = ["--force"]
        elif start == "after-kill":
            copy_without_lock(previous_kill, out)
        process = start_sdm("preprocess", PREPROCESS_FILES["logs"], "--out", out, *PREPROCESS_ARGS, *extra)
        if not signal_after_start(process, out, rng.uniform(0, 1.3 * seconds)):
            assert process.returncode == 0, process.stderr.read()
            continue
        landed += 1
        if out.exists():
            assert_complete_or_absent(out, reference)
            previous_kill = copy_without_lock(out, work / f"killed{landed}")
        outcome = run_sdm("preprocess", PREPROCESS_FILES["logs"], "--out", out, *PREPROCESS_ARGS)
        assert outcome.exit_code == 0, outcome.output
        assert_same_output(out, reference)
        shutil.rmtree(out)
    return landed


def test_preprocess_survives_sigkill_quick(preprocess_reference: tuple[Path, float], tmp_path: Path) -> None:
    assert kill_preprocess_repeatedly(QUICK_KILLS, 0, tmp_path, *preprocess_reference) == QUICK_KILLS


@pytest.mark.slow
@pytest.mark.parametrize("kills", [FULL_KILLS])
def test_preprocess_survives_sigkill(preprocess_reference: tuple[Path, float], tmp_path: Path, kills: int) -> None:
    assert kill_preprocess_repeatedly(kills, 1, tmp_path, *preprocess_reference) == kills


# --- train ------------------------------------------------------------------------------------------


def kill_train_repeatedly(kills: int, seed: int, work: Path, data: Path, reference: TrainReference) -> int:
    rng = random.Random(seed)
    landed, attempts, previous_kill = 0, 0, None
    while landed < kills:
        attempts += 1
        assert attempts <= 4 * kills, f"only {landed} of {attempts} kills landed while training"
        run = work / f"attempt{attempts}"
        if previous_kill is not None and rng.random() < 0.5:
            copy_without_lock(previous_kill, run)
        process = start_sdm(*train_args(data, run))
        if not signal_after_start(process, run, rng.uniform(0, 1.3 * reference.seconds)):
            assert process.returncode == 0, process.stderr.read()
            continue
        landed += 1
        if run.exists():
            assert_checkpoints_are_true(run, reference.run)
            previous_kill = copy_without_lock(run, work / f"killed{landed}")
        outcome = run_sdm(*train_args(data, run))
        assert outcome.exit_code == 0, outcome.output
        assert_same_run(run, reference.run)
        shutil.rmtree(run)
    return landed


@pytest.mark.slow  # over the 5-minute budget of the default suite; python -m pytest -m slow
def test_train_survives_sigkill_quick(train_reference: TrainReference, tiny_data: Path, tmp_path: Path) -> None:
    assert kill_train_repeatedly(QUICK_KILLS, 0, tmp_path, tiny_data, train_reference) == QUICK_KILLS


@pytest.mark.slow
@pytest.mark.parametrize("kills", [FULL_KILLS])
def test_train_survives_sigkill(train_reference: TrainReference, tiny_data: Path, tmp_path: Path, kills: int) -> None:
    assert kill_train_repeatedly(kills, 1, tmp_path, tiny_data, train_reference) == kills


def test_resume_repairs_a_history_left_an_epoch_behind(train_reference: TrainReference, tiny_data: Path, tmp_path: Path) -> None:
    """The narrowest window of a kill: after last.pt of the final epoch, before history.json. The
    run is complete in last.pt; --resume has no epoch left to train but must still write the
    history out (it once left history.json an epoch short)."""
    run = copy_without_lock(train_reference.run.path, tmp_path / "run")
    history = json.loads((run / HISTORY).read_text())
    (run / HISTORY).write_text(json.dumps({"epochs": history["epochs"][:-1]}))
    outcome = run_sdm(*train_args(tiny_data, run))
    assert outcome.exit_code == 0, outcome.output
    assert_same_run(run, train_reference.run)


# --- a full disk, an unwritable output ------------------------------------------------------------


def files_of(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in visible_files(directory)}


def write_into_dev_full(original):
    """A Parquet writer whose bytes go to /dev/full: the real error of a full disk."""
    return lambda self, path, *args, **kwargs: original(self, "/dev/full", *args, **kwargs)


def read_only_mkdir(original):
    def mkdir(self: Path, *args, **kwargs) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    return mkdir


@pytest.mark.parametrize(
    ("target", "replacement", "reason"),
    [
        ((pl.DataFrame, "write_parquet"), write_into_dev_full, "No space left on device"),
        ((pl.LazyFrame, "sink_parquet"), write_into_dev_full, "No space left on device"),
        ((Path, "mkdir"), read_only_mkdir, "Read-only file system"),
    ],
    ids=["full-disk", "full-disk-streaming", "read-only"],
)
def test_unwritable_preprocess_output_is_one_line_and_keeps_the_old_outputs(
    preprocess_reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target, replacement, reason: str
) -> None:
    reference = preprocess_reference[0]
    out = copy_without_lock(reference, tmp_path / "out")
    before = files_of(out)
    with monkeypatch.context() as patched:
        patched.setattr(*target, replacement(getattr(*target)))
        outcome = run_sdm("preprocess", PREPROCESS_FILES["logs"], "--out", out, *PREPROCESS_ARGS, "--force")
    if target == (pl.LazyFrame, "sink_parquet") and outcome.exit_code == 0:
        pytest.skip("preprocess writes nothing with sink_parquet")
    assert outcome.exit_code == 2, outcome.output
    message = outcome.stderr.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    assert reason in message and str(out) in message, message
    assert files_of(out) == before
    assert [path.name for path in out.iterdir() if path.name.startswith(".") and path.name != LOCK] == []
    assert run_sdm("preprocess", PREPROCESS_FILES["logs"], "--out", out, *PREPROCESS_ARGS).exit_code == 0
    assert_same_output(out, reference)


def test_full_disk_during_training_keeps_the_last_checkpoint(
    train_reference: TrainReference, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up after the first epoch's checkpoints: exit 2 with one line naming the
    checkpoint, last.pt still the first epoch's, and --resume (space freed) ends as the uninterrupted run."""
    import pipeline.storage

    checkpoints = []

    def open_until_full(path, mode="r", *args, **kwargs):
        if ".pt." in Path(path).name:  # the temporary file of a checkpoint being saved
            checkpoints.append(path)
        return open("/dev/full" if len(checkpoints) > 2 else path, mode, *args, **kwargs)

    run = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(pipeline.storage, "open", open_until_full, raising=False)
        outcome = run_sdm(*train_args(tiny_data, run))
    assert outcome.exit_code == 2, outcome.output
    message = outcome.stderr.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    assert "No space left on device" in message and str(run) in message, message
    last = load_checkpoint(run / LAST)
    assert last["epoch"] == 0 and states_equal(last["model"], train_reference.run.snapshots[0].model)
    assert [path.name for path in run.iterdir() if ".tmp-" in path.name] == []
    assert run_sdm(*train_args(tiny_data, run)).exit_code == 0
    assert_same_run(run, train_reference.run)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directories(preprocess_reference, train_reference: TrainReference, tiny_data: Path, tmp_path: Path) -> None:
    out = copy_without_lock(preprocess_reference[0], tmp_path / "out")
    run = copy_without_lock(train_reference.run.path, tmp_path / "run")
    (run / LAST).unlink()  # something left to train
    before = {directory: files_of(directory) for directory in (out, run)}
    for directory in (out, *out.rglob("*"), run):
        if directory.is_dir():
            directory.chmod(0o555)
    try:
        outcomes = [
            run_sdm("preprocess", PREPROCESS_FILES["logs"], "--out", out, *PREPROCESS_ARGS, "--force"),
            run_sdm(*train_args(tiny_data, run)),
        ]
    finally:
        for directory in (out, *out.rglob("*"), run):
            if directory.is_dir():
                directory.chmod(0o755)
    for outcome in outcomes:
        assert outcome.exit_code == 2, outcome.output
        assert "Traceback" not in outcome.stderr and len(outcome.stderr.strip().splitlines()) == 1, outcome.stderr
        assert "Permission denied" in outcome.stderr or "ermission" in outcome.stderr, outcome.stderr
    assert {directory: files_of(directory) for directory in (out, run)} == before
