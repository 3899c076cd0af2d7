"""Exact top-K retrieval by maximum inner product over the whole item catalogue.

SDM scores item v for user u as the inner product o_u · V_v of the fused user vector and
the item output embedding (paper §3.6), and matching returns the K best items. This module
does that exactly, with bounded memory, for any catalogue size:

    for each query chunk Q (the chunks shared out among torch's threads):
        best = K slots of (score -inf, id -1) per query
        for each item chunk C, tile by tile:
            S[:, T] = queries[Q] @ items[T].T                 # one matrix product per tile
            set S[:, T] to -inf for the padding item
            maxima of groups of 8 scores of S[:, T]          # while the tile is in cache
        maxima of groups of 8 of those, and so on up (levels of maxima)
        from the top level down, keep the groups whose maximum can still enter `best`
        now and then: best = top K of (best ∪ kept entries that are not excluded)

Nearly all the time should be the matrix products (2 · cases · items · d flops); the rest is
made to cost little next to them:
- A tile's scores (about TILE_SCORES floats) fit in a core's L2 cache, so the first reduction
  reads them from cache, not from memory.
- A group is FANOUT entries spaced evenly through its tile (entries g, g + n, g + 2n, ...), so
  its maximum is an elementwise max over rows of the tile, which vectorises; groups of adjacent
  entries need a horizontal reduction (twice as slow here for groups of 64).
- Descending the levels looks at FANOUT entries per level for each score that may enter `best`
  (a few hundred per query over 1M items once the first chunk has set the bar), instead of a
  whole block of 64. These steps are a dozen small operations, paid once per chunk
  (CHUNK_SCORES floats) rather than per tile.
- Excluded (case, item) pairs are not masked in the scores (an operation per tile): they are
  dropped from the candidates when merging. An excluded item may thus be a group's maximum,
  which only costs a look into that group, and the bound of the first chunk (see _candidates)
  allows for one spoilt group per excluded pair.
- Query chunks are independent, so each of torch's threads takes whole chunks and runs them
  single-threaded: the small steps of one chunk overlap the matrix products of another instead
  of leaving a core idle, as they did when every operation was split between the threads.

Ordering is (score descending, item id ascending): ties go to the smaller id. Merging sorts the
candidates by (case, item) and then stably sorts `best` followed by them by score: every
candidate has a larger id than the entries of `best`, so that is exactly this order.
Scores must be finite: -inf marks "no item".
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from sdm.evaluation.csr import CSR


FANOUT = 8  # entries per group of a level of maxima
MAX_LEVELS = 3  # levels of maxima: the top one has a group per FANOUT**3 = 512 scores of a tile
TILE_SCORES = 1 << 19  # scores per matrix product (2 MB of float32: a core's L2 cache)
CHUNK_SCORES = 1 << 23  # scores per candidate extraction (32 MB)
QUERY_CHUNK = 256  # queries per chunk: tiles of 2,048 items, for which torch.mm ran fastest here


@dataclass(frozen=True)
class _Plan:
    """How one query chunk walks the catalogue: chunks of `chunk` items, each in tiles of `tile`
    items; a tile takes `width` columns of the score buffer (tile rounded up to whole top-level
    groups) and is summarised by `levels` levels of maxima, each FANOUT times coarser."""

    chunk: int
    tile: int
    levels: int

    @property
    def width(self) -> int:
        return _round_up(self.tile, FANOUT**self.levels)

    @property
    def tiles_per_chunk(self) -> int:
        return -(-self.chunk // self.tile)


@torch.no_grad()
def top_k(
    queries: Tensor,
    items: Tensor,
    k: int,
    *,
    exclude: CSR | None = None,
    item_chunk: int | None = None,
    item_tile: int | None = None,
    query_chunk: int = QUERY_CHUNK,
    skip_padding: bool = True,
) -> tuple[Tensor, Tensor]:
    """Exact maximum-inner-product top-k: scores [N, k] (descending) and item ids [N, k] (int64).

    queries [N, d], items [M, d] (row 0 is the padding item and is never returned when
    skip_padding). Ties are broken by the smaller item id. `exclude` is a CSR
    (indptr [N + 1], indices [nnz]) of the item ids case n must not get (e.g. items the user
    has already seen). If k exceeds the number of eligible items, the tail has score -inf
    and id -1. item_chunk (items per candidate extraction) and item_tile (items per matrix
    product) default to CHUNK_SCORES and TILE_SCORES scores per query chunk. Memory is one
    [query_chunk, item_chunk] score buffer per thread plus candidate buffers of about
    query_chunk * k entries, whatever M is. The result does not depend on the chunk sizes or
    on the number of threads.
    """
    if queries.ndim != 2 or items.ndim != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(f"expected queries [N, d] and items [M, d], got {list(queries.shape)} and {list(items.shape)}")
    if queries.dtype != items.dtype:
        raise ValueError(f"queries and items must share a dtype, got {queries.dtype} and {items.dtype}")
    if k < 1 or query_chunk < 1 or any(size is not None and size < 1 for size in (item_chunk, item_tile)):
        raise ValueError("k, item_chunk, item_tile and query_chunk must be positive")
    n_cases, n_items = queries.shape[0], items.shape[0]
    if exclude is not None:
        indptr, indices = (torch.as_tensor(part, dtype=torch.int64) for part in exclude)
        exclude = (indptr, indices)
        if indptr.shape != (n_cases + 1,):
            raise ValueError(f"exclude indptr must have N + 1 = {n_cases + 1} entries, got {tuple(indptr.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n_items):
            raise ValueError(f"exclude holds item ids outside [0, {n_items})")

    queries, items = queries.contiguous(), items.contiguous()
    query_chunk = min(query_chunk, n_cases) or 1
    plan = _plan(query_chunk, n_items, item_chunk, item_tile)
    starts = range(0, n_cases, query_chunk)

    def one_chunk(start: int) -> tuple[Tensor, Tensor]:
        stop = min(start + query_chunk, n_cases)
        excluded = _excluded_keys(exclude, start, stop, n_items) if exclude is not None else None
        return _top_k_for_query_chunk(queries[start:stop], items, k, excluded, plan, skip_padding)

    results = _map_single_threaded(one_chunk, starts)
    if not results:
        return torch.empty(0, k, dtype=queries.dtype), torch.empty(0, k, dtype=torch.int64)
    scores, ids = zip(*results)
    return torch.cat(scores), torch.cat(ids)


def _plan(n_queries: int, n_items: int, item_chunk: int | None, item_tile: int | None) -> _Plan:
    """Tile and chunk sizes for query chunks of n_queries, and as many levels of maxima (up to
    MAX_LEVELS) as leave at least one group per tile at the top."""
    tile = item_tile or _round_up(max(1, TILE_SCORES // n_queries), FANOUT**MAX_LEVELS)
    chunk = item_chunk or max(1, CHUNK_SCORES // n_queries // tile) * tile
    tile = min(tile, chunk, n_items) or 1
    levels = next(level for level in range(MAX_LEVELS, -1, -1) if FANOUT**level <= tile)
    return _Plan(chunk=chunk, tile=tile, levels=levels)


def _map_single_threaded(function, starts: range) -> list:
    """[function(start) for start in starts], spread over torch.get_num_threads() threads that
    each run their torch operations on one thread (the setting is restored afterwards)."""
    threads = torch.get_num_threads()
    if min(threads, len(starts)) <= 1:
        return [function(start) for start in starts]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, len(starts))) as pool:
            return list(pool.map(function, starts))
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()  # grad mode is per thread: the workers do not inherit top_k's
def _top_k_for_query_chunk(
    queries: Tensor,
    items: Tensor,
    k: int,
    excluded: tuple[Tensor, Tensor] | None,
    plan: _Plan,
    skip_padding: bool,
) -> tuple[Tensor, Tensor]:
    """Running top-k of one query chunk over all item chunks: ([Q, k] scores, [Q, k] ids).
    excluded: (keys [E], item ids [E]) of the excluded pairs, key = case * n_items + item, sorted."""
    n_queries, n_items = queries.shape[0], items.shape[0]
    best_scores = torch.full((n_queries, k), float("-inf"), dtype=queries.dtype)  # [Q, k]
    best_ids = torch.full((n_queries, k), -1, dtype=torch.int64)  # [Q, k]
    tiles_per_chunk, width = plan.tiles_per_chunk, plan.width
    scores = torch.empty(n_queries, tiles_per_chunk * width, dtype=queries.dtype)  # [Q, tiles * width], reused
    # levels[0] is the scores seen as [tiles, Q, width]; levels[l] [tiles, Q, width / FANOUT**l]
    # holds the maxima of the groups of FANOUT entries of level l - 1 (see _candidates).
    levels = [scores.view(n_queries, tiles_per_chunk, width).transpose(0, 1)]
    levels += [torch.empty(tiles_per_chunk, n_queries, width // FANOUT**level, dtype=queries.dtype) for level in range(1, plan.levels + 1)]
    # Merging costs the same however few candidates a chunk yields, so candidates are pooled
    # until there are about k per case. Between merges the threshold lags behind, which only
    # lets a few more candidates through.
    pooled: list[tuple[Tensor, Tensor, Tensor]] = []
    n_pooled = 0

    for chunk_start in range(0, n_items, plan.chunk):
        n_tiles = -(-min(plan.chunk, n_items - chunk_start) // plan.tile)
        for tile in range(n_tiles):
            tile_start = chunk_start + tile * plan.tile
            n_tile_items = min(plan.tile, n_items - tile_start, chunk_start + plan.chunk - tile_start)
            tile_scores = levels[0][tile]  # [Q, width]
            torch.mm(queries, items[tile_start : tile_start + n_tile_items].T, out=tile_scores[:, :n_tile_items])
            if n_tile_items < width:
                tile_scores[:, n_tile_items:] = float("-inf")  # columns past the tile's last item
            if skip_padding and tile_start == 0:
                tile_scores[:, 0] = float("-inf")
            if plan.levels:  # the first level while the tile's scores are in cache
                torch.amax(tile_scores.view(n_queries, FANOUT, -1), dim=1, out=levels[1][tile])
        for level in range(2, plan.levels + 1):
            below = levels[level - 1][:n_tiles]
            torch.amax(below.view(n_tiles, n_queries, FANOUT, -1), dim=2, out=levels[level][:n_tiles])

        threshold = best_scores[:, -1]
        spoilt = None  # no bound from the chunk itself while the running top-k is full
        if not bool(torch.isfinite(threshold).all()):
            spoilt = 0 if excluded is None else _most_excluded(excluded, chunk_start, chunk_start + plan.chunk, n_items)
        case, item, score = _candidates([level[:n_tiles] for level in levels], threshold, k, spoilt, plan.tile)
        pooled.append((case, item + chunk_start, score))
        n_pooled += case.numel()
        if n_pooled >= n_queries * k or chunk_start + plan.chunk >= n_items:
            case, item, score = (torch.cat(parts) for parts in zip(*pooled))
            if excluded is not None:
                kept = ~torch.isin(case * n_items + item, excluded[0])
                case, item, score = case[kept], item[kept], score[kept]
            best_scores, best_ids = _merge(best_scores, best_ids, case, item, score, k, n_items)
            pooled, n_pooled = [], 0
    return best_scores, best_ids


def _candidates(
    levels: list[Tensor], threshold: Tensor, k: int, spoilt: int | None, tile: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Entries of one chunk that may enter the running top-k, as (case [P], item [P], score [P]),
    item counted from the chunk's first. levels[0] [tiles, Q, width] holds the chunk's scores by
    tile; entry g of levels[l] [tiles, Q, n_l] is the maximum of entries g, g + n_l, ...,
    g + (FANOUT - 1) n_l of levels[l - 1], so that it bounds FANOUT**l scores of its tile.

    An entry qualifies if score > threshold[case], the running k-th best: an equal score
    loses the tie to the running items, whose ids are smaller. Starting from every group of the
    top level, each step keeps the groups whose maximum qualifies and looks into their FANOUT
    members one level down. While the running top-k is not full (the first chunk; spoilt is
    then not None), entries must also be >= the case's (k + spoilt)-th largest maximum of the
    finest level holding that many groups, where spoilt bounds any case's excluded pairs in the
    chunk (each the maximum of at most one group): the chunk holds k eligible entries at least
    that large, and an equal one may still win on id. Excluded entries are among the
    candidates returned.
    """
    n_queries = threshold.shape[0]
    floor = torch.nextafter(threshold, threshold.new_tensor(float("inf")))  # [Q]; score > threshold <=> score >= floor
    if spoilt is not None:
        rank = k + spoilt
        bounding = next((level for level in levels[1:] + levels[:1] if level.shape[0] * level.shape[2] >= rank), None)
        if bounding is not None:
            per_case = bounding.transpose(0, 1).reshape(n_queries, -1)  # [Q, tiles * n_l]
            floor = torch.maximum(floor, per_case.topk(rank, dim=1, sorted=False).values.amin(dim=1))

    tile_of, case, group = (levels[-1] >= floor[:, None]).nonzero(as_tuple=True)  # [G] each: the groups to look into
    for level in range(len(levels) - 1, 0, -1):
        n_groups = levels[level].shape[2]
        members = levels[level - 1].unflatten(2, (FANOUT, n_groups))[tile_of, case, :, group]  # [G, FANOUT]
        row, member = (members >= floor[case].unsqueeze(1)).nonzero(as_tuple=True)
        tile_of, case, group = tile_of[row], case[row], group[row] + member * n_groups
    score = levels[0][tile_of, case, group]
    return case, tile_of * tile + group, score


