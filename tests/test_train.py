"""`sdm train`: training tensors and batches, the trainer's loop, checkpoints, resuming and every model.

Most runs use a small synthetic log and small dims; the sample data is trained once (shared with
the evaluation and serving tests) for the claims about the real-sized data.
"""

from __future__ import annotations

import json
import math
import inspect
from dataclasses import MISSING, fields, replace
from pathlib import Path

import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cli.app
from sdm.training.checkpoint import BEST, CONFIG, HISTORY, LAST, load_checkpoint
from sdm.data.sessions import BLOCK_ROWS, length_grouped_batches, load_cases, load_catalogue, load_training, pad_lists
from sdm.evaluation.evaluate import evaluate_split
from sdm.training.train import TrainConfig, auto_batch_size, load_trained, train
from helpers.cli import run_sdm, run_sdm_ok
from helpers.logs import DAY_MS
from helpers.training import (
    SAMPLE_TEST_DAYS,
    SAMPLE_VALID_DAYS,
    SMALL_MODEL,
    SMALL_MODEL_ARGS,
    TEST_THREADS,
    preprocess_tiny,
    read_json,
    read_split,
    read_vocab,
    states_equal,
    without_timing,
)

torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A one-epoch SDM run on the tiny data, made through the CLI; tests must not modify it."""
    run = tmp_path_factory.mktemp("tiny_run") / "run"
    run_sdm_ok("train", "--data", tiny_data, "--out", run, "--epochs", "1", *SMALL_MODEL_ARGS)
    return run


def small_config(data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(data=str(data), out=str(out), epochs=2, batch_size=256, threads=TEST_THREADS, **SMALL_MODEL)
    return TrainConfig(**(values | overrides))


def file_states(run: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(run.iterdir()) if path.is_file()}


# --- training tensors and batches --------------------------------------------------------------


def test_training_tensors_follow_the_train_split(sample_data):
    training = load_training(sample_data, load_catalogue(sample_data))
    rows = read_split(sample_data, "train")
    item_lists = rows.get_column("items").to_list()
    next_items = rows.get_column("next_item").to_list()
    width = max(map(len, item_lists))

    # Plain-Python reference: position t predicts item t + 1, the last position the next session's
    # first item, and every padding position holds 0.
    expected_items = [items + [0] * (width - len(items)) for items in item_lists]
    expected_targets = [items[1:] + [following] + [0] * (width - len(items)) for items, following in zip(item_lists, next_items)]
    assert training.tensors["lengths"].tolist() == [len(items) for items in item_lists]
    assert training.tensors["items"].tolist() == expected_items
    assert training.tensors["targets"].tolist() == expected_targets

    long_term = pl.read_parquet(sample_data / "long_term" / "long_term.parquet")
    long_items = dict(zip(long_term.get_column("session").to_list(), long_term.get_column("long_item").to_list()))
    sessions = rows.get_column("session").to_list()
    long_width = training.tensors["long_item"].shape[1]
    assert training.tensors["long_item"].tolist() == [
        long_items[session] + [0] * (long_width - len(long_items[session])) for session in sessions
    ]
    profiles = pl.read_parquet(sample_data / "events" / "users.parquet")
    fields = [column for column in profiles.columns if column != "user"]
    profile_of = {row[0]: list(row[1:]) for row in profiles.select("user", *fields).iter_rows()}
    assert training.tensors["profile"].tolist() == [profile_of[user] for user in rows.get_column("user").to_list()]


def test_next_item_is_the_first_item_of_the_users_next_training_session(sample_data):
    sessions = pl.read_parquet(sample_data / "sessions" / "sessions.parquet").sort("user", "start")
    events = pl.read_parquet(sample_data / "sessions" / "events.parquet")
    # The temporal protocol: training uses the events before the validation days.
    last_day_end = (events.get_column("time").max() // DAY_MS + 1) * DAY_MS
    valid_start = last_day_end - round((SAMPLE_TEST_DAYS + SAMPLE_VALID_DAYS) * DAY_MS)
    following = sessions.select(
        "session",
        following_first=pl.col("items").list.first().shift(-1).over("user"),
        following_start=pl.col("start").shift(-1).over("user"),
    )
    rows = read_split(sample_data, "train").join(following, on="session", how="left", maintain_order="left")
    expected_next = rows.select(
        pl.when(pl.col("following_start") < valid_start).then("following_first").otherwise(0).fill_null(0)
    ).to_series()
    assert rows.get_column("next_item").to_list() == expected_next.to_list()
    assert (rows.get_column("next_item") != 0).any() and (rows.get_column("next_item") == 0).any()

    training_items = (
        events.filter(pl.col("time") < valid_start).sort("order").group_by("session").agg("item")
    )
    items_of = dict(zip(training_items.get_column("session").to_list(), training_items.get_column("item").to_list()))
    assert rows.get_column("items").to_list() == [items_of[session] for session in rows.get_column("session").to_list()]


@settings(max_examples=60, deadline=None)
@given(
    lists=st.lists(st.one_of(st.none(), st.lists(st.integers(1, 10_000), max_size=9)), max_size=12),
    width=st.one_of(st.none(), st.integers(1, 12)),
)
def test_pad_lists_equals_plain_python_padding(lists, width):
    padded = pad_lists(pl.Series(lists, dtype=pl.List(pl.UInt32)), width)
    present = [values or [] for values in lists]
    expected_width = max([1, *map(len, present)]) if width is None else width
    expected = [values[:expected_width] + [0] * (expected_width - len(values[:expected_width])) for values in present]
    assert padded.dtype == torch.int64
    assert tuple(padded.shape) == (len(lists), expected_width)
    assert padded.tolist() == expected


def batches_of(lengths: torch.Tensor, batch_size: int, seed: int) -> list[torch.Tensor]:
    return list(length_grouped_batches(lengths, batch_size, torch.Generator().manual_seed(seed)))


def padded_cells(lengths: torch.Tensor, batches: list[torch.Tensor]) -> int:
    return sum(int(lengths[rows].max()) * len(rows) - int(lengths[rows].sum()) for rows in batches)


@pytest.mark.parametrize("n_rows, batch_size", [(1_000, 32), (9_001, 16)])
def test_length_grouped_batches_cover_every_row_exactly_once(n_rows, batch_size):
    lengths = torch.randint(1, 51, (n_rows,), generator=torch.Generator().manual_seed(0))
    batches = batches_of(lengths, batch_size, seed=1)
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(n_rows))
    # A window's rows are cut into equal batches; every window here holds many batches' worth.
    assert all(batch_size - 1 <= len(rows) <= batch_size for rows in batches)
    # Grouping by length needs far less padding than random batches of the same size.
    random_batches = list(torch.randperm(n_rows, generator=torch.Generator().manual_seed(2)).split(batch_size))
    assert padded_cells(lengths, batches) < 0.2 * padded_cells(lengths, random_batches)


def test_length_grouped_batches_are_contiguous_in_length_within_a_window():
    # 1,000 rows fit in one window of 50 batches: batches are consecutive slices of the rows
    # sorted by length, so their length ranges do not overlap.
    lengths = torch.randint(1, 51, (1_000,), generator=torch.Generator().manual_seed(0))
    ranges = sorted((int(lengths[rows].min()), int(lengths[rows].max())) for rows in batches_of(lengths, 32, seed=1))
    assert all(previous[1] <= current[0] for previous, current in zip(ranges, ranges[1:]))


def test_a_window_of_batches_reads_whole_blocks_of_consecutive_rows():
    # 40 blocks of BLOCK_ROWS rows in batches of 16: a window is 50 batches' worth, rounded up to
    # whole blocks (4 blocks = 64 batches of exactly 16). The batches of each window together are
    # whole blocks from all over the split.
    lengths = torch.randint(1, 51, (40 * BLOCK_ROWS,), generator=torch.Generator().manual_seed(0))
    batches = batches_of(lengths, 16, seed=1)
    per_window = 4 * BLOCK_ROWS // 16
    for start in range(0, 4 * per_window, per_window):
        rows = torch.cat(batches[start:start + per_window])
        blocks, counts = torch.unique(rows // BLOCK_ROWS, return_counts=True)
        assert len(blocks) == 4 and (counts == BLOCK_ROWS).all()
        assert int(blocks.max() - blocks.min()) > 4  # not simply the next rows of the file


def test_length_grouped_batches_depend_only_on_the_generator_seed():
    lengths = torch.randint(1, 51, (2_000,), generator=torch.Generator().manual_seed(0))
    first, again, other = batches_of(lengths, 64, 5), batches_of(lengths, 64, 5), batches_of(lengths, 64, 6)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


# --- the training loop on the sample data ---------------------------------------------------------


def test_loss_decreases_every_epoch_on_the_sample_data(sample_run):
    losses = [entry["loss"] for entry in sample_run.history]
    assert len(losses) == sample_run.config.epochs
    assert all(math.isfinite(loss) for loss in losses)
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    # A trained model is far better than chance: recall@50 of a random ranking is 50 / n_items.
    n_items = read_vocab(sample_run.data, "item").height
    assert sample_run.history[-1]["valid"]["recall@50"] > 5 * 50 / n_items


def test_every_epoch_writes_last_checkpoint_and_history(sample_run):
    assert [snapshot.last_epoch for snapshot in sample_run.snapshots] == list(range(sample_run.config.epochs))
    assert [snapshot.history_length for snapshot in sample_run.snapshots] == list(range(1, sample_run.config.epochs + 1))
    assert read_json(sample_run.path / HISTORY)["epochs"] == sample_run.history
    last = load_checkpoint(sample_run.path / LAST)
    assert {"model", "optimizer", "epoch", "history", "best_value", "bad_epochs"} <= set(last)
    assert states_equal(last["model"], sample_run.snapshots[-1].model)

    config = read_json(sample_run.path / CONFIG)
    assert config["catalogue"]["n_items"] == read_vocab(sample_run.data, "item").height + 1
    assert config["catalogue"]["n_users"] == read_vocab(sample_run.data, "user").height + 1
    assert config["model"]["dim"] == 32 and config["train"]["seed"] == 0


def test_best_checkpoint_holds_the_epoch_with_the_best_validation_metric(sample_run, sample_data):
    metric = sample_run.config.select_metric
    values = [entry["valid"][metric] for entry in sample_run.history]
    best_index = values.index(max(values))  # the first of equal values: a tie is no improvement
    best = load_checkpoint(sample_run.path / BEST)
    assert best["epoch"] == best_index
    assert states_equal(best["model"], sample_run.snapshots[best_index].model)
    assert [entry["improved"] for entry in sample_run.history] == [
        value > max(values[:index], default=-math.inf) for index, value in enumerate(values)
    ]

    model, _, catalogue = load_trained(sample_run.path)
    recomputed = evaluate_split(model, sample_data, catalogue, "valid", sample_run.config.ks)
    assert recomputed[metric] == pytest.approx(values[best_index], abs=1e-12)


# --- determinism and resuming on the tiny data -----------------------------------------------------


def test_same_seed_gives_the_same_run_and_another_seed_does_not(tiny_data, tmp_path):
    runs = {
        name: train(small_config(tiny_data, tmp_path / name, seed=seed))
        for name, seed in (("first", 0), ("again", 0), ("other", 1))
    }
    assert without_timing(runs["first"]) == without_timing(runs["again"])
    assert without_timing(runs["first"]) != without_timing(runs["other"])
    for checkpoint in (LAST, BEST):
        first, again, other = (load_checkpoint(tmp_path / name / checkpoint)["model"] for name in runs)
        assert states_equal(first, again)
        assert not states_equal(first, other)


def test_resume_to_more_epochs_continues_the_run(tiny_data, tmp_path):
    """More epochs on --resume: the epochs done stay as they were, the learning-rate schedule is
    planned again for the new budget from there on, and extending is as deterministic as training."""
    interrupted = small_config(tiny_data, tmp_path / "resumed", epochs=2, patience=4)
    first_two = train(interrupted)
    resumed = train(replace(interrupted, epochs=4), resume=True)
    assert len(resumed) == 4 and without_timing(resumed[:2]) == without_timing(first_two)
    again = small_config(tiny_data, tmp_path / "again", epochs=2, patience=4)
    train(again)
    assert without_timing(train(replace(again, epochs=4), resume=True)) == without_timing(resumed)
    straight = train(small_config(tiny_data, tmp_path / "straight", epochs=4, patience=4))
    assert without_timing(straight[:2]) != without_timing(first_two)  # a 4-epoch plan decays more slowly


def test_resume_with_different_options_is_refused(tiny_run, tiny_data):
    before = file_states(tiny_run)
    outcome = run_sdm("train", "--data", tiny_data, "--out", tiny_run, "--epochs", "2", *SMALL_MODEL_ARGS, "--lr", "0.01", "--resume")
    assert outcome.exit_code == 2, outcome.output
    assert "--resume" in outcome.stderr and "same options" in outcome.stderr
    assert "Traceback" not in outcome.output
    assert file_states(tiny_run) == before


def test_training_into_an_existing_run_without_resume_is_refused(tiny_run, tiny_data):
    before = file_states(tiny_run)
    outcome = run_sdm("train", "--data", tiny_data, "--out", tiny_run, "--epochs", "1", *SMALL_MODEL_ARGS)
    assert outcome.exit_code == 2, outcome.output
    assert str(tiny_run) in outcome.stderr and "already holds a run" in outcome.stderr and "--resume" in outcome.stderr
    assert len(outcome.stderr.strip().splitlines()) == 1
    assert file_states(tiny_run) == before


def test_a_resume_refused_for_changed_data_leaves_the_run_untouched(tiny_log, tmp_path):
    # Regression: train() once rewrote config.json (with the new data fingerprint) before comparing
    # fingerprints, so after the refusal the old model passed for one trained on the new data.
    data = preprocess_tiny(tiny_log, tmp_path / "data")
    run = tmp_path / "run"
    run_sdm_ok("train", "--data", data, "--out", run, "--epochs", "1", *SMALL_MODEL_ARGS)
    config_before = read_json(run / CONFIG)
    preprocess_tiny(tiny_log, data, valid_days=3.0)  # new splits, new fingerprint

    refused = run_sdm("train", "--data", data, "--out", run, "--epochs", "2", *SMALL_MODEL_ARGS, "--resume")
    assert refused.exit_code == 2 and "changed" in refused.stderr, refused.output
    assert read_json(run / CONFIG) == config_before, "the refused resume rewrote config.json"
    evaluated = run_sdm("evaluate", "--run", run, "--json")
    assert evaluated.exit_code == 2 and "changed" in evaluated.stderr, evaluated.output


# --- early stopping ---------------------------------------------------------------------------------


def test_early_stopping_after_patience_epochs_without_improvement(tiny_data, tmp_path):
    # With a learning rate of 1e-30 no parameter moves, so validation never improves after epoch 1
    # and the run must stop after 1 + patience epochs.
    run = tmp_path / "run"
    run_sdm_ok("train", "--data", tiny_data, "--out", run, "--epochs", "8", "--patience", "2", "--lr", "1e-30", *SMALL_MODEL_ARGS)
    history = read_json(run / HISTORY)["epochs"]
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    assert [entry["improved"] for entry in history] == [True, False, False]
    assert history[0]["valid"] == history[1]["valid"] == history[2]["valid"]
    assert load_checkpoint(run / BEST)["epoch"] == 0
    last = load_checkpoint(run / LAST)
    assert last["epoch"] == 2 and last["bad_epochs"] == 2


def test_patience_zero_is_refused_or_still_trains(tiny_data, tmp_path):
    # Bug: the loop checks `bad_epochs >= patience` before the first epoch, so --patience 0 ends
    # with exit 0, an empty history and no best.pt (`sdm evaluate` on the run then fails).
    run = tmp_path / "run"
    outcome = run_sdm("train", "--data", tiny_data, "--out", run, "--epochs", "2", "--patience", "0", *SMALL_MODEL_ARGS)
    if outcome.exit_code == 2:
        assert "--patience" in outcome.stderr
    else:
        assert outcome.exit_code == 0, outcome.output
        assert (run / BEST).is_file(), "exit 0 without training a single epoch"
        assert len(read_json(run / HISTORY)["epochs"]) >= 1


@pytest.mark.parametrize(
    ("model", "option"),
    [("gru4rec", "--no-long-term"), ("sasrec", "--no-short-term"), ("youtube-dnn", "--fusion"), ("popularity", "--no-short-term")],
)
def test_options_a_model_would_ignore_are_refused(tiny_data, tmp_path, model, option):
    extra = ("--fusion", "add") if option == "--fusion" else (option,)
    outcome = run_sdm("train", "--data", tiny_data, "--out", tmp_path / "run", "--model", model, *extra, *SMALL_MODEL_ARGS)
    assert outcome.exit_code == 2 and option in outcome.stderr and model in outcome.stderr, outcome.output
    assert not (tmp_path / "run").exists()


# --- every model, ablation and loss ----------------------------------------------------------------

VARIANTS = {
    "sdm": (),
    "youtube-dnn": ("--model", "youtube-dnn"),
    "popularity": ("--model", "popularity"),
    "no-long-term": ("--no-long-term",),
    "no-short-term": ("--no-short-term",),
    "no-side-info": ("--no-side-info",),
    "fusion-add": ("--fusion", "add"),
    "fusion-concat": ("--fusion", "concat"),
    "fusion-multiply": ("--fusion", "multiply"),
    "loss-sampled": ("--loss", "sampled", "--num-negatives", "200"),
    "in-batch-negatives": ("--loss", "sampled", "--negatives", "in-batch"),
}
EXPECTED_OPTIONS = {
    "sdm": {"model": "sdm", "fusion": "gated", "long_term": True, "short_term": True, "side_info": True},
    "youtube-dnn": {"model": "youtube-dnn"},
    "popularity": {"model": "popularity"},
    "no-long-term": {"long_term": False, "short_term": True},
    "no-short-term": {"long_term": True, "short_term": False},
    "no-side-info": {"side_info": False},
    "fusion-add": {"fusion": "add"},
    "fusion-concat": {"fusion": "concat"},
    "fusion-multiply": {"fusion": "multiply"},
    "loss-sampled": {"loss": "sampled", "num_negatives": 200},
    "in-batch-negatives": {"loss": "sampled", "negatives": "in-batch"},
}
LOSS_KIND = {"loss-sampled": "log-uniform", "in-batch-negatives": "in-batch", "popularity": "none"}


def user_vectors_with(model, batch: dict[str, torch.Tensor], **replaced: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.user_vectors(batch | replaced)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_every_model_and_ablation_trains_and_evaluates(variant, tiny_data, tmp_path):
    run = tmp_path / variant
    run_sdm_ok("train", "--data", tiny_data, "--out", run, "--epochs", "1", *SMALL_MODEL_ARGS, *VARIANTS[variant])
    config = read_json(run / CONFIG)
    assert EXPECTED_OPTIONS[variant].items() <= config["train"].items()
    assert LOSS_KIND.get(variant, "full") in config["loss"]
    (epoch,) = read_json(run / HISTORY)["epochs"]
    if variant == "popularity":
        assert epoch["loss"] == 0.0  # nothing to train
    else:
        assert math.isfinite(epoch["loss"]) and epoch["loss"] > 0

    metrics = json.loads(run_sdm_ok("evaluate", "--run", run, "--json").stdout)
    assert metrics["n_cases"] == read_split(tiny_data, "test").height
    names = ("hit_rate", "recall", "precision", "f1", "ndcg", "mrr")
    assert {f"{name}@{k}" for name in names for k in (10, 20, 50, 100)} | {"n_cases"} == set(metrics)
    assert all(0.0 <= value <= 1.0 for key, value in metrics.items() if key != "n_cases")
    assert metrics["hit_rate@100"] > 0

    if variant in ("sdm", "no-long-term", "no-short-term"):
        assert_dropped_inputs_are_ignored(run, tiny_data, variant)


def assert_dropped_inputs_are_ignored(run: Path, data: Path, variant: str) -> None:
    """The ablated model's user vectors do not depend on the behaviour it drops; the full model's do."""
    model, _, catalogue = load_trained(run)
    cases, _ = load_cases(data, catalogue, "test")
    batch = cases.batch(torch.arange(len(cases)))
    reference = user_vectors_with(model, batch)
    empty_long_term = {f"long_{feature}": torch.zeros_like(batch[f"long_{feature}"]) for feature in catalogue.long_features}
    valid = torch.arange(batch["items"].shape[1]) < batch["lengths"][:, None]
    other_items = torch.randint(1, catalogue.n_items, batch["items"].shape, generator=torch.Generator().manual_seed(0))
    without_long_term = user_vectors_with(model, batch, **empty_long_term)
    with_other_items = user_vectors_with(model, batch, items=torch.where(valid, other_items, 0))
    assert torch.equal(without_long_term, reference) == (variant == "no-long-term")
    assert torch.equal(with_other_items, reference) == (variant == "no-short-term")


# --- learning from a bare log ----------------------------------------------------------------


@pytest.fixture(scope="module")
def bare_sample_data(tmp_path_factory) -> Path:
    """The sample events alone: no items file (no side features) and no users file (no profile),
    so every user shares one profile vector; the case where models used to learn nothing."""
    out = tmp_path_factory.mktemp("bare") / "data"
    run_sdm_ok("preprocess", Path(__file__).parents[1] / "sample_data" / "events.csv", "--out", out,
               "--test-days", 3, "--valid-days", 2)
    return out


@pytest.fixture(scope="module")
def bare_popularity_hit_rate(bare_sample_data, tmp_path_factory) -> float:
    run = tmp_path_factory.mktemp("bare_popularity") / "run"
    return train(TrainConfig(data=str(bare_sample_data), out=str(run), model="popularity"))[0]["valid"]["hit_rate@50"]


@pytest.mark.parametrize("model", ["sdm", "youtube-dnn", "gru4rec", "sasrec"])
def test_every_model_learns_from_a_bare_log_within_one_epoch(bare_sample_data, bare_popularity_hit_rate, tmp_path, model):
    """At the defaults, one epoch takes the mean training loss clearly below ln(n_items), the loss
    of scoring every item alike, and validation hit rate@50 to at least 90% of popularity's: the
    model has learnt at least what popularity knows. (Measured: losses 7.34-7.42 against ln n =
    7.78 and hit rates 0.38-0.39 against popularity's 0.39; with N(0, 1) embeddings, lr 1e-3 and
    batches of 256 the losses were 7.46-8.42 and the hit rates 0.13-0.30.)"""
    catalogue = load_catalogue(bare_sample_data)
    assert not catalogue.side_features and not catalogue.profile_vocab
    history = train(TrainConfig(data=str(bare_sample_data), out=str(tmp_path / "run"), model=model, epochs=1, threads=TEST_THREADS))
    assert history[0]["loss"] < math.log(catalogue.n_items - 1) - 0.25, history[0]["loss"]
    assert history[0]["valid"]["hit_rate@50"] >= 0.9 * bare_popularity_hit_rate, (history[0]["valid"], bare_popularity_hit_rate)


def test_sdm_train_declares_every_train_config_field_with_its_default():
    # One source of the options: TrainConfig (ModelOptions included). The command declares each
    # field with the dataclass's default, and nothing else but its own switches; ks follows from
    # --select-metric.
    declared = {name: parameter.default for name, parameter in inspect.signature(cli.app.train_command).parameters.items()
                if name not in cli.app.NOT_SETTINGS}
    defaults = {field.name: field.default for field in fields(TrainConfig) if field.default is not MISSING}
    assert declared == defaults


def test_sdm_evaluate_reports_the_cut_offs_training_validates_at():
    from sdm.evaluation.metrics import KS

    default = inspect.signature(cli.app.evaluate).parameters["k"].default
    assert cli.app.parse_ks(default) == list(KS) == TrainConfig(data="", out="").ks


@pytest.mark.parametrize(
    "n_sessions, batch_size",
    [(1, 16), (735, 16), (4_196, 16), (8_000, 16), (8_001, 32), (20_000, 64), (10**7, 256)],
)
def test_automatic_batch_size_gives_about_500_steps_per_epoch_within_16_to_256(n_sessions, batch_size):
    assert auto_batch_size(n_sessions) == batch_size
