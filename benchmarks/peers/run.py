"""Speed against the public TensorFlow SDM (DeepMatch 0.3.2), both measured in one run.

    python benchmarks/peers/run.py [--work benchmarks/peers/.work] [--events 1000000] [--threads 2]
                                   [--peer-events 0] [--write-docs]

1. A venv of its own, WORK/venv (created once, then reused), holds the peer: DeepMatch 0.3.2,
   tensorflow-cpu 2.15, deepctr 0.9.4, numpy<2. None of it is a dependency of ours.
2. One log: `sdm synth --events N` with each event's category joined on (the peer's SDM takes one
   item side feature, as MovieLens' genres), and the users file (age, gender, city tier).
3. Preprocessing: `sdm preprocess`'s `run_preprocess` on the log at the public SDM's MovieLens
   configuration (`--max-session-length 5 --long-window none --max-long 50`, in memory), timed
   around that call (and the whole process's wall time beside it); then the peer's
   `gen_data_set_sdm` + `gen_model_input_sdm` on the same log (the first `--peer-events` rows
   when given), timed around those two calls. Events per second each.
4. Training at the peer's ML-1M size (dim 32, 2 LSTM layers, 4 heads, 255 sampled negatives,
   batch 512, short 5 / long 50) on the same sessions: our training split, every position a
   target, converted to the peer's input (benchmarks/peers/convert.py). The peer first: one epoch
   of `model.fit`, timed from the end of its 20th batch to the end of the epoch (graph building
   and the first steps excluded); then `sdm train` for one epoch, its `targets_per_second` from
   history.json (the epoch's training loop alone, first steps included). Same thread count.
Both throughputs, the ratios, the load average before and after each step and the versions go
to WORK/results.json and, with --write-docs, to docs/benchmarks.md ("Peers (same run)").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(HERE)]
from convert import write_peer_inputs  # noqa: E402
from docs_section import replace_section  # noqa: E402

from pipeline.storage import write_atomic, write_json_atomic  # noqa: E402

PEER_PACKAGES = ["deepmatch==0.3.2", "tensorflow-cpu==2.15.1", "deepctr==0.9.4", "numpy<2", "pandas<3"]
PEER_IMPORT_CHECK = "import deepmatch, deepctr, tensorflow, pandas"
PROFILE = "age,gender,city_tier"  # sdm synth's users file
PAPER_SIZE = ["--dim", "32", "--lstm-layers", "2", "--heads", "4", "--dropout", "0.2", "--loss", "sampled",
              "--num-negatives", "255", "--user-id"]  # the peer embeds user_id too
PEER_BATCH = 512  # samples, each one target item; ours counts sessions, each several targets
TRAINING_TARGET, PREPROCESS_TARGET = 3.0, 50.0


def peer_python(venv: Path) -> Path:
    """The peers venv's interpreter, creating the venv and installing the peer the first time."""
    python = venv / "bin" / "python"
    if python.is_file() and subprocess.run([python, "-c", PEER_IMPORT_CHECK], capture_output=True, check=False).returncode == 0:
        return python
    print(f"installing {' '.join(PEER_PACKAGES)} into {venv} (about 500 MB, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return python


def run_json(command: list, env: dict[str, str] | None = None) -> dict:
    """Run a command, fail with its stderr, return the JSON of its last output line."""
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command[:4]))} ... failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def loaded(step):
    """Run `step()` and add the 1-minute load average just before and just after it."""
    before = os.getloadavg()[0]
    result = {**step(), "load_before": before, "load_after": os.getloadavg()[0]}
    print(json.dumps(result), flush=True)
    return result


def sdm_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from cli.app import main; main()", *args]


