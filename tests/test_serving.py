"""`sdm recommend`: a user's top items in raw ids (exports: test_export.py; the server: test_server.py)."""

from __future__ import annotations


import numpy as np
import polars as pl
import pytest
import torch

from sdm.training.train import load_trained
from helpers.cli import run_sdm, run_sdm_ok
from helpers.serving import brute_force_top, items_seen_by, latest_session_inputs, raw_items, recommended
from helpers.training import SAMPLE_FILES, TEST_THREADS, read_vocab

torch.set_num_threads(TEST_THREADS)

K = 10
SIDE_COLUMNS = {"leaf": "leaf_category", "category": "category", "shop": "shop", "brand": "brand"}


@pytest.fixture(scope="module")
def trained(sample_run):
    model, _, catalogue = load_trained(sample_run.path)
    return model, catalogue


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
