"""Approximate top-K with faiss, for catalogues where exact search is too slow to serve.

faiss is an optional extra (`pip install "sdm[faiss]"`); evaluation reports how much of the exact
top-K an index finds (its recall against exact search) next to the ranking metrics.

HNSW and IVF search a Euclidean space, not the inner product: graph and cluster neighbourhoods
are built on distances, and under the inner product items of large norm are everybody's
neighbours, so on trained vectors (norms vary by item popularity) an inner-product HNSW found
only about half of the exact top-300 (docs/benchmarks.md). Each item x gets one more coordinate,
sqrt(R^2 - |x|^2) with R the largest item norm, and each query q a 0 there; then
|q - x'|^2 = |q|^2 + R^2 - 2 q.x, so the nearest items are those of largest inner product
(Bachrach et al., RecSys 2014). An index in this space has faiss's L2 metric and dimension d + 1;
`index_top_k` recognises it by its metric. The index only picks the candidates: their scores are
recomputed as exact inner products with the item vectors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import InputError
from sdm.evaluation.csr import in_rows

INDEX_KINDS = ("hnsw", "flat", "ivf")
RESCORE_CHUNK = 1 << 22  # item coordinates gathered at once when rescoring candidates (16 MB)


@dataclass(frozen=True)
class IndexParams:
    """How an index is built and searched. The defaults find >= 0.95 of the exact top-300 on
    the benchmark's trained vectors at 100k and 1M items (docs/benchmarks.md, "Serving")."""

    # At 1M items M 32 found 0.93 of the top-300 at efSearch 800 and 0.95 at 1200; M 48, 0.95
    # and 0.96, and searched faster for the same recall.
    M: int = 48  # HNSW: graph neighbours per node (memory: 2 * M * 4 bytes per item)
    efConstruction: int = 200  # HNSW: candidates kept while inserting; faiss's 40 built a poor graph
    efSearch: int = 1200  # HNSW: candidates kept while searching (faiss searches max(efSearch, K))
    nlist: int = 0  # IVF: clusters; 0 = sqrt(items)
    nprobe: int = 0  # IVF: clusters searched; 0 = nlist / 16

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            low = 0 if name in ("nlist", "nprobe") else 1
            if not isinstance(value, int) or value < low:
                raise InputError(f"--{option_name(name)} {value!r}: expected an integer of at least {low}")
        if self.nlist and self.nprobe > self.nlist:
            raise InputError(f"--nprobe {self.nprobe}: at most --nlist ({self.nlist})")


def option_name(param: str) -> str:
    return {"M": "hnsw-m", "efConstruction": "ef-construction", "efSearch": "ef-search"}.get(param, param)


def euclidean_items(items: np.ndarray) -> np.ndarray:
    """[n, d] item vectors -> [n, d + 1] whose Euclidean neighbours are the inner-product ones."""
    norms = np.einsum("ij,ij->i", items, items)
    extra = np.sqrt(np.maximum(norms.max(initial=0.0) - norms, 0.0))
    return np.ascontiguousarray(np.hstack([items, extra[:, None]]), dtype=np.float32)


def build_index(items: Tensor, kind: str, params: IndexParams = IndexParams()):
    """A faiss index over items[1:] (row 0 is padding): flat searches the inner product exactly,
    hnsw and ivf the Euclidean space of `euclidean_items`."""
    try:
        import faiss
    except ImportError:
        raise InputError('--index faiss needs faiss-cpu: pip install "sdm[faiss]"') from None
    vectors = np.ascontiguousarray(items[1:].detach().numpy().astype(np.float32))
    if kind == "flat":
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return index
    vectors = euclidean_items(vectors)
    d = vectors.shape[1]
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params.M, faiss.METRIC_L2)
        index.hnsw.efConstruction = params.efConstruction
        index.hnsw.efSearch = params.efSearch
    else:
        n_lists = min(params.nlist or max(1, int(np.sqrt(len(vectors)))), len(vectors))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, n_lists, faiss.METRIC_L2)
        index.train(vectors)
        index.nprobe = min(params.nprobe or max(1, n_lists // 16), n_lists)
    index.add(vectors)
    return index


def index_params(index) -> dict[str, int]:
    """The parameters an index was built and is searched with (faiss stores them in the index file)."""
    import faiss

    if isinstance(index, faiss.IndexHNSW):
        return {"M": int(index.hnsw.nb_neighbors(1)), "efConstruction": int(index.hnsw.efConstruction),
                "efSearch": int(index.hnsw.efSearch)}
    if isinstance(index, faiss.IndexIVF):
        return {"nlist": int(index.nlist), "nprobe": int(index.nprobe)}
    return {}


def drop_excluded(ids: Tensor, scores: Tensor, exclude: tuple[Tensor, Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Remove each case's excluded items from its ranked list and keep the first k (-1 / -inf pad)."""
    excluded = in_rows(ids, exclude)  # [N, K]
    drop = excluded | (ids < 0)
    order = torch.argsort(drop.to(torch.int8), dim=1, stable=True)[:, :k]  # kept entries first, in rank order
    kept_ids = torch.where(drop, -1, ids).gather(1, order)
    kept_scores = torch.where(drop, float("-inf"), scores).gather(1, order)
    return kept_scores, kept_ids


def faiss_top_k(
    queries: Tensor, items: Tensor, k: int, kind: str = "hnsw", exclude: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Approximate top-k (scores, item ids) [N, k], same conventions as retrieval.top_k."""
    return index_top_k(build_index(items, kind), items, queries, k, exclude)


def index_top_k(
    index, items: Tensor, queries: Tensor, k: int, exclude: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Top-k (scores, item ids) [N, k] from an index of build_index over items[1:]: ids are its
    positions + 1, scores the exact inner products with `items`, best first. Excluded items are
    searched past (k plus the longest exclusion list), then dropped; -1 / -inf pad."""
    import faiss

    extra = int(exclude[0].diff().max()) if exclude is not None and len(exclude[0]) > 1 else 0
    search_k = min(k + extra, index.ntotal)
    search = np.ascontiguousarray(queries.detach().numpy().astype(np.float32))
    if index.metric_type == faiss.METRIC_L2:  # the Euclidean space of euclidean_items: queries get a 0
        search = np.hstack([search, np.zeros((len(search), 1), dtype=np.float32)])
    _, positions = index.search(search, search_k)
    ids = torch.from_numpy(np.where(positions >= 0, positions + 1, -1).astype(np.int64))
    scores = torch.empty(ids.shape, dtype=items.dtype)
    rows = max(1, RESCORE_CHUNK // max(1, search_k * items.shape[1]))
    for start in range(0, len(ids), rows):
        block = slice(start, start + rows)
        scores[block] = torch.einsum("nd,nkd->nk", queries[block].to(items.dtype), items[ids[block].clamp(min=0)])
    scores = scores.to(queries.dtype)
    scores = scores.masked_fill(ids < 0, float("-inf"))
    scores, order = scores.sort(dim=1, descending=True, stable=True)
    ids = ids.gather(1, order)
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
