"""`sdm recommend` and `sdm export`: a user's top items in raw ids, and exported vectors and user
tower that reproduce the trained model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from sdm.data import SessionData, input_tensors
from sdm.serving import tower_arguments
from sdm.train import load_trained
from helpers.cli import run_sdm, run_sdm_ok
from helpers.training import SAMPLE_FILES, TEST_THREADS, read_json, read_vocab

torch.set_num_threads(TEST_THREADS)

K = 10
SIDE_COLUMNS = {"leaf": "leaf_category", "category": "category", "shop": "shop", "brand": "brand"}


@pytest.fixture(scope="module")
def trained(sample_run):
    model, _, catalogue = load_trained(sample_run.path)
    return model, catalogue


def latest_session_inputs(data: Path, catalogue, users: list[int]) -> SessionData:
    """Model inputs after each user's most recent session (by start time), from sessions.parquet."""
    sessions = pl.read_parquet(data / "sessions" / "sessions.parquet")
    latest = (
        sessions.filter(pl.col("user").is_in(users)).sort("start").group_by("user").last()
        .join(pl.DataFrame({"user": users}, schema={"user": pl.UInt32}).with_row_index("wanted"), on="user")
        .sort("wanted").select("user", "session", "items")
    )
    return SessionData(input_tensors(latest, data, catalogue))


def items_seen_by(data: Path, user: int) -> set[int]:
    events = pl.read_parquet(data / "sessions" / "events.parquet", columns=["user", "item"])
    return set(events.filter(pl.col("user") == user).get_column("item").to_list())


