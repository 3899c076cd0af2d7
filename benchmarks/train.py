"""Training throughput and memory on this machine (evaluation: benchmarks/evaluate.py, retrieval.py).

    python benchmarks/train.py [--rows 40000] [--sections training,processes,memory]
                               [--write-docs]

training     target items per second of `sdm.training.train.train_epoch` (the real loop: length-grouped
             batches gathered from padded tensors, forward, sampled softmax, backward, clipping,
             Adam) at the size of the public TensorFlow SDM (dim 32, 2 LSTM layers, 4 heads, 255
             log-uniform negatives, batch 512, sessions of 5 items, long-term sets of 50 per
             feature, five item features), for several catalogue sizes; 1 process x 2 threads.
processes    the same at 3,706 items and a global batch of 512, as 1 process x 1 thread,
             1 process x 2 threads and 2 DDP processes x 1 thread (torchrun, gloo, 256 each).
memory       private memory (RssAnon) and page-cache pages mapped (RssFile) of a trainer whose
             training tensors are memory-mapped (sdm.data.tensor_store), for 0.25M, 1M and 4M
             training sessions, during 300 training steps.

Each measurement that needs its own memory or process group runs in a child process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `sdm` sets it; must precede importing torch
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docs_section import replace_section  # noqa: E402

from sdm.models import build_model  # noqa: E402
from sdm.models.config import ModelConfig  # noqa: E402
from sdm.data.sessions import SessionData  # noqa: E402
from sdm.training.distributed import Ranks, join, leave  # noqa: E402
from sdm.data.tensor_store import map_tensors  # noqa: E402
from sdm.training.train import NO_BUFFER_SYNC, Objective, TrainConfig, make_loss, train_epoch  # noqa: E402

SIDE_VOCAB = {"leaf": 2_000, "category": 100, "shop": 20_000, "brand": 5_000}
SESSION, LONG, PROFILE_FIELDS = 5, 50, 3
TARGET_ITEMS_PER_SECOND = 58_000
SMALL_CATALOGUE = 3_706
SCALING_CATALOGUES = (SMALL_CATALOGUE, 100_000)
MEMORY_ROWS = (250_000, 1_000_000, 4_000_000)
MEMORY_STEPS, MEMORY_ITEMS = 300, 100_000
SECTION_TITLES = {
    "training": "Training throughput",
    "processes": "Training on several processes",
    "memory": "Training memory",
}
SECTIONS = tuple(SECTION_TITLES)


def zipf_ids(n: int, size: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Frequency-ranked ids in [1, n): id k drawn with probability about 1/k, as real logs are."""
    u = torch.rand(size, generator=generator, dtype=torch.float64)
    return torch.exp(u * torch.log(torch.tensor(float(n)))).long().clamp(1, n - 1)


