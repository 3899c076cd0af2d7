"""Two writers on one output directory, and Ctrl-C (issue 8).

A second `sdm preprocess` or `sdm train` on an --out that another process is writing stops at
once with one line and exit code 2, touching nothing; Ctrl-C stops a run with one line (exit
code 130, no traceback) and leaves it resumable: the rerun, or `--resume`, reaches exactly the
uninterrupted result.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cli.app import EXIT_INTERRUPTED, INTERRUPTED_MESSAGE
from helpers.cli import run_sdm
from helpers.logs import snapshot
from helpers.processes import (
    LOCK,
    PREPROCESS_ARGS,
    PREPROCESS_FILES,
    TRAIN_ARGS,
    assert_same_output,
    assert_same_run,
    copy_without_lock,
    signal_after_start,
    start_sdm,
    train_args,
    TrainReference,
)
from sdm.training.checkpoint import LAST, interrupts_deferred

HOLD_LOCK = "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(120)"


def files(directory: Path) -> list[Path]:
    return [path for path in directory.rglob("*") if path.is_file() and path.name != LOCK]


def assert_one_line(stderr: str, *words: str) -> None:
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    for word in words:
        assert word in stderr, (word, stderr)


def test_second_preprocess_on_a_locked_out_stops_and_changes_nothing(preprocess_reference, tmp_path: Path) -> None:
    out = copy_without_lock(preprocess_reference[0], tmp_path / "out")
    before = snapshot(files(out))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        outcome = run_sdm("preprocess", PREPROCESS_FILES["logs"], "--out", out, *PREPROCESS_ARGS, "--force")
    finally:
        holder.kill()
        holder.wait()
    assert outcome.exit_code == 2, outcome.output
    assert_one_line(outcome.stderr, str(out), "another sdm process")
    assert snapshot(files(out)) == before
    rerun = run_sdm("preprocess", PREPROCESS_FILES["logs"], "--out", out, *PREPROCESS_ARGS, "--force")
    assert rerun.exit_code == 0, rerun.output
    assert_same_output(out, preprocess_reference[0])


def test_ctrl_c_stops_preprocess_with_one_line_and_the_rerun_completes(preprocess_reference, tmp_path: Path) -> None:
    reference, seconds = preprocess_reference
    for attempt, fraction in enumerate((0.3, 0.1, 0.0)):  # until the signal finds the process at work
        out = tmp_path / f"out{attempt}"
        process = start_sdm("preprocess", PREPROCESS_FILES["logs"], "--out", out, *PREPROCESS_ARGS)
        if signal_after_start(process, out, fraction * seconds, signal.SIGINT):
            break
    else:
        pytest.fail("preprocess finished before every Ctrl-C")
    assert process.returncode == EXIT_INTERRUPTED
    assert_one_line(process.stderr.read(), INTERRUPTED_MESSAGE)
    rerun = run_sdm("preprocess", PREPROCESS_FILES["logs"], "--out", out, *PREPROCESS_ARGS)
    assert rerun.exit_code == 0, rerun.output
    assert_same_output(out, reference)


def test_second_train_is_refused_and_ctrl_c_leaves_a_resumable_run(
    train_reference: TrainReference, tiny_data: Path, tmp_path: Path
) -> None:
    """One real training process: a second `sdm train` on its --out (with or without --resume)
    is refused while it runs; then Ctrl-C mid-training; then --resume ends as the uninterrupted run."""
    run = tmp_path / "run"
    process = start_sdm(*train_args(tiny_data, run))
    try:
        deadline = time.monotonic() + 120
        while not (run / LOCK).exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        for extra in ([], ["--resume"]):
            second = run_sdm("train", "--data", tiny_data, "--out", run, *TRAIN_ARGS, *extra)
            assert second.exit_code == 2, second.output
            assert_one_line(second.stderr, str(run), "another sdm process")
        while not (run / LAST).is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == EXIT_INTERRUPTED, "training ended before Ctrl-C reached it"
    assert_one_line(process.stderr.read(), INTERRUPTED_MESSAGE)
    resumed = run_sdm("train", "--data", tiny_data, "--out", run, *TRAIN_ARGS, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_same_run(run, train_reference.run)


def test_ctrl_c_while_an_epoch_is_saved_acts_once_the_save_is_done() -> None:
    """An epoch is saved in two files (last.pt, history.json): a Ctrl-C between them left a run
    whose history.json was missing or an epoch behind. The interrupt now waits for the save."""
    assert threading.current_thread() is threading.main_thread(), "signals reach the main thread only"
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in `sdm train`, whatever the runner set
    steps = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler has run by now: without the deferral the block ends here
                steps.append("saved")
        assert steps == ["saved"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outside)
