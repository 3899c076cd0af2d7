"""`sdm report`: the results table, the tables' mean ± std and bold, the defaults and tuned
tables, the report's files and bad inputs. The grid that writes the table: tests/test_quality.py."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from helpers.cli import run_sdm

from sdm.evaluation.report import (
    RESULTS_SCHEMA,
    VALID_COLUMN,
    markdown_table,
    read_results,
    results_frame,
    summarise,
    write_report,
    write_results,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def history(losses: list[float], recalls: list[float]) -> str:
    return json.dumps([
        {"epoch": i + 1, "loss": loss, "seconds": 1.0, "valid_recall@50": recall}
        for i, (loss, recall) in enumerate(zip(losses, recalls, strict=True))
    ])


def result_row(model: str, seed: int, metrics: dict[str, float], variant: str = "full", protocol: str = "leave-last-out") -> dict:
    return {
        "dataset": "toy", "protocol": protocol, "model": model, "variant": variant, "stage": "test", "seed": seed,
        "params": "{}", "best_epoch": 2, "epochs": 3, "train_seconds": 3.0, "n_valid": 40, "n_test": 50,
        VALID_COLUMN: 0.2, "history": history([5.0, 4.0, 3.5], [0.1, 0.2, 0.15]), **metrics,
    }


def hand_made_table() -> pl.DataFrame:
    """Two models and two SDM ablations over two seeds, and two search rows."""
    rows = []
    for seed in (0, 1):
        shift = 0.01 * seed
        rows.append(result_row("popularity", seed, {f"test_hit_rate@{k}": 0.05 + k / 1000 for k in (10, 20, 50, 100)}))
        for variant, level in (("full", 0.2), ("no-long-term", 0.15), ("fusion=add", 0.18)):
            metrics = {f"test_hit_rate@{k}": level + k / 1000 + shift for k in (10, 20, 50, 100)}
            metrics |= {"test_ndcg@10": level / 2, "test_mrr@10": level / 3, "test_seen_excluded_hit_rate@50": level + 0.1}
            rows.append(result_row("sdm", seed, metrics, variant))
    for lr, value in ((0.001, 0.21), (0.003, 0.19)):
        rows.append({**result_row("sdm", 0, {}), "stage": "tune", "params": json.dumps({"lr": lr}), VALID_COLUMN: value})
    return results_frame(rows)


def test_results_table_round_trips(tmp_path: Path) -> None:
    table = hand_made_table()
    path = tmp_path / "results" / "quality.parquet"
    write_results(table, path)
    back = read_results(path)
    assert back.schema == RESULTS_SCHEMA
    assert back.equals(table)
    assert back.get_column("test_recall@10").is_null().all()  # never computed: null, not 0
    assert not list(path.parent.glob(".*tmp*"))  # no temporary file left behind


def test_mean_and_std_over_seeds() -> None:
    rows = [result_row("sdm", seed, {"test_hit_rate@10": value}) for seed, value in enumerate((0.1, 0.2, 0.3))]
    summary = summarise(results_frame(rows), ["test_hit_rate@10"])
    # mean (0.1 + 0.2 + 0.3) / 3 = 0.2; sample std sqrt((0.01 + 0 + 0.01) / 2) = 0.1
    assert summary.get_column("seeds").to_list() == [3]
    assert summary.get_column("test_hit_rate@10_mean").item() == pytest.approx(0.2)
    assert summary.get_column("test_hit_rate@10_std").item() == pytest.approx(0.1)
    assert "| sdm | 3 | **0.2000 ± 0.1000** |" in markdown_table(summary, "model", ["test_hit_rate@10"])


def test_bold_marks_the_best_of_each_column() -> None:
    rows = [
        result_row("a", 0, {"test_hit_rate@10": 0.30, "test_ndcg@10": 0.10}),
        result_row("b", 0, {"test_hit_rate@10": 0.20, "test_ndcg@10": 0.12}),
        result_row("c", 0, {"test_hit_rate@10": 0.30, "test_ndcg@10": 0.05}),
    ]
    table = markdown_table(summarise(results_frame(rows), ["test_hit_rate@10", "test_ndcg@10"]), "model",
                           ["test_hit_rate@10", "test_ndcg@10"])
    lines = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[3:-1]] for line in table.splitlines()[2:]}
    assert lines == {
        "a": ["**0.3000**", "0.1000"],
        "b": ["0.2000", "**0.1200**"],
        "c": ["**0.3000**", "0.0500"],  # a tie for the best: both bold
    }


def test_report_writes_markdown_and_plots(tmp_path: Path) -> None:
    results = tmp_path / "quality.parquet"
    write_results(hand_made_table(), results)
    out = tmp_path / "report"
    outcome = run_sdm("report", results, "--out", out)
    assert outcome.exit_code == 0, outcome.output
    text = (out / "report.md").read_text()
    for heading in ("## toy, leave-last-out", "### Models", "### SDM ablations", "## Hyper-parameter search"):
        assert heading in text
    images = [line[line.index("(") + 1:-1] for line in text.splitlines() if line.startswith("![")]
    assert {name.split("-")[0] for name in images} == {"curves", "hit_rate", "ablation"}
    for name in images:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "| **0.2100** |" in text and "| 0.1900 |" in text  # the chosen search row: the best on validation
    # rerun over an existing report: replaced, no staging directory left
    assert run_sdm("report", results, "--out", out).exit_code == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["quality.parquet", "report"]


@pytest.mark.parametrize("case", ["missing", "not-parquet", "wrong-columns", "empty"])
def test_bad_inputs_exit_2_naming_the_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}.parquet"
    if case == "not-parquet":
        path.write_text("user,item\n1,2\n")
    elif case == "wrong-columns":
        pl.DataFrame({"model": ["sdm"], "hr": [0.1]}).write_parquet(path)
    elif case == "empty":
        write_results(results_frame([]), path)
    outcome = run_sdm("report", path, "--out", tmp_path / "report")
    assert outcome.exit_code == 2
    assert str(path) in outcome.stderr and len(outcome.stderr.strip().splitlines()) == 1, outcome.stderr
    assert not (tmp_path / "report").exists()


def test_report_has_a_defaults_table_and_a_tuned_table(tmp_path: Path) -> None:
    """Rows of stage "defaults" and "test" of one dataset x protocol: two tables, each with its own rows."""
    rows = [result_row("sdm", 0, {"test_hit_rate@50": 0.3}), result_row("gru4rec", 0, {"test_hit_rate@50": 0.25})]
    rows += [{**result_row("sdm", 0, {"test_hit_rate@50": 0.2}), "stage": "defaults"}]
    results = tmp_path / "quality.parquet"
    write_results(results_frame(rows), results)
    write_report([results], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    defaults, tuned = text.split("### Models, (a) at defaults")[1].split("### Models, (b) tuned")
    assert "| sdm | 1 | **0.2000** |" in defaults and "gru4rec" not in defaults
    assert "| sdm | 1 | **0.3000** |" in tuned and "| gru4rec | 1 | 0.2500 |" in tuned
