"""Ranking metrics: hand-computed examples and a plain-Python reference on random rankings."""

import math

import numpy as np
import pytest
import torch

from helpers.reference import metrics_reference
from sdm.evaluation.metrics import ranking_metrics


def to_csr(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    indptr = torch.tensor([0] + [len(items) for items in lists]).cumsum(0)
    return indptr, torch.tensor([item for items in lists for item in items], dtype=torch.int64)


def assert_metrics_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name] == pytest.approx(value, abs=1e-12), name


def test_single_target_by_hand():
    # Leave-last-out: one target per case.
    #   case 0: ranking [5, 7, 9],  target {7}: hit at rank 2
    #   case 1: ranking [2, 3, -1], target {2}: hit at rank 1 (and a padded slot)
    #   case 2: ranking [4, 6, 8],  target {1}: no hit
    ranking = torch.tensor([[5, 7, 9], [2, 3, -1], [4, 6, 8]])
    targets = to_csr([[7], [2], [1]])
    inv_log2_3 = 1 / math.log2(3)
    expected = {
        # K=1: hits [0, 1, 0]
        "hit_rate@1": 1 / 3,
        "recall@1": (0 + 1 + 0) / 3,
        "precision@1": (0 + 1 + 0) / 3,
        "f1@1": (0 + 1 + 0) / 3,  # case 1: P = R = 1
        "ndcg@1": (0 + 1 + 0) / 3,  # case 1: DCG = 1/log2(2) = 1 = IDCG
        "mrr@1": (0 + 1 + 0) / 3,
        # K=3: hits [1, 1, 0]
        "hit_rate@3": 2 / 3,
        "recall@3": (1 + 1 + 0) / 3,
        "precision@3": (1 / 3 + 1 / 3 + 0) / 3,
        "f1@3": (0.5 + 0.5 + 0) / 3,  # P = 1/3, R = 1: 2 * (1/3) / (4/3) = 1/2
        "ndcg@3": (inv_log2_3 + 1 + 0) / 3,  # case 0: DCG = 1/log2(3), IDCG = 1 (one target)
        "mrr@3": (1 / 2 + 1 + 0) / 3,
        "n_cases": 3,
    }
    assert_metrics_equal(ranking_metrics(ranking, targets, [1, 3]), expected)


def test_multi_target_by_hand():
    # Multi-target protocol: the rest of the session is the ground truth.
    #   case 0: ranking [10, 11, 12, 13], targets {11, 13, 20} (T=3): hits at ranks 2 and 4
    #   case 1: ranking [1, 2, -1, -1],   targets {5, 2} (T=2):      hit at rank 2
    ranking = np.array([[10, 11, 12, 13], [1, 2, -1, -1]])
    targets = to_csr([[20, 13, 11], [5, 2]])  # any order within a case
    d2, d4 = 1 / math.log2(3), 1 / math.log2(5)  # discounts of ranks 2 and 4
    expected = {
        # K=2: hits [1, 1]
        "hit_rate@2": 1.0,
        "recall@2": (1 / 3 + 1 / 2) / 2,
        "precision@2": (1 / 2 + 1 / 2) / 2,
        "f1@2": (2 / 5 + 1 / 2) / 2,  # case 0: 2 (1/2)(1/3) / (1/2 + 1/3) = 2/5; case 1: P = R = 1/2
        "ndcg@2": (d2 / (1 + d2) + d2 / (1 + d2)) / 2,  # IDCG@2 = 1 + 1/log2(3) for both (T >= 2)
        "mrr@2": (1 / 2 + 1 / 2) / 2,
        # K=4: hits [2, 1]
        "hit_rate@4": 1.0,
        "recall@4": (2 / 3 + 1 / 2) / 2,
        "precision@4": (2 / 4 + 1 / 4) / 2,
        "f1@4": (4 / 7 + 1 / 3) / 2,  # case 0: 2 (1/2)(2/3) / (7/6) = 4/7; case 1: 2 (1/4)(1/2) / (3/4) = 1/3
        "ndcg@4": ((d2 + d4) / (1 + d2 + 1 / 2) + d2 / (1 + d2)) / 2,  # IDCG: min(T, 4) = 3 and 2 terms
        "mrr@4": (1 / 2 + 1 / 2) / 2,
        "n_cases": 2,
    }
    assert_metrics_equal(ranking_metrics(ranking, targets, [2, 4]), expected)


def test_all_targets_found_at_the_top_scores_one():
    # Targets {3, 4} ranked first and second: every metric but precision is 1; precision@K = 2/K.
    metrics = ranking_metrics(torch.tensor([[4, 3, 7, 8]]), to_csr([[3, 4]]), [2, 4])
    for name in ("hit_rate", "recall", "ndcg", "mrr"):
        assert metrics[f"{name}@2"] == metrics[f"{name}@4"] == 1.0
    assert metrics["precision@2"] == 1.0 and metrics["precision@4"] == 0.5
    assert metrics["f1@2"] == 1.0 and metrics["f1@4"] == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_padding_never_counts_as_a_hit():
    # Case 1 has no items at all. Its -1 slots must not match anything, not even case 0's
    # largest target, which sits right before case 1's items in (case, item) order.
    metrics = ranking_metrics(torch.tensor([[1, 2, 3], [-1, -1, -1]]), to_csr([[7], [3]]), [3])
    assert metrics["hit_rate@3"] == 0.0 and metrics["ndcg@3"] == 0.0


def test_an_item_is_a_hit_only_for_its_own_case():
    # Item 9 is case 1's target, not case 0's; a key collision across cases would count it.
    metrics = ranking_metrics(torch.tensor([[9, 1], [1, 9]]), to_csr([[2], [9]]), [2])
    assert metrics["hit_rate@2"] == 0.5
    assert metrics["mrr@2"] == (0 + 1 / 2) / 2


@pytest.mark.parametrize("max_targets", [1, 6])  # leave-last-out and multi-target
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_on_random_rankings(max_targets, seed):
    rng = np.random.default_rng(seed)
    n_cases, k_max, n_items = 300, 20, 60  # a small catalogue, so that hits are common
    rankings = [list(rng.permutation(n_items)[:k_max]) for _ in range(n_cases)]
    for ranking in rankings:  # some cases ran out of items
        n_padded = int(rng.integers(0, 5)) if rng.random() < 0.3 else 0
        ranking[k_max - n_padded :] = [-1] * n_padded
    target_counts = rng.integers(1, max_targets + 1, size=n_cases)
    targets = [list(rng.choice(n_items, size=int(count), replace=False)) for count in target_counts]
    ks = [1, 5, 10, 20]
    actual = ranking_metrics(torch.tensor(rankings), to_csr(targets), ks)
    assert_metrics_equal(actual, metrics_reference(rankings, targets, ks))


def test_rejects_bad_inputs():
    ranking = torch.tensor([[1, 2]])
    with pytest.raises(ValueError):
        ranking_metrics(ranking, to_csr([[1]]), [3])  # K > Kmax
    with pytest.raises(ValueError):
        ranking_metrics(ranking, to_csr([[]]), [1])  # a case without targets
    with pytest.raises(ValueError):
        ranking_metrics(ranking, to_csr([[1], [2]]), [1])  # targets for two cases, ranking for one
