"""Fixtures shared by the tests; helpers live in the `helpers` package (tests/helpers/).

Preprocessed data and trained runs are expensive, so each is built once per test session and
shared by every module that asks for it.
"""

from __future__ import annotations

import os

# As `sdm` itself does (cli.app.main): idle OpenMP threads sleep instead of spinning, which on a
# shared machine made two-thread training several times slower. Set before anything loads torch;
# child `sdm` processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.training import preprocess_sample

    return preprocess_sample(tmp_path_factory.mktemp("sample") / "data")


@pytest.fixture(scope="session")
def tiny_log(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from helpers.training import write_tiny_log

    return write_tiny_log(tmp_path_factory.mktemp("tiny_raw"))


@pytest.fixture(scope="session")
def tiny_data(tiny_log: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.training import preprocess_tiny

    return preprocess_tiny(tiny_log, tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def sample_run(sample_data: Path, tmp_path_factory: pytest.TempPathFactory):
    from helpers.training import train_sample_run

    return train_sample_run(sample_data, tmp_path_factory.mktemp("sample_run") / "sdm")


@pytest.fixture(scope="session")
def tiny_runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small evaluated runs on tiny_data (helpers.training.train_tiny_run): SDM and popularity."""
    from helpers.training import train_tiny_run

    root = tmp_path_factory.mktemp("tiny_runs")
    return {model: train_tiny_run(tiny_data, root / model, model) for model in ("sdm", "popularity")}


@pytest.fixture(scope="session")
def preprocess_reference(tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted preprocess of the sample data: (output directory, seconds its work took)."""
    from helpers.processes import uninterrupted_preprocess

    return uninterrupted_preprocess(tmp_path_factory.mktemp("preprocess_reference") / "out")


@pytest.fixture(scope="session")
def train_reference(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted tiny training run (helpers.processes.TrainReference) on tiny_data."""
    from helpers.processes import uninterrupted_training

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
