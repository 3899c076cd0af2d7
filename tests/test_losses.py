import math

import pytest
import torch
from scipy.stats import chi2

from sdm.training.losses import LogUniformSampler, full_softmax_loss, in_batch_softmax_loss, sampled_softmax_loss


class FixedSampler(LogUniformSampler):
    """The log-uniform sampler's probabilities, but with chosen negatives."""

    def __init__(self, n_items: int, negatives: list[int]):
        super().__init__(n_items)
        self.negatives = torch.tensor(negatives)

    def sample(self, num, generator=None):
        assert num == len(self.negatives)
        return self.negatives


def log_uniform_p(item: int, n_items: int) -> float:
    return (math.log(item + 1) - math.log(item)) / math.log(n_items)


def test_sampler_probabilities_sum_to_one_and_follow_the_formula():
    sampler = LogUniformSampler(1000)
    ids = torch.arange(1, 1000)
    probs = sampler.log_prob(ids).double().exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    for item in (1, 2, 10, 999):
        assert probs[item - 1].item() == pytest.approx(log_uniform_p(item, 1000), rel=1e-6)


def test_sampler_frequencies_match_log_prob():
    n_items, draws = 60, 200_000
    sampler = LogUniformSampler(n_items)
    ids = sampler.sample(draws, torch.Generator().manual_seed(0))
    assert ids.min() >= 1 and ids.max() <= n_items - 1
    observed = torch.bincount(ids, minlength=n_items)[1:].double()
    expected = draws * sampler.log_prob(torch.arange(1, n_items)).double().exp()
    statistic = ((observed - expected) ** 2 / expected).sum().item()
    assert statistic < chi2.ppf(0.999, df=n_items - 2)


def test_sampler_is_deterministic_given_a_generator():
    sampler = LogUniformSampler(100)
    first = sampler.sample(50, torch.Generator().manual_seed(5))
    second = sampler.sample(50, torch.Generator().manual_seed(5))
    assert torch.equal(first, second)


def test_sampled_loss_matches_hand_computation_and_drops_accidental_hits():
    n_items = 10
    item_vectors = torch.zeros(n_items, 2)
    item_vectors[3] = torch.tensor([1.0, 0.0])
    item_vectors[5] = torch.tensor([0.0, 1.0])
    item_vectors[7] = torch.tensor([1.0, 1.0])
    user_vecs = torch.tensor([[2.0, 1.0], [0.5, -1.0]])
    targets = torch.tensor([3, 7])
    negatives = [3, 5, 3, 7]  # row 0 hits its target twice, row 1 once
    sampler = FixedSampler(n_items, negatives)
    loss = sampled_softmax_loss(user_vecs, targets, item_vectors.__getitem__, sampler, num_negatives=4)

    def corrected(score: float, item: int) -> float:
        return score - math.log(4 * log_uniform_p(item, n_items))

    # row 0: u = (2, 1); target 3 scores 2; kept negatives 5 (score 1) and 7 (score 3).
    row0 = -2.0 + math.log(math.exp(2.0) + math.exp(corrected(1.0, 5)) + math.exp(corrected(3.0, 7)))
    # row 1: u = (0.5, -1); target 7 scores -0.5; kept negatives 3, 5, 3 (scores 0.5, -1, 0.5).
    row1 = 0.5 + math.log(
        math.exp(-0.5) + 2 * math.exp(corrected(0.5, 3)) + math.exp(corrected(-1.0, 5))
    )
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-5)


def test_sampled_loss_approaches_full_loss_with_more_negatives():
    torch.manual_seed(0)
    n_items = 500
    item_vectors, user_vecs = 0.5 * torch.randn(n_items, 8), 0.5 * torch.randn(64, 8)
    targets = torch.randint(1, n_items, (64,))
    full = full_softmax_loss(user_vecs, targets, item_vectors).item()
    sampler, generator = LogUniformSampler(n_items), torch.Generator().manual_seed(1)
    errors = []
    for num_negatives in (2**6, 2**10, 2**14):
        draws = [sampled_softmax_loss(user_vecs, targets, item_vectors.__getitem__, sampler, num_negatives, generator) for _ in range(8)]
        errors.append(sum(abs(loss.item() - full) for loss in draws) / len(draws))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.03 * full


def test_in_batch_loss_matches_hand_computation():
    item_vectors = torch.zeros(4, 2)
    item_vectors[1] = torch.tensor([1.0, 0.0])
    item_vectors[2] = torch.tensor([0.0, 1.0])
    user_vecs = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 1.0]])
    targets = torch.tensor([1, 2, 1])  # rows 0 and 2 share a target: accidental hits for each other
    log_q = torch.log(torch.tensor([1.0, 0.5, 0.25, 0.25]))
    loss = in_batch_softmax_loss(user_vecs, targets, item_vectors.__getitem__, log_q)
    # logit_ij = u_i . v_{t_j} - log q(t_j); columns: item 1, item 2, item 1.
    log_q1, log_q2 = math.log(0.5), math.log(0.25)
    row0 = -(1 - log_q1) + math.log(math.exp(1 - log_q1) + math.exp(2 - log_q2))
    row1 = -(-1 - log_q2) + math.log(math.exp(3 - log_q1) + math.exp(-1 - log_q2) + math.exp(3 - log_q1))
    row2 = -(0 - log_q1) + math.log(math.exp(1 - log_q2) + math.exp(0 - log_q1))
    assert loss.item() == pytest.approx((row0 + row1 + row2) / 3, rel=1e-6)


def test_full_loss_is_cross_entropy_over_real_items_only():
    torch.manual_seed(0)
    item_vectors, user_vecs = torch.randn(6, 3), torch.randn(4, 3)
    targets = torch.tensor([1, 5, 2, 5])
    item_vectors[0] = 100.0  # the padding row must not be a candidate
    scores = user_vecs @ item_vectors.T
    expected = sum(
        -scores[i, t].item() + math.log(sum(math.exp(scores[i, j].item()) for j in range(1, 6)))
        for i, t in enumerate(targets.tolist())
    ) / 4
    assert full_softmax_loss(user_vecs, targets, item_vectors).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss_name", ["sampled", "in_batch", "full"])
def test_gradients_are_finite_with_accidental_hits(loss_name):
    torch.manual_seed(0)
    n_items = 8
    user_vecs = torch.randn(5, 4, requires_grad=True)
    item_vectors = torch.randn(n_items, 4, requires_grad=True)
    targets = torch.tensor([1, 1, 2, 1, 3])  # frequent items, so hits are certain
    if loss_name == "sampled":
        generator = torch.Generator().manual_seed(0)
        loss = sampled_softmax_loss(user_vecs, targets, item_vectors.__getitem__, LogUniformSampler(n_items), 64, generator)
    elif loss_name == "in_batch":
        log_q = torch.full((n_items,), -math.log(n_items - 1))
        loss = in_batch_softmax_loss(user_vecs, targets, item_vectors.__getitem__, log_q)
    else:
        loss = full_softmax_loss(user_vecs, targets, item_vectors)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(user_vecs.grad).all() and torch.isfinite(item_vectors.grad).all()
    assert user_vecs.grad.abs().sum() > 0
    assert (item_vectors.grad[0] == 0).all()  # padding never takes part
