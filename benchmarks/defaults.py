"""Every model at its defaults, as a user runs it: `sdm preprocess LOG`, `sdm train`, `sdm evaluate`.

    python benchmarks/defaults.py [--seeds 1] [--work defaults-work] [--out docs/defaults.md]

No option is chosen per dataset except the ones a user must give (the split, where the log's own
defaults give too few cases to measure, and what the preprocess warning suggests, run as a
separate row). Each run is a real `sdm` process; finished runs are skipped, so a killed run
continues where it stopped. The table is rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
ML = SHARED / "movielens_100k"
REES = SHARED / "rees46_multicat_2019oct_head"
SAMPLE = ROOT / "sample_data"
SUGGESTED = ["--max-session-length", "5", "--long-window", "none", "--max-long", "50"]  # pipeline/diagnostics.py
LLO = ["--split", "leave-last-out"]
# name -> (what it is, `sdm preprocess` arguments)
DATASETS: dict[str, tuple[str, list[str]]] = {
    "ml-100k": ("MovieLens-100K `u.data` alone, leave-last-out", [str(ML / "u.data"), *LLO]),
    "ml-100k + suggested": ("the same with the flags the warning suggests for rating logs", [str(ML / "u.data"), *LLO, *SUGGESTED]),
    "ml-100k full": ("with `--items u.item --users u.user` (genres as flags), every rating", [
        str(ML / "u.data"), "--items", str(ML / "u.item"), "--users", str(ML / "u.user"),
        "--flag-columns", "unknown..Western", "--min-item-count", "1", *LLO]),
    "rees46": ("REES46 October head (a 3-hour click stream), leave-last-out", [str(REES / "2019-Oct_head.csv"), *LLO]),
    "sample": ("`sdm demo`'s data and split", [str(SAMPLE / "events.csv"), "--items", str(SAMPLE / "items.csv"),
               "--users", str(SAMPLE / "users.csv"), "--test-days", "3", "--valid-days", "2"]),
}
MODELS = ("popularity", "item-cf", "youtube-dnn", "gru4rec", "sasrec", "sdm")
METRICS = ("hit_rate@10", "hit_rate@50", "ndcg@10")


def sdm(*args: str) -> str:
    return subprocess.run(["sdm", *args], check=True, capture_output=True, text=True).stdout


def run(work: Path, dataset: str, model: str, seed: int) -> dict[str, float]:
    data = work / "data" / dataset.replace(" ", "-").replace("+", "plus")
    if not (data / "splits" / "manifest.json").is_file():
        sdm("preprocess", *DATASETS[dataset][1], "--out", str(data))
    out = work / "runs" / data.name / f"{model}-seed{seed}"
    metrics = out / "defaults-benchmark.json"  # what `sdm evaluate --json` printed: the run's own ranking
    if not metrics.is_file():
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        sdm("train", "--data", str(data), "--out", str(out), "--model", model, "--seed", str(seed), "--quiet")
        metrics.write_text(sdm("evaluate", "--run", str(out), "--json"))
    return json.loads(metrics.read_text())


def cell(values: list[float], n_cases: int) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else math.sqrt(max(mean * (1 - mean), 0) / max(n_cases, 1))
    return f"{mean:.3f} ± {spread:.3f}"


def write_table(path: Path, results: dict[tuple[str, str], list[dict[str, float]]], seeds: int) -> None:
    spread = "std over seeds" if seeds > 1 else "binomial standard error over the test cases (one seed)"
    lines = [
        "# Every model at its defaults", "",
        "`python benchmarks/defaults.py` (each row a `sdm preprocess` / `sdm train` / `sdm evaluate` with",
        f"no tuning flags; seeds: {seeds}; ± is the {spread}). Bold: the best model of each column.", "",
    ]
    for dataset, (what, _) in DATASETS.items():
        rows = {model: runs for (name, model), runs in results.items() if name == dataset}
        if not rows:
            continue
        lines += [f"## {dataset}: {what}", "", "| model | " + " | ".join(METRICS) + " | test cases |", "|---|" + "---|" * (len(METRICS) + 1)]
        best = {m: max(statistics.fmean(r[m] for r in runs) for runs in rows.values()) for m in METRICS}
        for model, runs in rows.items():
            cells = []
            for m in METRICS:
                text = cell([r[m] for r in runs], int(runs[0]["n_cases"]))
                cells.append(f"**{text}**" if statistics.fmean(r[m] for r in runs) == best[m] else text)
            lines.append(f"| {model} | " + " | ".join(cells) + f" | {int(runs[0]['n_cases'])} |")
        lines.append("")
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("\n".join(lines))
    os.replace(temporary, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("defaults-work"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "defaults.md")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    options = parser.parse_args()
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for dataset in options.datasets.split(","):
        for model in MODELS:
            for seed in range(options.seeds if model not in ("popularity", "item-cf") else 1):
                results.setdefault((dataset, model), []).append(run(options.work, dataset, model, seed))
                write_table(options.out, results, options.seeds)
                print(dataset, model, seed, {m: round(results[(dataset, model)][-1][m], 4) for m in METRICS}, flush=True)


if __name__ == "__main__":
    main()
