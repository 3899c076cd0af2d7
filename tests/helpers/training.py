"""Shared set-up for the training, evaluation, serving and end-to-end tests: the sample and tiny
data (built once per test session by the fixtures in conftest.py) and small training runs.

The runs are small (dim 16-32, one LSTM layer, a few epochs) so that the whole suite stays fast
on two cores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import torch

from pipeline.config import PreprocessConfig
from pipeline.run import run_preprocess
from pipeline.synth import SynthConfig, write_synth
from sdm.training.checkpoint import HISTORY, LAST, load_checkpoint
from sdm.training.train import EpochReport, TrainConfig, train

REPO = Path(__file__).resolve().parents[2]
SAMPLE_DIR = REPO / "sample_data"
SAMPLE_FILES = {name: SAMPLE_DIR / f"{name}.csv" for name in ("events", "items", "users")}
# The sample data's split, passed explicitly because tests recompute its period boundaries.
SAMPLE_TEST_DAYS, SAMPLE_VALID_DAYS = 1.0, 1.0

# A small synthetic log (about 800 training sessions, 300 items) for the many short runs.
TINY_SYNTH = SynthConfig(n_events=6_000, seed=3)
TINY_TEST_DAYS, TINY_VALID_DAYS = 2.0, 2.0

SMALL_MODEL = {"dim": 16, "heads": 2, "lstm_layers": 1}
TEST_THREADS = 2
SMALL_MODEL_ARGS = ("--dim", "16", "--heads", "2", "--lstm-layers", "1", "--threads", str(TEST_THREADS), "--quiet")
SAMPLE_RUN_EPOCHS = 3
TIMING_FIELDS = ("seconds", "targets_per_second")


def preprocess_sample(out: Path) -> Path:
    run_preprocess(
        PreprocessConfig(
            logs=SAMPLE_FILES["events"], items=SAMPLE_FILES["items"], users=SAMPLE_FILES["users"], out=out,
            test_days=SAMPLE_TEST_DAYS, valid_days=SAMPLE_VALID_DAYS,
        )
    )
    return out


def write_tiny_log(out: Path) -> dict[str, Path]:
    return write_synth(TINY_SYNTH, out)


def preprocess_tiny(raw: dict[str, Path], out: Path, **overrides: Any) -> Path:
    options = {"test_days": TINY_TEST_DAYS, "valid_days": TINY_VALID_DAYS} | overrides
    run_preprocess(PreprocessConfig(logs=raw["events"], items=raw["items"], users=raw["users"], out=out, **options))
    return out


@dataclass
class EpochSnapshot:
    """What the run directory held right after an epoch ended."""

    report: EpochReport
    last_epoch: int  # the "epoch" stored in last.pt (0-based)
    history_length: int  # entries in history.json
    model: dict[str, torch.Tensor]  # last.pt's model state


@dataclass
class TrainedRun:
    path: Path
    data: Path
    config: TrainConfig
    history: list[dict[str, Any]]
    snapshots: list[EpochSnapshot] = field(default_factory=list)


def train_recording(config: TrainConfig, **options: Any) -> TrainedRun:
    """train(config), snapshotting last.pt and history.json after every epoch."""
    run = Path(config.out)
    snapshots: list[EpochSnapshot] = []

    def record(report: EpochReport) -> None:
        last = load_checkpoint(run / LAST)
        history = json.loads((run / HISTORY).read_text())["epochs"]
        snapshots.append(EpochSnapshot(report, last["epoch"], len(history), last["model"]))

    history = train(config, on_epoch=record, **options)
    return TrainedRun(run, Path(config.data), config, history, snapshots)


def train_sample_run(data: Path, out: Path) -> TrainedRun:
    """SDM trained for a few epochs on the sample data (small dims, full softmax)."""
    config = TrainConfig(
        data=str(data), out=str(out), epochs=SAMPLE_RUN_EPOCHS, batch_size=512, dim=32, heads=2, lstm_layers=1,
        seed=0, patience=SAMPLE_RUN_EPOCHS,
    )
    return train_recording(config)


def train_tiny_run(data: Path, out: Path, model: str = "sdm") -> Path:
    """A one-epoch run at dim 8 on the tiny data, evaluated on test: a run directory with every
    file `sdm train` and `sdm evaluate` write, for the tests that damage them."""
    from helpers.cli import run_sdm_ok

    train(TrainConfig(data=str(data), out=str(out), model=model, epochs=1, dim=8, heads=2, lstm_layers=1, threads=TEST_THREADS))
    run_sdm_ok("evaluate", "--run", out, "--k", "10")
    return out


def without_timing(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History entries minus the wall-clock fields, which legitimately differ between runs."""
    return [{key: value for key, value in entry.items() if key not in TIMING_FIELDS} for entry in history]


def read_split(data: Path, split: str) -> pl.DataFrame:
    return pl.read_parquet(data / "splits" / f"{split}.parquet")


def read_vocab(data: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(data / "events" / "vocab" / f"{name}.parquet")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def states_equal(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def assert_memorises(model: torch.nn.Module, batch: dict[str, torch.Tensor], valid: torch.Tensor, targets: torch.Tensor, steps: int) -> None:
    """Adam (lr 0.01) on the exact softmax for `steps` steps, then every valid position's top item
    must be its target: the model can fit a tiny dataset."""
    from sdm.training.losses import full_softmax_loss

    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        loss = full_softmax_loss(model(batch)[valid], targets, model.item_vectors())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = model(batch)[valid] @ model.item_vectors()[1:].T
    assert (scores.argmax(-1) + 1 == targets).all(), f"loss {loss.item():.3f}"
