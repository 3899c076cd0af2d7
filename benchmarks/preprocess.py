"""Benchmark `sdm preprocess`: in memory at 10M events against a bare `polars.read_csv` + sort,
and in user buckets at 10M, 20M and 40M events under one `--memory-limit`.

    python benchmarks/preprocess.py [--events 10000000,20000000,40000000] [--memory-limit 1GB]
                                    [--before REV] [--work /tmp/sdm-bench] [--write-docs]

Logs come from `sdm synth` (events, items and users files) and are deleted after their runs.
Each measurement runs in its own process so that its peak RSS is its own. Numbers are printed as
JSON and, with --write-docs, replace the "preprocess" section of docs/benchmarks.md.
With --before, the in-memory run is also made with the code of git revision REV (exported with
`git archive`), on the same log in the same run, so that a change is measured against what it
changed. Targets: peak RSS at 40M within 1.5x of 10M and wall time within 4.5x (same memory limit);
in memory at 10M, within 5x the bare read + sort's time and 4x the typed events table's memory.
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

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docs_section import replace_section

GENERATE = """
import sys
from pathlib import Path
from pipeline.synth import SynthConfig, write_synth
write_synth(SynthConfig(n_events=int(sys.argv[1]), seed=0), Path(sys.argv[2]), "csv")
"""

BARE = """
import json, sys, time, resource, polars as pl
started = time.perf_counter()
frame = pl.read_csv(sys.argv[1]).sort("user_id", "timestamp")
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "rows": frame.height, "bytes": frame.estimated_size(),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

PREPROCESS = """
import json, sys, time, resource
from pathlib import Path
import polars as pl
from pipeline.buckets import TYPED_EVENT_BYTES
from pipeline.cache import read_manifest
from pipeline.config import PreprocessConfig
from pipeline.run import run_preprocess
source, out, limit, buckets = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
config = PreprocessConfig(logs=source / "events.csv", items=source / "items.csv", users=source / "users.csv", out=out,
                          memory_limit=limit, buckets=int(buckets) if buckets != "auto" else None)
started = time.perf_counter()
reports = run_preprocess(config, force=True)
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
events = pl.scan_parquet(out / "events" / "events.parquet").select(pl.len()).collect().item()
print(json.dumps({"seconds": seconds, "stages": {r.name: r.seconds for r in reports},
                  "buckets": read_manifest(out / "events")["fingerprint"]["buckets"],
                  "kept_events": events, "events_table_bytes": events * TYPED_EVENT_BYTES, "peak_rss_mb": peak}))
"""


def run_python(code: str, *args: str, root: Path = ROOT) -> dict:
    """`code` run in a process of its own, importing the packages of `root`."""
    environment = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=root, env=environment, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    lines = result.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def measured(code: str, *args: str, root: Path = ROOT) -> dict:
    """A run with the machine's load average (1 minute) just before and just after it."""
    before = os.getloadavg()[0]
    result = run_python(code, *args, root=root)
    return {**result, "load_before": before, "load_after": os.getloadavg()[0]}


def exported(revision: str, work: Path) -> Path:
    """The tree of a git revision, written under `work` (the working tree is left alone)."""
    target = work / f"code-{revision}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def parse_size(text: str) -> int:
    sys.path.insert(0, str(ROOT))
    from pipeline.config import parse_size as parse

    return parse(text, option="--memory-limit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", default="10000000,20000000,40000000", help="comma-separated; the first is the baseline")
    parser.add_argument("--memory-limit", default="1GB")
    parser.add_argument("--before", help="git revision whose in-memory run is measured too, in the same run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdm-bench"))
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    sizes = [int(size) for size in args.events.split(",")]
    limit = parse_size(args.memory_limit)

    runs, in_memory = [], None
    for size in sizes:
        source, out = args.work / f"synth-{size}", args.work / f"out-{size}"
        started = time.perf_counter()
        run_python(GENERATE, str(size), str(source))
        generation = time.perf_counter() - started
        csv_mb = (source / "events.csv").stat().st_size / 2**20
        if size == sizes[0]:
            bare = measured(BARE, str(source / "events.csv"))
            full = measured(PREPROCESS, str(source), str(out), str(limit), "1")
            earlier = None
            if args.before:
                earlier = measured(PREPROCESS, str(source), str(out), str(limit), "1", root=exported(args.before, args.work))
                earlier = {**earlier, "revision": args.before, "time_ratio": earlier["seconds"] / bare["seconds"]}
            in_memory = {
                "before": earlier,
                "events": size, "csv_mb": csv_mb, "bare_read_sort": bare, "preprocess": full,
                "time_ratio": full["seconds"] / bare["seconds"],
                "memory_ratio_vs_events_table": full["peak_rss_mb"] * 2**20 / full["events_table_bytes"],
                "memory_ratio_vs_raw_frame": full["peak_rss_mb"] * 2**20 / bare["bytes"],
            }
            print(json.dumps({"in_memory": in_memory}), flush=True)
        bucketed = measured(PREPROCESS, str(source), str(out), str(limit), "auto")
        runs.append({"events": size, "csv_mb": csv_mb, "generation_seconds": generation, **bucketed})
        print(json.dumps(runs[-1]), flush=True)
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)

    base, top = runs[0], runs[-1]
    summary = {
        "memory_limit": args.memory_limit,
        "rss_ratio": top["peak_rss_mb"] / base["peak_rss_mb"],
        "time_ratio": top["seconds"] / base["seconds"],
        "events_ratio": top["kept_events"] / base["kept_events"],
    }
    print(json.dumps({"in_memory": in_memory, "bucketed": runs, "summary": summary}, indent=2))
    if args.write_docs:
        write_docs(args, in_memory, runs, summary)


