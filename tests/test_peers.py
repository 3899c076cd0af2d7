"""benchmarks/peers: our sessions as DeepMatch SDM's input, and the restated peer preprocessing.

The conversion needs only polars and numpy; the peer's preprocessing needs pandas (and
TensorFlow for its padding), present only in the peers venv, so those tests skip without them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

PEERS = Path(__file__).resolve().parents[1] / "benchmarks" / "peers"
sys.path.insert(0, str(PEERS))
from convert import padded, peer_inputs, position_samples, write_peer_inputs  # noqa: E402

U32 = pl.List(pl.UInt32)


def test_padded_keeps_order_pads_after_and_truncates():
    lists = pl.Series([[3, 1], [], [5, 6, 7, 8]], dtype=U32)
    assert padded(lists, 3).tolist() == [[3, 1, 0], [0, 0, 0], [5, 6, 7]]


def two_sessions() -> tuple[pl.DataFrame, pl.DataFrame]:
    train = pl.DataFrame(
        {"session": [10, 11], "user": [1, 2], "items": [[4, 5, 6], [7]], "next_item": [8, 0]},
        schema={"session": pl.UInt32, "user": pl.UInt32, "items": U32, "next_item": pl.UInt32},
    )
    long_term = pl.DataFrame(
        {"session": [11, 10], "long_item": [[], [9, 3]]}, schema={"session": pl.UInt32, "long_item": U32}
    )
    return train, long_term


def test_every_position_is_one_sample_and_a_missing_next_item_none():
    samples = position_samples(*two_sessions())
    assert samples.to_dicts() == [
        {"user": 1, "target": 5, "short": [4], "prefer": [9, 3]},
        {"user": 1, "target": 6, "short": [4, 5], "prefer": [9, 3]},
        {"user": 1, "target": 8, "short": [4, 5, 6], "prefer": [9, 3]},
    ]


def test_short_keeps_the_last_five_items():
    train = pl.DataFrame(
        {"session": [1], "user": [1], "items": [[1, 2, 3, 4, 5, 6, 7]], "next_item": [0]},
        schema={"session": pl.UInt32, "user": pl.UInt32, "items": U32, "next_item": pl.UInt32},
    )
    long_term = pl.DataFrame({"session": [1], "long_item": [[]]}, schema={"session": pl.UInt32, "long_item": U32})
    samples = position_samples(train, long_term)
    assert samples["short"].to_list()[-1] == [2, 3, 4, 5, 6]
    assert samples["target"].to_list() == [2, 3, 4, 5, 6, 7]


def test_peer_inputs_align_genres_with_items_and_fill_the_profile():
    samples = position_samples(*two_sessions())
    item_category = np.array([0, 1, 1, 2, 2, 3, 3, 4, 4, 5], dtype=np.int32)  # item k -> category (k + 1) // 2
    users = pl.DataFrame({"user": [1, 2], "age": [3, 1]}, schema={"user": pl.UInt32, "age": pl.UInt32})
    inputs = peer_inputs(samples, item_category, users, short_len=3, prefer_len=4)
    assert inputs["short_movie_id"].tolist() == [[4, 0, 0], [4, 5, 0], [4, 5, 6]]
    assert inputs["short_genres"].tolist() == [[2, 0, 0], [2, 3, 0], [2, 3, 3]]
    assert inputs["prefer_movie_id"].tolist() == [[9, 3, 0, 0]] * 3
    assert inputs["prefer_genres"].tolist() == [[5, 2, 0, 0]] * 3
    assert inputs["short_sess_length"].tolist() == [1, 2, 3]
    assert inputs["prefer_sess_length"].tolist() == [2, 2, 2]
    assert inputs["movie_id"].tolist() == [5, 6, 8]
    assert inputs["age"].tolist() == [3, 3, 3]
    assert {name: int(inputs[f"vocab_{name}"]) for name in ["user_id", "movie_id", "genres", "age"]} == {
        "user_id": 3, "movie_id": 10, "genres": 6, "age": 4}
    assert str(inputs["profile"]) == "age"


def test_the_peer_gets_exactly_our_training_targets(tiny_data: Path, tmp_path: Path):
    n = write_peer_inputs(tiny_data, tmp_path / "inputs.npz")
    stats = json.loads((tiny_data / "splits" / "manifest.json").read_text())["stats"]
    assert n == stats["train_targets"]
    stored = np.load(tmp_path / "inputs.npz")
    assert len(stored["movie_id"]) == n and stored["movie_id"].min() > 0
    assert stored["short_movie_id"].shape == (n, 5) and stored["prefer_movie_id"].shape == (n, 50)
    assert (stored["short_movie_id"][np.arange(n), stored["short_sess_length"] - 1] > 0).all()


def test_restated_gen_data_set_sdm_splits_history_as_the_example():
    pd = pytest.importorskip("pandas")
    from peer_driver import peer_sessions

    items = list(range(1, 10))  # one user, 9 events in time order
    data = pd.DataFrame({"user_id": 1, "movie_id": items, "genres": [i * 10 for i in items],
                         "rating": 1, "timestamp": list(range(9, 0, -1))[::-1]})
    train, test = peer_sessions(data, short_len=5, prefer_len=2)
    by_target = {sample[1]: sample for sample in train}
    assert len(train) == 7 and [sample[1] for sample in test] == [9]
    _, _, _, short, prefer, n_short, n_prefer, short_genres, prefer_genres, _ = by_target[8]
    assert (short, prefer, n_short, n_prefer) == ([3, 4, 5, 6, 7], [2, 1], 5, 2)
    assert (short_genres, prefer_genres) == ([30, 40, 50, 60, 70], [20, 10])
    assert by_target[2][3:7] == ([1], [], 1, 0)
