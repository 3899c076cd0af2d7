"""Exact top-K retrieval by maximum inner product over the whole item catalogue.

SDM scores item v for user u as the inner product o_u · V_v of the fused user vector and
the item output embedding (paper §3.6), and matching returns the K best items. This module
does that exactly, with bounded memory, for any catalogue size:

    for each query chunk Q:
        best = K slots of (score -inf, id -1) per query
        for each item chunk I:
            S = queries[Q] @ items[I].T                      # [|Q|, |I|]
            set S to -inf for the padding item and the excluded (case, item) pairs
            keep the entries of S that can still enter `best` (block-maximum filter)
            now and then: best = top K of (best ∪ kept entries)

The block-maximum filter is what makes this faster than `torch.topk` on every chunk (the
bare mm + topk floor): the items of a chunk are cut into blocks of (up to) 64, and one
cheap reduction gives each block's maximum per query. Only blocks whose maximum can still
enter `best` are gathered and filtered entry by entry, and for random-looking scores those
are a handful per query once the first chunk has set the bar.

Ordering is (score descending, item id ascending): ties go to the smaller id. Merging is a
stable sort of `best` followed by the candidates, each query's candidates in increasing id
order and all with larger ids than `best`, which implements exactly that order.
Scores must be finite: -inf marks "no item".
"""

from __future__ import annotations

import torch
from torch import Tensor

CSR = tuple[Tensor, Tensor]  # (indptr [N + 1], indices [nnz]), int64: row n owns indices[indptr[n]:indptr[n + 1]]

MAX_BLOCK = 64  # items per block of the block-maximum filter, at most