def our_env(threads: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": str(threads)}


def peer_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TF_NUM_INTRAOP_THREADS": str(threads),
            "TF_NUM_INTEROP_THREADS": str(threads), "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ""}


def build_log(work: Path, events: int, seed: int) -> tuple[Path, Path]:
    """sdm synth's events with their item's category joined on -> WORK/log.csv, and its users file."""
    import polars as pl

    synth = work / "synth"
    subprocess.run(sdm_command("synth", "--events", str(events), "--seed", str(seed), "--out", str(synth)),
                   check=True, capture_output=True, env=our_env(1))
    log = (
        pl.scan_csv(synth / "events.csv", schema_overrides={"user_id": pl.Utf8})
        .join(pl.scan_csv(synth / "items.csv").select("item_id", "category"), on="item_id", how="left",
              maintain_order="left")
        .select("user_id", "item_id", "category", "timestamp")
        .collect()
    )
    write_atomic(work / "log.csv", lambda handle: log.write_csv(handle))
    return work / "log.csv", synth / "users.csv"


PREPROCESS = """
import json, sys, time
from pathlib import Path
from pipeline.config import PreprocessConfig
from pipeline.run import run_preprocess
log, users, out = map(Path, sys.argv[1:4])
config = PreprocessConfig(logs=log, users=users, out=out, max_session_length=5, long_window_ms=None, max_long=50, buckets=1)
started = time.perf_counter()
reports = run_preprocess(config, force=True)
print(json.dumps({"in_process_seconds": time.perf_counter() - started, "stages": {r.name: r.seconds for r in reports}}))
"""


def our_preprocess(log: Path, users: Path, data: Path, events: int) -> dict:
    """`sdm preprocess`'s run_preprocess (as `--max-session-length 5 --long-window none --max-long 50
    --buckets 1`) in a fresh process: the time of that call
    (as the peer's: its functions alone), its stages, and the wall time of the whole process
    (interpreter start-up and imports too)."""
    started = time.perf_counter()
    result = run_json([sys.executable, "-c", PREPROCESS, log, users, data], env=our_env(os.cpu_count()))
    seconds = time.perf_counter() - started
    return {**result, "events": events, "seconds": seconds, "events_per_second": events / result["in_process_seconds"],
            "wall_events_per_second": events / seconds}


def our_training(data: Path, run: Path, threads: int, seed: int, batch_size: int) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    subprocess.run(sdm_command("train", "--data", str(data), "--out", str(run), *PAPER_SIZE, "--batch-size", str(batch_size),
                               "--epochs", "1", "--threads", str(threads), "--seed", str(seed), "--quiet"),
                   check=True, capture_output=True, env=our_env(threads))
    epoch = json.loads((run / "history.json").read_text())["epochs"][0]
    return {"seconds": epoch["seconds"], "items_per_second": epoch["targets_per_second"], "threads": threads,
            "batch_size": batch_size}


def targets_per_session(data: Path) -> float:
    stats = json.loads((data / "splits" / "manifest.json").read_text())["stats"]
    return stats["train_targets"] / stats["train_sessions"]


def our_versions() -> dict[str, str]:
    from importlib.metadata import version

    import polars as pl
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "polars": pl.__version__,
            "sdm": version("sdm")}


