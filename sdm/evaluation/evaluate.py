"""Full-catalogue retrieval evaluation: embed every case and every item, exact top-K, metrics."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from sdm.serving.ann import faiss_top_k, overlap_recall
from sdm.data.sessions import SessionData, csr_rows, load_cases, seen_items, to_device
from sdm.training.distributed import Ranks
from sdm.evaluation.metrics import METRICS, per_case_metrics, ranking_metrics
from sdm.models.base import Recommender
from sdm.evaluation.retrieval import top_k

EMBED_BATCH = 2048


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (or, without any, its buffers) live."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


@torch.no_grad()
def embed_cases(model: Recommender, cases: SessionData, batch_size: int = EMBED_BATCH) -> Tensor:
    """-> [N, d] user vectors of every case, in row order, float32 on the CPU (where retrieval runs)."""
    model.eval()
    device = model_device(model)
    rows = torch.arange(len(cases))
    return torch.cat([model.user_vectors(to_device(cases.batch(chunk), device)).float().cpu() for chunk in rows.split(batch_size)])


@torch.no_grad()
def retrieve(model: Recommender, cases: SessionData, k: int, exclude: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Top-k (scores, item ids) [N, k] for every case over the whole catalogue."""
    model.eval()
    return top_k(embed_cases(model, cases), model.item_vectors().float().cpu(), k, exclude=exclude)


def evaluate_shared(
    model: Recommender, cases: SessionData, ks: Sequence[int], ranks: Ranks, exclude: tuple[Tensor, Tensor] | None = None
) -> dict[str, float]:
    """`evaluate_cases` (exact) with the cases shared out among the ranks: each ranks its own share,
    and the per-case metrics are summed over all ranks, so every rank gets the metrics of all
    cases (the same as one process, up to the order of the sums)."""
    names = [f"{name}@{k}" for k in ks for name in METRICS]
    start, stop = ranks.share(len(cases))
    sums = torch.zeros(len(names), dtype=torch.float64)
    if stop > start:
        share = cases.rows_between(start, stop)
        _, ids = retrieve(model, share, max(ks), None if exclude is None else csr_rows(exclude, start, stop))
        per_case = per_case_metrics(ids, (share.targets_indptr, share.targets_indices), ks)
        sums = torch.stack([per_case[name].sum() for name in names])
    totals = ranks.sum(sums)
    return {name: float(total / len(cases)) for name, total in zip(names, totals, strict=True)} | {"n_cases": len(cases)}


def evaluate_cases(
    model: Recommender,
    cases: SessionData,
    ks: Sequence[int],
    exclude: tuple[Tensor, Tensor] | None = None,
    index: str = "exact",
) -> dict[str, float]:
    """Ranking metrics of exact top-K, or of a faiss index (`index` in sdm.serving.ann.INDEX_KINDS), in
    which case `index_recall@K` says how much of the exact top-K the index found."""
    if index == "exact":
        _, ids = retrieve(model, cases, max(ks), exclude)
        return ranking_metrics(ids, (cases.targets_indptr, cases.targets_indices), ks)
    model.eval()
    with torch.no_grad():
        queries, items = embed_cases(model, cases), model.item_vectors().float().cpu()
        _, exact = top_k(queries, items, max(ks), exclude=exclude)
    _, approximate = faiss_top_k(queries, items, max(ks), index, exclude)
    metrics = ranking_metrics(approximate, (cases.targets_indptr, cases.targets_indices), ks)
    return metrics | {f"index_recall@{k}": overlap_recall(approximate[:, :k], exact[:, :k]) for k in ks}


def evaluate_split(
    model: Recommender,
    data: Path,
    catalogue,
    split: str,
    ks: Sequence[int],
    exclude_seen: bool = False,
    index: str = "exact",
) -> dict[str, float]:
    cases, keys = load_cases(data, catalogue, split)
    if len(cases) == 0:
        return {"n_cases": 0}
    exclude = seen_items(data, keys) if exclude_seen else None
    return evaluate_cases(model, cases, ks, exclude, index)
