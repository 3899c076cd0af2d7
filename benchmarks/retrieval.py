"""Exact top-K retrieval against its floor, and faiss indexes against exact search.

    python benchmarks/retrieval.py [--items 1000000] [--cases 2048] [--write-docs]

Top-100 over random items (d = 64) in cases per second: `sdm.evaluation.retrieval.top_k` (chunked, running
top-K, bounded memory) next to the floor measured in the same run, one bare `torch.mm` +
`torch.topk` per chunk of 1,024 cases over the same matrices; then faiss flat, IVF and HNSW
(`sdm evaluate --index ...`) with their build time, search speed and recall@100 against exact.
Each timing is the best of `--rounds`, so that other work on the machine inflates it less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `sdm` sets it; must precede importing torch
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docs_section import replace_section  # noqa: E402

from sdm.serving.ann import INDEX_KINDS, build_index, index_top_k, overlap_recall  # noqa: E402
from sdm.evaluation.retrieval import top_k  # noqa: E402

K, DIM = 100, 64
TARGET_RATIO = 1.5  # exact top-K within 1.5x of the floor's time


def best_seconds(run: Callable[[], object], rounds: int) -> float:
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return min(timings)


def floor(queries: torch.Tensor, items: torch.Tensor) -> None:
    for chunk in queries.split(1024):
        torch.topk(chunk @ items.T, K, dim=1)


def measure(n_items: int, n_cases: int, rounds: int) -> dict[str, object]:
    torch.set_num_threads(os.cpu_count() or 1)
    generator = torch.Generator().manual_seed(0)
    items = torch.randn(n_items, DIM, generator=generator)
    queries = torch.randn(n_cases, DIM, generator=generator)
    exact_seconds = best_seconds(lambda: top_k(queries, items, K), rounds)
    floor_seconds = best_seconds(lambda: floor(queries, items), rounds)
    _, exact = top_k(queries, items, K)
    indexes = {}
    for kind in INDEX_KINDS:
        started = time.perf_counter()
        index = build_index(items, kind)
        build_seconds = time.perf_counter() - started
        search_seconds = best_seconds(lambda: index_top_k(index, items, queries, K), rounds)
        _, found = index_top_k(index, items, queries, K)
        indexes[kind] = {
            "build_seconds": build_seconds,
            "cases_per_second": n_cases / search_seconds,
            "recall": overlap_recall(found, exact),
        }
    return {
        "n_items": n_items,
        "cases": n_cases,
        "exact_cases_per_second": n_cases / exact_seconds,
        "floor_cases_per_second": n_cases / floor_seconds,
        "indexes": indexes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--cases", type=int, default=2_048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    result = measure(args.items, args.cases, args.rounds)
    load_after = os.getloadavg()[0]
    print(json.dumps(result, indent=2))
    if args.write_docs:
        time_ratio = result["floor_cases_per_second"] / result["exact_cases_per_second"]  # exact's time / floor's
        rows = "\n".join(
            f"| faiss {kind} | {r['cases_per_second']:,.0f} | {r['recall']:.3f} | {r['build_seconds']:.1f} s |"
            for kind, r in result["indexes"].items()
        )
        text = f"""Command: `python benchmarks/retrieval.py --items {args.items} --cases {args.cases} --write-docs`.
Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; load average (1 min)
{load_before:.1f} before / {load_after:.1f} after. Top-{K} over {args.items:,} random items, d = {DIM},
{args.cases:,} cases, best of {args.rounds} rounds.

| method | cases / s | recall@{K} vs exact | build |
|---|---|---|---|
| `sdm.evaluation.retrieval.top_k` (exact) | {result['exact_cases_per_second']:,.0f} | 1 | |
| floor: bare `torch.mm` + `torch.topk` per 1,024 cases | {result['floor_cases_per_second']:,.0f} | 1 | |
{rows}

Exact top-K takes {time_ratio:.2f}x the floor's time (target: within {TARGET_RATIO}x:
{'met' if time_ratio <= TARGET_RATIO else 'missed'}); it beats the floor because the block-maximum filter
lets only a few score blocks per case reach the selection. faiss's exact flat index
(`--index flat`), with its own matrix product and heaps, is faster still. Random vectors are the hard
case for the indexes (real embeddings cluster); `sdm evaluate --index KIND` reports an index's
recall on the model's own vectors.
"""
        replace_section(ROOT / "docs" / "benchmarks.md", "retrieval", "Retrieval: exact top-K and faiss", text)


if __name__ == "__main__":
    main()
