"""`sdm evaluate` end to end against its floor, the matrix products alone, in one run.

    python benchmarks/evaluate.py [--items 1000000] [--cases 2048] [--rounds 3] [--write-docs]

End to end is `sdm.evaluation.evaluate.evaluate_cases` on an SDM model of d = 64 with a catalogue of
`--items` items: user tower, item vectors, exact top-100 over the whole catalogue, metrics at
10, 20, 50 and 100; once as `sdm evaluate` and once with `--exclude-seen` (50 seen items per
case). Its parts are timed on their own in the same run. The GEMM rate is the best rate of
torch.mm over the same cases x items product, in blocks of a few shapes, with all of torch's
threads; the floor is 2 * cases * items * d / that rate; the same in bfloat16 is the floor of
top_k's bfloat16 screen (sdm/evaluation/retrieval.py). faiss's exact flat index
(IndexFlatIP) is searched over the same vectors for reference. Each timing is the best of
`--rounds`, so that other work on the machine inflates it less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `sdm` sets it; must precede importing torch
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docs_section import replace_section  # noqa: E402
from retrieval import best_seconds  # noqa: E402
from train import PROFILE_FIELDS, SIDE_VOCAB, item_side_table, synthetic_tensors, zipf_ids  # noqa: E402

from sdm.models import build_model  # noqa: E402
from sdm.models.config import ModelConfig  # noqa: E402
from sdm.data.sessions import SessionData  # noqa: E402
from sdm.evaluation.evaluate import embed_cases, evaluate_cases  # noqa: E402
from sdm.evaluation.metrics import ranking_metrics  # noqa: E402
from sdm.evaluation.retrieval import top_k  # noqa: E402

K, KS, DIM = 100, (10, 20, 50, 100), 64
SEEN_PER_CASE = 50
TARGET_CASES_PER_SECOND = 1_000
GEMM_SHAPES = ((256, 2_048), (1_024, 4_096), (2_048, 8_192))  # (cases, items) per torch.mm


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()


def distinct_per_row(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, m] ids -> CSR (indptr [N + 1], indices) of each row's distinct ids, sorted."""
    ids = ids.sort(dim=1).values
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:, 1:] = ids[:, 1:] != ids[:, :-1]
    indptr = torch.cat([torch.zeros(1, dtype=torch.long), keep.sum(1).cumsum(0)])
    return indptr, ids[keep]


def evaluation_setup(n_items: int, n_cases: int):
    """(model, cases with up to 5 targets each, CSR of up to SEEN_PER_CASE seen items per case)."""
    generator = torch.Generator().manual_seed(1)
    config = ModelConfig(n_items=n_items, n_users=1000, side_vocab=SIDE_VOCAB, profile_vocab=[10] * PROFILE_FIELDS, dim=DIM)
    torch.manual_seed(1)
    model = build_model("sdm", config, item_side_table(n_items, generator), torch.ones(n_items, dtype=torch.long)).eval()
    tensors = synthetic_tensors(n_cases, n_items, generator)
    cases = SessionData(tensors, *distinct_per_row(zipf_ids(n_items, (n_cases, 5), generator)))
    return model, cases, distinct_per_row(zipf_ids(n_items, (n_cases, SEEN_PER_CASE), generator))


def blocked_products(queries: torch.Tensor, items: torch.Tensor, n_queries: int, n_items: int) -> None:
    """queries x items.T in [n_queries, n_items] blocks into one reused buffer (whole item blocks only)."""
    out = torch.empty(n_queries, n_items, dtype=queries.dtype)
    for start in range(0, queries.shape[0], n_queries):
        block = queries[start : start + n_queries]
        for item_start in range(0, items.shape[0] - n_items + 1, n_items):
            torch.mm(block, items[item_start : item_start + n_items].T, out=out[: block.shape[0]])


