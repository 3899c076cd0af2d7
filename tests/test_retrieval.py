"""Exact top-k retrieval against a brute-force full sort of the score matrix.

Embeddings are small integers (or multiples of 1/8), so every inner product is exact in
float32 whatever order the matrix product sums in, and scores compare bit for bit. Small
integers also produce many exactly tied scores, which exercises the tie rule.
"""

import math

import pytest
import torch

from sdm.evaluation import retrieval
from sdm.evaluation.metrics import ranking_metrics
from sdm.evaluation.retrieval import top_k

NEG_INF = float("-inf")


def brute_force_top_k(queries, items, k, exclude=None, skip_padding=True):
    """Sort every row of the full score matrix; stable, so equal scores keep increasing id order."""
    scores = queries @ items.T  # [N, M]
    if skip_padding:
        scores[:, 0] = NEG_INF
    if exclude is not None:
        indptr, indices = exclude
        cases = torch.repeat_interleave(torch.arange(queries.shape[0]), indptr.diff())
        scores[cases, indices] = NEG_INF
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    top_scores = scores.gather(1, order)
    top_ids = torch.where(top_scores == NEG_INF, -1, order)
    missing = k - top_scores.shape[1]  # k larger than the catalogue
    top_scores = torch.cat([top_scores, torch.full((queries.shape[0], missing), NEG_INF)], dim=1)
    top_ids = torch.cat([top_ids, torch.full((queries.shape[0], missing), -1)], dim=1)
    return top_scores, top_ids


def integer_embeddings(n, d, low=-2, high=3):
    return torch.randint(low, high, (n, d)).float()


def random_exclusions(n_cases, n_items, max_per_case):
    per_case = torch.randint(0, max_per_case + 1, (n_cases,))
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), per_case.cumsum(0)])
    return indptr, torch.randint(0, n_items, (int(per_case.sum()),))


@pytest.mark.parametrize(
    ("item_chunk", "query_chunk"),
    [
        (7, 5),  # item chunks much smaller than k and than one 64-item block
        (100, 64),  # chunks that divide neither M nor N
        (64, 13),  # exactly one block per chunk
        (1000, 1000),  # a single chunk each way
        (8_192, 1_024),  # the defaults
    ],
)
@pytest.mark.parametrize("with_exclusions", [False, True])
def test_matches_brute_force_for_chunk_sizes(item_chunk, query_chunk, with_exclusions):
    torch.manual_seed(0)
    queries, items = integer_embeddings(37, 4), integer_embeddings(523, 4)
    exclude = random_exclusions(37, 523, 40) if with_exclusions else None
    for k in (1, 20, 150):
        scores, ids = top_k(queries, items, k, exclude=exclude, item_chunk=item_chunk, query_chunk=query_chunk)
        expected_scores, expected_ids = brute_force_top_k(queries, items, k, exclude)
        assert torch.equal(scores, expected_scores)
        assert torch.equal(ids, expected_ids)


def test_matches_brute_force_on_continuous_scores_over_many_chunks():
    # Few ties here; many 64-item blocks per chunk and a small k exercise the block-maximum
    # bound and the pooling of candidates between merges.
    torch.manual_seed(1)
    queries = torch.randint(-64, 65, (50, 16)).float() / 8
    items = torch.randint(-64, 65, (5000, 16)).float() / 8
    exclude = random_exclusions(50, 5000, 300)
    for k, item_chunk in [(1, 1000), (3, 640), (10, 999), (100, 2048)]:
        scores, ids = top_k(queries, items, k, exclude=exclude, item_chunk=item_chunk, query_chunk=16)
        expected_scores, expected_ids = brute_force_top_k(queries, items, k, exclude)
        assert torch.equal(scores, expected_scores)
        assert torch.equal(ids, expected_ids)


def test_matches_brute_force_on_random_shapes():
    torch.manual_seed(2)
    for _ in range(40):
        n_cases, n_items, dim = (int(torch.randint(1, high, ())) for high in (30, 800, 5))
        k, item_chunk, query_chunk = (int(torch.randint(1, high, ())) for high in (120, 400, 40))
        queries, items = integer_embeddings(n_cases, dim), integer_embeddings(n_items, dim)
        exclude = random_exclusions(n_cases, n_items, 20)
        skip_padding = bool(torch.randint(0, 2, ()))
        chunks = {"item_chunk": item_chunk, "query_chunk": query_chunk}
        scores, ids = top_k(queries, items, k, exclude=exclude, skip_padding=skip_padding, **chunks)
        expected_scores, expected_ids = brute_force_top_k(queries, items, k, exclude, skip_padding)
        assert torch.equal(scores, expected_scores)
        assert torch.equal(ids, expected_ids)


