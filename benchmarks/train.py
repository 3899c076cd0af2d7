"""Training and evaluation throughput on this machine.

    python benchmarks/train.py [--write-docs]

Training: target items per second of `sdm.train.train_epoch` (the real loop: length-grouped
batches gathered from padded tensors, forward, sampled softmax, backward, clipping, Adam) at the
size of the public TensorFlow SDM (dim 32, 2 LSTM layers, 4 heads, 255 log-uniform negatives,
batch 512, sessions of 5 items, long-term sets of 50 per feature, five item features), for
several catalogue sizes. Evaluation: cases per second for top-100 over a 1M-item catalogue
(user tower + exact chunked retrieval), next to a bare `torch.mm` + `torch.topk` over the same
matrices.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `sdm` sets it; must precede importing torch
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docs_section import replace_section  # noqa: E402

from sdm.baselines import build_model  # noqa: E402
from sdm.config import ModelConfig  # noqa: E402
from sdm.data import SessionData  # noqa: E402
from sdm.evaluate import embed_cases  # noqa: E402
from sdm.retrieval import top_k  # noqa: E402
from sdm.train import TrainConfig, epoch_generator, make_loss, train_epoch  # noqa: E402

SIDE_VOCAB = {"leaf": 2_000, "category": 100, "shop": 20_000, "brand": 5_000}
SESSION, LONG, PROFILE_FIELDS = 5, 50, 3
K = 100  # evaluation cut-off


def zipf_ids(n: int, size: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Frequency-ranked ids in [1, n): id k drawn with probability about 1/k, as real logs are."""
    u = torch.rand(size, generator=generator, dtype=torch.float64)
    return torch.exp(u * torch.log(torch.tensor(float(n)))).long().clamp(1, n - 1)


def synthetic_sessions(n_rows: int, n_items: int, generator: torch.Generator) -> tuple[SessionData, torch.Tensor]:
    items = zipf_ids(n_items, (n_rows, SESSION), generator)
    targets = torch.cat([items[:, 1:], zipf_ids(n_items, (n_rows, 1), generator)], dim=1)
    tensors = {
        "items": items,
        "lengths": torch.full((n_rows,), SESSION),
        "targets": targets,
        "user": torch.randint(1, 1000, (n_rows,), generator=generator),
        "profile": torch.randint(1, 10, (n_rows, PROFILE_FIELDS), generator=generator),
        "long_item": zipf_ids(n_items, (n_rows, LONG), generator),
        **{f"long_{f}": zipf_ids(v, (n_rows, LONG), generator) for f, v in SIDE_VOCAB.items()},
    }
    item_side = torch.stack([zipf_ids(v, (n_items,), generator) for v in SIDE_VOCAB.values()], dim=1)
    item_side[0] = 0
    return SessionData(tensors), item_side


