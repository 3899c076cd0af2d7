"""Full-catalogue retrieval evaluation: embed every case and every item, exact top-K, metrics."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from sdm.data import SessionData, load_cases, seen_items
from sdm.metrics import ranking_metrics
from sdm.model import Recommender
from sdm.retrieval import top_k

EMBED_BATCH = 2048


@torch.no_grad()
def embed_cases(model: Recommender, cases: SessionData, batch_size: int = EMBED_BATCH) -> Tensor:
    """-> [N, d] user vectors of every case, in row order."""
    model.eval()
    rows = torch.arange(len(cases))
    return torch.cat([model.user_vectors(cases.batch(chunk)) for chunk in rows.split(batch_size)])


@torch.no_grad()
def retrieve(model: Recommender, cases: SessionData, k: int, exclude: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Top-k (scores, item ids) [N, k] for every case over the whole catalogue."""
    model.eval()
    return top_k(embed_cases(model, cases), model.item_vectors(), k, exclude=exclude)


def evaluate_cases(
    model: Recommender,
    cases: SessionData,
    ks: Sequence[int],
    exclude: tuple[Tensor, Tensor] | None = None,
) -> dict[str, float]:
    _, ids = retrieve(model, cases, max(ks), exclude)
    return ranking_metrics(ids, (cases.targets_indptr, cases.targets_indices), ks)


def evaluate_split(
    model: Recommender, data: Path, catalogue, split: str, ks: Sequence[int], exclude_seen: bool = False
) -> dict[str, float]:
    cases, keys = load_cases(data, catalogue, split)
    if len(cases) == 0:
        return {"n_cases": 0}
    exclude = seen_items(data, keys) if exclude_seen else None
    return evaluate_cases(model, cases, ks, exclude)