def met(ok: bool) -> str:
    return "met" if ok else "missed"


def before_text(in_memory: dict) -> str:
    """The in-memory run of the --before revision, measured in the same run, or nothing."""
    earlier = in_memory["before"]
    if earlier is None:
        return ""
    stages = " · ".join(f"{name} {seconds:.1f}s" for name, seconds in earlier["stages"].items())
    return (
        f"\nThe same log with the code of `{earlier['revision']}` (`--before`), in the same run: "
        f"{earlier['seconds']:.1f} s, {earlier['time_ratio']:.2f}x the bare read + sort, peak RSS "
        f"{earlier['peak_rss_mb']:,.0f} MB; stages: {stages}. Load before / after: "
        f"{earlier['load_before']:.1f} / {earlier['load_after']:.1f}.\n"
    )


def write_docs(args: argparse.Namespace, in_memory: dict, runs: list[dict], summary: dict) -> None:
    from pipeline.buckets import PEAK_OVERHEAD

    full, bare = in_memory["preprocess"], in_memory["bare_read_sort"]
    in_memory_stages = " · ".join(f"{name} {seconds:.1f}s" for name, seconds in full["stages"].items())
    rows = "\n".join(
        f"| {run['events'] / 1e6:.0f}M | {run['csv_mb']:,.0f} MB | {run['buckets']} | {run['seconds']:.1f} s | "
        f"{run['peak_rss_mb']:,.0f} MB | {run['load_before']:.1f} / {run['load_after']:.1f} |"
        for run in runs
    )
    text = f"""Command: `python benchmarks/preprocess.py --events {args.events} --memory-limit {args.memory_limit}{f' --before {args.before}' if args.before else ''} --write-docs`
(synthetic logs from `sdm synth`, with items and users files). Machine: {platform.machine()},
{os.cpu_count()} cores, Python {platform.python_version()}, polars {pl.__version__}; the load average
(1 min) before / after each run is in the tables (other work was running on the machine).

**In user buckets**, all under `--memory-limit {args.memory_limit}` (the number of buckets follows from it):

| events | CSV | buckets | wall time | peak RSS | load before / after |
|---|---|---|---|---|---|
{rows}

Peak RSS at {runs[-1]['events'] / 1e6:.0f}M is {summary['rss_ratio']:.2f}x the {runs[0]['events'] / 1e6:.0f}M run's
(target within 1.5x: {met(summary['rss_ratio'] <= 1.5)}); wall time {summary['time_ratio']:.2f}x for
{summary['events_ratio']:.0f}x the events (target within 4.5x: {met(summary['time_ratio'] <= 4.5)}). The largest peak,
{max(run['peak_rss_mb'] for run in runs):,.0f} MB, is {max(run['peak_rss_mb'] for run in runs) * 2**20 / parse_size(args.memory_limit):.2f}x the memory limit.

**In memory** (one bucket, `--buckets 1`), {in_memory['events'] / 1e6:.0f}M events ({in_memory['csv_mb']:.0f} MB of CSV):

| measure | bare `read_csv` + sort | `sdm preprocess` (all 4 stages) | ratio | target |
|---|---|---|---|---|
| wall time | {bare['seconds']:.1f} s | {full['seconds']:.1f} s | {in_memory['time_ratio']:.2f}x | within 5x: {met(in_memory['time_ratio'] <= 5)} |
| peak RSS | {bare['peak_rss_mb']:,.0f} MB | {full['peak_rss_mb']:,.0f} MB | | |

Stages: {in_memory_stages}. Load before / after: {full['load_before']:.1f} / {full['load_after']:.1f}.
{before_text(in_memory)}
Peak RSS of preprocess is {in_memory['memory_ratio_vs_events_table']:.1f}x the typed events table
({full['events_table_bytes'] / 2**20:,.0f} MB at 32 bytes an event; target within 4x:
{met(in_memory['memory_ratio_vs_events_table'] <= 4)}) and {in_memory['memory_ratio_vs_raw_frame']:.1f}x the raw frame of strings
({bare['bytes'] / 2**20:,.0f} MB). `PEAK_OVERHEAD` in pipeline/buckets.py ({PEAK_OVERHEAD}), which turns
`--memory-limit` into a number of buckets, stays above this ratio: the global step's dictionaries
and counts do not shrink with more buckets, so a lower value would take the bucketed runs above
further past their limit.
"""
    replace_section(ROOT / "docs" / "benchmarks.md", "preprocess", "Preprocessing (`sdm preprocess`)", text)


if __name__ == "__main__":
    main()