def training_throughput(n_items: int, n_rows: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    data, item_side = synthetic_sessions(n_rows, n_items, generator)
    config = TrainConfig(data="", out="", dim=32, batch_size=512, loss="sampled", num_negatives=255, tie_output=False)
    model_config = ModelConfig(
        n_items=n_items, n_users=1000, side_vocab=SIDE_VOCAB, profile_vocab=[10] * PROFILE_FIELDS, dim=32
    )
    torch.manual_seed(0)
    model = build_model("sdm", model_config, item_side, torch.ones(n_items, dtype=torch.long))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    loss_fn = make_loss(config, torch.ones(n_items, dtype=torch.long))
    train_epoch(model, optimizer, SessionData({k: v[:4096] for k, v in data.tensors.items()}), loss_fn, config,
                epoch_generator(0, 0))  # warm-up
    started = time.perf_counter()
    _, targets = train_epoch(model, optimizer, data, loss_fn, config, epoch_generator(0, 1))
    seconds = time.perf_counter() - started
    return {"n_items": n_items, "targets": targets, "seconds": seconds, "targets_per_second": targets / seconds}


def evaluation_throughput(n_items: int, n_cases: int, k: int) -> dict[str, float]:
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(1)
    data, item_side = synthetic_sessions(n_cases, 50_000, generator)
    model_config = ModelConfig(n_items=50_000, n_users=1000, side_vocab=SIDE_VOCAB, profile_vocab=[10] * PROFILE_FIELDS, dim=64)
    model = build_model("sdm", model_config, item_side, torch.ones(50_000, dtype=torch.long)).eval()
    items = torch.randn(n_items, 64, generator=generator)
    started = time.perf_counter()
    queries = embed_cases(model, data)
    top_k(queries, items, k)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    top_k(queries, items, k)
    retrieval_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for chunk in queries.split(1024):
        torch.topk(chunk @ items.T, k, dim=1)
    floor_seconds = time.perf_counter() - started
    return {
        "n_items": n_items,
        "cases": n_cases,
        "cases_per_second": n_cases / seconds,
        "retrieval_cases_per_second": n_cases / retrieval_seconds,
        "floor_cases_per_second": n_cases / floor_seconds,
        **index_throughput(queries, items, k),
    }


def index_throughput(queries: torch.Tensor, items: torch.Tensor, k: int) -> dict[str, float]:
    """`sdm evaluate --index ivf`: faiss IVF build time, search cases/s and recall@k against exact."""
    from sdm.ann import build_index, overlap_recall

    _, exact = top_k(queries, items, k)
    started = time.perf_counter()
    index = build_index(items, "ivf")
    build_seconds = time.perf_counter() - started
    started = time.perf_counter()
    _, positions = index.search(queries.numpy(), k)
    search_seconds = time.perf_counter() - started
    found = torch.from_numpy(positions).long() + 1  # the index holds items[1:]
    return {
        "ivf_build_seconds": build_seconds,
        "ivf_cases_per_second": len(queries) / search_seconds,
        "ivf_recall": overlap_recall(found, exact),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=40_000, help="training sessions per measured epoch")
    parser.add_argument("--cases", type=int, default=4_096)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    training = [training_throughput(n, args.rows, 2) for n in (3_706, 100_000, 1_000_000)]
    evaluation = evaluation_throughput(1_000_000, args.cases, K)
    print(json.dumps({"training": training, "evaluation": evaluation}, indent=2))
    if args.write_docs:
        rows = "\n".join(
            f"| {t['n_items']:,} | {t['targets_per_second']:,.0f} | {'met' if t['targets_per_second'] >= 58_000 else 'missed'} |"
            for t in training
        )
        text = f"""Command: `python benchmarks/train.py --rows {args.rows} --cases {args.cases} --write-docs`.
Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}.

**Training** (SDM at the public TensorFlow SDM's size: dim 32, 2 LSTM layers, 4 heads, 255
log-uniform negatives, batch 512, sessions of 5 items, long-term sets of 50 for each of 5 features;
2 threads). Target: 58,000 target items per second (3x the 19,400 samples/s of the TF code here).

| catalogue (items) | target items / s | target |
|---|---|---|
{rows}

**Evaluation** (top-100 over {evaluation['n_items']:,} items, d = 64, {evaluation['cases']:,} cases):
{evaluation['cases_per_second']:,.0f} cases/s end to end (user tower + exact retrieval; target 1,000);
retrieval alone {evaluation['retrieval_cases_per_second']:,.0f} cases/s, against
{evaluation['floor_cases_per_second']:,.0f} cases/s for a bare `torch.mm` + `torch.topk` over the same matrices.
Our chunked top-K stays below 1,000 exact cases/s; faiss's exact flat index (`sdm evaluate --index
flat`) is faster on the same matrices and reaches it (see "Retrieval" below). The IVF index
(sqrt(n) lists, 1/8 probed) searches {evaluation['ivf_cases_per_second']:,.0f} cases/s with recall@{K} of
{evaluation['ivf_recall']:.3f} against exact search after a {evaluation['ivf_build_seconds']:.0f} s build (random vectors, the
hard case for an index: real embeddings cluster).
"""
        replace_section(ROOT / "docs" / "benchmarks.md", "train", "Training and evaluation throughput", text)


if __name__ == "__main__":
    main()