def test_returned_scores_are_the_inner_products_in_descending_order():
    torch.manual_seed(3)
    queries, items = torch.randn(20, 8), torch.randn(900, 8)
    scores, ids = top_k(queries, items, 30, item_chunk=128)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    recomputed = (queries.unsqueeze(1) * items[ids]).sum(-1)  # [N, k]
    torch.testing.assert_close(scores, recomputed)


def test_padding_item_is_never_returned():
    torch.manual_seed(4)
    queries = torch.rand(10, 4) + 0.1  # positive, so the all-100 padding row has the best score for everyone
    items = torch.rand(300, 4)
    items[0] = 100.0
    _, ids = top_k(queries, items, 299, item_chunk=50)
    assert not (ids == 0).any()
    assert torch.equal(ids.sort(dim=1).values, torch.arange(1, 300).expand(10, -1))  # every other item appears
    _, ids_with_padding = top_k(queries, items, 5, skip_padding=False)
    assert torch.all(ids_with_padding[:, 0] == 0)


def test_excluded_items_are_skipped():
    # One query, items scored 1..9 by their id; excluding the best two promotes the next.
    queries = torch.ones(2, 1)
    items = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    exclude = (torch.tensor([0, 2, 2]), torch.tensor([9, 8]))  # case 0 has seen items 9 and 8, case 1 nothing
    scores, ids = top_k(queries, items, 3, exclude=exclude, item_chunk=4)
    assert ids.tolist() == [[7, 6, 5], [9, 8, 7]]
    assert scores.tolist() == [[7.0, 6.0, 5.0], [9.0, 8.0, 7.0]]


def test_excluded_items_at_the_top_of_the_first_chunk_do_not_raise_its_bound():
    # Excluded items are not masked in the scores, so they can be the largest maxima of the
    # first chunk; the bound taken from that chunk must allow for them.
    queries = torch.ones(2, 1)
    items = torch.randperm(1_000, generator=torch.Generator().manual_seed(9)).float().unsqueeze(1)
    first_chunk_best = torch.argsort(items[:400, 0], descending=True)
    exclude = (torch.tensor([0, 60, 60]), first_chunk_best[:60].sort().values)  # case 0 has seen the chunk's best 60
    scores, ids = top_k(queries, items, 10, exclude=exclude, item_chunk=400, item_tile=64)
    expected_scores, expected_ids = brute_force_top_k(queries, items, 10, exclude)
    assert torch.equal(ids, expected_ids) and torch.equal(scores, expected_scores)


def test_ties_go_to_the_smaller_item_id():
    queries = torch.ones(3, 2)
    items = torch.ones(200, 2)  # every item scores 2
    items[150] = 2.0  # except item 150, which scores 4
    _, ids = top_k(queries, items, 5, item_chunk=17)
    assert ids.tolist() == [[150, 1, 2, 3, 4]] * 3


def test_k_larger_than_the_eligible_items_pads_with_minus_one():
    queries = torch.tensor([[1.0], [-1.0]])
    items = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])  # item 0 is padding
    exclude = (torch.tensor([0, 1, 1]), torch.tensor([3]))
    scores, ids = top_k(queries, items, 6, exclude=exclude, item_chunk=2)
    assert ids.tolist() == [[4, 2, 1, -1, -1, -1], [1, 2, 3, 4, -1, -1]]
    assert scores.tolist() == [[4.0, 2.0, 1.0] + [NEG_INF] * 3, [-1.0, -2.0, -3.0, -4.0] + [NEG_INF] * 2]


def test_same_inputs_give_the_same_outputs():
    torch.manual_seed(5)
    queries, items = torch.randn(64, 16), torch.randn(3000, 16)
    first = top_k(queries, items, 25, item_chunk=700, query_chunk=20)
    second = top_k(queries, items, 25, item_chunk=700, query_chunk=20)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_rejects_bad_inputs():
    queries, items = torch.zeros(3, 4), torch.zeros(10, 4)
    with pytest.raises(ValueError):
        top_k(queries, torch.zeros(10, 5), 2)
    with pytest.raises(ValueError):
        top_k(queries, items, 0)
    with pytest.raises(ValueError):
        top_k(queries, items, 2, exclude=(torch.tensor([0, 1]), torch.tensor([1])))  # indptr too short
    with pytest.raises(ValueError):
        top_k(queries, items, 2, exclude=(torch.tensor([0, 1, 1, 1]), torch.tensor([10])))  # item out of range


