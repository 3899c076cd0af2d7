"""Where no user returns to an item (ratings, reviews), runs rank without each user's seen items:
validation during training, and by default `sdm evaluate`, `sdm recommend` and `sdm serve`."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch

from helpers.cli import run_sdm, run_sdm_ok
from helpers.logs import BASE_MS, DAY_MS, KEEP_ALL_ITEMS, MINUTE_MS, preprocess, raw_events, write_log
from helpers.training import SMALL_MODEL_ARGS
from sdm.data.sessions import load_cases, seen_items, training_repeat_share
from sdm.evaluation.evaluate import evaluate_cases, evaluate_shared
from sdm.training.checkpoint import BEST, CONFIG, LAST, load_checkpoint, save_checkpoint
from sdm.training.distributed import Ranks
from sdm.training.train import load_trained

N_FILMS = 40


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Preprocessed leave-last-out data: a rating log (each user rates 8 films once, a day apart)
    and a click stream (sessions of 4 clicks that come back to a user's few items)."""
    root = tmp_path_factory.mktemp("seen")
    ratings = [(user, f"film{(user * 7 + k * 3) % N_FILMS}", BASE_MS + k * DAY_MS + user, 4) for user in range(60) for k in range(8)]
    clicks = [(user, f"i{(user + day + click) % 6}", BASE_MS + day * DAY_MS + click * MINUTE_MS + user)
              for user in range(60) for day in range(4) for click in range(4)]
    write_log(root / "ratings.csv", ratings, header=("user", "item", "time", "rating"))
    write_log(root / "clicks.csv", clicks)
    for name in ("ratings", "clicks"):
        preprocess(root / f"{name}.csv", root / name, *KEEP_ALL_ITEMS, "--split", "leave-last-out")
    return {"ratings": root / "ratings", "clicks": root / "clicks"}


def train(data: Path, run: Path, *options: object) -> dict:
    run_sdm_ok("train", "--data", data, "--out", run, "--epochs", 2, *SMALL_MODEL_ARGS, *options)
    return json.loads((run / CONFIG).read_text())


def seen_of(data: Path, raw_user: str) -> set[str]:
    """Every item of the user's logged events (their latest session is the input of `sdm recommend`)."""
    return set(raw_events(data).filter(pl.col("user") == raw_user).get_column("item").to_list())


def recommended_items(run: Path, user: str, k: int) -> set[str]:
    lines = run_sdm_ok("recommend", "--run", run, "--user", user, "-k", k, "--json").stdout.splitlines()
    return {json.loads(line)["item"] for line in lines if line}


def test_the_repeat_share_of_the_training_sessions(logs):
    assert training_repeat_share(logs["ratings"]) == 0.0
    assert training_repeat_share(logs["clicks"]) > 0.5  # 16 clicks on at most 4 distinct items per user


def test_a_rating_log_validates_and_evaluates_without_seen_items(logs, tmp_path):
    config = train(logs["ratings"], tmp_path / "run")
    assert config["exclude_seen"] is True and config["train"]["exclude_seen"] is None
    history = json.loads((tmp_path / "run" / "history.json").read_text())["epochs"]
    best = max(history, key=lambda epoch: epoch["valid"]["recall@50"])
    default = json.loads(run_sdm_ok("evaluate", "--run", tmp_path / "run", "--split", "valid", "--json").stdout)
    excluded = json.loads(run_sdm_ok("evaluate", "--run", tmp_path / "run", "--split", "valid", "--exclude-seen", "--json").stdout)
    included = json.loads(run_sdm_ok("evaluate", "--run", tmp_path / "run", "--split", "valid", "--include-seen", "--json").stdout)
    assert default == excluded and default["recall@50"] == pytest.approx(best["valid"]["recall@50"])
    # Every user rated 7 of the 40 films before the validation one: ranked, they take places in the top 10.
    assert included["recall@10"] < excluded["recall@10"]
    assert (tmp_path / "run" / "metrics-valid-exclude-seen.json").is_file() and (tmp_path / "run" / "metrics-valid.json").is_file()
    recommended = recommended_items(tmp_path / "run", "5", 30)
    assert len(recommended) == 30 and not recommended & seen_of(logs["ratings"], "5")