def gemm_rate(queries: torch.Tensor, items: torch.Tensor, rounds: int) -> tuple[float, tuple[int, int]]:
    """Best GFLOP/s of torch.mm over the whole queries x items product, and the block shape."""
    rates = {}
    for n_queries, n_items in GEMM_SHAPES:
        flops = 2 * queries.shape[0] * (items.shape[0] // n_items * n_items) * queries.shape[1]
        seconds = best_seconds(lambda shape=(n_queries, n_items): blocked_products(queries, items, *shape), rounds)
        rates[(n_queries, n_items)] = flops / seconds / 1e9
    shape = max(rates, key=rates.get)
    return rates[shape], shape


def faiss_flat(queries: torch.Tensor, items: torch.Tensor, rounds: int) -> dict[str, float] | None:
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(np.ascontiguousarray(items[1:].numpy()))
    search = np.ascontiguousarray(queries.numpy())
    seconds = best_seconds(lambda: index.search(search, K), rounds)
    return {"cases_per_second": len(queries) / seconds, "version": faiss.__version__}


@torch.no_grad()
def measure(n_items: int, n_cases: int, rounds: int) -> dict[str, object]:
    model, cases, seen = evaluation_setup(n_items, n_cases)
    queries, items = embed_cases(model, cases), model.item_vectors().detach().float()
    _, ids = top_k(queries, items, K)
    targets = (cases.targets_indptr, cases.targets_indices)
    seconds = {
        "end_to_end": best_seconds(lambda: evaluate_cases(model, cases, KS), rounds),
        "end_to_end_exclude_seen": best_seconds(lambda: evaluate_cases(model, cases, KS, seen), rounds),
        "user_tower": best_seconds(lambda: embed_cases(model, cases), rounds),
        "item_vectors": best_seconds(lambda: model.item_vectors(), rounds),
        "top_k": best_seconds(lambda: top_k(queries, items, K), rounds),
        "top_k_exclude_seen": best_seconds(lambda: top_k(queries, items, K, exclude=seen), rounds),
        "metrics": best_seconds(lambda: ranking_metrics(ids, targets, KS), rounds),
    }
    rate, shape = gemm_rate(queries, items, rounds)
    floor_seconds = 2 * n_cases * n_items * DIM / (rate * 1e9)
    # top_k screens in bfloat16 where the CPU has it: the floor of its first pass
    bfloat16_rate, _ = gemm_rate(queries.bfloat16(), items.bfloat16(), rounds)
    return {
        "n_items": n_items,
        "cases": n_cases,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "cases_per_second": {name: n_cases / value for name, value in seconds.items()},
        "gemm_gflops": rate,
        "gemm_shape": shape,
        "floor_seconds": floor_seconds,
        "floor_cases_per_second": n_cases / floor_seconds,
        "bfloat16_gemm_gflops": bfloat16_rate,
        "bfloat16_floor_cases_per_second": bfloat16_rate * 1e9 / (2 * n_items * DIM),
        "faiss_flat": faiss_flat(queries, items, rounds),
    }


def docs_text(result: dict, args: argparse.Namespace, load_before: str, load_after: str) -> str:
    per_second, seconds = result["cases_per_second"], result["seconds"]
    end_to_end = per_second["end_to_end"]
    shape = result["gemm_shape"]
    faiss_row = (
        f"| faiss {result['faiss_flat']['version']} IndexFlatIP, search alone | {result['faiss_flat']['cases_per_second']:,.0f} | |"
        if result["faiss_flat"] else "| faiss IndexFlatIP | not installed | |"
    )
    met = "met" if end_to_end >= TARGET_CASES_PER_SECOND else f"missed by {TARGET_CASES_PER_SECOND / end_to_end:.2f}x"
    parts = ", ".join(f"{name.replace('_', ' ')} {seconds[name]:.2f} s" for name in ("user_tower", "item_vectors", "top_k", "metrics"))
    return f"""Command: `python benchmarks/evaluate.py --items {args.items} --cases {args.cases} --rounds {args.rounds} --write-docs`.
Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({result['threads']} threads),
OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}. `uptime` before: {load_before};
after: {load_after}. SDM at d = {DIM}, {args.items:,} items, {args.cases:,} cases, top-{K}, metrics at
{', '.join(map(str, KS))}; best of {args.rounds} rounds.

| what | cases / s | seconds |
|---|---|---|
| `sdm evaluate` end to end (`evaluate_cases`: tower, item vectors, exact top-{K}, metrics) | {end_to_end:,.0f} | {seconds['end_to_end']:.2f} |
| the same with `--exclude-seen` ({SEEN_PER_CASE} seen items per case) | {per_second['end_to_end_exclude_seen']:,.0f} | {seconds['end_to_end_exclude_seen']:.2f} |
| exact top-{K} alone (`sdm.evaluation.retrieval.top_k`) | {per_second['top_k']:,.0f} | {seconds['top_k']:.2f} |
| exact top-{K} alone, {SEEN_PER_CASE} excluded items per case | {per_second['top_k_exclude_seen']:,.0f} | {seconds['top_k_exclude_seen']:.2f} |
| floor: the matrix products alone at the GEMM rate | {result['floor_cases_per_second']:,.0f} | {result['floor_seconds']:.2f} |
| the same products in bfloat16 (the floor of top_k's screen) | {result['bfloat16_floor_cases_per_second']:,.0f} | {args.cases / result['bfloat16_floor_cases_per_second']:.2f} |
{faiss_row}

GEMM rate: {result['gemm_gflops']:.1f} GFLOP/s in float32, {result['bfloat16_gemm_gflops']:.1f} in bfloat16 (torch.mm over the same cases x items product in blocks of
{shape[0]:,} x {shape[1]:,}, the best of {len(GEMM_SHAPES)} block shapes); floor = 2 x cases x items x d / rate.
End to end takes {result['floor_cases_per_second'] / end_to_end:.2f}x the floor's time; the parts, each timed alone: {parts}.
Target {TARGET_CASES_PER_SECOND:,} cases/s end to end: {met}.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--cases", type=int, default=2_048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    load_before = uptime()
    result = measure(args.items, args.cases, args.rounds)
    load_after = uptime()
    print(json.dumps(result | {"uptime_before": load_before, "uptime_after": load_after}, indent=2))
    if args.write_docs:
        text = docs_text(result, args, load_before, load_after)
        replace_section(ROOT / "docs" / "benchmarks.md", "evaluate", "Evaluation at the floor (`sdm evaluate`)", text)


if __name__ == "__main__":
    main()
