"""`sdm serve` under load: latency p50/p95/p99 and requests/s for 1, 8 and 32 concurrent clients,
top-K over about 100k and 1M items, exact search, HNSW and IVF, with the recall@K against exact
search of HNSW (at several efSearch) and IVF (at several nprobe) on the trained vectors.

For each catalogue size: a synthetic log with that many items (`sdm synth`, uniform popularity
inside a leaf, 5 events per item), preprocessed with --min-item-count 1 so that the catalogue keeps
them, SDM trained for one epoch (dim 32, sampled softmax, one thread), `sdm export --index hnsw`
(the ONNX user tower, which the server runs with onnxruntime, and the default index parameters);
then a real `sdm serve` process per index, and client threads (one keep-alive connection each)
that post {"user": <random known user>, "k": K} for a fixed time.
Every request must get a 200 with K items: errors and requests without an answer are counted.

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


# A log with uniform item popularity inside each leaf and 5 events per catalogue item touches about
# 90% of its items (89,670 of 100,000 measured), and --min-item-count 1 keeps them all: the synthetic
# catalogue is n_items / 0.9, so that about n_items are served.
EVENTS_PER_ITEM, TOUCHED_SHARE = 5.0, 0.9


def build_run(work: Path, n_items: int) -> Path:
    """A run trained (one epoch, one thread) on a synthetic log of about n_items served items."""
    from pipeline.config import PreprocessConfig
    from pipeline.run import run_preprocess
    from pipeline.synth import SynthConfig, write_synth
    from sdm.training.train import TrainConfig, train

    run = work / f"run-{n_items}"
    if (run / "best.pt").is_file():
        return run
    catalogue = int(n_items / TOUCHED_SHARE)
    synth = SynthConfig(n_events=int(catalogue * EVENTS_PER_ITEM), n_items=catalogue, seed=1, item_zipf_exponent=0.0)
    raw = write_synth(synth, work / f"log-{n_items}", "parquet")
    data = work / f"data-{n_items}"
    run_preprocess(PreprocessConfig(logs=raw["events"], items=raw["items"], users=raw["users"], out=data,
                                    min_item_count=1, test_days=0.5, valid_days=0.5))
    train(TrainConfig(data=str(data), out=str(run), epochs=1, dim=32, lstm_layers=1, heads=2, batch_size=512,
                      loss="sampled", num_negatives=255, ks=[300], select_metric="recall@300", threads=1))
    return run


def export(run: Path) -> tuple[dict, float]:
    """`sdm export --index hnsw` (ONNX tower) at the default parameters, unless RUN/export is that already; (manifest, seconds)."""
    from sdm.serving.ann import IndexParams

    manifest_path, timing = run / "export" / "manifest.json", run / "benchmark-export.json"
    defaults = IndexParams()
    wanted = {"M": defaults.M, "efConstruction": defaults.efConstruction, "efSearch": defaults.efSearch}
    if manifest_path.is_file() and timing.is_file():
        manifest = json.loads(manifest_path.read_text())
        if (manifest.get("index") or {}).get("params") == wanted and manifest["tower"]["format"] == "onnx":
            return manifest, json.loads(timing.read_text())["seconds"]
    began = time.perf_counter()
    subprocess.run([*SDM, "export", "--run", str(run), "--index", "hnsw"], check=True, cwd=REPO,
                   env=os.environ | {"OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - began
    timing.write_text(json.dumps({"seconds": seconds}))
    return json.loads(manifest_path.read_text()), seconds


def recalls(run: Path, k: int, n_users: int = 1000) -> dict[str, dict[int, tuple[float, float]]]:
    """{"hnsw": {efSearch: (recall@k, ms per query)}, "ivf": {nprobe: ...}, "default": {kind: setting}}
    against exact search,
    one thread, for a sample of users' current vectors; HNSW is the exported index, IVF built here."""
    import faiss
    import polars as pl
    import torch

    from sdm.serving.ann import build_index, index_top_k, overlap_recall
    from sdm.evaluation.retrieval import top_k
    from sdm.training.train import load_trained

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    model, _, _ = load_trained(run)
    with torch.no_grad():
        items = model.item_vectors().float()
    users = pl.read_parquet(run / "export" / "users.parquet")
    users = users.sample(n=min(n_users, users.height), seed=0, with_replacement=False)
    queries = torch.from_numpy(users.get_column("vector").to_numpy().copy())
    _, exact = top_k(queries, items, k)

    def measured(index) -> tuple[float, float]:
        began = time.perf_counter()
        _, found = index_top_k(index, items, queries, k)
        return overlap_recall(found, exact), (time.perf_counter() - began) / len(queries) * 1000

    hnsw = faiss.read_index(str(run / "export" / "index.faiss"))
    result: dict[str, dict[int, tuple[float, float]]] = {"hnsw": {}, "ivf": {}, "default": {}}
    result["default"]["hnsw"] = hnsw.hnsw.efSearch
    for ef in sorted({k, 800, hnsw.hnsw.efSearch, 1600}):
        hnsw.hnsw.efSearch = ef
        result["hnsw"][ef] = measured(hnsw)
    del hnsw
    ivf = build_index(items, "ivf")
    result["default"]["ivf"] = ivf.nprobe
    for nprobe in sorted({ivf.nlist // 32, ivf.nprobe, ivf.nlist // 8, ivf.nlist // 4}):
        ivf.nprobe = max(1, nprobe)
        result["ivf"][ivf.nprobe] = measured(ivf)
    return result


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


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
    parser.add_argument("--items", default="100000,1000000", help="catalogue sizes (about), comma-separated")
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
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows, sizes = [], []
    for n_items in (int(n) for n in args.items.split(",")):
        run = build_run(args.work, n_items)
        manifest, export_seconds = export(run)
        measured = recalls(run, args.k)
        import polars as pl

        users = pl.read_parquet(run / "export" / "users.parquet").get_column("id").to_list()
        size = {"items": manifest["items"], "users": len(users), "export_seconds": export_seconds, "recalls": measured}
        for index in ("exact", "hnsw", "ivf"):  # ivf: built at start (the export holds the HNSW index)
            process, url = start_server(run, index)
            try:
                import httpx

                info = httpx.get(url + "/info").json()
                size |= {"user_rows_bytes": info["user_rows_bytes"]}
                for count in clients:
                    before = load_average()
                    result = load(url, users, count, args.long_seconds if count == max(clients) else args.seconds, args.k)
                    result |= {"items": manifest["items"], "index": index, "load": (before, load_average())}
                    print(json.dumps(result), flush=True)
                    rows.append(result)
                size[f"{index}_rss_mb"] = peak_rss_mb(process.pid)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
        size |= data_sizes(run)
        print(json.dumps(size, default=str), flush=True)
        sizes.append(size)
    if args.write_docs:
        write_docs(args, rows, sizes, uptime)


def data_sizes(run: Path) -> dict[str, int]:
    """Sessions and events of the run's data (what the server's in-memory user rows hold)."""
    import polars as pl

    data = Path(json.loads((run / "config.json").read_text())["train"]["data"])
    count = lambda path: pl.scan_parquet(path).select(pl.len()).collect().item()  # noqa: E731
    return {"sessions": count(data / "sessions" / "sessions.parquet"), "events": count(data / "sessions" / "events.parquet")}


def write_docs(args, rows: list[dict], sizes: list[dict], uptime: str) -> None:
    import torch

    from sdm.serving.ann import IndexParams

    table = ["| items | index | clients | seconds | requests | errors or unanswered | p50 ms | p95 ms | p99 ms | req/s | load before / after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['items']:,} | {r['index']} | {r['clients']} | {r['seconds']:g} | {r['sent']:,} | "
                     f"{r['sent'] - r['answered']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | "
                     f"{r['rps']:.0f} | {r['load'][0]:.1f} / {r['load'][1]:.1f} |")
    recall_table = ["| items | index | setting | recall@{k} | ms per query (1 thread, 1,000 queries in one call) |".format(k=args.k), "|---|---|---|---|---|"]
    memory_table = ["| items | users | sessions | events | user rows in memory | per 1M sessions | server peak RSS exact / hnsw | export (hnsw build) |",
                    "|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        for kind, setting in (("hnsw", "efSearch"), ("ivf", "nprobe")):
            for value, (recall, ms) in size["recalls"][kind].items():
                recall_table.append(f"| {size['items']:,} | {kind} | {setting} {value} | {recall:.3f} | {ms:.2f} |")
        per_million = size["user_rows_bytes"] / size["sessions"] * 1e6 / 2**20
        memory_table.append(f"| {size['items']:,} | {size['users']:,} | {size['sessions']:,} | {size['events']:,} | "
                            f"{size['user_rows_bytes'] / 2**20:.0f} MB | {per_million:.0f} MB | "
                            f"{size['exact_rss_mb']:,.0f} / {size['hnsw_rss_mb']:,.0f} MB | {size['export_seconds']:.0f} s |")
    largest = max(sizes, key=lambda size: size["items"])
    defaults = IndexParams()
    targets = []
    for kind in ("hnsw", "ivf"):
        setting = largest["recalls"]["default"][kind]
        recall = largest["recalls"][kind][setting][0]
        single = [r for r in rows if r["items"] == largest["items"] and r["index"] == kind and r["clients"] == 1]
        p99 = single[0]["p99"] if single else float("nan")
        met = p99 <= TARGET_P99_MS and recall >= TARGET_RECALL
        name = f"{kind} at {'efSearch' if kind == 'hnsw' else 'nprobe'} {setting}"
        targets.append(f"{name}: p99 {p99:.1f} ms, recall {recall:.3f} ({'met' if met else 'missed'})")
    clean = all(r["errors"] == 0 and r["answered"] == r["sent"] for r in rows)
    body = f"""
Command: `python benchmarks/serving.py --items {args.items} --clients {args.clients} --seconds {args.seconds:g} --long-seconds {args.long_seconds:g} --k {args.k} --write-docs`.
Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__};
`uptime` at the start: {uptime}.
The load generator (Python threads, one keep-alive connection each) runs on the same 2 cores as the server
(one `sdm serve` process, one thread per request for onnxruntime, which runs the exported user tower, and faiss). Runs trained one epoch on a synthetic log
({EVENTS_PER_ITEM:g} events per item, uniform popularity inside a leaf, `--min-item-count 1`); every request is
top-{args.k} for a random known user (their latest session and long-term sets, as `sdm recommend`).
HNSW: the exported index, M {defaults.M}, efConstruction {defaults.efConstruction}, efSearch {defaults.efSearch}; IVF: built
by the server at start, nlist sqrt(items), nprobe nlist / 16 (the defaults).

{chr(10).join(table)}

Recall@{args.k} against exact search on the trained vectors (1,000 users' current vectors; HNSW is the exported
index searched at each efSearch, IVF is built with nlist = sqrt(items) and searched at each nprobe):

{chr(10).join(recall_table)}

Memory of the per-user rows the server holds (latest session, long-term sets, profile, every logged event's
item and time; `/info` reports it) and of the server process:

{chr(10).join(memory_table)}

Targets: single-client p99 <= {TARGET_P99_MS:g} ms for top-{args.k} over {largest['items']:,} items with an index of recall >= {TARGET_RECALL}:
{'; '.join(targets)};
no error or lost request under {max(int(c) for c in args.clients.split(','))} clients for {args.long_seconds:g} s: {'met' if clean else 'missed'}.
"""
    replace_section(REPO / "docs" / "benchmarks.md", "serving", "Serving (`sdm serve`)", body)


if __name__ == "__main__":
    main()
