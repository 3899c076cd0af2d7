"""Ranking metrics for top-K retrieval, averaged over evaluation cases.

One case is one ranked list (a user's top-Kmax items, -1 where there is no item) and its
ground-truth set. The same definitions serve the single-target leave-last-out protocol
(|targets| = 1) and the paper's multi-target protocol (§4.2: the rest of the test-period
session is the ground truth).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from sdm.evaluation.csr import CSR, in_rows

METRICS = ("hit_rate", "recall", "precision", "f1", "ndcg", "mrr")
KS = (10, 20, 50, 100)  # the cut-offs training validates at and `sdm evaluate` reports by default


def ranking_metrics(topk_ids: Tensor | np.ndarray, targets: CSR, ks: Sequence[int]) -> dict[str, float]:
    """The mean over cases of every per-case metric (`per_case_metrics`), plus "n_cases"."""
    metrics = {name: float(values.mean()) for name, values in per_case_metrics(topk_ids, targets, ks).items()}
    return metrics | {"n_cases": len(topk_ids)}


def per_case_metrics(topk_ids: Tensor | np.ndarray, targets: CSR, ks: Sequence[int]) -> dict[str, Tensor]:
    """Metrics at every K in ks from ranked ids [N, Kmax] (-1 = no item, other ids distinct
    within a row) and targets, a CSR (indptr [N + 1], indices [nnz]) of each case's
    ground-truth items (deduplicated, at least one per case). Each K must be <= Kmax.

    With hits_K = |top-K ∩ targets| and T = |targets| for a case, the metrics of a case are:
        hit_rate@K   [hits_K > 0]
        recall@K     hits_K / T
        precision@K  hits_K / K
        f1@K         the case's F1 = 2PR / (P + R) = 2 hits_K / (K + T), 0 without a hit
        ndcg@K       DCG / IDCG with DCG = sum over hit ranks r <= K (1-based) of 1 / log2(r + 1)
                     and IDCG = sum_{r=1}^{min(T, K)} 1 / log2(r + 1)
        mrr@K        1 / rank of the first hit if it is within K, else 0
    Keys are "hit_rate@K", ..., "mrr@K"; values [N] float64, one per case.
    """
    topk_ids = torch.as_tensor(topk_ids, dtype=torch.int64)
    indptr, target_items = (torch.as_tensor(part, dtype=torch.int64) for part in targets)
    n_cases, k_max = topk_ids.shape
    if n_cases == 0:
        raise ValueError("no cases to evaluate")
    if indptr.shape != (n_cases + 1,):
        raise ValueError(f"targets indptr must have N + 1 = {n_cases + 1} entries, got {tuple(indptr.shape)}")
    n_targets = indptr.diff()  # [N]
    if int(n_targets.min()) < 1:
        raise ValueError("every case needs at least one target")
    if any(not 1 <= k <= k_max for k in ks):
        raise ValueError(f"every K must lie in [1, {k_max}], got {list(ks)}")

    hit = in_rows(topk_ids, (indptr, target_items))  # [N, Kmax]
    cumulative_hits = hit.cumsum(dim=1, dtype=torch.float64)  # [N, Kmax]
    discount = 1.0 / torch.log2(torch.arange(2, k_max + 2, dtype=torch.float64))  # [Kmax] 1/log2(r+1), r = 1..Kmax
    dcg = (hit * discount).cumsum(dim=1)  # [N, Kmax]
    ideal_dcg = discount.cumsum(dim=0)  # [Kmax], IDCG with r targets at index r - 1
    first_hit_rank = torch.where(hit.any(dim=1), hit.to(torch.int8).argmax(dim=1) + 1, k_max + 1)  # [N], 1-based
    first_hit_rank = first_hit_rank.to(torch.float64)
    n_targets = n_targets.to(torch.float64)

    metrics: dict[str, Tensor] = {}
    for k in ks:
        hits = cumulative_hits[:, k - 1]  # [N]
        per_case = {
            "hit_rate": (hits > 0).to(torch.float64),
            "recall": hits / n_targets,
            "precision": hits / k,
            "f1": 2 * hits / (k + n_targets),
            "ndcg": dcg[:, k - 1] / ideal_dcg[n_targets.clamp(max=k).long() - 1],
            "mrr": torch.where(first_hit_rank <= k, 1.0 / first_hit_rank, 0.0),
        }
        metrics.update({f"{name}@{k}": values for name, values in per_case.items()})
    return metrics
