"""Approximate top-K with faiss, for catalogues where exact search is too slow to serve.

faiss is an optional extra (`pip install "sdm[faiss]"`); evaluation reports how much of the exact
top-K an index finds (its recall against exact search) next to the ranking metrics.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import InputError

INDEX_KINDS = ("hnsw", "flat", "ivf")
HNSW_NEIGHBOURS, HNSW_EF_SEARCH = 32, 128


def build_index(items: Tensor, kind: str):
    """A faiss inner-product index over items[1:] (row 0 is padding)."""
    try:
        import faiss
    except ImportError:
        raise InputError('--index faiss needs faiss-cpu: pip install "sdm[faiss]"') from None
    vectors = np.ascontiguousarray(items[1:].detach().numpy().astype(np.float32))
    d = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        n_lists = max(1, int(np.sqrt(len(vectors))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, n_lists, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = max(1, n_lists // 8)
    index.add(vectors)
    return index


def drop_excluded(ids: Tensor, scores: Tensor, exclude: tuple[Tensor, Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Remove each case's excluded items from its ranked list and keep the first k (-1 / -inf pad)."""
    indptr, indices = exclude
    n_cases = ids.shape[0]
    modulus = int(max(int(ids.max()), int(indices.max()) if indices.numel() else 0)) + 2
    owner = torch.repeat_interleave(torch.arange(n_cases), indptr.diff())
    keys, _ = torch.sort(owner * modulus + indices)
    query = torch.arange(n_cases).unsqueeze(1) * modulus + ids
    if len(keys):
        excluded = keys[torch.searchsorted(keys, query).clamp(max=len(keys) - 1)] == query
    else:
        excluded = torch.zeros_like(ids, dtype=torch.bool)
    drop = excluded | (ids < 0)
    order = torch.argsort(drop.to(torch.int8), dim=1, stable=True)[:, :k]  # kept entries first, in rank order
    kept_ids = torch.where(drop, -1, ids).gather(1, order)
    kept_scores = torch.where(drop, float("-inf"), scores).gather(1, order)
    return kept_scores, kept_ids


def faiss_top_k(
    queries: Tensor, items: Tensor, k: int, kind: str = "hnsw", exclude: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Approximate top-k (scores, item ids) [N, k], same conventions as retrieval.top_k."""
    return index_top_k(build_index(items, kind), queries, k, exclude)


def index_top_k(index, queries: Tensor, k: int, exclude: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Top-k (scores, item ids) [N, k] from an index of build_index: ids are its positions + 1.
    Excluded items are searched past (k plus the longest exclusion list), then dropped."""
    extra = int(exclude[0].diff().max()) if exclude is not None and len(exclude[0]) > 1 else 0
    search_k = min(k + extra, index.ntotal)
    scores, positions = index.search(np.ascontiguousarray(queries.detach().numpy().astype(np.float32)), search_k)
    ids = torch.from_numpy(np.where(positions >= 0, positions + 1, -1).astype(np.int64))
    scores = torch.from_numpy(scores).to(queries.dtype)
    if exclude is not None:
        return drop_excluded(ids, scores, exclude, k)
    pad = k - ids.shape[1]
    if pad > 0:
        ids = torch.cat([ids, torch.full((ids.shape[0], pad), -1)], dim=1)
        scores = torch.cat([scores, torch.full((scores.shape[0], pad), float("-inf"), dtype=scores.dtype)], dim=1)
    return scores, ids


def overlap_recall(approximate: Tensor, exact: Tensor) -> float:
    """Share of the exact top-K ids (>= 0) that the approximate top-K also returns."""
    valid = exact >= 0
    found = (approximate.unsqueeze(2) == exact.unsqueeze(1)).any(1) & valid  # [N, K]
    return float(found.sum() / valid.sum().clamp(min=1))