def _merge(
    best_scores: Tensor, best_ids: Tensor, case: Tensor, item: Tensor, score: Tensor, k: int, n_items: int
) -> tuple[Tensor, Tensor]:
    """Top-k of the running best [Q, k] and the candidates (case [P], item [P], score [P]), whose
    items are all larger than the running ids."""
    n_queries = best_scores.shape[0]
    # Group the candidates by case in increasing id order and lay them out densely:
    # row = case, column = rank among the case's candidates.
    by_case = torch.argsort(case * n_items + item)
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


def _excluded_keys(exclude: CSR, start: int, stop: int, n_items: int) -> tuple[Tensor, Tensor]:
    """The excluded pairs of cases [start, stop) as (keys [E], sorted, with key = case * n_items
    + item and case relative to start; the same pairs' items [E], in key order)."""
    indptr, indices = exclude
    items = indices[int(indptr[start]) : int(indptr[stop])]  # [E]
    per_case = indptr[start + 1 : stop + 1] - indptr[start:stop]  # [Q]
    cases = torch.repeat_interleave(torch.arange(stop - start), per_case)  # [E]
    keys, order = (cases * n_items + items).sort()
    return keys, items[order]


def _most_excluded(excluded: tuple[Tensor, Tensor], start: int, stop: int, n_items: int) -> int:
    """The most excluded pairs any one case has with items in [start, stop)."""
    keys, items = excluded
    cases = keys[(items >= start) & (items < stop)] // n_items
    return int(torch.bincount(cases).max()) if cases.numel() else 0


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
