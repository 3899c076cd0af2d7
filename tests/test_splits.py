"""Splits: leave-last-out and temporal evaluation cases, and no leakage of held-out events into
training (issue "Polars preprocessing", stage 4)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from helpers.logs import (
    DAY_MS,
    HOUR_MS,
    KEEP_ALL_ITEMS,
    MINUTE_MS,
    SECOND_MS,
    preprocess,
    vocabulary,
    write_log,
)

DAY0 = 19_675 * DAY_MS  # 2023-11-14 00:00:00 UTC, a midnight


def run(tmp_path: Path, rows: Sequence[Sequence[object]], *options: object) -> Path:
    logs = write_log(tmp_path / "events.csv", rows)
    preprocess(logs, tmp_path / "out", *options, *KEEP_ALL_ITEMS)
    return tmp_path / "out"


def session_rows(user: str, items: str | Sequence[str], start_ms: int) -> list[tuple[str, str, int]]:
    """One session: the items one minute apart from `start_ms`."""
    return [(user, item, start_ms + k * MINUTE_MS) for k, item in enumerate(items)]


def decoded(out: Path, split: str) -> list[dict]:
    """Rows of a split with raw user and item ids; `session` replaced by that session's raw items."""
    users, items = vocabulary(out, "user"), vocabulary(out, "item")
    sessions = pl.read_parquet(out / "sessions" / "sessions.parquet")
    session_items = {row["session"]: [items[i] for i in row["items"]] for row in sessions.iter_rows(named=True)}
    rows = []
    for row in pl.read_parquet(out / "splits" / f"{split}.parquet").iter_rows(named=True):
        rows.append({
            "user": users[row["user"]],
            "session": session_items[row["session"]],
            "items": [items[i] for i in row["items"]],
            **({"targets": [items[i] for i in row["targets"]]} if "targets" in row else {}),
        })
    return sorted(rows, key=lambda row: (row["user"], row["items"]))


# --- leave-last-out -------------------------------------------------------------------------------

LEAVE_LAST_OUT_LOG = [
    *session_rows("a", "pqr", DAY0),
    *session_rows("a", "st", DAY0 + DAY_MS),  # s opens a session: its input is the whole previous one
    *session_rows("b", "wxyz", DAY0 + HOUR_MS),  # both targets inside one session
]


def test_leave_last_out_cases(tmp_path: Path) -> None:
    out = run(tmp_path, LEAVE_LAST_OUT_LOG, "--split", "leave-last-out")
    assert decoded(out, "test") == [
        {"user": "a", "session": ["s", "t"], "items": ["s"], "targets": ["t"]},
        {"user": "b", "session": list("wxyz"), "items": ["w", "x", "y"], "targets": ["z"]},
    ]
    assert decoded(out, "valid") == [
        {"user": "a", "session": ["p", "q", "r"], "items": ["p", "q", "r"], "targets": ["s"]},
        {"user": "b", "session": list("wxyz"), "items": ["w", "x"], "targets": ["y"]},
    ]
    assert [(row["user"], row["items"]) for row in decoded(out, "train")] == [("a", ["p", "q", "r"]), ("b", ["w", "x"])]


def test_leave_last_out_case_points_at_the_first_target_event(tmp_path: Path) -> None:
    out = run(tmp_path, LEAVE_LAST_OUT_LOG, "--split", "leave-last-out")
    events = pl.read_parquet(out / "sessions" / "events.parquet")
    last_two = events.group_by("user").agg(pl.col("order").sort().tail(2))
    expected = {(user, orders[1]) for user, orders in last_two.iter_rows()}
    test = pl.read_parquet(out / "splits" / "test.parquet")
    assert set(test.select("user", "first_target_order").iter_rows()) == expected


# --- temporal -------------------------------------------------------------------------------------

# The log ends at 23:23 on day 9, so that "the last N days" counts the same whether it is read as
# calendar days or as N x 24 hours before the last event.
TEMPORAL_LOG = [
    *session_rows("a", ["a1", "a2", "a3"], DAY0 + 2 * DAY_MS),
    *session_rows("a", ["a4", "a5"], DAY0 + 5 * DAY_MS),
    *session_rows("a", ["g", "h", "i", "j"], DAY0 + 8 * DAY_MS + 12 * HOUR_MS),  # day 8: validation
    *session_rows("a", ["a", "b", "c", "d", "c", "e", "d", "f"], DAY0 + 9 * DAY_MS + 10 * HOUR_MS),  # day 9: test
    *session_rows("b", ["b1", "b2"], DAY0 + 7 * DAY_MS + 23 * HOUR_MS),  # day 7: training
    *session_rows("b", ["m", "n", "o", "n"], DAY0 + 9 * DAY_MS),  # day 9 from midnight: test
    *session_rows("c", ["c1", "c2", "c3", "c4"], DAY0 + 9 * DAY_MS + 23 * HOUR_MS + 20 * MINUTE_MS),  # test
]


def test_temporal_cases_use_the_first_quarter_as_input(tmp_path: Path) -> None:
    out = run(tmp_path, TEMPORAL_LOG)  # --split temporal is the default
    test = decoded(out, "test")
    assert [(row["user"], row["items"]) for row in test] == [("a", ["a", "b"]), ("b", ["m"]), ("c", ["c1"])]
    assert [sorted(row["targets"]) for row in test] == [["c", "d", "e", "f"], ["n", "o"], ["c2", "c3", "c4"]]
    assert all(len(row["targets"]) == len(set(row["targets"])) for row in test)  # deduplicated
    valid = decoded(out, "valid")
    assert [(row["user"], row["items"], sorted(row["targets"])) for row in valid] == [("a", ["g"], ["h", "i", "j"])]
    train = decoded(out, "train")
    assert [(row["user"], row["items"]) for row in train] == [("a", ["a1", "a2", "a3"]), ("a", ["a4", "a5"]),
                                                                ("b", ["b1", "b2"])]


