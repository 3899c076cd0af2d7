"""The installed `sdm` command end to end on the shipped sample data, in child processes."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest

from helpers.cli import sdm_process
from helpers.training import SAMPLE_FILES, SMALL_MODEL_ARGS, read_json

K = 5


def succeeded(*args: object, cwd) -> str:
    finished = sdm_process(*args, cwd=cwd)
    assert finished.returncode == 0, f"sdm {' '.join(map(str, args))}:\n{finished.stdout}\n{finished.stderr}"
    return finished.stdout


def test_preprocess_train_evaluate_recommend(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    succeeded(
        "preprocess", SAMPLE_FILES["events"], "--items", SAMPLE_FILES["items"], "--users", SAMPLE_FILES["users"],
        "--out", data, cwd=tmp_path,
    )
    succeeded("train", "--data", data, "--out", run, "--epochs", 2, "--batch-size", 512, *SMALL_MODEL_ARGS, cwd=tmp_path)
    metrics = json.loads(succeeded("evaluate", "--run", run, "--k", "20,50", "--json", cwd=tmp_path))
    users = pl.read_parquet(data / "events" / "vocab" / "user.parquet").get_column("raw")
    shown = succeeded("recommend", "--run", run, "--user", users[0], "-k", K, "--json", cwd=tmp_path)

    history = read_json(run / "history.json")["epochs"]
    assert [entry["epoch"] for entry in history] == [1, 2]
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()
    test_cases = pl.read_parquet(data / "splits" / "test.parquet").height
    assert metrics["n_cases"] == test_cases > 0
    assert read_json(run / "metrics-test.json")["metrics"] == metrics
    assert 0 < metrics["hit_rate@50"] <= 1

    recommendations = [json.loads(line) for line in shown.splitlines() if line.strip()]
    known_items = set(pl.read_csv(SAMPLE_FILES["items"], infer_schema=False).get_column("item_id").to_list())
    assert [row["rank"] for row in recommendations] == list(range(1, K + 1))
    assert all(row["item"] in known_items for row in recommendations)


@pytest.mark.slow  # over the 5-minute budget of the default suite; python -m pytest -m slow
def test_demo_completes_and_compares_the_three_models(tmp_path):
    finished = sdm_process("demo", "--out", tmp_path / "demo", "--epochs", 1, cwd=tmp_path, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    number = r"\d\.\d{4}"
    for model in ("popularity", "youtube-dnn", "sdm"):
        row = re.compile(rf"^\W*{re.escape(model)}\W+(?:{number}\W+){{4}}$")  # HR@10, HR@50, NDCG@10, NDCG@50
        assert any(row.match(line) for line in finished.stdout.splitlines()), f"no table row for {model}:\n{finished.stdout}"
        assert (tmp_path / "demo" / "runs" / f"{model}-seed0" / "best.pt").is_file()