def measure(args: argparse.Namespace) -> dict:
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    python = peer_python(work / "venv")
    driver = [python, HERE / "peer_driver.py"]
    log, users = build_log(work, args.events, args.seed)
    data = work / "data"
    results: dict = {"events": args.events, "threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}

    print("preprocessing: sdm preprocess", flush=True)
    results["our_preprocess"] = loaded(lambda: our_preprocess(log, users, data, args.events))
    print("preprocessing: the peer's gen_data_set_sdm + gen_model_input_sdm", flush=True)
    peer_rows = ["--events", str(args.peer_events)] if args.peer_events else []
    results["peer_preprocess"] = loaded(lambda: run_json(
        [*driver, "preprocess", log, users, "--profile", PROFILE, *peer_rows], env=peer_env(args.threads)))

    inputs = work / "peer_inputs.npz"
    results["samples"] = write_peer_inputs(data, inputs)
    print(f"training: the peer, one epoch of {results['samples']:,} target items", flush=True)
    results["peer_training"] = loaded(lambda: run_json(
        [*driver, "train", inputs, "--threads", str(args.threads), "--seed", str(args.seed)], env=peer_env(args.threads)))
    print(f"training: sdm train, one epoch at --batch-size {PEER_BATCH}", flush=True)
    results["our_training"] = loaded(lambda: our_training(data, work / "run", args.threads, args.seed, PEER_BATCH))
    results["targets_per_session"] = targets_per_session(data)
    sessions = round(PEER_BATCH / results["targets_per_session"])  # about PEER_BATCH targets a step
    print(f"training: sdm train, one epoch at --batch-size {sessions} (about {PEER_BATCH} targets a step)", flush=True)
    results["our_training_matched"] = loaded(lambda: our_training(data, work / "run", args.threads, args.seed, sessions))

    peer_rate = results["peer_training"]["items_per_second"]
    results["training_ratio"] = results["our_training"]["items_per_second"] / peer_rate
    results["matched_training_ratio"] = results["our_training_matched"]["items_per_second"] / peer_rate
    results["preprocess_ratio"] = (results["our_preprocess"]["events_per_second"]
                                   / results["peer_preprocess"]["events_per_second"])
    results["versions"] = {"ours": our_versions(), "peer": results["peer_training"].pop("versions")}
    write_json_atomic(work / "results.json", results)
    return results


def verdict(ratio: float, target: float) -> str:
    return "met" if ratio >= target else f"missed (at {ratio / target:.0%} of it)"


def docs_body(results: dict, command: str) -> str:
    pre_ours, pre_peer = results["our_preprocess"], results["peer_preprocess"]
    train_ours, train_peer = results["our_training"], results["peer_training"]
    ours, peer = results["versions"]["ours"], results["versions"]["peer"]
    matched = results["our_training_matched"]
    per_step = PEER_BATCH * results["targets_per_session"]
    stages = " · ".join(f"{name} {seconds:.1f} s" for name, seconds in pre_ours["stages"].items())
    prefix = "" if pre_peer["events"] == results["events"] else (
        f" The peer ran on the log's first {pre_peer['events']:,} events (its loop over users is quadratic in a"
        " user's history, so its rate on the whole log would be lower still); no extrapolation.")
    return f"""
Command: `{command}`. Machine: {results['machine']}; ours: Python {ours['python']}, torch {ours['torch']},
polars {ours['polars']}, sdm {ours['sdm']}; the peer, in its own venv: DeepMatch {peer['deepmatch']},
tensorflow-cpu {peer['tensorflow']}, deepctr {peer['deepctr']}, numpy {peer['numpy']}, pandas {peer['pandas']}.
Both sides in the same run, one after the other, {results['threads']} threads each for training. The log:
`sdm synth --events {results['events']:,}` with each event's item category (the peer's SDM takes one
item side feature, as MovieLens' genres) and the users file (3 profile fields).

**Preprocessing** (the public SDM's MovieLens configuration: sessions of at most 5 items, long-term
sets of 50, no window). Ours: `run_preprocess`, what `sdm preprocess --max-session-length 5
--long-window none --max-long 50 --buckets 1` calls, timed around the call in a fresh process
(reading the CSV and all four stages; the process's wall time, with interpreter start-up and
imports, beside it). The peer: `gen_data_set_sdm` + `gen_model_input_sdm` timed around the two
calls (reading and label encoding before them not counted); these live in DeepMatch's `examples/`,
not in its package, so `benchmarks/peers/peer_driver.py` restates them operation for operation
(checked to give the example's samples, tuple for tuple, on a 200,000-event prefix).{prefix}

| side | events | seconds | events / s | load before / after |
|---|---|---|---|---|
| `sdm preprocess` (`run_preprocess`) | {pre_ours['events']:,} | {pre_ours['in_process_seconds']:.1f} | {pre_ours['events_per_second']:,.0f} | {pre_ours['load_before']:.1f} / {pre_ours['load_after']:.1f} |
| the same, whole process | {pre_ours['events']:,} | {pre_ours['seconds']:.1f} | {pre_ours['wall_events_per_second']:,.0f} | |
| DeepMatch examples | {pre_peer['events']:,} | {pre_peer['seconds']:.1f} | {pre_peer['events_per_second']:,.0f} | {pre_peer['load_before']:.1f} / {pre_peer['load_after']:.1f} |

Our stages: {stages}. The peer's `gen_data_set_sdm` took {pre_peer['gen_data_set_seconds']:.1f} s of its
{pre_peer['seconds']:.1f} s, and made {pre_peer['samples']:,} training samples.

Ratio {results['preprocess_ratio']:.1f}x; target {PREPROCESS_TARGET:.0f}x: {verdict(results['preprocess_ratio'], PREPROCESS_TARGET)}.

**Training** at the peer's ML-1M size (dim 32, 2 LSTM layers, 4 heads, dropout 0.2, 255 sampled
negatives, batch 512, short 5 / long 50, user id in the profile) on the same {results['samples']:,} target
items: our training split, each position of a session one target; the peer gets each as one sample
(`benchmarks/peers/convert.py`). The peer: one epoch of `model.fit` (graph mode, as `run_sdm.py`),
timed from the end of its 20th batch to the end of the epoch. Ours: one epoch of `sdm train`, the
training loop's `targets_per_second` from `history.json` (its first steps included). Our
`--batch-size` counts sessions, each of several targets, and the peer's batch counts targets: at
`--batch-size 512` a step of ours trains {per_step:,.0f} targets against the peer's 512 (with the same 255
shared negatives), so ours is also run at `--batch-size {matched['batch_size']}`, about 512 targets a step.

| side | batch | target items / s | seconds timed | load before / after | vs the peer |
|---|---|---|---|---|---|
| `sdm train` | 512 sessions | {train_ours['items_per_second']:,.0f} | {train_ours['seconds']:.1f} | {train_ours['load_before']:.1f} / {train_ours['load_after']:.1f} | {results['training_ratio']:.2f}x |
| `sdm train` | {matched['batch_size']} sessions | {matched['items_per_second']:,.0f} | {matched['seconds']:.1f} | {matched['load_before']:.1f} / {matched['load_after']:.1f} | {results['matched_training_ratio']:.2f}x |
| DeepMatch `SDM` | 512 samples | {train_peer['items_per_second']:,.0f} | {train_peer['seconds']:.1f} | {train_peer['load_before']:.1f} / {train_peer['load_after']:.1f} | 1x |

Target {TRAINING_TARGET:.0f}x: at `--batch-size 512` {verdict(results['training_ratio'], TRAINING_TARGET)}; with about 512 targets a
step {verdict(results['matched_training_ratio'], TRAINING_TARGET)}.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=HERE / ".work", help="venv, log, data and runs (git-ignored)")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=2, help="training threads, both sides")
    parser.add_argument("--peer-events", type=int, default=0, help="the peer preprocesses only the first N events (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    results = measure(args)
    command = "python benchmarks/peers/run.py " + " ".join(sys.argv[1:])
    body = docs_body(results, command.strip())
    print(body)
    if args.write_docs:
        replace_section(ROOT / "docs" / "benchmarks.md", "peers", "Peers (same run)", body)


if __name__ == "__main__":
    main()