def test_include_seen_keeps_every_item_ranked(logs, tmp_path):
    config = train(logs["ratings"], tmp_path / "run", "--include-seen")
    assert config["exclude_seen"] is False
    assert recommended_items(tmp_path / "run", "5", N_FILMS) >= seen_of(logs["ratings"], "5")


def test_a_click_stream_ranks_every_item(logs, tmp_path):
    assert train(logs["clicks"], tmp_path / "run")["exclude_seen"] is False
    default = json.loads(run_sdm_ok("evaluate", "--run", tmp_path / "run", "--json").stdout)
    assert default == json.loads((tmp_path / "run" / "metrics-test.json").read_text())["metrics"]


def forget_exclude_seen(run: Path) -> None:
    """Make `run` look written before --exclude-seen/--include-seen existed."""
    config = json.loads((run / CONFIG).read_text())
    del config["exclude_seen"], config["train"]["exclude_seen"]
    (run / CONFIG).write_text(json.dumps(config))
    for name in (LAST, BEST):
        state = load_checkpoint(run / name)
        state["config"] = json.dumps(config)
        save_checkpoint(state, run / name)


@pytest.mark.parametrize("log, resumes", [("clicks", True), ("ratings", False)])
def test_a_run_from_before_the_choice_resumes_only_as_it_ranked(logs, tmp_path, log, resumes):
    run = tmp_path / "run"
    train(logs[log], run, "--include-seen")
    forget_exclude_seen(run)
    again = run_sdm("train", "--data", logs[log], "--out", run, "--epochs", 3, *SMALL_MODEL_ARGS, "--resume")
    if resumes:  # a click stream resolves to ranking every item, as the old run did
        assert again.exit_code == 0, again.output
        assert len(json.loads((run / "history.json").read_text())["epochs"]) == 3
    else:
        assert again.exit_code == 2 and "resume it with --include-seen" in again.stderr
        assert torch.load(run / LAST, weights_only=False)["epoch"] == 1  # untouched
        run_sdm_ok("train", "--data", logs[log], "--out", run, "--epochs", 3, *SMALL_MODEL_ARGS, "--resume", "--include-seen")


class UnsummedRanks(Ranks):
    """One rank of a world whose sum is left to the test: each rank's own share of the sums."""

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return values


def test_ranks_that_share_the_cases_exclude_each_cases_own_seen_items(logs, tmp_path):
    train(logs["ratings"], tmp_path / "run")
    model, _, catalogue = load_trained(tmp_path / "run")
    cases, keys = load_cases(logs["ratings"], catalogue, "valid")
    seen = seen_items(logs["ratings"], keys)
    whole = evaluate_cases(model, cases, [10, 50], seen)
    shares = [evaluate_shared(model, cases, [10, 50], UnsummedRanks(rank, 3), seen) for rank in range(3)]
    for name in ("recall@10", "recall@50", "ndcg@10"):
        assert sum(share[name] for share in shares) == pytest.approx(whole[name])
    assert whole["recall@10"] > evaluate_cases(model, cases, [10, 50])["recall@10"]


def test_the_server_ranks_as_the_run_unless_the_request_says(logs, tmp_path):
    pytest.importorskip("fastapi")
    from sdm.serving.server import Service

    train(logs["ratings"], tmp_path / "run")
    service = Service(tmp_path / "run")  # also: a log without a users file (no profile) serves
    assert service.info()["exclude_seen"] is True
    seen = seen_of(logs["ratings"], "5")

    def answered(exclude_seen: bool | None) -> set[str]:
        request = {"user": "5", "items": None, "k": N_FILMS - len(seen), "exclude": [], "exclude_seen": exclude_seen}
        return {entry["item"] for entry in service.answer([request])[0]["items"]}

    assert not answered(None) & seen and answered(None) == answered(True)
    assert answered(False) & seen