def reference_metrics(ids, targets, k):
    """hit_rate@k, recall@k and ndcg@k of ranked id lists, from Python sets."""
    hit_rate = recall = ndcg = 0.0
    for ranking, wanted in zip(ids.tolist(), targets):
        hits = [rank for rank, item in enumerate(ranking[:k]) if item in wanted]
        hit_rate += bool(hits)
        recall += len(hits) / len(wanted)
        ideal = sum(1 / math.log2(rank + 2) for rank in range(min(k, len(wanted))))
        ndcg += sum(1 / math.log2(rank + 2) for rank in hits) / ideal
    n = len(targets)
    return {f"hit_rate@{k}": hit_rate / n, f"recall@{k}": recall / n, f"ndcg@{k}": ndcg / n}


@pytest.mark.parametrize("threads", [1, 2])
def test_many_tiles_and_chunks_match_brute_force_ids_scores_and_metrics(threads):
    # Several query chunks (shared among threads), chunks that are no whole number of tiles
    # and a catalogue that is no whole number of either, small-integer scores (many ties) and
    # exclusions: the fast path must give the brute-force ids, scores and metrics.
    torch.manual_seed(6)
    n_cases, n_items, k = 70, 9_001, 50
    queries, items = integer_embeddings(n_cases, 6), integer_embeddings(n_items, 6)
    exclude = random_exclusions(n_cases, n_items, 400)
    targets = [set(torch.randint(1, n_items, (int(torch.randint(1, 6, ())),)).tolist()) for _ in range(n_cases)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        scores, ids = top_k(queries, items, k, exclude=exclude, item_chunk=2_500, item_tile=600, query_chunk=16)
    finally:
        torch.set_num_threads(previous)
    expected_scores, expected_ids = brute_force_top_k(queries, items, k, exclude)
    assert torch.equal(scores, expected_scores)
    assert torch.equal(ids, expected_ids)
    indptr = torch.tensor([0] + [len(t) for t in targets]).cumsum(0)
    flat = torch.tensor([item for wanted in targets for item in sorted(wanted)])
    metrics = ranking_metrics(ids, (indptr, flat), [k])
    for name, value in reference_metrics(expected_ids, targets, k).items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name


def test_the_default_sizes_match_brute_force_over_several_tiles():
    # Enough queries for the default tiles (2,048 items for 256 queries) and levels of maxima,
    # over a catalogue that is no whole number of tiles.
    torch.manual_seed(7)
    queries, items = integer_embeddings(300, 4), integer_embeddings(5_003, 4)
    exclude = random_exclusions(300, 5_003, 30)
    scores, ids = top_k(queries, items, 100, exclude=exclude)
    expected_scores, expected_ids = brute_force_top_k(queries, items, 100, exclude)
    assert torch.equal(scores, expected_scores)
    assert torch.equal(ids, expected_ids)


def test_threads_give_the_same_result_and_the_setting_is_restored():
    # The worker threads must also run without autograd (item vectors straight from a model require grad).
    torch.manual_seed(8)
    queries, items = torch.randn(90, 16), torch.randn(4_000, 16)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = top_k(queries, items, 30, query_chunk=16)
        torch.set_num_threads(2)
        two = top_k(queries, items.requires_grad_(), 30, query_chunk=16)  # as model.item_vectors() are
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


# The bfloat16 screen: a bfloat16 search for W > k candidates, rescored in float32, with the
# queries its error bound cannot settle searched again in float32. Its answer must be the
# float32 one in every case, settled by the screen or not.


def grid_embeddings(n, d, generator):
    """Multiples of 1/8 in [-2, 2]: continuous enough for few ties, exact in float32 sums."""
    return torch.randint(-16, 17, (n, d), generator=generator).float() / 8


def screened(monkeypatch, queries, items, k, **options):
    """top_k through the screen, and how many queries it left to the float32 search."""
    searched_again = []
    search = retrieval._top_k

    def counting(q, v, options_):
        if q.dtype == torch.float32:
            searched_again.append(q.shape[0])
        return search(q, v, options_)

    monkeypatch.setattr(retrieval, "_top_k", counting)
    result = top_k(queries, items, k, screen=True, **options)
    return result, sum(searched_again)


@pytest.mark.parametrize("with_exclusions", [False, True])
def test_the_screen_settles_continuous_scores_and_matches_brute_force(monkeypatch, with_exclusions):
    generator = torch.Generator().manual_seed(10)
    queries, items = grid_embeddings(90, 16, generator), grid_embeddings(3_001, 16, generator)
    exclude = random_exclusions(90, 3_001, 200) if with_exclusions else None
    for k, chunks in [(1, {}), (10, {"item_chunk": 700, "query_chunk": 32}), (40, {"item_tile": 512})]:
        (scores, ids), searched_again = screened(monkeypatch, queries, items, k, exclude=exclude, **chunks)
        expected_scores, expected_ids = brute_force_top_k(queries, items, k, exclude)
        assert torch.equal(ids, expected_ids)
        assert torch.equal(scores, expected_scores)
        assert searched_again < 90 // 10  # the screen itself settled nearly every query


def test_scores_bfloat16_cannot_tell_apart_are_settled_in_float32(monkeypatch):
    # Every score lies in [1000, 1001), where bfloat16's spacing is 4: the screen sees one
    # score for all items and keeps the smallest ids. Its bound must send every query to the
    # float32 search, which finds the true best.
    generator = torch.Generator().manual_seed(13)
    items = torch.zeros(5_000, 2)
    items[:, 0] = 1_000 + torch.randint(0, 64, (5_000,), generator=generator).float() / 64
    queries = torch.tensor([[1.0, 0.0], [1.0, 0.5]])
    (scores, ids), searched_again = screened(monkeypatch, queries, items, 5)
    expected_scores, expected_ids = brute_force_top_k(queries, items, 5)
    assert torch.equal(ids, expected_ids) and torch.equal(scores, expected_scores)
    assert searched_again == 2


@pytest.mark.parametrize("case", ["ties", "negative scores", "k beyond the eligible items"])
def test_the_queries_the_screen_cannot_settle_are_searched_again_exactly(monkeypatch, case):
    torch.manual_seed(11)
    queries, items = integer_embeddings(40, 4), integer_embeddings(2_000, 4)  # many equal scores
    exclude, k = random_exclusions(40, 2_000, 50), 30
    if case == "negative scores":  # every score below zero: bit keys cannot order them
        queries, items = queries.abs() + 1, -(items.abs() + 1)
    if case == "k beyond the eligible items":
        items, exclude, k = items[:100], random_exclusions(40, 100, 60), 80
    (scores, ids), searched_again = screened(monkeypatch, queries, items, k, exclude=exclude)
    expected_scores, expected_ids = brute_force_top_k(queries, items, k, exclude)
    assert torch.equal(ids, expected_ids)
    assert torch.equal(scores, expected_scores)
    assert searched_again > 0


@pytest.mark.parametrize("threads", [1, 2])
def test_bfloat16_products_stay_within_the_screens_error_bound(threads):
    # The screen's proof assumes torch's bfloat16 matrix product sums in float32 and rounds once;
    # a kernel that rounded partial sums to bfloat16 would break it and fail here.
    generator = torch.Generator().manual_seed(12)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n_queries, n_items, d in [(256, 2_048, 64), (7, 33, 16), (50, 1_000, 3), (64, 4_096, 256)]:
            queries = torch.randn(n_queries, d, generator=generator)
            items = torch.randn(n_items, d, generator=generator) * torch.rand(n_items, 1, generator=generator) * 10
            out = torch.empty(n_queries, n_items + 64, dtype=torch.bfloat16)  # a strided tile, as the kernel writes
            torch.mm(queries.bfloat16(), items.bfloat16().T, out=out[:, :n_items])
            error = (out[:, :n_items].double() - queries.double() @ items.double().T).abs()
            allowed = retrieval._screen_error(d) * queries.double().norm(dim=1)[:, None] * items.double().norm(dim=1)
            assert bool((error <= allowed).all()), (n_queries, n_items, d)
    finally:
        torch.set_num_threads(previous)


def test_large_float32_catalogues_are_screened_by_default(monkeypatch):
    calls = []
    monkeypatch.setattr(retrieval, "_screened_top_k", lambda *args: calls.append(args) or (None, None))
    monkeypatch.setattr(retrieval, "SCREEN_MIN_ITEMS", 500)
    monkeypatch.setattr(retrieval, "_computes_in_bfloat16", lambda: True)
    queries, items = torch.randn(3, 4), torch.randn(499, 4)
    top_k(queries, items, 5)
    top_k(queries.double(), torch.randn(600, 4).double(), 5)
    assert not calls  # too few items, then not float32
    top_k(queries, torch.randn(500, 4), 5)
    assert len(calls) == 1
    monkeypatch.setattr(retrieval, "_computes_in_bfloat16", lambda: False)  # bfloat16 emulated: slower
    top_k(queries, torch.randn(500, 4), 5)
    assert len(calls) == 1