def brute_force_top(model, inputs: SessionData, k: int, excluded: list[set[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores, ids) by sorting the full score matrix; padding and excluded items never returned."""
    with torch.no_grad():
        scores = model.user_vectors(inputs.batch(torch.arange(len(inputs)))) @ model.item_vectors().T  # [N, n_items]
    scores[:, 0] = -torch.inf
    for row, items in enumerate(excluded or []):
        scores[row, sorted(items)] = -torch.inf
    ranked_scores, ranked_ids = scores.sort(dim=1, descending=True, stable=True)
    return ranked_scores[:, :k], ranked_ids[:, :k]


def recommended(run: Path, raw_user: str, *options: object) -> pl.DataFrame:
    outcome = run_sdm_ok("recommend", "--run", run, "--user", raw_user, *options, "--json")
    return pl.DataFrame([json.loads(line) for line in outcome.stdout.splitlines() if line.strip()])


def raw_items(data: Path, ids: list[int]) -> list[str]:
    raw = dict(read_vocab(data, "item").select("id", "raw").iter_rows())
    return [raw[i] for i in ids]


@pytest.mark.parametrize("user_rank", [0, 100])
def test_recommend_lists_the_top_k_with_raw_ids_scores_and_side_information(user_rank, sample_run, trained):
    model, catalogue = trained
    users = read_vocab(sample_run.data, "user")
    user, raw_user = users.row(user_rank)[:2]
    ranked = recommended(sample_run.path, raw_user, "-k", K)

    assert ranked.columns == ["rank", "item", "score", *SIDE_COLUMNS]
    assert ranked.get_column("rank").to_list() == list(range(1, K + 1))
    scores = ranked.get_column("score").to_list()
    assert all(earlier >= later for earlier, later in zip(scores, scores[1:]))

    expected_scores, expected_ids = brute_force_top(model, latest_session_inputs(sample_run.data, catalogue, [user]), K)
    assert ranked.get_column("item").to_list() == raw_items(sample_run.data, expected_ids[0].tolist())
    np.testing.assert_allclose(scores, expected_scores[0].numpy(), rtol=1e-5, atol=1e-5)

    # Side information as in the raw items file.
    items_file = pl.read_csv(SAMPLE_FILES["items"], infer_schema=False)
    side_of = {row[0]: row[1:] for row in items_file.select("item_id", *SIDE_COLUMNS.values()).iter_rows()}
    assert [tuple(row[1:]) for row in ranked.select("item", *SIDE_COLUMNS).iter_rows()] == [
        tuple(side_of[item]) for item in ranked.get_column("item").to_list()
    ]


def test_recommend_exclude_seen_removes_every_item_the_user_interacted_with(sample_run, trained):
    model, catalogue = trained
    data = sample_run.data
    users = read_vocab(data, "user").head(30)
    candidates = users.get_column("id").to_list()
    _, plain_top = brute_force_top(model, latest_session_inputs(data, catalogue, candidates), K)
    # A user whose plain top-k holds items they have seen, so that excluding them matters.
    picked = next(
        (index for index, user in enumerate(candidates) if set(plain_top[index].tolist()) & items_seen_by(data, user)), None
    )
    assert picked is not None
    user, raw_user = candidates[picked], users.get_column("raw")[picked]
    seen = items_seen_by(data, user)

    ranked = recommended(sample_run.path, raw_user, "-k", K, "--exclude-seen")
    seen_raw = set(raw_items(data, sorted(seen)))
    assert not set(ranked.get_column("item").to_list()) & seen_raw
    _, expected_ids = brute_force_top(model, latest_session_inputs(data, catalogue, [user]), K, excluded=[seen])
    assert ranked.get_column("item").to_list() == raw_items(data, expected_ids[0].tolist())


def test_recommend_prints_a_table_by_default(sample_run):
    raw_user = read_vocab(sample_run.data, "user").get_column("raw")[0]
    top_item = recommended(sample_run.path, raw_user, "-k", 3).get_column("item")[0]
    shown = run_sdm_ok("recommend", "--run", sample_run.path, "--user", raw_user, "-k", "3").stdout
    assert f"top 3 for user {raw_user}" in shown
    assert top_item in shown


def test_recommend_for_an_unknown_user_is_refused_in_one_line(sample_run):
    outcome = run_sdm("recommend", "--run", sample_run.path, "--user", "no-such-user-42")
    assert outcome.exit_code == 2
    assert outcome.stdout == ""
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-user-42" in lines[0]


# --- export ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(sample_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "out"
    run_sdm_ok("export", "--run", sample_run.path, "--out", out)
    return out


def test_export_writes_item_vectors_in_raw_ids(exported, sample_run, trained):
    model, _ = trained
    items = pl.read_parquet(exported / "items.parquet")
    vocab = read_vocab(sample_run.data, "item")
    assert items.get_column("id").to_list() == vocab.get_column("raw").to_list()
    with torch.no_grad():
        expected = model.item_vectors()[torch.from_numpy(vocab.get_column("id").to_numpy().astype(np.int64))]
    assert torch.equal(torch.from_numpy(items.get_column("vector").to_numpy().copy()), expected)
    summary = read_json(exported / "export.json")
    assert (summary["items"], summary["dim"]) == (vocab.height, sample_run.config.dim)


def test_export_writes_every_users_current_vector(exported, sample_run, trained):
    model, catalogue = trained
    users = pl.read_parquet(exported / "users.parquet")
    vocab = read_vocab(sample_run.data, "user")
    with_sessions = set(pl.read_parquet(sample_run.data / "sessions" / "sessions.parquet").get_column("user").to_list())
    id_of = dict(vocab.select("raw", "id").iter_rows())
    assert users.height == len(with_sessions) == read_json(exported / "export.json")["users"]
    user_ids = [id_of[raw] for raw in users.get_column("id").to_list()]
    assert set(user_ids) == with_sessions

    inputs = latest_session_inputs(sample_run.data, catalogue, user_ids)
    with torch.no_grad():
        expected = model.user_vectors(inputs.batch(torch.arange(len(inputs))))
    # Batched with different padding than the export, hence float rounding only.
    torch.testing.assert_close(torch.from_numpy(users.get_column("vector").to_numpy().copy()), expected, rtol=1e-5, atol=1e-6)


def tower_batches(inputs: SessionData) -> dict[str, dict[str, torch.Tensor]]:
    """Batches unlike the trace example (8 rows): other sizes, session lengths and set widths."""
    lengths = inputs.tensors["lengths"]
    longest = torch.argsort(lengths, descending=True, stable=True)
    everyone = inputs.batch(torch.arange(len(inputs)))
    wider_sets = {
        name: torch.cat([values, torch.zeros(values.shape[0], 7, dtype=values.dtype)], dim=1)
        for name, values in everyone.items() if name.startswith("long_")
    }
    return {
        "one short session": inputs.batch(longest[-1:]),
        "three longest sessions": inputs.batch(longest[:3]),
        "everyone": everyone,
        "everyone, wider long-term sets": everyone | wider_sets,
        "extra session padding": everyone | {"items": torch.cat([everyone["items"], torch.zeros_like(everyone["items"])], dim=1)},
    }


def test_exported_user_tower_reproduces_the_model(exported, sample_run, trained):
    model, catalogue = trained
    tower = torch.jit.load(str(exported / "user_tower.pt"))
    users = pl.read_parquet(exported / "users.parquet")
    id_of = dict(read_vocab(sample_run.data, "user").select("raw", "id").iter_rows())
    inputs = latest_session_inputs(sample_run.data, catalogue, [id_of[raw] for raw in users.get_column("id").to_list()])
    assert int(inputs.tensors["lengths"].max()) > 1 and len(inputs) != 8

    for name, batch in tower_batches(inputs).items():
        with torch.no_grad():
            from_tower = tower(*tower_arguments(batch, catalogue.long_features))
            from_model = model.user_vectors(batch)
        assert from_tower.shape == (batch["items"].shape[0], sample_run.config.dim), name
        assert torch.equal(from_tower, from_model), name

    with torch.no_grad():
        everyone = tower(*tower_arguments(inputs.batch(torch.arange(len(inputs))), catalogue.long_features))
    torch.testing.assert_close(everyone, torch.from_numpy(users.get_column("vector").to_numpy().copy()), rtol=1e-5, atol=1e-6)
    assert read_json(exported / "export.json")["tower_inputs"] == [
        "items", "lengths", "profile", "user", *(f"long_{feature}" for feature in catalogue.long_features)
    ]
