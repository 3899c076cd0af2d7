"""`sdm serve` under load: latency p50/p95/p99 and requests/s for 1, 8 and 32 concurrent clients,
top-K over 100k and 1M items, exact search and HNSW (with HNSW's recall@K against exact search on
the trained vectors).

For each catalogue size: a synthetic log with that many items (`sdm synth`), preprocessed with
--min-item-count 1 so that the catalogue keeps them, SDM trained for one epoch (dim 32, sampled
softmax), `sdm export --index hnsw`; then a real `sdm serve` process per index, and client
threads (one keep-alive connection each) that post {"user": <random known user>, "k": K} for a
fixed time. Every request must get a 200: errors and requests without an answer are counted.

    python benchmarks/serving.py --write-docs          # docs/benchmarks.md, section "serving"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.docs_section import replace_section  # noqa: E402

SDM = [sys.executable, "-c", "import sys; from cli.app import main; sys.argv[0] = 'sdm'; main()"]
TARGET_P99_MS, TARGET_RECALL = 15.0, 0.95


def build_run(work: Path, n_items: int, events_per_item: float) -> Path:
    from pipeline.config import PreprocessConfig
    from pipeline.run import run_preprocess
    from pipeline.synth import SynthConfig, write_synth
    from sdm.train import TrainConfig, train

    run = work / f"run-{n_items}"
    if (run / "best.pt").is_file():
        return run
    raw = write_synth(SynthConfig(n_events=int(n_items * events_per_item), n_items=n_items, seed=1), work / f"log-{n_items}", "parquet")
    data = work / f"data-{n_items}"
    run_preprocess(PreprocessConfig(logs=raw["events"], items=raw["items"], users=raw["users"], out=data,
                                    min_item_count=1, test_days=0.5, valid_days=0.5))
    train(TrainConfig(data=str(data), out=str(run), epochs=1, dim=32, lstm_layers=1, heads=2, batch_size=512,
                      loss="sampled", num_negatives=255, ks=[300], select_metric="recall@300"))
    subprocess.run([*SDM, "export", "--run", str(run), "--format", "torchscript", "--index", "hnsw"], check=True, cwd=REPO)
    return run


def hnsw_recall(run: Path, k: int, n_users: int = 1000) -> float:
    """Share of the exact top-k that the exported HNSW index finds, for users' current vectors."""
    import faiss
    import polars as pl
    import torch

    from sdm.ann import index_top_k, overlap_recall
    from sdm.retrieval import top_k
    from sdm.train import load_trained

    model, _, _ = load_trained(run)
    users = pl.read_parquet(run / "export" / "users.parquet")
    users = users.sample(n=min(n_users, users.height), seed=0, with_replacement=False)
    queries = torch.from_numpy(users.get_column("vector").to_numpy().copy())
    with torch.no_grad():
        _, exact = top_k(queries, model.item_vectors().float(), k)
    _, approximate = index_top_k(faiss.read_index(str(run / "export" / "index.faiss")), queries, k)
    return overlap_recall(approximate, exact)


