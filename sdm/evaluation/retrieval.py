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
- A tile's scores (about TILE_BYTES) fit in a core's L2 cache, so the first reduction
  reads them from cache, not from memory.
- A group is FANOUT entries spaced evenly through its tile (entries g, g + n, g + 2n, ...), so
  its maximum is an elementwise max over rows of the tile, which vectorises; groups of adjacent
  entries need a horizontal reduction (twice as slow here for groups of 64).
- Descending the levels looks at FANOUT entries per level for each score that may enter `best`
  (a few hundred per query over 1M items once the first chunk has set the bar), instead of a
  whole block of 64. These steps are a dozen small operations, paid once per chunk
  (CHUNK_BYTES of scores) rather than per tile.
- Excluded (case, item) pairs are not masked in the scores (an operation per tile): they are
  dropped from the candidates when merging. An excluded item may thus be a group's maximum,
  which only costs a look into that group, and the bound of the first chunk (see _candidates)
  allows for one spoilt group per excluded pair.
- Query chunks are independent, so each of torch's threads takes whole chunks and runs them
  single-threaded: the small steps of one chunk overlap the matrix products of another instead
  of leaving a core idle, as they did when every operation was split between the threads.

Float32 catalogues large enough for it to pay are first screened in bfloat16, whose matrix
products run 2-3x faster on CPUs with bfloat16 instructions, and then rescored exactly:

    W candidates per query = the top W (> k) of the bfloat16 scores, by the kernel above
    rescore the W candidates in float32; the top k of them is the answer when it is certain:
        k-th rescored score > W-th bfloat16 score + c · |q| · max_v |v|      (c ≈ 3u, u = 2^-8)

A bfloat16 score differs from the float32 one by at most about 3u · |q| · |v| (u each for
rounding q, v and the product, summed in float32; exactly: _screen_error), so an item left out
of the W scores at most the right-hand side and cannot beat the k-th. Queries for which this
does not hold (scores bunched within the bound) are searched again in float32, so the answer is
the float32 top-k either way and only the time depends on the data. (The rescored products are
summed in another order than the tiles' products: two items whose float32 scores differ by
rounding alone may come out in the other order than without the screen.) The bfloat16 search
compares scores by their bits read as int16 (see _Order), which halves its reductions' time.

Ordering is (score descending, item id ascending): ties go to the smaller id. Merging sorts the
candidates by (case, item) and then stably sorts `best` followed by them by score: every
candidate has a larger id than the entries of `best`, so that is exactly this order.
Scores must be finite: -inf marks "no item".
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from sdm.evaluation.csr import CSR, rows_of


FANOUT = 8  # entries per group of a level of maxima
MAX_LEVELS = 3  # levels of maxima: the top one has a group per FANOUT**3 = 512 scores of a tile
TILE_BYTES = 1 << 21  # scores per matrix product: 2 MB, a core's L2 cache
CHUNK_BYTES = 1 << 25  # scores per candidate extraction: 32 MB
QUERY_CHUNK = 256  # queries per chunk: tiles of 2,048 items, for which torch.mm ran fastest here
# Screening (see above): bfloat16's unit roundoff; below SCREEN_MIN_ITEMS the float32 pass is
# cheap and a second pass for uncertain queries would cost more than screening saves.
BFLOAT16_ROUNDOFF = 2.0**-8
SCREEN_MIN_ITEMS = 1 << 16


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
    screen: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact maximum-inner-product top-k: scores [N, k] (descending) and item ids [N, k] (int64).

    queries [N, d], items [M, d] (row 0 is the padding item and is never returned when
    skip_padding). Ties are broken by the smaller item id. `exclude` is a CSR
    (indptr [N + 1], indices [nnz]) of the item ids case n must not get (e.g. items the user
    has already seen). If k exceeds the number of eligible items, the tail has score -inf
    and id -1. item_chunk (items per candidate extraction) and item_tile (items per matrix
    product) default to CHUNK_BYTES and TILE_BYTES of scores per query chunk. Memory is one
    [query_chunk, item_chunk] score buffer per thread plus candidate buffers of about
    query_chunk * k entries, whatever M is. The result does not depend on the chunk sizes or
    on the number of threads. screen: whether float32 inputs go through the bfloat16 screen
    (default: when the catalogue has SCREEN_MIN_ITEMS items and the CPU computes in bfloat16).
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
    search = _Search(k, exclude, item_chunk, item_tile, query_chunk, skip_padding)
    if screen is None:
        screen = queries.dtype == torch.float32 and n_items >= SCREEN_MIN_ITEMS and _computes_in_bfloat16()
    if screen and queries.dtype == torch.float32:
        return _screened_top_k(queries, items, search)
    return _top_k(queries, items, search)


