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
import signal
import threading
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
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C waits for the block to end, then acts as it would have: an epoch that finished is
    saved whole (last.pt and history.json), not cut off between the two files."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread receives signals
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, None)


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


# What each checkpoint file holds (sdm/training/train.py: save_epoch), and the type of each entry; a file
# without these is not ours. (last.pt records the run's config since issue 17; older ones do not.)
CHECKPOINT_KEYS = {
    LAST: {"model", "optimizer", "epoch", "history", "best_value", "bad_epochs"},
    BEST: {"model", "epoch", "config"},
}
ENTRY_TYPES = {"model": dict, "optimizer": dict, "epoch": int, "history": str, "best_value": (int, float), "bad_epochs": int, "config": str}
JSON_ENTRIES = ("history", "config")
# What must match between a checkpoint's recorded run config and RUN/config.json for the
# checkpoint to be this run's: everything but what a run may change (moved, given more epochs).
SAME_RUN_KEYS = ("model", "catalogue", "data_fingerprint")
FREE_OPTIONS = ("epochs", "out")  # a run may be moved, or given more epochs
# Options added since 0.2.0: a run recorded before one existed is compared without it (what the
# option changes is checked where it is resolved).
ADDED_TRAIN_OPTIONS = ("exclude_seen",)
RETRAIN = "restore the run's own file, or retrain into a new --out"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Tensors and plain containers only (weights_only): a pickle payload is refused, never run.
    A best.pt or last.pt without its keys (another program's file, or a best.pt renamed last.pt),
    or with an entry of the wrong type, is refused with one line."""
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise InputError(f"{path}: refused to load: not a plain checkpoint ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable checkpoint ({type(error).__name__}); {RETRAIN}") from None
    missing = CHECKPOINT_KEYS.get(path.name, {"model"}) - set(state if isinstance(state, dict) else ())
    if missing:
        raise InputError(f"{path}: not a checkpoint sdm train wrote (no {', '.join(sorted(missing))}); retrain, or resume from the run's own files")
    for key, expected in ENTRY_TYPES.items():
        if key in state and (not isinstance(state[key], expected) or isinstance(state[key], bool) or not valid_json(state[key], key)):
            raise InputError(f"{path}: not a checkpoint sdm train wrote ({key} is a {type(state[key]).__name__}); {RETRAIN}")
    return state


def valid_json(value: Any, key: str) -> bool:
    if key not in JSON_ENTRIES:
        return True
    try:
        return isinstance(json.loads(value), dict if key == "config" else list)
    except ValueError:
        return False


def check_same_run(state: dict[str, Any], path: Path, run_config: dict[str, Any]) -> None:
    """A checkpoint that records another run's config (other data, vocabularies, model or options:
    a file copied from another run directory) is refused."""
    if "config" not in state:
        return  # a last.pt from before checkpoints recorded their run
    recorded = json.loads(state["config"])
    same = same_options(recorded.get("train") or {}, run_config.get("train") or {})
    differs = [key for key in SAME_RUN_KEYS if recorded.get(key) != run_config.get(key)] + ["train"] * (not same)
    if differs:
        raise InputError(f"{path}: a checkpoint of another run (its {', '.join(differs)} differ from {path.parent / CONFIG}); {RETRAIN}")


def same_options(recorded: dict[str, Any], given: dict[str, Any]) -> bool:
    """Whether two records of training options are one run's, FREE_OPTIONS and options one of them
    predates aside."""
    skipped = {*FREE_OPTIONS, *(name for name in ADDED_TRAIN_OPTIONS if name not in recorded or name not in given)}
    return {k: v for k, v in recorded.items() if k not in skipped} == {k: v for k, v in given.items() if k not in skipped}


def restore(module: Any, state: dict[str, Any], path: Path, key: str = "model") -> None:
    """module.load_state_dict(state[key]), with weights or optimiser state of another shape (another
    run's file) refused with one line."""
    try:
        module.load_state_dict(state[key])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
        reason = str(error).strip().splitlines()[0]
        raise InputError(f"{path}: its {key} does not fit the run in {path.parent / CONFIG} ({reason}); {RETRAIN}") from None


def read_run_config(run: Path) -> dict[str, Any]:
    """RUN/config.json, checked to hold what its readers use: the training options (with the data
    directory and model), the model config, the catalogue's sizes and the data's fingerprint."""
    try:
        config = json.loads((run / CONFIG).read_text())
    except FileNotFoundError:
        raise InputError(f"{run}: not a run directory (no {CONFIG}); train one with `sdm train --data DIR --out {run}`") from None
    except (OSError, ValueError) as error:
        raise InputError(f"{run / CONFIG}: unreadable ({error}); {RETRAIN}") from None
    expected = {"train": dict, "model": dict, "catalogue": dict, "data_fingerprint": str}
    wrong = [key for key, kind in expected.items() if not isinstance(config, dict) or not isinstance(config.get(key), kind)]
    train = config.get("train") if isinstance(config, dict) else None
    wrong += [f"train.{key}" for key in ("data", "model") if isinstance(train, dict) and not isinstance(train.get(key), str)]
    if wrong:
        raise InputError(f"{run / CONFIG}: not the {CONFIG} sdm train writes (no valid {', '.join(wrong)}); {RETRAIN}")
    return config


def read_history(run: Path) -> list[dict[str, Any]]:
    """RUN/history.json's epochs (empty when there is none), each checked to hold its numbers."""
    path = run / HISTORY
    if not path.is_file():
        return []
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: unreadable ({type(error).__name__}); {RETRAIN}") from None
    epochs = document.get("epochs") if isinstance(document, dict) else None
    numbers = ("epoch", "loss", "seconds")
    if not isinstance(epochs, list) or not all(
        isinstance(entry, dict) and all(is_number(entry.get(key)) for key in numbers)
        and isinstance(entry.get("valid"), dict) and all(map(is_number, entry["valid"].values()))
        for entry in epochs
    ):
        raise InputError(f"{path}: not the {HISTORY} sdm train writes (epochs of {', '.join(numbers)} and valid metrics); {RETRAIN}")
    return epochs


def read_metrics(path: Path) -> dict[str, float]:
    """The metrics of a RUN/metrics-<split>.json that `sdm evaluate` wrote, checked to be numbers."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: unreadable ({type(error).__name__}); rerun `sdm evaluate` to rewrite it") from None
    metrics = document.get("metrics") if isinstance(document, dict) else None
    if not isinstance(metrics, dict) or not all(map(is_number, metrics.values())):
        raise InputError(f"{path}: not the metrics sdm evaluate writes; rerun `sdm evaluate` to rewrite it")
    return metrics


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def write_run_json(run: Path, name: str, payload: dict[str, Any] | list[Any]) -> None:
    write_json_atomic(run / name, payload if isinstance(payload, dict) else {"epochs": payload})