def start_server(run: Path, index: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([*SDM, "serve", "--run", str(run), "--index", index, "--port", "0"], cwd=REPO,
                               env=os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "300"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not found:
        raise RuntimeError(f"sdm serve did not start: {line} {process.stderr.read()}")
    url = f"http://127.0.0.1:{found.group(1)}"
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("sdm serve did not answer /health within 600 s")


def load(url: str, users: list[str], clients: int, seconds: float, k: int) -> dict[str, float]:
    """`clients` threads posting for `seconds`; latencies of the answered requests."""
    import httpx

    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    sent = [0] * clients
    stop_at = time.monotonic() + seconds

    def client(slot: int) -> None:
        rng = random.Random(slot)
        # TCP_NODELAY: httpx writes headers and body separately, and Nagle's algorithm with the
        # server's delayed ACK would add 40 ms to every request.
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        with httpx.Client(base_url=url, timeout=30, transport=transport) as http:
            while time.monotonic() < stop_at:
                body = {"user": rng.choice(users), "k": k}
                sent[slot] += 1
                began = time.perf_counter()
                try:
                    response = http.post("/recommend", json=body)
                    ok = response.status_code == 200 and len(response.json()["items"]) == k
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies[slot].append(time.perf_counter() - began)
                else:
                    errors[slot] += 1

    threads = [threading.Thread(target=client, args=(slot,)) for slot in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 120)
    elapsed = time.monotonic() - began
    answered = np.array([value for slot in latencies for value in slot]) * 1000
    return {
        "clients": clients, "seconds": seconds, "sent": sum(sent), "answered": len(answered), "errors": sum(errors),
        "p50": float(np.percentile(answered, 50)), "p95": float(np.percentile(answered, 95)),
        "p99": float(np.percentile(answered, 99)), "rps": len(answered) / elapsed,
    }


def load_average() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default="100000,1000000", help="catalogue sizes, comma-separated")
    parser.add_argument("--events-per-item", type=float, default=2.0)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=15.0, help="per load level, but the largest")
    parser.add_argument("--long-seconds", type=float, default=60.0, help="for the largest number of clients")
    parser.add_argument("--k", type=int, default=300)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sdm-serving-bench")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args.work.mkdir(parents=True, exist_ok=True)
    clients = [int(c) for c in args.clients.split(",")]
    rows, recalls = [], {}
    for n_items in (int(n) for n in args.items.split(",")):
        run = build_run(args.work, n_items, args.events_per_item)
        manifest = json.loads((run / "export" / "manifest.json").read_text())
        recalls[manifest["items"]] = hnsw_recall(run, args.k)
        import polars as pl

        users = pl.read_parquet(run / "export" / "users.parquet").get_column("id").to_list()
        for index in ("exact", "hnsw"):
            process, url = start_server(run, index)
            try:
                for count in clients:
                    before = load_average()
                    result = load(url, users, count, args.long_seconds if count == max(clients) else args.seconds, args.k)
                    result |= {"items": manifest["items"], "index": index, "load": (before, load_average())}
                    print(json.dumps(result), flush=True)
                    rows.append(result)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    print(json.dumps({"recall": recalls}))
    if args.write_docs:
        write_docs(args, rows, recalls)


def write_docs(args, rows: list[dict], recalls: dict[int, float]) -> None:
    import torch

    table = ["| items | index | clients | seconds | requests | errors or unanswered | p50 ms | p95 ms | p99 ms | req/s | load before / after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['items']:,} | {r['index']} | {r['clients']} | {r['seconds']:g} | {r['sent']:,} | "
                     f"{r['sent'] - r['answered']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | "
                     f"{r['rps']:.0f} | {r['load'][0]:.1f} / {r['load'][1]:.1f} |")
    recall_lines = ", ".join(f"{items:,} items: {value:.3f}" for items, value in recalls.items())
    largest = max(recalls)
    single = [r for r in rows if r["items"] == largest and r["index"] == "hnsw" and r["clients"] == 1]
    p99 = single[0]["p99"] if single else float("nan")
    clean = all(r["errors"] == 0 and r["answered"] == r["sent"] for r in rows)
    body = f"""
Command: `python benchmarks/serving.py --items {args.items} --clients {args.clients} --seconds {args.seconds:g} --long-seconds {args.long_seconds:g} --k {args.k} --write-docs`.
Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__};
the load generator (Python threads, one keep-alive connection each) runs on the same 2 cores as the server
(one `sdm serve` process, one thread per request for torch and faiss). Runs trained one epoch on a synthetic log
({args.events_per_item:g} events per item, `--min-item-count 1`); every request is top-{args.k} for a random known user
(their latest session and long-term sets, as `sdm recommend`).

{chr(10).join(table)}

HNSW (M 32, efSearch max(128, K)) recall@{args.k} against exact search on the trained vectors, 1,000 users: {recall_lines}.

Targets: single-client p99 <= {TARGET_P99_MS:g} ms for top-{args.k} over {largest:,} items with an index of recall >= {TARGET_RECALL}:
p99 {p99:.1f} ms, recall {recalls[largest]:.3f} ({'met' if p99 <= TARGET_P99_MS and recalls[largest] >= TARGET_RECALL else 'missed'});
no error or lost request under {max(int(c) for c in args.clients.split(','))} clients for {args.long_seconds:g} s: {'met' if clean else 'missed'}.
"""
    replace_section(REPO / "docs" / "benchmarks.md", "serving", "Serving (`sdm serve`)", body)


if __name__ == "__main__":
    main()