@dataclass(frozen=True)
class _Search:
    """top_k's options but the vectors (exclude already as int64 tensors)."""

    k: int
    exclude: tuple[Tensor, Tensor] | None
    item_chunk: int | None
    item_tile: int | None
    query_chunk: int
    skip_padding: bool
    bit_keys: bool = False  # compare bfloat16 scores by their bits (_Order), as the screen does


@dataclass(frozen=True)
class _Order:
    """How the kernel compares scores: as themselves, or (bit_keys) a bfloat16 score by its bit
    pattern read as an int16, which reduces 4x faster here. Bits order positive scores as their
    values and put every negative score below them, in no useful order: a search whose k-th best
    score is positive is exact, any other one the screen does again in float32."""

    key_dtype: torch.dtype
    bottom: float  # below every key: "no item"

    @staticmethod
    def of(dtype: torch.dtype, bit_keys: bool) -> _Order:
        if bit_keys:
            if dtype != torch.bfloat16:
                raise ValueError(f"bit keys are for bfloat16 scores, not {dtype}")
            return _Order(torch.int16, torch.iinfo(torch.int16).min)
        return _Order(dtype, float("-inf"))

    def keys(self, scores: Tensor) -> Tensor:
        return scores if scores.dtype == self.key_dtype else scores.view(self.key_dtype)

    def above(self, keys: Tensor) -> Tensor:
        """The smallest keys greater than `keys`."""
        if self.key_dtype.is_floating_point:
            return torch.nextafter(keys, keys.new_tensor(float("inf")))
        return keys + 1


def _computes_in_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (without them bfloat16 products are emulated, slower)."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported is not None and supported())


