"""`sdm report`: markdown tables and PNG plots from quality-grid results or `sdm train` runs.

The results table (one row per run, written by benchmarks/quality.py) has the explicit schema
`RESULTS_SCHEMA`. A run is identified by `KEY_COLUMNS`; `stage` is "defaults" for runs with
`sdm train`'s defaults, "tune" for the trials of `sdm tune` (seed 0, validation only, no test
metrics) and "test" for the best trial's options with every seed. Metrics are
`test_{name}@{K}` and `test_seen_excluded_{name}@{K}` (the user's earlier
items never recommended); null where not computed. `history` is a JSON list of epochs with their
training loss and validation recall@K.

A `sdm train` run directory becomes one "test" row of the same table (config.json, history.json,
metrics-test.json and metrics-test-exclude-seen.json when `sdm evaluate` wrote them), so both
kinds of input are reported the same way.

The report: for each dataset x protocol and each of the stages "defaults" ("(a) at defaults")
and "test" ("(b) tuned"), the models (variant "full") and SDM's ablations as mean ± std over
seeds (sample std, n - 1; the best mean of each column in bold), training curves, HR@K against K
and ablation bars; then the hyper-parameter search.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.cache import read_manifest
from pipeline.errors import InputError
from pipeline.storage import publish_directory, temporary_path, write_atomic
from sdm.training.checkpoint import read_history, read_metrics, read_run_config
from sdm.evaluation.metrics import KS, METRICS

SELECT_METRIC = "recall@50"  # the validation metric that picks the epoch and the configuration
VALID_COLUMN = f"valid_{SELECT_METRIC}"
TEST_COLUMNS = tuple(f"test_{name}@{k}" for name in METRICS for k in KS)
SEEN_EXCLUDED_COLUMNS = tuple(f"test_seen_excluded_{name}@{k}" for name in METRICS for k in KS)
KEY_COLUMNS = ("dataset", "protocol", "model", "variant", "params", "seed", "stage")
RESULTS_SCHEMA = pl.Schema(
    {
        "dataset": pl.String,
        "protocol": pl.String,
        "model": pl.String,
        "variant": pl.String,
        "stage": pl.String,
        "seed": pl.Int64,
        "params": pl.String,
        "best_epoch": pl.Int64,
        "epochs": pl.Int64,
        "train_seconds": pl.Float64,
        "n_valid": pl.Int64,
        "n_test": pl.Int64,
        VALID_COLUMN: pl.Float64,
        **{name: pl.Float64 for name in TEST_COLUMNS + SEEN_EXCLUDED_COLUMNS},
        "history": pl.String,
    }
)

# SDM's ablations: variant name -> the `sdm train` options that make it (all others as chosen).
ABLATIONS: dict[str, dict[str, Any]] = {
    "no-long-term": {"long_term": False},
    "no-short-term": {"short_term": False},
    "no-side-info": {"side_info": False},
    "fusion=add": {"fusion": "add"},
    "fusion=concat": {"fusion": "concat"},
    "fusion=multiply": {"fusion": "multiply"},
}
FULL = "full"

# Columns of the models and ablation tables, per protocol: the split on which public SDM
# implementations are compared (issue 6) and the paper's multi-target metrics (§4.2).
TABLE_METRICS = {
    "leave-last-out": ("test_hit_rate@10", "test_hit_rate@50", "test_ndcg@10", "test_mrr@10",
                       "test_seen_excluded_hit_rate@50", "test_seen_excluded_ndcg@10"),
    "temporal": ("test_hit_rate@20", "test_recall@20", "test_hit_rate@100", "test_recall@100",
                 "test_precision@100", "test_f1@100", "test_seen_excluded_hit_rate@20", "test_seen_excluded_recall@100"),
}
ABLATION_METRIC = {"leave-last-out": "test_hit_rate@50", "temporal": "test_recall@50"}
DEFAULT_PROTOCOL = "temporal"  # whose columns a run of unknown protocol is shown with
RUN_PARAMS_SKIPPED = ("data", "out", "seed", "threads")  # not hyper-parameters


# --- the results table --------------------------------------------------------------------------

def empty_results() -> pl.DataFrame:
    return pl.DataFrame(schema=RESULTS_SCHEMA)


def results_frame(rows: Sequence[dict[str, Any]]) -> pl.DataFrame:
    """Rows (dicts; absent columns are null) -> a frame of RESULTS_SCHEMA."""
    return pl.DataFrame([{name: row.get(name) for name in RESULTS_SCHEMA} for row in rows], schema=RESULTS_SCHEMA)


def read_results(path: Path) -> pl.DataFrame:
    """A results Parquet file, checked and cast to RESULTS_SCHEMA (extra columns dropped)."""
    if not path.is_file():
        raise InputError(f"{path}: no such results file")
    try:
        frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as error:
        raise InputError(f"{path}: not a readable Parquet file ({type(error).__name__})") from None
    missing = [name for name in RESULTS_SCHEMA if name not in frame.columns]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(f"{path}: not a quality results table (missing columns {shown})")
    try:
        return frame.select(pl.col(name).cast(dtype) for name, dtype in RESULTS_SCHEMA.items())
    except pl.exceptions.PolarsError:
        raise InputError(f"{path}: a results column has the wrong type") from None


def write_results(frame: pl.DataFrame, path: Path) -> None:
    """Written atomically: a kill leaves the old table or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = frame.select(pl.col(name).cast(dtype) for name, dtype in RESULTS_SCHEMA.items())
    write_atomic(path, table.write_parquet)


