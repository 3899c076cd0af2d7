"""`sdm evaluate`: metric files, the valid/test splits, --json and --exclude-seen, and refusing
checkpoints that would run code when loaded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch

from sdm.training.checkpoint import BEST, LAST
from sdm.data.sessions import load_cases, seen_items
from sdm.evaluation.evaluate import embed_cases, retrieve
from sdm.training.train import load_trained
from helpers.cli import run_sdm, run_sdm_ok
from helpers.training import SMALL_MODEL_ARGS, TEST_THREADS, read_json, read_split

torch.set_num_threads(TEST_THREADS)

METRIC_NAMES = ("hit_rate", "recall", "precision", "f1", "ndcg", "mrr")


@pytest.fixture(scope="module")
def evaluated_run(sample_run, tmp_path_factory) -> Path:
    """A copy of the sample run for the tests that write metric files into it."""
    run = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(sample_run.path, run)
    return run


def brute_force_metrics(model, data: Path, catalogue, split: str, ks: list[int]) -> dict[str, float]:
    """hit_rate@K and recall@K from a full score matrix, sorted, and the targets as Python sets."""
    cases, _ = load_cases(data, catalogue, split)
    with torch.no_grad():
        scores = embed_cases(model, cases) @ model.item_vectors().T  # [N, n_items]
    scores[:, 0] = -torch.inf  # the padding item is no recommendation
    ranked = scores.argsort(dim=1, descending=True, stable=True)[:, : max(ks)].tolist()
    targets = [set(values) for values in read_split(data, split).get_column("targets").to_list()]
    metrics = {}
    for k in ks:
        hits = [len(set(ranking[:k]) & wanted) for ranking, wanted in zip(ranked, targets)]
        metrics[f"hit_rate@{k}"] = sum(h > 0 for h in hits) / len(hits)
        metrics[f"recall@{k}"] = sum(h / len(wanted) for h, wanted in zip(hits, targets)) / len(hits)
    return metrics


@pytest.mark.parametrize("split", ["test", "valid"])
def test_metrics_file_holds_every_metric_for_every_k(split, evaluated_run, sample_data):
    run_sdm_ok("evaluate", "--run", evaluated_run, "--split", split, "--k", "5,20,50")
    written = read_json(evaluated_run / f"metrics-{split}.json")
    assert written["split"] == split and written["exclude_seen"] is False
    metrics = written["metrics"]
    assert set(metrics) == {f"{name}@{k}" for name in METRIC_NAMES for k in (5, 20, 50)} | {"n_cases"}
    assert metrics["n_cases"] == read_split(sample_data, split).height
    assert all(0.0 <= value <= 1.0 for key, value in metrics.items() if key != "n_cases")
    for name in METRIC_NAMES:
        if name in ("hit_rate", "recall", "ndcg", "mrr"):  # can only grow with K
            assert metrics[f"{name}@5"] <= metrics[f"{name}@20"] <= metrics[f"{name}@50"]

    model, _, catalogue = load_trained(evaluated_run)
    reference = brute_force_metrics(model, sample_data, catalogue, split, [5, 20, 50])
    for key, value in reference.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key


def test_valid_and_test_are_different_case_sets(evaluated_run, sample_data):
    valid = json.loads(run_sdm_ok("evaluate", "--run", evaluated_run, "--split", "valid", "--json").stdout)
    test = json.loads(run_sdm_ok("evaluate", "--run", evaluated_run, "--split", "test", "--json").stdout)
    assert valid["n_cases"] == read_split(sample_data, "valid").height
    assert test["n_cases"] == read_split(sample_data, "test").height
    assert valid != test


def test_json_output_parses_and_equals_the_metrics_file(evaluated_run):
    printed = json.loads(run_sdm_ok("evaluate", "--run", evaluated_run, "--k", "10,100", "--json").stdout)
    assert printed == read_json(evaluated_run / "metrics-test.json")["metrics"]
    assert {"hit_rate@10", "recall@100", "n_cases"} <= set(printed)


def test_table_output_lists_each_k(evaluated_run):
    shown = run_sdm_ok("evaluate", "--run", evaluated_run, "--k", "7,30").stdout
    rows = [line.split() for line in shown.splitlines()]
    assert any("7" in row for row in rows) and any("30" in row for row in rows)
    assert "hit_rate" in shown and "recall" in shown


def seen_before_first_target(data: Path, split: str) -> list[set[int]]:
    """Plain-Python reference: per case, the items its user interacted with before the first target."""
    events = pl.read_parquet(data / "sessions" / "events.parquet").select("user", "order", "item")
    history: dict[int, list[tuple[int, int]]] = {}
    for user, order, item in events.iter_rows():
        history.setdefault(user, []).append((order, item))
    cases = read_split(data, split).select("user", "first_target_order")
    return [{item for order, item in history[user] if order < first} for user, first in cases.iter_rows()]


def test_exclude_seen_never_returns_an_item_seen_before_the_first_target(sample_run, sample_data):
    model, _, catalogue = load_trained(sample_run.path)
    cases, keys = load_cases(sample_data, catalogue, "test")
    expected_seen = seen_before_first_target(sample_data, "test")
    indptr, indices = seen_items(sample_data, keys)
    assert [set(indices[indptr[n] : indptr[n + 1]].tolist()) for n in range(len(cases))] == expected_seen

    _, plain = retrieve(model, cases, 100)
    _, excluding = retrieve(model, cases, 100, exclude=(indptr, indices))
    plain_overlap = sum(len(set(ids) & seen) for ids, seen in zip(plain.tolist(), expected_seen))
    assert plain_overlap > 0  # without the option, seen items are recommended: the test has teeth
    assert all(not set(ids) & seen for ids, seen in zip(excluding.tolist(), expected_seen))
    assert (excluding > 0).all()  # the catalogue is large enough to fill every list with unseen items


def test_exclude_seen_changes_the_metrics(evaluated_run):
    plain = json.loads(run_sdm_ok("evaluate", "--run", evaluated_run, "--json").stdout)
    excluding = json.loads(run_sdm_ok("evaluate", "--run", evaluated_run, "--exclude-seen", "--json").stdout)
    written = read_json(evaluated_run / "metrics-test-exclude-seen.json")
    assert written["exclude_seen"] is True and written["metrics"] == excluding
    assert excluding["n_cases"] == plain["n_cases"]
    assert excluding != plain


# --- checkpoint safety ---------------------------------------------------------------------------


class RunsCommand:
    """Unpickling this calls os.system(command): what a malicious checkpoint would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize(
    "checkpoint, command",
    [
        (BEST, ("evaluate", "--json")),
        (BEST, ("recommend", "--user", "nobody")),
        (LAST, ("train", "--epochs", "2", *SMALL_MODEL_ARGS, "--resume")),
    ],
    ids=["evaluate", "recommend", "resume"],
)
def test_a_checkpoint_that_would_run_code_is_refused(checkpoint, command, tiny_data, tmp_path):
    run = tmp_path / "run"
    run_sdm_ok("train", "--data", tiny_data, "--out", run, "--epochs", "1", *SMALL_MODEL_ARGS)
    marker = tmp_path / "payload-ran"
    torch.save({"model": RunsCommand(f"touch {marker}"), "epoch": 0}, run / checkpoint)

    args = [command[0], *(("--data", tiny_data, "--out", run) if command[0] == "train" else ("--run", run)), *command[1:]]
    outcome = run_sdm(*args)
    assert outcome.exit_code == 2, outcome.output
    assert "refused" in outcome.stderr and checkpoint in outcome.stderr
    assert "Traceback" not in outcome.output
    assert not marker.exists()

    # The control: the file really is an exploit, which an unrestricted load executes.
    torch.load(run / checkpoint, weights_only=False)
    assert marker.exists()