def _screened_top_k(queries: Tensor, items: Tensor, search: _Search) -> tuple[Tensor, Tensor]:
    """The float32 top-k through a bfloat16 screen (see the module's docstring)."""
    k = search.k
    width = 2 * k + 64  # W: room enough that the bound rarely fails on trained vectors
    coarse, candidates = _top_k(queries.bfloat16(), items.bfloat16(), replace(search, k=width, bit_keys=True))  # [N, W] each
    scores, ids = _rescored(queries, items, candidates, k)  # [N, k] each, float32
    bound = _screen_error(queries.shape[1]) * queries.norm(dim=1) * items.norm(dim=1).max()  # [N]
    floor = coarse[:, -1].float()  # [N]: the W-th bfloat16 score, exact if positive (see _Order)
    uncertain = (~((floor > 0) & (scores[:, -1] > floor + bound))).nonzero().squeeze(1)  # [U]
    if uncertain.numel():
        exclude = None if search.exclude is None else rows_of(search.exclude, uncertain)
        # Typically a few dozen queries: one chunk per thread keeps every core on them.
        query_chunk = min(search.query_chunk, -(-uncertain.numel() // torch.get_num_threads()))
        scores[uncertain], ids[uncertain] = _top_k(queries[uncertain], items, replace(search, exclude=exclude, query_chunk=query_chunk))
    return scores, ids


def _screen_error(d: int) -> float:
    """c such that a bfloat16 score of q and v is within c |q| |v| of its float32 rescoring.

    Rounding q and v to bfloat16 moves q·v by at most (2u + u²) Σ|q_i v_i| (u = 2^-8), the
    float32 sum of the d products by γ_d (1 + u)² Σ|q_i v_i| (γ_d = d 2^-24 / (1 - d 2^-24), any
    order of summation), rounding the sum to bfloat16 by u |sum|; Σ|q_i v_i| <= |q| |v|. That
    is 3u + 4u² + 1.02 γ_d up to terms of u³; the rest of 5u² + 6γ_d covers the float32
    rescoring (γ_d) and the float32 norms and products of the bound itself (under 4γ_d).
    """
    u, gamma = BFLOAT16_ROUNDOFF, d * 2.0**-24 / (1 - d * 2.0**-24)
    return 3 * u + 5 * u**2 + 6 * gamma


def _rescored(queries: Tensor, items: Tensor, candidates: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top k of each query's candidates [N, W] (id -1: none) by float32 score, ties to the smaller id."""
    scores, ids = [], []
    for start in range(0, queries.shape[0], QUERY_CHUNK):  # bounds the [Q, W, d] gather
        chunk = candidates[start : start + QUERY_CHUNK]  # [Q, W]
        ranked = chunk.where(chunk >= 0, items.shape[0]).sort(dim=1).values  # [Q, W] by id, none last
        found = ranked < items.shape[0]
        vectors = items[ranked.where(found, 0)]  # [Q, W, d]
        exact = torch.bmm(vectors, queries[start : start + QUERY_CHUNK, :, None]).squeeze(2)  # [Q, W]
        exact = exact.masked_fill(~found, float("-inf"))
        top, order = exact.sort(dim=1, descending=True, stable=True)  # stable: equal scores keep id order
        scores.append(top[:, :k])
        ids.append(ranked.gather(1, order[:, :k]).where(top[:, :k] > float("-inf"), -1))
    return torch.cat(scores), torch.cat(ids)


def _top_k(queries: Tensor, items: Tensor, search: _Search) -> tuple[Tensor, Tensor]:
    """top_k in the inputs' own dtype: the kernel of the module's docstring."""
    k, exclude, skip_padding = search.k, search.exclude, search.skip_padding
    n_cases, n_items = queries.shape[0], items.shape[0]
    query_chunk = min(search.query_chunk, n_cases) or 1
    plan = _plan(query_chunk, n_items, search.item_chunk, search.item_tile, queries.element_size())
    order = _Order.of(queries.dtype, search.bit_keys)
    starts = range(0, n_cases, query_chunk)
    # Each thread allocates its buffers once: fresh ones for every query chunk cost page faults
    # (about 0.01 s per chunk over 1M items).
    per_thread = threading.local()

    def one_chunk(start: int) -> tuple[Tensor, Tensor]:
        stop = min(start + query_chunk, n_cases)
        excluded = _excluded_keys(exclude, start, stop, n_items) if exclude is not None else None
        if not hasattr(per_thread, "buffers"):
            per_thread.buffers = _level_buffers(plan, query_chunk, queries.dtype, order.key_dtype)
        levels = [buffer[: buffer.numel() // query_chunk * (stop - start)].view(plan.tiles_per_chunk, stop - start, -1)
                  for buffer in per_thread.buffers]
        return _top_k_for_query_chunk(queries[start:stop], items, k, excluded, plan, skip_padding, order, levels)

    results = _map_single_threaded(one_chunk, starts)
    if not results:
        return torch.empty(0, k, dtype=queries.dtype), torch.empty(0, k, dtype=torch.int64)
    keys, ids = zip(*results)
    return torch.cat(keys).view(queries.dtype), torch.cat(ids)


def _level_buffers(plan: _Plan, n_queries: int, dtype: torch.dtype, key_dtype: torch.dtype) -> list[Tensor]:
    """Flat buffers for one query chunk of up to n_queries: the scores of a chunk of items by tile,
    [tiles, Q, width] in `dtype`, then the levels of maxima l = 1..plan.levels (see _candidates),
    [tiles, Q, width / FANOUT**l] in `key_dtype`. Each tile's scores are one contiguous block:
    rows of a [Q, tiles * width] buffer lie a power of two apart and compete for the same cache
    sets, so the tile did not stay in cache for its first reduction."""
    sizes = [plan.tiles_per_chunk * n_queries * plan.width // FANOUT**level for level in range(plan.levels + 1)]
    return [torch.empty(size, dtype=dtype if level == 0 else key_dtype) for level, size in enumerate(sizes)]


def _plan(n_queries: int, n_items: int, item_chunk: int | None, item_tile: int | None, score_bytes: int) -> _Plan:
    """Tile and chunk sizes for query chunks of n_queries, and as many levels of maxima (up to
    MAX_LEVELS) as leave at least one group per tile at the top."""
    tile = item_tile or _round_up(max(1, TILE_BYTES // score_bytes // n_queries), FANOUT**MAX_LEVELS)
    chunk = item_chunk or max(1, CHUNK_BYTES // score_bytes // n_queries // tile) * tile
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
    order: _Order,
    levels: list[Tensor],
) -> tuple[Tensor, Tensor]:
    """Running top-k of one query chunk over all item chunks: ([Q, k] keys, [Q, k] ids).
    excluded: (keys [E], item ids [E]) of the excluded pairs, key = case * n_items + item, sorted.
    levels: _level_buffers for Q queries, as [tiles, Q, n] views (their contents are overwritten)."""
    n_queries, n_items = queries.shape[0], items.shape[0]
    best_scores = torch.full((n_queries, k), order.bottom, dtype=order.key_dtype)  # [Q, k] keys
    best_ids = torch.full((n_queries, k), -1, dtype=torch.int64)  # [Q, k]
    width = plan.width
    by_tile, levels = levels[0], [order.keys(levels[0]), *levels[1:]]  # scores [tiles, Q, width], their keys, maxima
    # Merging costs the same however few candidates a chunk yields, so candidates are pooled
    # until there are about k / 2 per case. Between merges the threshold lags behind: pooling up
    # to k let the second and third chunks through at the first chunk's bar, each with about k
    # candidates per case and ten times the descents of a later chunk (8% of top_k's time).
    pooled: list[tuple[Tensor, Tensor, Tensor]] = []
    n_pooled = 0

    for chunk_start in range(0, n_items, plan.chunk):
        n_tiles = -(-min(plan.chunk, n_items - chunk_start) // plan.tile)
        for tile in range(n_tiles):
            tile_start = chunk_start + tile * plan.tile
            n_tile_items = min(plan.tile, n_items - tile_start, chunk_start + plan.chunk - tile_start)
            tile_scores = by_tile[tile]  # [Q, width]
            torch.mm(queries, items[tile_start : tile_start + n_tile_items].T, out=tile_scores[:, :n_tile_items])
            tile_keys = levels[0][tile]  # [Q, width]
            if n_tile_items < width:
                tile_keys[:, n_tile_items:] = order.bottom  # columns past the tile's last item
            if skip_padding and tile_start == 0:
                tile_keys[:, 0] = order.bottom
            if plan.levels:  # the first level while the tile's scores are in cache
                torch.amax(tile_keys.view(n_queries, FANOUT, -1), dim=1, out=levels[1][tile])
        for level in range(2, plan.levels + 1):
            below = levels[level - 1][:n_tiles]
            torch.amax(below.view(n_tiles, n_queries, FANOUT, -1), dim=2, out=levels[level][:n_tiles])

        threshold = best_scores[:, -1]
        spoilt = None  # no bound from the chunk itself while the running top-k is full
        if not bool((threshold > order.bottom).all()):
            spoilt = 0 if excluded is None else _most_excluded(excluded, chunk_start, chunk_start + plan.chunk, n_items)
        case, item, score = _candidates([level[:n_tiles] for level in levels], threshold, k, spoilt, plan.tile, order)
        pooled.append((case, item + chunk_start, score))
        n_pooled += case.numel()
        if n_pooled >= n_queries * k // 2 or chunk_start + plan.chunk >= n_items:
            case, item, score = (torch.cat(parts) for parts in zip(*pooled))
            if excluded is not None:
                kept = ~torch.isin(case * n_items + item, excluded[0])
                case, item, score = case[kept], item[kept], score[kept]
            best_scores, best_ids = _merge(best_scores, best_ids, case, item, score, k, n_items, order.bottom)
            pooled, n_pooled = [], 0
    return best_scores, best_ids


def _candidates(
    levels: list[Tensor], threshold: Tensor, k: int, spoilt: int | None, tile: int, order: _Order
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
    floor = order.above(threshold)  # [Q]; score > threshold <=> score >= floor
    if spoilt is not None:
        rank = k + spoilt
        bounding = next((level for level in levels[1:] + levels[:1] if level.shape[0] * level.shape[2] >= rank), None)
        if bounding is not None:
            per_case = bounding.transpose(0, 1).reshape(n_queries, -1)  # [Q, tiles * n_l]
            floor = torch.maximum(floor, per_case.topk(rank, dim=1, sorted=False).values.amin(dim=1))

    # Groups as rows (tile, case) and positions in them: one flat index per gather (`take`) costs
    # a fifth less than indexing [tiles, Q, n] with three index tensors.
    tile_of, case, group = (levels[-1] >= floor[:, None]).nonzero(as_tuple=True)  # [G] each: the groups to look into
    row = tile_of * n_queries + case  # [G]: the (tile, case) row of every level
    for level in range(len(levels) - 1, 0, -1):
        n_groups, below = levels[level].shape[2], levels[level - 1]
        spread = torch.arange(0, FANOUT * n_groups, n_groups)  # [FANOUT]: a group's members, n_groups apart
        members = below.take((row * below.shape[2] + group).unsqueeze(1) + spread)  # [G, FANOUT]
        kept, member = (members >= floor[row % n_queries].unsqueeze(1)).nonzero(as_tuple=True)
        row, group = row[kept], group[kept] + member * n_groups
    score = levels[0].take(row * levels[0].shape[2] + group)
    return row % n_queries, row // n_queries * tile + group, score


def _merge(
    best_scores: Tensor, best_ids: Tensor, case: Tensor, item: Tensor, score: Tensor, k: int, n_items: int, bottom: float
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
    dense_scores = best_scores.new_full((n_queries, width), bottom)  # [Q, W]
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