def test_temporal_test_and_valid_days_options(tmp_path: Path) -> None:
    out = run(tmp_path, TEMPORAL_LOG, "--test-days", "2", "--valid-days", "2")
    # test = days 8 and 9, validation = days 6 and 7, training = before day 6
    assert [row["items"] for row in decoded(out, "test")] == [["a", "b"], ["g"], ["m"], ["c1"]]
    assert [row["items"] for row in decoded(out, "valid")] == [["b1"]]
    assert [row["items"] for row in decoded(out, "train")] == [["a1", "a2", "a3"], ["a4", "a5"]]


def test_temporal_input_fraction_option(tmp_path: Path) -> None:
    out = run(tmp_path, TEMPORAL_LOG, "--input-fraction", "0.5")
    assert [(row["items"], sorted(row["targets"])) for row in decoded(out, "test")] == [
        (["a", "b", "c", "d"], ["c", "d", "e", "f"]), (["m", "n"], ["n", "o"]), (["c1", "c2"], ["c3", "c4"])]


# --- no leakage -----------------------------------------------------------------------------------


def random_log(seed: int) -> list[tuple[str, str, int]]:
    """20 users over about a week: sessions of a few events seconds to minutes apart, hours
    between sessions; rows interleaved by time as a real log is."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(20):
        steps = rng.choice([30 * SECOND_MS, 2 * MINUTE_MS, 3 * HOUR_MS, 14 * HOUR_MS], size=75, p=[0.45, 0.3, 0.15, 0.1])
        times = DAY0 + int(rng.integers(0, DAY_MS)) + np.cumsum(steps)
        rows += [(f"u{user}", f"i{item}", int(time)) for item, time in zip(rng.integers(0, 60, 75), times)]
    return sorted(rows, key=lambda row: row[2])


def events_seen_by_training(out: Path) -> pl.DataFrame:
    """The session events behind every training row: its items (checked to be a prefix of its
    session) and its `next_item` (checked to be the first event of the user's next session), so
    that nothing a training row holds escapes the leakage checks."""
    session_events = pl.read_parquet(out / "sessions" / "events.parquet")
    train = pl.read_parquet(out / "splits" / "train.parquet")
    prefixes = (
        train.select("session", pl.col("items").alias("train_item"),
                     pl.int_ranges(pl.col("items").list.len(), dtype=pl.UInt32).alias("position"))
        .explode("train_item", "position")
    )
    next_items = train.filter(pl.col("next_item") != 0).select(
        pl.col("session") + 1, pl.col("next_item").alias("train_item"), pl.lit(0, pl.UInt32).alias("position"))
    used = pl.concat([prefixes, next_items]).join(session_events, on=["session", "position"], how="left")
    assert (used.get_column("train_item") == used.get_column("item")).all()
    return used


def test_leave_last_out_has_no_leakage(tmp_path: Path) -> None:
    out = run(tmp_path, random_log(seed=11), "--split", "leave-last-out")
    session_events = pl.read_parquet(out / "sessions" / "events.parquet")
    targets = session_events.filter(pl.col("order").rank("ordinal", descending=True).over("user") <= 2)
    used = events_seen_by_training(out)
    assert used.height > 1_000
    assert used.join(targets, on=["user", "order"], how="semi").height == 0
    first_target = targets.group_by("user").agg(pl.col("order").min().alias("first_target"))
    assert used.join(first_target, on="user").filter(pl.col("order") >= pl.col("first_target")).height == 0
    cases = pl.concat([pl.read_parquet(out / "splits" / f"{split}.parquet") for split in ("valid", "test")])
    assert set(cases.select("user", "first_target_order").iter_rows()) <= set(targets.select("user", "order").iter_rows())


def test_temporal_has_no_leakage(tmp_path: Path) -> None:
    out = run(tmp_path, random_log(seed=12), "--test-days", "2", "--valid-days", "2")
    session_events = pl.read_parquet(out / "sessions" / "events.parquet")
    cases = pl.concat([pl.read_parquet(out / "splits" / f"{split}.parquet") for split in ("valid", "test")])
    targets = (
        cases.select("session", pl.col("items").list.len().alias("n_input"))
        .join(session_events, on="session")
        .filter(pl.col("position") >= pl.col("n_input"))
    )
    used = events_seen_by_training(out)
    assert used.height > 300 and targets.height > 30
    assert used.join(targets, on=["user", "order"], how="semi").height == 0
    assert used.get_column("time").max() < targets.get_column("time").min()
    later_than_a_target = used.join(targets.group_by("user").agg(pl.col("order").min().alias("first")), on="user")
    assert later_than_a_target.filter(pl.col("order") >= pl.col("first")).height == 0


@pytest.mark.parametrize("split", ["leave-last-out", "temporal"])
def test_every_case_has_input_and_targets(tmp_path: Path, split: str) -> None:
    out = run(tmp_path, random_log(seed=13), "--split", split, "--test-days", "2", "--valid-days", "2")
    for name in ("valid", "test"):
        cases = pl.read_parquet(out / "splits" / f"{name}.parquet")
        assert cases.height > 0
        assert (cases.get_column("items").list.len() > 0).all()
        assert (cases.get_column("targets").list.len() > 0).all()
