"""`sdm report` and the quality grid (benchmarks/quality.py): the results table, the tables'
mean ± std and bold, the report's files, bad inputs, and the grid's resume by run key."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import polars as pl
import pytest
from helpers.cli import run_sdm

from sdm.evaluation.report import (
    RESULTS_SCHEMA,
    TEST_COLUMNS,
    VALID_COLUMN,
    markdown_table,
    read_results,
    results_frame,
    summarise,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_quality():
    """benchmarks/quality.py as a module (benchmarks/ is not a package)."""
    if "quality" not in sys.modules:
        spec = importlib.util.spec_from_file_location("quality", REPO / "benchmarks" / "quality.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["quality"] = module
        spec.loader.exec_module(module)
    return sys.modules["quality"]


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


def fake_grid(tmp_path: Path, seeds: int = 2):
    """A grid over one dataset x protocol whose runner trains nothing: it records each run and
    scores lr 0.003 best on validation."""
    quality = load_quality()
    calls: list = []

    def runner(spec) -> dict:
        calls.append(spec)
        valid = 0.3 if spec.params.get("lr") == 0.003 else 0.1
        return {VALID_COLUMN: valid, "epochs": 1, "history": "[]", **({"test_hit_rate@10": valid} if spec.stage == "test" else {})}

    grid = quality.GridConfig(
        work=tmp_path, results=tmp_path / "results.parquet", datasets=("toy",), protocols=("leave-last-out",),
        entries=("popularity", "sdm", "no-long-term"), seeds=seeds, search=({"lr": 0.001}, {"lr": 0.003}), epochs=2, patience=1,
    )
    return quality, grid, runner, calls


def test_grid_runs_each_key_once_and_resumes(tmp_path: Path) -> None:
    quality, grid, runner, calls = fake_grid(tmp_path)
    prepare = lambda dataset, protocol, work: work / "data"
    table = quality.run_grid(grid, runner, prepare)
    # search: sdm x 2 configs; test: (popularity, sdm, no-long-term) x 2 seeds
    assert [(c.model, c.variant, c.stage) for c in calls].count(("sdm", "full", "tune")) == 2
    assert len(calls) == 2 + 3 * 2 and table.height == len(calls)
    tested = [c for c in calls if c.stage == "test" and c.model == "sdm"]
    assert {c.params["lr"] for c in tested} == {0.003}  # the configuration best on validation
    assert {json.dumps(c.params, sort_keys=True) for c in tested if c.variant == "no-long-term"} == {
        json.dumps({"epochs": 2, "patience": 1, "lr": 0.003, "long_term": False}, sort_keys=True)
    }
    assert read_results(grid.results).equals(table)

    calls.clear()
    quality.run_grid(grid, runner, prepare)
    assert calls == []  # every key is in the table

    # a grid killed before its last run: only that run is done again
    kept = table.filter(~((pl.col("variant") == "no-long-term") & (pl.col("seed") == 1)))
    write_results(kept, grid.results)
    quality.run_grid(grid, runner, prepare)
    assert [(c.variant, c.seed, c.stage) for c in calls] == [("no-long-term", 1, "test")]
    assert read_results(grid.results).height == table.height

    # one more seed adds only that seed's test runs
    calls.clear()
    quality.run_grid(quality.GridConfig(**{**grid.__dict__, "seeds": 3}), runner, prepare)
    assert sorted((c.model, c.variant, c.seed) for c in calls) == [
        ("popularity", "full", 2), ("sdm", "full", 2), ("sdm", "no-long-term", 2)
    ]


def test_grid_skips_a_dataset_whose_files_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    quality, grid, runner, calls = fake_grid(tmp_path)
    monkeypatch.setitem(quality.DATASETS, "toy", {"logs": tmp_path / "absent.csv"})
    table = quality.run_grid(grid, runner)
    assert calls == [] and table.is_empty()
    assert f"skipping toy: missing {tmp_path / 'absent.csv'}" in capsys.readouterr().out


@pytest.mark.slow  # over the 5-minute budget of the default suite; python -m pytest -m slow
def test_quick_grid_on_sample_data_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--quick for one model and protocol: search (1 config), test with and without seen items,
    a second call that runs nothing, and `sdm report` over the table."""
    quality = load_quality()
    work = tmp_path / "work"
    argv = ["quality.py", "--quick", "--datasets", "sample", "--protocols", "leave-last-out", "--models", "youtube-dnn",
            "--work", str(work)]
    monkeypatch.setattr(sys, "argv", argv)
    quality.main()
    results = work / "results" / "quality.parquet"
    table = read_results(results)
    assert table.select("model", "stage", "seed").rows() == [("youtube-dnn", "tune", 0), ("youtube-dnn", "test", 0)]
    tune, test = table.row(0, named=True), table.row(1, named=True)
    assert test[VALID_COLUMN] == tune[VALID_COLUMN]  # seed 0 of the chosen config is the search run
    assert all(test[name] is not None for name in TEST_COLUMNS)
    assert 0 <= test["test_seen_excluded_hit_rate@50"] <= 1 and tune["test_hit_rate@50"] is None
    assert len(json.loads(test["history"])) == test["epochs"] <= quality.QUICK_EPOCHS
    quality.main()
    assert read_results(results).equals(table)
    assert run_sdm("report", results, "--out", tmp_path / "report").exit_code == 0
    assert "| youtube-dnn | 1 |" in (tmp_path / "report" / "report.md").read_text()
