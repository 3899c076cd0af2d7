"""GRU4Rec, SASRec and item-based CF: end to end through `sdm train/evaluate/recommend/export`,
item-cf's scores against a hand computation, and the sequence models' causality and padding."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.errors import InputError
from sdm.models import build_model
from sdm.models.config import ModelConfig
from sdm.data.sessions import SessionData
from sdm.evaluation.evaluate import evaluate_cases
from sdm.models.item_cf import ItemCF, cooccurrence_cosine, top_neighbours
from sdm.models.sasrec import SASRec
from helpers.cli import run_sdm, run_sdm_ok
from helpers.models import N_ITEMS, make_batch, make_config, make_model
from helpers.training import SMALL_MODEL_ARGS, assert_memorises, read_json, read_split, read_vocab

NEW_MODELS = ("gru4rec", "sasrec", "item-cf")
SEQUENCE_MODELS = ("gru4rec", "sasrec")


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest.single_thread


# --- end to end on the tiny synthetic data ---------------------------------------------------------


@pytest.mark.parametrize("name", NEW_MODELS)
def test_trains_evaluates_and_recommends_end_to_end(name, tiny_data, tmp_path):
    run = tmp_path / name
    run_sdm_ok("train", "--data", tiny_data, "--out", run, "--model", name, "--epochs", "2", *SMALL_MODEL_ARGS)
    config = read_json(run / "config.json")
    assert config["train"]["model"] == name
    epochs = read_json(run / "history.json")["epochs"]
    if name == "item-cf":
        assert config["loss"] == "none"
        assert [epoch["loss"] for epoch in epochs] == [0.0]  # nothing to train: one pass, no optimiser
    else:
        assert "full softmax" in config["loss"]
        assert len(epochs) == 2 and all(math.isfinite(epoch["loss"]) and epoch["loss"] > 0 for epoch in epochs)

    # The reloaded best.pt reproduces the validation metrics measured during training, so whatever
    # the model holds (weights or item-cf's similarity tables) was saved and restored.
    best = max((epoch for epoch in epochs if epoch["improved"]), key=lambda epoch: epoch["epoch"])
    valid = json.loads(run_sdm_ok("evaluate", "--run", run, "--split", "valid", "--json").stdout)
    assert valid == pytest.approx(best["valid"])

    test = json.loads(run_sdm_ok("evaluate", "--run", run, "--json", "--exclude-seen").stdout)
    assert test["n_cases"] == read_split(tiny_data, "test").height
    assert all(0.0 <= value <= 1.0 for key, value in test.items() if key != "n_cases")
    assert test["hit_rate@100"] > 0

    user = read_vocab(tiny_data, "user").get_column("raw")[0]
    lines = run_sdm_ok("recommend", "--run", run, "--user", user, "-k", "5", "--json").stdout.splitlines()
    ranked = [json.loads(line) for line in lines if line.strip()]
    assert [row["rank"] for row in ranked] == [1, 2, 3, 4, 5]
    assert len({row["item"] for row in ranked}) == 5

    if name == "item-cf":
        refused = run_sdm("export", "--run", run)
        assert refused.exit_code == 2
        assert "item-cf" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
        assert not (run / "export").exists()


# --- item-cf on a hand-computed example -----------------------------------------------------------

# Training sessions (0 = padding); item 3 twice in the last session counts once, item 5 never occurs.
SESSIONS = torch.tensor([[1, 2, 3], [1, 2, 0], [2, 4, 0], [3, 3, 0]])
CF_ITEMS = 6  # ids 0..5
# Sessions holding each item: n_1 = 2 (s1, s2), n_2 = 3 (s1, s2, s3), n_3 = 2 (s1, s4), n_4 = 1 (s3).
# Co-occurrences: C_12 = 2 (s1, s2), C_13 = 1, C_23 = 1 (s1), C_24 = 1 (s3); every other pair 0.
SIM_12 = 2 / math.sqrt(2 * 3)
SIM_13 = 1 / math.sqrt(2 * 2)
SIM_23 = 1 / math.sqrt(3 * 2)
SIM_24 = 1 / math.sqrt(3 * 1)


def cf_config(**overrides) -> ModelConfig:
    return ModelConfig(n_items=CF_ITEMS, n_users=3, dim=4, heads=1, **overrides)


def cf_batch(sessions: list[list[int]], long_items: list[list[int]]) -> dict[str, torch.Tensor]:
    items = torch.tensor(sessions)
    return {
        "items": items,
        "lengths": (items != 0).sum(1),
        "long_item": torch.tensor(long_items),
        "profile": torch.zeros(len(sessions), 0, dtype=torch.long),
        "user": torch.ones(len(sessions), dtype=torch.long),
    }


def test_item_cf_similarity_is_the_cosine_of_session_cooccurrence():
    sim = torch.from_numpy(cooccurrence_cosine(SESSIONS, CF_ITEMS).toarray())
    expected = torch.zeros(CF_ITEMS, CF_ITEMS, dtype=torch.float64)
    for (i, j), value in {(1, 2): SIM_12, (1, 3): SIM_13, (2, 3): SIM_23, (2, 4): SIM_24}.items():
        expected[i, j] = expected[j, i] = value
    torch.testing.assert_close(sim, expected)


def test_item_cf_scores_sum_the_similarities_from_the_input_items():
    # Case 0: session {1, 4}, long-term {3}.   Case 1: session {2, 2}, no long-term set.
    batch = cf_batch([[1, 4], [2, 2]], [[3], [0]])
    with torch.no_grad():
        with_long = build_model("item-cf", cf_config(), torch.zeros(CF_ITEMS, 0), torch.ones(CF_ITEMS), SESSIONS)
        session_only = ItemCF(cf_config(long_term=False), SESSIONS)
        scores = with_long.user_vectors(batch) @ with_long.item_vectors().T  # [B, n_items]
        session_scores = session_only.user_vectors(batch) @ session_only.item_vectors().T
    # score(j) = sum over input items i of sim(i, j), self-similarity 0; item 2 repeated counts once.
    expected_session = torch.tensor([
        [0, 0, SIM_12 + SIM_24, SIM_13, 0, 0],
        [0, SIM_12, 0, SIM_23, SIM_24, 0],
    ])
    long_term_3 = torch.tensor([[0, SIM_13, SIM_23, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(session_scores, expected_session.float())
    torch.testing.assert_close(scores, (expected_session + long_term_3).float())


def test_item_cf_forward_is_the_multi_hot_of_every_prefix():
    model = ItemCF(cf_config(), SESSIONS)
    batch = cf_batch([[4, 1, 4, 0]], [[3, 0]])
    out = model(batch)  # [1, T, n_items]
    expected = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 1, 0, 1, 1, 0], [0, 1, 0, 1, 1, 0], [0, 1, 0, 1, 1, 0]]).float()
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(model.user_vectors(batch), out[:, 2])


def test_item_cf_goes_through_the_shared_evaluator_with_exclusion():
    # Case 0 of the scoring test ranks 2 first (SIM_12 + SIM_24 + SIM_23), then 1 and 3 tie at 0.5
    # (ties go to the smaller id).
    model = ItemCF(cf_config(), SESSIONS)
    batch = cf_batch([[1, 4]], [[3]])
    cases = SessionData(batch, targets_indptr=torch.tensor([0, 1]), targets_indices=torch.tensor([1]))
    plain = evaluate_cases(model, cases, [1, 2])
    assert (plain["hit_rate@1"], plain["hit_rate@2"], plain["mrr@2"]) == (0.0, 1.0, 0.5)
    without_2 = evaluate_cases(model, cases, [1], exclude=(torch.tensor([0, 1]), torch.tensor([2])))
    assert without_2["hit_rate@1"] == 1.0


def test_item_cf_keeps_the_top_m_neighbours_ties_to_the_smaller_id():
    neighbours, similarity = top_neighbours(cooccurrence_cosine(SESSIONS, CF_ITEMS), m=2)
    # Item 2's neighbours: 1 (SIM_12 = 0.816), 4 (SIM_24 = 0.577), 3 (SIM_23 = 0.408) -> 1, 4.
    assert neighbours[2].tolist() == [1, 4]
    torch.testing.assert_close(similarity[2], torch.tensor([SIM_12, SIM_24]))
    # Item 4 has one neighbour (2); item 5 none: padded with id 0 and similarity 0.
    assert neighbours[4].tolist() == [2, 0] and similarity[4, 1] == 0
    assert neighbours[5].tolist() == [0, 0] and (similarity[5] == 0).all()
    # Sessions {1, 3, 5}, {1, 5}, {3, 5}: n_1 = n_3 = 2, n_5 = 3 and C_15 = C_35 = 2, so item 5's two
    # neighbours tie at 2 / sqrt(6); the smaller id wins.
    tied = torch.tensor([[1, 3, 5], [1, 5, 0], [3, 5, 0]])
    neighbours, similarity = top_neighbours(cooccurrence_cosine(tied, CF_ITEMS), m=1)
    assert neighbours[5].tolist() == [1] and similarity[5].item() == pytest.approx(2 / math.sqrt(6))


def test_item_cf_refuses_catalogues_too_large_for_its_dense_similarity(monkeypatch):
    monkeypatch.setattr("sdm.models.item_cf.MAX_ITEMS", CF_ITEMS - 1)
    with pytest.raises(InputError, match="item-cf"):
        ItemCF(cf_config(), SESSIONS)


# --- GRU4Rec and SASRec ---------------------------------------------------------------------------


def test_sasrec_positions_matter():
    # Self-attention alone is order-blind; the learned positions make the last vector depend on order.
    model = make_model("sasrec")
    assert isinstance(model, SASRec)
    forward = {"items": torch.tensor([[3, 7, 11]]), "lengths": torch.tensor([3]), "profile": torch.zeros(1, 0, dtype=torch.long), "user": torch.ones(1, dtype=torch.long)}
    backward = dict(forward, items=torch.tensor([[7, 3, 11]]))
    with torch.no_grad():
        assert not torch.allclose(model.user_vectors(forward), model.user_vectors(backward))


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_sequence_model_overfits_eight_sessions(name):
    model = make_model(name, dim=32, dropout=0.0).train()
    batch = make_batch(make_config(), B=8, T=4, seed=1)
    valid = torch.arange(4) < batch["lengths"][:, None]  # [B, T]
    # Distinct first items, so that no two sessions share a prefix and every target is learnable.
    batch["items"][:, 0] = torch.randperm(N_ITEMS - 1, generator=torch.Generator().manual_seed(0))[:8] + 1
    targets = torch.randint(1, N_ITEMS, valid.shape, generator=torch.Generator().manual_seed(2))[valid]
    assert_memorises(model, batch, valid, targets, steps=150)


@pytest.mark.parametrize("quiet", [True, False])
def test_counting_baselines_report_no_loss_or_speed(tiny_data, tmp_path, quiet):
    # Popularity takes no gradient step: "loss 0.0000, 0 targets/s" would read as a broken run.
    outcome = run_sdm("train", "--data", tiny_data, "--out", tmp_path / "run", "--model", "popularity", *(["--quiet"] if quiet else []))
    assert outcome.exit_code == 0, outcome.stderr
    assert "0.0000" not in outcome.stdout and "0 targets/s" not in outcome.stdout
    assert ("counted, no gradient steps" in outcome.stdout) != quiet
    assert ("Training" in outcome.stdout) == quiet  # the table, or one line per epoch: not both
