"""Softmax losses over the item catalogue (paper §3.6: sampled softmax with cross-entropy).

Every loss takes user_vecs [N, d] (one row per target) and targets [N] item ids >= 1, and returns
the mean loss over the N targets, or their sum with reduction="sum" (what a DDP rank returns, to
be divided by the number of targets of all ranks). The exact softmax needs item_vectors
[n_items, d] (row 0 is padding and never a candidate); the sampled ones only embed their
candidates, through vectors_of(ids [...]) -> [..., d], so a model whose item vectors come from a
tower need not run it over the catalogue.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


class LogUniformSampler:
    """Zipf sampler over ids [1, n_items): P(id) = (log(id + 1) - log(id)) / log(n_items).

    Item ids are ranked by descending training frequency, so this approximates the unigram
    distribution without storing it (TF's log_uniform_candidate_sampler, shifted past padding).
    """

    def __init__(self, n_items: int):
        if n_items < 2:
            raise ValueError("need at least one non-padding item")
        self.n_items = n_items

    def sample(self, num: int, generator: torch.Generator | None = None) -> Tensor:
        """-> ids [num], drawn with replacement."""
        # Inverse CDF: P(id <= k) = log(k + 1) / log(n_items), so id = floor(n_items ** u), u ~ U[0, 1).
        u = torch.rand(num, generator=generator, dtype=torch.float64)
        ids = torch.exp(u * math.log(self.n_items)).floor().long()
        return ids.clamp(1, self.n_items - 1)  # float rounding could reach n_items

    def log_prob(self, ids: Tensor) -> Tensor:
        """ids [...] in [1, n_items) -> log P(id) [...] (float32)."""
        ids = ids.double()
        return (torch.log(torch.log1p(1.0 / ids)) - math.log(math.log(self.n_items))).float()


VectorsOf = Callable[[Tensor], Tensor]  # item ids [...] -> item vectors [..., d]


def sampled_softmax_loss(
    user_vecs: Tensor,
    targets: Tensor,
    vectors_of: VectorsOf,
    sampler: LogUniformSampler,
    num_negatives: int,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy over {target} + num_negatives shared log-uniform negatives, with logQ correction.

    Each negative's logit is reduced by log(num_negatives * P(id)), its expected count, so that
    sum_j exp(logit_j) estimates the partition function over the catalogue; a negative equal to the
    row's target (accidental hit) is dropped. Unlike TF, the target's own logit is not corrected:
    the target is always a candidate, not a sample, and with this choice the loss converges to the
    full softmax loss as num_negatives grows (TF's corrected target logit makes it drift by
    log(num_negatives * P(target))).
    """
    negatives = sampler.sample(num_negatives, generator).to(targets.device)  # [S]
    # One call embeds both: for a tower, one pass over N + S ids instead of the catalogue.
    target_vecs, negative_vecs = vectors_of(torch.cat([targets, negatives])).split([len(targets), num_negatives])
    true_logits = (user_vecs * target_vecs).sum(-1, keepdim=True)  # [N, 1]
    log_expected_count = math.log(num_negatives) + sampler.log_prob(negatives).to(user_vecs.dtype)  # [S]
    sampled_logits = user_vecs @ negative_vecs.T - log_expected_count  # [N, S]
    sampled_logits = sampled_logits.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([true_logits, sampled_logits], dim=1)  # [N, 1 + S]
    return F.cross_entropy(logits, torch.zeros_like(targets), reduction=reduction)


Gather = Callable[[Tensor], tuple[Tensor, int]]  # rows [n, ...] -> (all ranks' rows [M, ...], offset of ours)


def alone(rows: Tensor) -> tuple[Tensor, int]:
    return rows, 0


def in_batch_softmax_loss(
    user_vecs: Tensor, targets: Tensor, vectors_of: VectorsOf, log_q: Tensor, gather: Gather = alone, reduction: str = "mean"
) -> Tensor:
    """Cross-entropy where row i's candidates are the targets of all rows, logit_ij = u_i . v_j - log q(t_j).

    log_q [n_items]: log probability of an item appearing as a target (unigram), the rate at which
    it is drawn as a negative. Another row with the same target is an accidental hit and is dropped.
    Under DDP `gather` brings every rank's targets, so that the candidates are those of the whole
    global batch, as in one process.
    """
    candidate_vecs, offset = gather(vectors_of(targets))  # [M, d]
    candidates, _ = gather(targets)  # [M]
    logits = user_vecs @ candidate_vecs.T - log_q[candidates].to(user_vecs.dtype)  # [N, M]
    rows = offset + torch.arange(len(targets), device=targets.device)  # [N]: each row's own column
    columns = torch.arange(len(candidates), device=targets.device)
    accidental = (candidates[None, :] == targets[:, None]) & (columns[None, :] != rows[:, None])  # [N, M]
    logits = logits.masked_fill(accidental, float("-inf"))
    return F.cross_entropy(logits, rows, reduction=reduction)


def full_softmax_loss(user_vecs: Tensor, targets: Tensor, item_vectors: Tensor, reduction: str = "mean") -> Tensor:
    """Exact cross-entropy over items 1..n_items-1."""
    logits = user_vecs @ item_vectors[1:].T  # [N, n_items - 1]
    return F.cross_entropy(logits, targets - 1, reduction=reduction)
