"""Benchmark `sdm preprocess` against a bare `polars.read_csv` + sort of the same file.

    python benchmarks/preprocess.py --events 10000000 [--work /tmp/sdm-bench] [--write-docs]

Each measurement runs in its own process so that its peak RSS is its own. Numbers are printed
as JSON and, with --write-docs, replace the "preprocess" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docs_section import replace_section  # noqa: E402

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
from pipeline.config import PreprocessConfig
from pipeline.run import run_preprocess
source, out = Path(sys.argv[1]), Path(sys.argv[2])
config = PreprocessConfig(logs=source / "events.csv", items=source / "items.csv", users=source / "users.csv", out=out)
started = time.perf_counter()
reports = run_preprocess(config, force=True)
seconds = time.perf_counter() - started
events = pl.read_parquet(out / "events" / "events.parquet")
print(json.dumps({"seconds": seconds, "stages": {r.name: r.seconds for r in reports},
                  "events_table_bytes": events.estimated_size(),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_python(code: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def generate(events: int, directory: Path) -> float:
    from pipeline.synth import SynthConfig, write_synth

    started = time.perf_counter()
    if not (directory / "events.csv").is_file():
        write_synth(SynthConfig(n_events=events, seed=0), directory, "csv")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdm-bench"))
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    source = args.work / f"synth-{args.events}"
    generation = generate(args.events, source)
    bare = run_python(BARE, str(source / "events.csv"))
    full = run_python(PREPROCESS, str(source), str(args.work / f"out-{args.events}"))
    result = {
        "events": args.events,
        "csv_mb": (source / "events.csv").stat().st_size / 2**20,
        "generation_seconds": generation,
        "bare_read_sort": bare,
        "preprocess": full,
        "time_ratio": full["seconds"] / bare["seconds"],
        "memory_ratio_vs_events_table": full["peak_rss_mb"] * 2**20 / full["events_table_bytes"],
        "memory_ratio_vs_raw_frame": full["peak_rss_mb"] * 2**20 / bare["bytes"],
    }
    print(json.dumps(result, indent=2))
    if args.write_docs:
        stages = " · ".join(f"{name} {seconds:.1f}s" for name, seconds in full["stages"].items())
        text = f"""Command: `python benchmarks/preprocess.py --events {args.events} --write-docs`
(synthetic log from `sdm synth`, with items and users files; {result['csv_mb']:.0f} MB of CSV).
Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, polars {pl.__version__}.

| measure | bare `read_csv` + sort | `sdm preprocess` (all 4 stages) | ratio | target |
|---|---|---|---|---|
| wall time | {bare['seconds']:.1f} s | {full['seconds']:.1f} s | {result['time_ratio']:.2f}x | within 5x |
| peak RSS | {bare['peak_rss_mb']:,.0f} MB | {full['peak_rss_mb']:,.0f} MB | | |

Stages: {stages}.
In-memory size of the events table: {full['events_table_bytes'] / 2**20:,.0f} MB typed (`events.parquet`
loaded), {bare['bytes'] / 2**20:,.0f} MB as the raw frame of strings. Peak RSS of preprocess is
{result['memory_ratio_vs_events_table']:.1f}x the typed table and {result['memory_ratio_vs_raw_frame']:.1f}x the raw frame (target: within 4x).
"""
        replace_section(ROOT / "docs" / "benchmarks.md", "preprocess", "Preprocessing (`sdm preprocess`)", text)


if __name__ == "__main__":
    main()
