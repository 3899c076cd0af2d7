"""Run directories and checkpoints: written atomically, loaded without executing code.

    RUN/config.json      how the run was made (training options, model config, data, vocab sizes)
    RUN/last.pt          the state after the last completed epoch (what --resume continues from)
    RUN/best.pt          the model of the epoch with the best validation metric
    RUN/history.json     per-epoch loss, throughput and validation metrics
    RUN/metrics-<split>.json   written by `sdm evaluate`
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from pipeline.errors import InputError
from pipeline.storage import ensure_output_dir, write_atomic, write_json_atomic

CONFIG = "config.json"
LAST = "last.pt"
BEST = "best.pt"
HISTORY = "history.json"
LOCK = ".sdm.lock"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """torch.save, atomically: a kill leaves the old file or the new one."""
    write_atomic(path, lambda handle: torch.save(state, handle))


@contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """Hold RUN/.sdm.lock while a run is written: a second `sdm train` on the same --out stops with a
    message instead of interleaving checkpoints. A run directory this call created and nothing was
    written to is removed again."""
    created = ensure_output_dir(run)
    lock = FileLock(run / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise InputError(f"{run}: another sdm process is writing this run; wait for it or use another --out") from None
    for leftover in run.glob(".*.tmp-*"):  # temporary files of a killed save_checkpoint / write_json_atomic
        leftover.unlink(missing_ok=True)
    try:
        yield
    finally:
        lock.release()
        if created and [path.name for path in run.iterdir()] == [LOCK]:
            shutil.rmtree(run, ignore_errors=True)


# What each checkpoint file holds (sdm/train.py: save_epoch); a file without these is not ours.
CHECKPOINT_KEYS = {
    LAST: {"model", "optimizer", "epoch", "history", "best_value", "bad_epochs"},
    BEST: {"model", "epoch", "config"},
}


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Tensors and plain containers only (weights_only): a pickle payload is refused, never run.
    A best.pt or last.pt without its keys (another program's file, or a best.pt renamed last.pt)
    is refused with one line."""
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise InputError(f"{path}: refused to load: not a plain checkpoint ({reason})") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise InputError(f"{path}: not a readable checkpoint ({type(error).__name__})") from None
    missing = CHECKPOINT_KEYS.get(path.name, {"model"}) - set(state if isinstance(state, dict) else ())
    if missing:
        raise InputError(f"{path}: not a checkpoint sdm train wrote (no {', '.join(sorted(missing))}); retrain, or resume from the run's own files")
    return state


def read_run_config(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / CONFIG).read_text())
    except FileNotFoundError:
        raise InputError(f"{run}: not a run directory (no {CONFIG}); train one with `sdm train --data DIR --out {run}`") from None
    except (OSError, ValueError) as error:
        raise InputError(f"{run / CONFIG}: unreadable ({error})") from None


def write_run_json(run: Path, name: str, payload: dict[str, Any] | list[Any]) -> None:
    write_json_atomic(run / name, payload if isinstance(payload, dict) else {"epochs": payload})