def synthetic_tensors(n_rows: int, n_items: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    items = zipf_ids(n_items, (n_rows, SESSION), generator)
    return {
        "items": items,
        "lengths": torch.full((n_rows,), SESSION),
        "targets": torch.cat([items[:, 1:], zipf_ids(n_items, (n_rows, 1), generator)], dim=1),
        "user": torch.randint(1, 1000, (n_rows,), generator=generator),
        "profile": torch.randint(1, 10, (n_rows, PROFILE_FIELDS), generator=generator),
        "long_item": zipf_ids(n_items, (n_rows, LONG), generator),
        **{f"long_{f}": zipf_ids(v, (n_rows, LONG), generator) for f, v in SIDE_VOCAB.items()},
    }


def item_side_table(n_items: int, generator: torch.Generator) -> torch.Tensor:
    item_side = torch.stack([zipf_ids(v, (n_items,), generator) for v in SIDE_VOCAB.values()], dim=1)
    item_side[0] = 0
    return item_side


def training_setup(n_items: int, batch_size: int, ranks: Ranks = Ranks()):
    """(config, objective (DDP-wrapped under several ranks), optimizer) of the benchmark model."""
    generator = torch.Generator().manual_seed(0)
    item_side = item_side_table(n_items, generator)
    config = TrainConfig(data="", out="", dim=32, batch_size=batch_size, loss="sampled", num_negatives=255, tie_output=False)
    model_config = ModelConfig.build(config, n_items=n_items, n_users=1000, side_vocab=SIDE_VOCAB, profile_vocab=[10] * PROFILE_FIELDS)
    torch.manual_seed(0)
    model = build_model("sdm", model_config, item_side, torch.ones(n_items, dtype=torch.long))
    objective = Objective(model, make_loss(config, torch.ones(n_items, dtype=torch.long), ranks))
    if ranks.distributed:
        objective = torch.nn.parallel.DistributedDataParallel(objective, **NO_BUFFER_SYNC)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    return config, objective, optimizer


def training_throughput(n_items: int, n_rows: int, threads: int, batch_size: int = 512, ranks: Ranks = Ranks()) -> dict:
    """Targets per second of one measured epoch (after a warm-up), over all ranks."""
    torch.set_num_threads(threads)
    data = SessionData(synthetic_tensors(n_rows, n_items, torch.Generator().manual_seed(1)))
    config, objective, optimizer = training_setup(n_items, batch_size, ranks)
    warm_up = SessionData({name: tensor[:4096] for name, tensor in data.tensors.items()})
    train_epoch(objective, optimizer, warm_up, config, 0, ranks)
    ranks.barrier()
    started = time.perf_counter()
    _, targets = train_epoch(objective, optimizer, data, config, 1, ranks)
    seconds = time.perf_counter() - started
    return {"n_items": n_items, "targets": targets, "seconds": seconds, "targets_per_second": targets / seconds}


def ddp_worker(n_items: int, n_rows: int) -> None:
    """One rank of `processes` (under torchrun): rank 0 prints the measurement as JSON."""
    ranks = join("cpu")
    try:
        result = training_throughput(n_items, n_rows, 1, 512 // ranks.world_size, ranks)
        if ranks.is_main:
            print(json.dumps(result | {"processes": ranks.world_size, "threads": 1}))
    finally:
        leave(ranks)


def run_child(arguments: list[str], environment: dict[str, str] | None = None) -> dict:
    result = subprocess.run(arguments, capture_output=True, text=True, cwd=ROOT, env=environment, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-4000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def process_scaling(n_rows: int) -> list[dict]:
    script = str(Path(__file__).resolve())
    results = []
    for n_items in SCALING_CATALOGUES:
        results += [training_throughput(n_items, n_rows, threads) | {"processes": 1, "threads": threads} for threads in (1, 2)]
        results.append(run_child(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script,
             "--worker", "ddp", "--items", str(n_items), "--rows", str(n_rows)],
            {**os.environ, "OMP_NUM_THREADS": "1"},
        ))
    return results


def write_store(directory: Path, n_rows: int) -> None:
    """Training tensors of n_rows synthetic sessions in the layout of sdm.data.tensor_store, chunk by chunk."""
    generator = torch.Generator().manual_seed(2)
    first = synthetic_tensors(1, MEMORY_ITEMS, generator)
    files = {
        name: np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=np.int32, shape=(n_rows, *tensor.shape[1:]))
        for name, tensor in first.items()
    }
    for start in range(0, n_rows, 100_000):
        chunk = synthetic_tensors(min(100_000, n_rows - start), MEMORY_ITEMS, generator)
        for name, tensor in chunk.items():
            files[name][start:start + len(tensor)] = tensor.numpy()
    for array in files.values():
        array.flush()
    print(json.dumps({"rows": n_rows}))


def memory_status() -> dict[str, int]:
    """RssAnon and RssFile of this process, in kB (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) for name in ("RssAnon", "RssFile")}


class StopTraining(Exception):
    pass


def bytes_read() -> int:
    """Bytes this process has read from storage (Linux /proc/self/io)."""
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["read_bytes"])


def memory_worker(directory: Path, plain: bool) -> None:
    """Map the store, train MEMORY_STEPS steps, print peak private and file-backed RSS and the bytes
    read meanwhile as JSON. `plain`: np.load's own mapping, without sdm's random-access advice."""
    torch.set_num_threads(2)
    config, objective, optimizer = training_setup(MEMORY_ITEMS, 512)
    peaks = memory_status()
    before = dict(peaks)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            for name, value in memory_status().items():
                peaks[name] = max(peaks[name], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    names = ["items", "lengths", "targets", "user", "profile", "long_item", *[f"long_{f}" for f in SIDE_VOCAB]]
    read_before = bytes_read()
    if plain:
        data = SessionData({name: torch.from_numpy(np.load(directory / f"{name}.npy", mmap_mode="c")) for name in names})
    else:
        data = SessionData(map_tensors(directory, names))
    steps = 0

    def count(targets: int, loss: float) -> None:
        nonlocal steps
        steps += 1
        if steps == MEMORY_STEPS:
            raise StopTraining

    started = time.perf_counter()
    try:
        train_epoch(objective, optimizer, data, config, 0, on_batch=count)
    except StopTraining:
        pass
    seconds = time.perf_counter() - started
    read_mb = (bytes_read() - read_before) / 2**20
    done.set()
    sampler.join()
    size = sum(path.stat().st_size for path in directory.glob("*.npy"))
    print(json.dumps({"rows": len(data), "store_mb": size / 2**20, "steps": steps, "seconds": seconds,
                      "mapping": "plain" if plain else "advised", "read_mb": read_mb,
                      "anon_before_mb": before["RssAnon"] / 1024, "anon_peak_mb": peaks["RssAnon"] / 1024,
                      "file_peak_mb": peaks["RssFile"] / 1024}))


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_page_cache() -> bool:
    """Empty the page cache (needs root), so that a run reads its store from storage."""
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
        return True
    except OSError:
        return False


def memory_scaling(work: Path, sizes: list[int]) -> list[dict]:
    """Per size, a trainer with sdm's mapping; for the largest, also one with np.load's plain mapping
    (readahead left on). Each starts with an empty page cache where that is allowed."""
    results = []
    script = str(Path(__file__).resolve())
    for n_rows in sizes:
        with tempfile.TemporaryDirectory(dir=work) as directory:
            run_child([sys.executable, script, "--worker", "write-store", "--rows", str(n_rows), "--store", directory])
            for plain in (False, True) if n_rows == max(sizes) else (False,):
                cold = drop_page_cache()
                worker = [sys.executable, script, "--worker", "memory", "--store", directory, *(["--plain"] * plain)]
                results.append(run_child(worker) | {"cold_cache": cold})
    return results


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def training_text(training: list[dict], load_before: str, load_after: str) -> str:
    rows = "\n".join(
        f"| {t['n_items']:,} | {t['targets_per_second']:,.0f} | {'met' if t['targets_per_second'] >= TARGET_ITEMS_PER_SECOND else 'missed'} |"
        for t in training
    )
    return f"""**Training** (SDM at the public TensorFlow SDM's size: dim 32, 2 LSTM layers, 4 heads, 255
log-uniform negatives, batch 512, sessions of 5 items, long-term sets of 50 for each of 5 features;
1 process x 2 threads). Target: {TARGET_ITEMS_PER_SECOND:,} target items per second (3x the 19,400 samples/s of
the TF code here). Load average (1 min) before / after: {load_before} / {load_after}.

| catalogue (items) | target items / s | target |
|---|---|---|
{rows}
"""


def processes_text(scaling: list[dict], load_before: str, load_after: str) -> str:
    base = {s["n_items"]: s["targets_per_second"] for s in scaling if (s["processes"], s["threads"]) == (1, 1)}
    rows = "\n".join(
        f"| {s['n_items']:,} | {s['processes']} x {s['threads']} | {s['targets_per_second']:,.0f} | {s['targets_per_second'] / base[s['n_items']]:.2f}x |"
        for s in scaling
    )
    return f"""**Processes and threads** (the model above, a global batch of 512 sessions: DDP ranks take
256 each; gloo on loopback). Load average before / after: {load_before} / {load_after}.

| catalogue (items) | processes x threads | target items / s | vs 1 x 1 |
|---|---|---|---|
{rows}

A DDP step costs the compute of a rank's share plus an all-reduce of every gradient, dense
embedding tables included (about {(SIDE_VOCAB['shop'] * 16 + SIDE_VOCAB['brand'] * 8 + SIDE_VOCAB['leaf'] * 8 + SIDE_VOCAB['category'] * 8) * 4 / 2**20:.1f} MB of side tables plus 32 floats per item, {100_000 * 32 * 4 / 2**20:.1f} MB at 100,000 items,
per step). On more cores, ranks of one thread each should scale with the cores while the compute of a
step outweighs that all-reduce (small catalogues, large batches); at millions of items the dense
all-reduce of the item table takes over, and sparse or sharded embeddings would be the next step.
"""


def memory_text(memory: list[dict], load_before: str, load_after: str) -> str:
    advised = [m for m in memory if m["mapping"] == "advised"]
    rows = "\n".join(
        f"| {m['rows']:,} | {m['mapping']} | {m['store_mb']:,.0f} MB | {m['anon_before_mb']:,.0f} MB | {m['anon_peak_mb']:,.0f} MB "
        f"| {m['file_peak_mb']:,.0f} MB | {m['read_mb']:,.0f} MB | {m['seconds']:.1f} s |"
        for m in memory
    )
    growth = advised[-1]["anon_peak_mb"] / advised[0]["anon_peak_mb"]
    rows_read_mb = MEMORY_STEPS * 512 * advised[-1]["store_mb"] / advised[-1]["rows"]
    cold = "each run started with an empty page cache" if all(m["cold_cache"] for m in memory) else (
        "the page cache could not be emptied (not root), so the reads are a lower bound")
    return f"""**Memory of a trainer** whose training tensors are memory-mapped (sdm.data.tensor_store: int32 .npy
files), during {MEMORY_STEPS} steps of the model above (batch 512) over a {MEMORY_ITEMS:,}-item catalogue, sessions
of 5 items, long-term sets of 50 per feature; {cold}. RssAnon is the process's private memory;
RssFile counts the pages of the mapped files in its page tables: they live in the page cache,
are shared by every process on the machine (each DDP rank maps the same files) and are dropped by
the kernel under pressure. "advised" is sdm's mapping (`madvise(MADV_RANDOM)`); "plain" is
`np.load(mmap_mode=...)` with the kernel's readahead. Load average before / after: {load_before} / {load_after}.

| training sessions | mapping | files | RssAnon before mapping | RssAnon peak | RssFile peak | read from storage | {MEMORY_STEPS} steps |
|---|---|---|---|---|---|---|---|
{rows}

Peak private memory grows {growth:.2f}x for {advised[-1]['rows'] // advised[0]['rows']}x the sessions. The {MEMORY_STEPS} steps gather about
{rows_read_mb:,.0f} MB of rows; with readahead (8 MB per fault on this machine's disk:
`/sys/block/*/queue/read_ahead_kb`) scattered rows pull in most of each file, which for files larger
than memory would mean reading far more than the batches need.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=40_000, help="training sessions per measured epoch")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--memory-rows", default=",".join(map(str, MEMORY_ROWS)), help="training sessions of the memory runs")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()), help="where the memory section writes its files")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--worker", choices=("ddp", "write-store", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--items", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "ddp":
        return ddp_worker(args.items, args.rows)
    if args.worker == "write-store":
        return write_store(args.store, args.rows)
    if args.worker == "memory":
        return memory_worker(args.store, args.plain)

    sections = [name for name in args.sections.split(",") if name]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    results = {}
    for section in SECTIONS:
        if section not in sections:
            continue
        before = load()
        if section == "training":
            results[section] = [training_throughput(n, args.rows, 2) for n in (SMALL_CATALOGUE, 100_000, 1_000_000)]
            text = training_text(results[section], before, load())
        elif section == "processes":
            results[section] = process_scaling(args.rows)
            text = processes_text(results[section], before, load())
        else:
            results[section] = memory_scaling(args.work, [int(n) for n in args.memory_rows.split(",")])
            text = memory_text(results[section], before, load())
        print(json.dumps({section: results[section]}, indent=2), flush=True)
        if args.write_docs:
            command = f"python benchmarks/train.py --sections {section} --rows {args.rows} --memory-rows {args.memory_rows} --write-docs"
            replace_section(ROOT / "docs" / "benchmarks.md", f"train-{section}", SECTION_TITLES[section],
                            f"Command: `{command}`.\nMachine: {machine()}.\n\n{text}")


if __name__ == "__main__":
    main()