@torch.no_grad()
def top_k(
    queries: Tensor,
    items: Tensor,
    k: int,
    *,
    exclude: CSR | None = None,
    item_chunk: int = 8_192,
    query_chunk: int = 1_024,
    skip_padding: bool = True,
) -> tuple[Tensor, Tensor]:
    """Exact maximum-inner-product top-k: scores [N, k] (descending) and item ids [N, k] (int64).

    queries [N, d], items [M, d] (row 0 is the padding item and is never returned when
    skip_padding). Ties are broken by the smaller item id. `exclude` is a CSR
    (indptr [N + 1], indices [nnz]) of the item ids case n must not get (e.g. items the user
    has already seen). If k exceeds the number of eligible items, the tail has score -inf
    and id -1. Memory is one [query_chunk, item_chunk] score block plus candidate buffers of
    about query_chunk * k entries, whatever M is. The defaults keep the score block at 32 MB
    (float32), small enough to stay in cache while it is reduced to block maxima; larger
    blocks measured slower.
    """
    if queries.ndim != 2 or items.ndim != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(f"expected queries [N, d] and items [M, d], got {list(queries.shape)} and {list(items.shape)}")
    if queries.dtype != items.dtype:
        raise ValueError(f"queries and items must share a dtype, got {queries.dtype} and {items.dtype}")
    if k < 1 or item_chunk < 1 or query_chunk < 1:
        raise ValueError("k, item_chunk and query_chunk must be positive")
    n_cases, n_items = queries.shape[0], items.shape[0]
    if exclude is not None:
        indptr, indices = (torch.as_tensor(part, dtype=torch.int64) for part in exclude)
        exclude = (indptr, indices)
        if indptr.shape != (n_cases + 1,):
            raise ValueError(f"exclude indptr must have N + 1 = {n_cases + 1} entries, got {tuple(indptr.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n_items):
            raise ValueError(f"exclude holds item ids outside [0, {n_items})")

    best_scores = torch.empty(n_cases, k, dtype=queries.dtype)
    best_ids = torch.empty(n_cases, k, dtype=torch.int64)
    for start in range(0, n_cases, query_chunk):
        stop = min(start + query_chunk, n_cases)
        excluded = _excluded_pairs(exclude, start, stop, item_chunk, n_items) if exclude is not None else None
        best_scores[start:stop], best_ids[start:stop] = _top_k_for_query_chunk(
            queries[start:stop], items, k, excluded, item_chunk, skip_padding
        )
    return best_scores, best_ids


def _top_k_for_query_chunk(
    queries: Tensor,
    items: Tensor,
    k: int,
    excluded: tuple[Tensor, Tensor, Tensor] | None,
    item_chunk: int,
    skip_padding: bool,
) -> tuple[Tensor, Tensor]:
    """Running top-k of one query chunk over all item chunks: ([Q, k] scores, [Q, k] ids)."""
    n_queries, n_items = queries.shape[0], items.shape[0]
    best_scores = torch.full((n_queries, k), float("-inf"), dtype=queries.dtype)  # [Q, k]
    best_ids = torch.full((n_queries, k), -1, dtype=torch.int64)  # [Q, k]
    # Blocks small enough for a chunk to hold more than k of them, so that its k-th largest
    # block maximum can bound the candidates while the running top-k is still empty.
    block = max(1, min(MAX_BLOCK, min(item_chunk, n_items) // (k + 1)))
    # One score buffer reused by every item chunk, its rows padded to whole blocks.
    buffer = torch.empty(n_queries * _round_up(min(item_chunk, n_items), block), dtype=queries.dtype)
    # Merging costs the same however few candidates a chunk yields, so candidates are pooled
    # until there are about k per case. Between merges the threshold lags behind, which only
    # lets a few more candidates through.
    pooled: list[tuple[Tensor, Tensor, Tensor]] = []
    n_pooled = 0

    for chunk_index, item_start in enumerate(range(0, n_items, item_chunk)):
        n_chunk_items = min(item_chunk, n_items - item_start)
        scores = buffer[: n_queries * _round_up(n_chunk_items, block)].view(n_queries, -1)  # [Q, I]
        torch.mm(queries, items[item_start : item_start + n_chunk_items].T, out=scores[:, :n_chunk_items])
        scores[:, n_chunk_items:] = float("-inf")  # columns past the catalogue's end
        if skip_padding and item_start == 0:
            scores[:, 0] = float("-inf")
        if excluded is not None:
            excluded_cases, excluded_items, chunk_bounds = excluded
            lo, hi = chunk_bounds[chunk_index], chunk_bounds[chunk_index + 1]
            scores[excluded_cases[lo:hi], excluded_items[lo:hi] - item_start] = float("-inf")

        case, item, score = _candidates(scores, best_scores[:, -1], k, block)
        pooled.append((case, item + item_start, score))
        n_pooled += case.numel()
        if n_pooled >= n_queries * k or item_start + item_chunk >= n_items:
            case, item, score = (torch.cat(parts) for parts in zip(*pooled))
            best_scores, best_ids = _merge(best_scores, best_ids, case, item, score, k)
            pooled, n_pooled = [], 0
    return best_scores, best_ids


def _candidates(scores: Tensor, threshold: Tensor, k: int, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Entries of scores [Q, I] that may enter the running top-k, as (case [P], item [P], score [P])
    sorted by case then item (item is the column within the chunk).

    An entry qualifies if score > threshold[case], the running k-th best: an equal score
    loses the tie to the running items, whose ids are smaller. When that lets more than k
    blocks through for some case (the running top-k is not full yet, or the chunk is unusually
    good), entries must also be >= the case's k-th largest block maximum: the chunk holds k
    entries at least that large, and an equal one may still win on id.
    """
    n_queries, n_blocks = scores.shape[0], scores.shape[1] // block
    blocks = scores.view(n_queries, n_blocks, block)  # [Q, nb, block]
    block_max = blocks.amax(dim=2)  # [Q, nb]
    floor = torch.nextafter(threshold, threshold.new_tensor(float("inf")))  # [Q]; score > threshold <=> score >= floor
    # [B], [B]: the blocks to look into, sorted by case then block
    block_case, block_index = (block_max >= floor.unsqueeze(1)).nonzero(as_tuple=True)
    if block_case.numel() > k and int(torch.bincount(block_case).max()) > k:
        floor = torch.maximum(floor, block_max.topk(k, dim=1, sorted=False).values.amin(dim=1))
        block_case, block_index = (block_max >= floor.unsqueeze(1)).nonzero(as_tuple=True)

    block_scores = blocks[block_case, block_index]  # [B, block]
    block_row, lane = (block_scores >= floor[block_case].unsqueeze(1)).nonzero(as_tuple=True)  # [P], [P]
    return block_case[block_row], block_index[block_row] * block + lane, block_scores[block_row, lane]


def _merge(
    best_scores: Tensor, best_ids: Tensor, case: Tensor, item: Tensor, score: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Top-k of the running best [Q, k] and the candidates (case [P], item [P], score [P]), whose
    items come in increasing id order within each case and are all larger than the running ids."""
    n_queries = best_scores.shape[0]
    # Group the candidates by case (keeping the id order) and lay them out densely:
    # row = case, column = rank among the case's candidates.
    by_case = torch.argsort(case, stable=True)
    case, item, score = case[by_case], item[by_case], score[by_case]
    per_case = torch.bincount(case, minlength=n_queries)  # [Q]
    first_of_case = torch.cumsum(per_case, 0) - per_case  # [Q]
    column = torch.arange(case.numel()) - first_of_case[case]  # [P]
    width = int(per_case.max()) if case.numel() else 0
    dense_scores = best_scores.new_full((n_queries, width), float("-inf"))  # [Q, W]
    dense_ids = best_ids.new_full((n_queries, width), -1)  # [Q, W]
    dense_scores[case, column] = score
    dense_ids[case, column] = item

    # Among equal scores, running entries (smaller ids) precede candidates in id order, so a
    # stable sort breaks ties by the smaller id.
    all_scores = torch.cat([best_scores, dense_scores], dim=1)  # [Q, k + W]
    all_ids = torch.cat([best_ids, dense_ids], dim=1)  # [Q, k + W]
    top_scores, order = all_scores.sort(dim=1, descending=True, stable=True)
    return top_scores[:, :k], all_ids.gather(1, order[:, :k])


def _excluded_pairs(
    exclude: CSR, start: int, stop: int, item_chunk: int, n_items: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The (case, item) pairs of cases [start, stop), case relative to start, grouped by item
    chunk: (cases [E], items [E], chunk_bounds [n_chunks + 1]) with chunk c owning pairs
    chunk_bounds[c]:chunk_bounds[c + 1]."""
    indptr, indices = exclude
    items = indices[int(indptr[start]) : int(indptr[stop])]  # [E]
    per_case = indptr[start + 1 : stop + 1] - indptr[start:stop]  # [Q]
    cases = torch.repeat_interleave(torch.arange(stop - start), per_case)  # [E]
    chunk_of_pair, order = (items // item_chunk).sort(stable=True)
    chunk_bounds = torch.searchsorted(chunk_of_pair, torch.arange(_round_up(n_items, item_chunk) // item_chunk + 1))
    return cases[order], items[order], chunk_bounds


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
