"""The training tensors on disk (sdm.data.tensor_store): memory-mapped, built once, rebuilt when the
data changes, the same for every bucket count, and never left half-written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import sdm.data.tensor_store
from pipeline.cache import MANIFEST
from sdm.data.sessions import load_catalogue, load_training
from pipeline.contract import DataDir
from sdm.data.tensor_store import TRAIN
from helpers.training import preprocess_tiny, read_split


def mapped_files() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's file-backed memory mappings."""
    mappings = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            start, end = (int(address, 16) for address in fields[0].split("-"))
            mappings.append((start, end, fields[5]))
    return mappings


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_training_tensors_are_mapped_from_their_files_not_copied(tiny_data):
    training = load_training(tiny_data, load_catalogue(tiny_data))
    directory = (DataDir(tiny_data).tensors / TRAIN).resolve()
    mappings = mapped_files()
    for name, tensor in training.tensors.items():
        address = tensor.data_ptr()
        owners = [path for start, end, path in mappings if start <= address < end]
        assert owners == [str(directory / f"{name}.npy")], (name, owners)
        assert tensor.dtype == torch.int32
    # Batches are ordinary int64 tensors in memory.
    batch = training.batch(torch.tensor([3, 1, 2]))
    assert all(tensor.dtype == torch.int64 for tensor in batch.values())


def test_tensors_are_built_once_and_rebuilt_when_the_splits_change(tiny_log, tmp_path):
    data = preprocess_tiny(tiny_log, tmp_path / "data")
    manifest = DataDir(data).tensors / TRAIN / MANIFEST
    first = load_training(data, load_catalogue(data))
    built = manifest.read_bytes(), manifest.stat().st_mtime_ns
    again = load_training(data, load_catalogue(data))
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == built
    assert torch.equal(first.tensors["items"], again.tensors["items"])

    preprocess_tiny(tiny_log, data, valid_days=3.0)  # fewer training days: other splits
    rebuilt = load_training(data, load_catalogue(data))
    assert manifest.read_bytes() != built[0]
    assert len(rebuilt) == read_split(data, "train").height < len(first)


def rows_as_sorted_tuples(tensors: dict[str, torch.Tensor]) -> list[tuple]:
    names = sorted(tensors)
    columns = [tensors[name].reshape(len(tensors[name]), -1).tolist() for name in names]
    return sorted(tuple(value for column in row for value in column) for row in zip(*columns))


def test_bucketed_data_gives_the_same_training_rows(tiny_log, tiny_data, tmp_path):
    bucketed = preprocess_tiny(tiny_log, tmp_path / "bucketed", buckets=3)
    assert (bucketed / "splits" / "train.parquet").is_dir()
    one = load_training(tiny_data, load_catalogue(tiny_data))
    three = load_training(bucketed, load_catalogue(bucketed))
    assert {name: tuple(t.shape) for name, t in three.tensors.items()} == {name: tuple(t.shape) for name, t in one.tensors.items()}
    assert rows_as_sorted_tuples(three.tensors) == rows_as_sorted_tuples(one.tensors)
    assert three.n_targets == one.n_targets == int((one.tensors["targets"] > 0).sum())


def test_a_failed_build_leaves_the_previous_tensors_and_no_temporary_files(tiny_log, tmp_path, monkeypatch):
    data = preprocess_tiny(tiny_log, tmp_path / "data")
    load_training(data, load_catalogue(data))
    stage = DataDir(data).tensors / TRAIN
    before = {path.name: path.read_bytes() for path in stage.iterdir()}
    preprocess_tiny(tiny_log, data, valid_days=3.0)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sdm.data.tensor_store, "training_arrays", fail)
    with pytest.raises(OSError):
        load_training(data, load_catalogue(data))
    assert {path.name: path.read_bytes() for path in stage.iterdir()} == before
    assert [path.name for path in DataDir(data).tensors.iterdir() if path.name != f".{TRAIN}.lock"] == [TRAIN]


def test_item_counts_are_the_training_occurrences(tiny_data):
    catalogue = load_catalogue(tiny_data)
    items = read_split(tiny_data, "train").get_column("items").explode().drop_nulls().to_numpy()
    expected = np.bincount(items, minlength=catalogue.n_items)
    assert catalogue.item_counts.tolist() == expected.tolist()
    assert catalogue.item_counts[0] == 0 and int(catalogue.item_counts.sum()) == len(items) > 0
