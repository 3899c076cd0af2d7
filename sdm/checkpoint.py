"""Run directories and checkpoints: written atomically, loaded without executing code.

    RUN/config.json      how the run was made (training options, model config, data, vocab sizes)
    RUN/last.pt          the state after the last completed epoch (what --resume continues from)
    RUN/best.pt          the model of the epoch with the best validation metric
    RUN/history.json     per-epoch loss, throughput and validation metrics
    RUN/metrics-<split>.json   written by `sdm evaluate`
"""

from __future__ import annotations

import json
import os
import pickle
import uuid
from pathlib import Path
from typing import Any

import torch

from pipeline.cache import fsync_directory, write_json_atomic
from pipeline.errors import InputError

CONFIG = "config.json"
LAST = "last.pt"
BEST = "best.pt"
HISTORY = "history.json"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file, fsync, rename: a kill leaves the old file or the new one."""
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_directory(path.parent)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Tensors and plain containers only (weights_only): a pickle payload is refused, never run."""
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise InputError(f"{path}: refused to load: not a plain checkpoint ({reason})") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise InputError(f"{path}: not a readable checkpoint ({type(error).__name__})") from None


def read_run_config(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / CONFIG).read_text())
    except FileNotFoundError:
        raise InputError(f"{run}: not a run directory (no {CONFIG}); train one with `sdm train --data DIR --out {run}`") from None
    except (OSError, ValueError) as error:
        raise InputError(f"{run / CONFIG}: unreadable ({error})") from None


def write_run_json(run: Path, name: str, payload: dict[str, Any] | list[Any]) -> None:
    write_json_atomic(run / name, payload if isinstance(payload, dict) else {"epochs": payload})