def compact_history(history: Sequence[dict[str, Any]]) -> str:
    """`sdm train`'s per-epoch history -> JSON [{epoch, loss, seconds, valid_recall@K...}]."""
    return json.dumps(
        [
            {"epoch": epoch["epoch"], "loss": epoch["loss"], "seconds": epoch["seconds"]}
            | {f"valid_recall@{k}": epoch["valid"][f"recall@{k}"] for k in KS if f"recall@{k}" in epoch["valid"]}
            for epoch in history
        ]
    )


def history_summary(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """best_epoch, epochs, train_seconds, the best validation metric and the compact history."""
    values = [epoch["valid"].get(SELECT_METRIC) for epoch in history]
    scored = [(value, epoch["epoch"]) for value, epoch in zip(values, history, strict=True) if value is not None]
    best_value, best_epoch = max(scored, key=lambda pair: pair[0]) if scored else (None, None)
    return {
        "best_epoch": best_epoch,
        "epochs": len(history),
        "train_seconds": sum(epoch["seconds"] for epoch in history),
        VALID_COLUMN: best_value,
        "history": compact_history(history),
    }


def variant_of(options: dict[str, Any]) -> str:
    """The ablation a run's training options make: "full", "no-long-term", "fusion=add", ..."""
    changed = [name for name, settings in ABLATIONS.items() if all(options.get(k) == v for k, v in settings.items())]
    return "+".join(changed) or FULL


def metric_columns(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}{name}": value for name, value in metrics.items() if name != "n_cases"}


def run_row(run: Path) -> dict[str, Any]:
    """A `sdm train` run directory as one "test" row of the results table."""
    options = read_run_config(run)["train"]
    history = read_history(run)
    data = Path(options["data"])
    splits = (read_manifest(data / "splits") or {"stats": {}})["stats"]
    row = {
        "dataset": data.name or "?",
        "protocol": splits.get("split", "?"),
        "model": options["model"],
        "variant": variant_of(options),
        "stage": "test",
        "seed": options.get("seed", 0),
        "params": json.dumps({k: v for k, v in options.items() if k not in RUN_PARAMS_SKIPPED}, sort_keys=True),
        "n_valid": splits.get("valid_cases"),
        "n_test": splits.get("test_cases"),
        **history_summary(history),
    }
    for name, prefix in (("metrics-test.json", "test_"), ("metrics-test-exclude-seen.json", "test_seen_excluded_")):
        if (run / name).is_file():
            row |= metric_columns(read_metrics(run / name), prefix)
    return row


def load_inputs(paths: Sequence[Path]) -> pl.DataFrame:
    """Results Parquet files and `sdm train` run directories -> one frame of RESULTS_SCHEMA."""
    frames = []
    for path in paths:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise InputError(f"{path}: neither a results file nor a `sdm train` run directory (no config.json)")
            frame = results_frame([run_row(path)])
        else:
            frame = read_results(path)
        if frame.is_empty():
            raise InputError(f"{path}: the results table is empty")
        frames.append(frame)
    if not frames:
        raise InputError("no inputs: give results Parquet files or `sdm train` run directories")
    return pl.concat(frames)


# --- tables -------------------------------------------------------------------------------------

def summarise(frame: pl.DataFrame, metrics: Sequence[str]) -> pl.DataFrame:
    """Test rows -> one row per (dataset, protocol, model, variant, params): n seeds, and for
    each metric its mean and sample standard deviation over seeds (`{metric}_mean`, `{metric}_std`;
    std null with one seed)."""
    groups = ["dataset", "protocol", "model", "variant", "params"]
    metrics = list(dict.fromkeys(metrics))
    return frame.group_by(groups, maintain_order=True).agg(
        pl.col("seed").n_unique().alias("seeds"),
        *(pl.col(m).mean().alias(f"{m}_mean") for m in metrics),
        *(pl.col(m).std(ddof=1).alias(f"{m}_std") for m in metrics),
    )


def mean_std(mean: float | None, std: float | None) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.4f}" if std is None or math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def markdown_table(summary: pl.DataFrame, label: str, metrics: Sequence[str]) -> str:
    """Rows of `summarise` -> a markdown table, first column `label`, one column per metric
    (mean ± std), the best mean of each column in bold (every row that reaches it)."""
    metrics = [m for m in metrics if summary.get_column(f"{m}_mean").is_not_null().any()]
    if not metrics:
        return "No test metrics (evaluate a run with `sdm evaluate --run RUN` to add them)."
    labels = row_labels(summary, label)
    header = f"| {label} | seeds | " + " | ".join(column_title(m) for m in metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]
    best = {m: summary.get_column(f"{m}_mean").max() for m in metrics}
    for index, row in enumerate(summary.iter_rows(named=True)):
        cells = []
        for m in metrics:
            text = mean_std(row[f"{m}_mean"], row[f"{m}_std"])
            cells.append(f"**{text}**" if row[f"{m}_mean"] is not None and row[f"{m}_mean"] == best[m] else text)
        lines.append(f"| {labels[index]} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def row_labels(summary: pl.DataFrame, label: str) -> list[str]:
    """The `label` column (model or variant); runs that share one are told apart by their params."""
    names = summary.get_column(label).to_list()
    params = summary.get_column("params").to_list()
    return [name if names.count(name) == 1 else f"{name} `{params[i]}`" for i, name in enumerate(names)]


def column_title(metric: str) -> str:
    """'test_seen_excluded_hit_rate@50' -> 'HR@50 (seen excl.)'."""
    short = {"hit_rate": "HR", "recall": "Recall", "precision": "Precision", "f1": "F1", "ndcg": "NDCG", "mrr": "MRR"}
    seen = metric.startswith("test_seen_excluded_")
    name, _, k = metric.removeprefix("test_seen_excluded_").removeprefix("test_").partition("@")
    return f"{short.get(name, name)}@{k}" + (" (seen excl.)" if seen else "")


def tuning_table(tune: pl.DataFrame) -> str:
    """The search rows, the chosen configuration of each model in bold."""
    lines = ["| dataset | protocol | model | params | valid " + SELECT_METRIC + " | best epoch / epochs | train s |",
             "|---|---|---|---|---|---|---|"]
    chosen = tune.with_columns(
        chosen=pl.col(VALID_COLUMN) == pl.col(VALID_COLUMN).max().over("dataset", "protocol", "model", "variant")
    )
    for row in chosen.iter_rows(named=True):
        value = "–" if row[VALID_COLUMN] is None else f"{row[VALID_COLUMN]:.4f}"
        lines.append(
            f"| {row['dataset']} | {row['protocol']} | {row['model']} | `{row['params']}` | "
            f"{f'**{value}**' if row['chosen'] else value} | {row['best_epoch']} / {row['epochs']} | {row['train_seconds']:.1f} |"
        )
    return "\n".join(lines)


# --- plots --------------------------------------------------------------------------------------

def figure(width: float = 8.0, height: float = 4.5, columns: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 9})
    return plt.subplots(1, columns, figsize=(width, height), squeeze=False)


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_curves(runs: pl.DataFrame, title: str, path: Path) -> None:
    """Training loss and validation Recall@50 per epoch, one line per model (its first seed).
    Models without training (one epoch, loss 0) are a dashed level in the recall panel."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = figure(11.0, 4.5, columns=2)
    loss_axis, recall_axis = axes[0]
    labels = row_labels(runs, "model")
    for index, row in enumerate(runs.iter_rows(named=True)):
        epochs = json.loads(row["history"] or "[]")
        if not epochs:
            continue
        colour = f"C{index % 10}"  # the same model has the same colour in both panels
        x = [epoch["epoch"] for epoch in epochs]
        recall = [epoch.get(f"valid_{SELECT_METRIC}", math.nan) for epoch in epochs]
        if len(epochs) == 1 and epochs[0]["loss"] == 0:
            recall_axis.axhline(recall[0], linestyle="--", linewidth=1.2, label=labels[index], color=colour)
            continue
        loss_axis.plot(x, [epoch["loss"] for epoch in epochs], marker="o", markersize=3, label=labels[index], color=colour)
        recall_axis.plot(x, recall, marker="o", markersize=3, label=labels[index], color=colour)
    loss_axis.set(title="Training loss", xlabel="epoch", ylabel="mean cross-entropy per target (nats)")
    recall_axis.set(title=f"Validation {metric_label(SELECT_METRIC)}", xlabel="epoch", ylabel=metric_label(SELECT_METRIC))
    for axis in (loss_axis, recall_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    fig.suptitle(title)
    save(fig, path)


def finite_or_zero(value: float | None) -> float:
    return 0.0 if value is None or math.isnan(value) else value


def metric_label(metric: str) -> str:
    return column_title(metric if metric.startswith("test_") else f"test_{metric}")


def plot_hit_rate(summary: pl.DataFrame, title: str, path: Path) -> None:
    """Test HR@K against K, one line per model (mean over seeds, error bars = std)."""
    fig, axes = figure()
    axis = axes[0][0]
    labels = row_labels(summary, "model")
    for index, row in enumerate(summary.iter_rows(named=True)):
        means = [row[f"test_hit_rate@{k}_mean"] for k in KS]
        if all(mean is None for mean in means):
            continue
        stds = [finite_or_zero(row[f"test_hit_rate@{k}_std"]) for k in KS]
        axis.errorbar(KS, [math.nan if m is None else m for m in means], yerr=stds, marker="o", capsize=3, label=labels[index])
    axis.set_xscale("log")
    axis.set_xticks(KS, [str(k) for k in KS])
    axis.set(title=title, xlabel="K (items retrieved, log scale)", ylabel="HR@K on test (share of cases with a hit)")
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend()
    save(fig, path)


def plot_ablation(summary: pl.DataFrame, metric: str, title: str, path: Path) -> None:
    """One bar per SDM variant: mean of `metric` over seeds, error bar = std."""
    fig, axes = figure()
    axis = axes[0][0]
    means = [finite_or_zero(value) for value in summary.get_column(f"{metric}_mean").to_list()]
    stds = [finite_or_zero(value) for value in summary.get_column(f"{metric}_std").to_list()]
    labels = row_labels(summary, "variant")
    bars = axis.bar(range(len(means)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    axis.bar_label(bars, labels=[f"{m:.3f}" for m in means], padding=3, fontsize=9)
    axis.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    axis.set(title=title, ylabel=f"{metric_label(metric)} on test (mean ± std over seeds)")
    axis.grid(axis="y", alpha=0.3)
    save(fig, path)


# --- the report ---------------------------------------------------------------------------------

def slug(*parts: str) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9._=-]+", "_", part) for part in parts)


# Stages evaluated on test -> the title of their tables when a dataset x protocol has both.
TEST_STAGES = {"defaults": "(a) at defaults", "test": "(b) tuned"}


def section(frame: pl.DataFrame, dataset: str, protocol: str, out: Path) -> list[str]:
    """Markdown (and PNGs in `out`) for one dataset x protocol: its tables for each stage."""
    rows = frame.filter(pl.col("stage").is_in(list(TEST_STAGES)), dataset=dataset, protocol=protocol)
    counts = rows.select(pl.col("n_valid").max(), pl.col("n_test").max()).row(0)
    lines = [f"## {dataset}, {protocol}", "", f"Validation cases: {counts[0] or '?'}; test cases: {counts[1] or '?'}.", ""]
    stages = [stage for stage in TEST_STAGES if stage in rows.get_column("stage").to_list()]
    for stage in stages:
        # A lone "test" stage (`sdm train` run directories) is not labelled "tuned".
        title = f", {TEST_STAGES[stage]}" if len(stages) > 1 or stage != "test" else ""
        lines += stage_tables(rows.filter(stage=stage), dataset, protocol, stage, title, out)
    return lines


def stage_tables(test: pl.DataFrame, dataset: str, protocol: str, stage: str, title: str, out: Path) -> list[str]:
    """The models and the ablations tables and plots of one stage's rows (`title` names the stage)."""
    metrics = TABLE_METRICS.get(protocol, TABLE_METRICS[DEFAULT_PROTOCOL])
    ablation_metric = ABLATION_METRIC.get(protocol, ABLATION_METRIC[DEFAULT_PROTOCOL])
    lines = []
    models = test.filter(variant=FULL)
    if not models.is_empty():
        summary = summarise(models, [*metrics, *(f"test_hit_rate@{k}" for k in KS)])
        lines += [f"### Models{title} (test, mean ± std over seeds; best in bold)", "", markdown_table(summary, "model", metrics), ""]
        curves, hit_rate = slug("curves", dataset, protocol, stage) + ".png", slug("hit_rate", dataset, protocol, stage) + ".png"
        first_seed = models.filter(pl.col("seed") == pl.col("seed").min().over("model", "params"))
        plot_curves(first_seed, f"{dataset}, {protocol}{title}: training (first seed of each model)", out / curves)
        lines += [f"![training curves]({curves})", ""]
        if summary.get_column(f"test_hit_rate@{KS[0]}_mean").is_not_null().any():
            plot_hit_rate(summary, f"{dataset}, {protocol}{title}: HR@K on test", out / hit_rate)
            lines += [f"![HR@K against K]({hit_rate})", ""]
    ablations = test.filter(model="sdm")
    if ablations.get_column("variant").n_unique() > 1:
        summary = summarise(ablations, [*metrics, ablation_metric])
        bars = slug("ablation", dataset, protocol, stage) + ".png"
        plot_ablation(summary, ablation_metric, f"{dataset}, {protocol}{title}: SDM ablations", out / bars)
        lines += [f"### SDM ablations{title} (test, mean ± std over seeds; best in bold)", "",
                  markdown_table(summary, "variant", metrics), "", f"![ablations]({bars})", ""]
    return lines


def write_report(inputs: Sequence[Path], out: Path) -> list[Path]:
    """Write OUT/report.md and its PNGs (into a temporary directory, then renamed to OUT)."""
    frame = load_inputs(inputs)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "report.md").is_file())):
        raise InputError(f"{out}: exists and is not a report directory; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_path(out)
    staging.mkdir()
    try:
        lines = ["# SDM quality results", "", "Inputs: " + ", ".join(f"`{path}`" for path in inputs), ""]
        pairs = frame.filter(pl.col("stage").is_in(list(TEST_STAGES))).select("dataset", "protocol").unique(maintain_order=True).iter_rows()
        for dataset, protocol in pairs:
            lines += section(frame, dataset, protocol, staging)
        tune = frame.filter(stage="tune")
        if not tune.is_empty():
            lines += ["## Hyper-parameter search (validation only, seed 0; chosen in bold)", "", tuning_table(tune), ""]
        (staging / "report.md").write_text("\n".join(lines))
        publish_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(out.iterdir())
