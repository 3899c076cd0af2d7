"""Long-term sets: for each session, the distinct values of each feature on the user's events in
earlier sessions no older than --long-window before the session start, most recent first, at most
--max-long (issue "Polars preprocessing", stage 3)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import reference
from helpers.logs import (
    BASE_MS,
    DAY_MS,
    HOUR_MS,
    KEEP_ALL_ITEMS,
    MINUTE_MS,
    SECOND_MS,
    inspect_user,
    preprocess,
    stats,
    vocabulary,
    write_log,
)
from helpers.reference import Event

WEEK_MS = 7 * DAY_MS
SIDE = ("leaf", "category", "shop", "brand")


def run(tmp_path: Path, rows: Sequence[Sequence[object]], *options: object,
        header: Sequence[str] = ("user", "item", "time")) -> Path:
    logs = write_log(tmp_path / "events.csv", rows, header=header)
    preprocess(logs, tmp_path / "out", *options, *KEEP_ALL_ITEMS)
    return tmp_path / "out"


def long_term(out: Path, user: str, feature: str = "item") -> list[list[str]]:
    """The user's long-term set of `feature` for each session, in session order."""
    return [session["long_term"][feature] for session in inspect_user(out, user)["sessions"]]


def last_session_long_term(out: Path, user: str, feature: str = "item") -> list[str]:
    return long_term(out, user, feature)[-1]


# --- the window -----------------------------------------------------------------------------------

START = BASE_MS + 30 * DAY_MS  # the start of the session whose long-term set is checked


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        ([("exactly", START - WEEK_MS)], ["exactly"]),
        ([("too-old", START - WEEK_MS - SECOND_MS)], []),
        # both in one earlier session: the window cuts inside it
        ([("too-old", START - WEEK_MS - SECOND_MS), ("exactly", START - WEEK_MS)], ["exactly"]),
    ],
    ids=["exactly-7d-before", "7d-and-1s-before", "window-cuts-a-session"],
)
def test_default_window_of_seven_days(tmp_path: Path, history: list[tuple[str, int]], expected: list[str]) -> None:
    rows = [("u1", item, time) for item, time in history] + [("u1", "now", START)]
    assert last_session_long_term(run(tmp_path, rows), "u1") == expected


@pytest.mark.parametrize(("age_ms", "included"), [(DAY_MS, True), (DAY_MS + SECOND_MS, False)])
def test_long_window_option(tmp_path: Path, age_ms: int, included: bool) -> None:
    rows = [("u1", "old", START - age_ms), ("u1", "now", START)]
    out = run(tmp_path, rows, "--long-window", "1d")
    assert last_session_long_term(out, "u1") == (["old"] if included else [])


def test_long_window_none_is_unlimited(tmp_path: Path) -> None:
    rows = [("u1", "ancient", START - 400 * DAY_MS), ("u1", "recent", START - HOUR_MS), ("u1", "now", START)]
    (tmp_path / "unlimited").mkdir()
    unlimited = run(tmp_path / "unlimited", rows, "--long-window", "none")
    assert last_session_long_term(unlimited, "u1") == ["recent", "ancient"]
    assert last_session_long_term(run(tmp_path, rows), "u1") == ["recent"]  # the 7-day default


def test_never_overlaps_the_session_itself(tmp_path: Path) -> None:
    rows = [("u1", item, BASE_MS + k * MINUTE_MS) for k, item in enumerate("abc")]
    rows += [("u1", item, BASE_MS + HOUR_MS + k * MINUTE_MS) for k, item in enumerate("da")]
    out = run(tmp_path, rows)
    assert long_term(out, "u1") == [[], ["c", "b", "a"]]  # "d" belongs to the session itself


def test_only_the_users_own_history(tmp_path: Path) -> None:
    rows = [("u2", "theirs", BASE_MS), ("u1", "mine", BASE_MS + MINUTE_MS), ("u1", "now", BASE_MS + HOUR_MS),
            ("u2", "later", BASE_MS + HOUR_MS)]
    out = run(tmp_path, rows)
    assert long_term(out, "u1") == [[], ["mine"]]
    assert long_term(out, "u2") == [[], ["theirs"]]


def test_sessions_split_by_the_length_cap_are_earlier_sessions(tmp_path: Path) -> None:
    rows = [("u1", f"i{k}", BASE_MS + k * SECOND_MS) for k in range(5)]
    out = run(tmp_path, rows, "--max-session-length", "2")
    assert long_term(out, "u1") == [[], ["i1", "i0"], ["i3", "i2", "i1", "i0"]]


# --- order, distinctness and the cap --------------------------------------------------------------


def test_distinct_values_most_recent_first(tmp_path: Path) -> None:
    first = [("u1", item, BASE_MS + k * MINUTE_MS) for k, item in enumerate("aba")]
    second = [("u1", item, BASE_MS + HOUR_MS + k * MINUTE_MS) for k, item in enumerate("cb")]
    out = run(tmp_path, [*first, *second, ("u1", "now", BASE_MS + 2 * HOUR_MS)])
    assert last_session_long_term(out, "u1") == ["b", "c", "a"]


def test_ties_in_time_most_recent_is_the_later_input_row(tmp_path: Path) -> None:
    rows = [("u1", item, BASE_MS) for item in "xyz"] + [("u1", "now", BASE_MS + HOUR_MS)]
    assert last_session_long_term(run(tmp_path, rows), "u1") == ["z", "y", "x"]


@pytest.mark.parametrize(
    ("max_long", "expected"),
    [(2, ["e", "d"]), (4, ["e", "d", "b", "a"]), (20, ["e", "d", "b", "a", "c"])],
)
def test_max_long_keeps_the_most_recent(tmp_path: Path, max_long: int, expected: list[str]) -> None:
    # last occurrences, most recent first: e, d, b (second session), then a, c (first session)
    first = [("u1", item, BASE_MS + k * MINUTE_MS) for k, item in enumerate("abca")]
    second = [("u1", item, BASE_MS + HOUR_MS + k * MINUTE_MS) for k, item in enumerate("bde")]
    out = run(tmp_path, [*first, *second, ("u1", "now", BASE_MS + 2 * HOUR_MS)], "--max-long", max_long)
    assert last_session_long_term(out, "u1") == expected


def test_default_cap_is_twenty(tmp_path: Path) -> None:
    history = [("u1", f"i{k:02d}", BASE_MS + k * SECOND_MS) for k in range(25)]
    out = run(tmp_path, [*history, ("u1", "now", BASE_MS + HOUR_MS)])
    assert last_session_long_term(out, "u1") == [f"i{k:02d}" for k in range(24, 4, -1)]


def test_random_log_matches_a_plain_reference(tmp_path: Path) -> None:
    """Sessions of random lengths and gaps (some straddling the window edge, items repeating):
    every long-term item set equals the rule applied literally to the user's earlier sessions."""
    rng = np.random.default_rng(3)
    n = 500
    users = rng.integers(0, 6, n)
    steps = rng.choice([SECOND_MS, MINUTE_MS, 6 * HOUR_MS, DAY_MS, 2 * DAY_MS], size=n, p=[0.3, 0.3, 0.2, 0.1, 0.1])
    times = BASE_MS + np.cumsum(steps)
    items = rng.integers(0, 25, n)
    rows = [(f"u{u}", f"i{i}", int(t)) for u, i, t in zip(users, items, times)]
    max_long, window = 5, 3 * DAY_MS
    out = run(tmp_path, rows, "--max-long", max_long, "--long-window", "3d")

    for user in sorted({row[0] for row in rows}):
        sessions = inspect_user(out, user)["sessions"]
        events = [Event(*row) for row in rows if row[0] == user]  # already in time order, times distinct
        boundaries = np.cumsum([0, *(len(session["items"]) for session in sessions)])
        cut = [events[boundaries[index] : boundaries[index + 1]] for index in range(len(sessions))]
        expected = reference.long_term_sets(cut, None, window, max_long)
        assert [session["long_term"]["item"] for session in sessions] == expected, user


# --- side features --------------------------------------------------------------------------------

ITEM_SIDE = {  # item -> leaf, category, shop, brand
    "a": ("leafA", "cat1", "shopA", "brandA"),
    "b": ("leafB", "cat1", "shopB", "brandB"),
    "now": ("leafN", "cat2", "shopN", "brandN"),
}
HISTORY = [("u1", "a", BASE_MS), ("u1", "b", BASE_MS + MINUTE_MS), ("u1", "now", BASE_MS + HOUR_MS)]
EXPECTED_SIDE = {"item": ["b", "a"], "leaf": ["leafB", "leafA"], "category": ["cat1"],
                 "shop": ["shopB", "shopA"], "brand": ["brandB", "brandA"]}


def write_items(path: Path, rows: Sequence[Sequence[object]],
                header: Sequence[str] = ("item_id", "leaf_category", "category", "shop_id", "brand")) -> Path:
    return write_log(path, rows, header=header)


def test_side_features_from_an_items_file(tmp_path: Path) -> None:
    items = write_items(tmp_path / "items.csv", [(item, *side) for item, side in ITEM_SIDE.items()])
    out = run(tmp_path, HISTORY, "--items", items)
    assert inspect_user(out, "u1")["sessions"][-1]["long_term"] == EXPECTED_SIDE


def test_side_features_from_event_columns(tmp_path: Path) -> None:
    rows = [(user, item, time, *ITEM_SIDE[item]) for user, item, time in HISTORY]
    out = run(tmp_path, rows, header=("user", "item", "time", "leaf", "cate", "seller_id", "brand_id"))
    assert inspect_user(out, "u1")["sessions"][-1]["long_term"] == EXPECTED_SIDE


def test_features_the_input_lacks_are_empty_lists(tmp_path: Path) -> None:
    out = run(tmp_path, HISTORY)
    assert inspect_user(out, "u1")["sessions"][-1]["long_term"] == {
        "item": ["b", "a"], "leaf": [], "category": [], "shop": [], "brand": []}


def test_item_absent_from_items_file_has_no_side_values(tmp_path: Path) -> None:
    rows = [*HISTORY[:2], ("u1", "ghost", BASE_MS + 2 * MINUTE_MS), HISTORY[2]]
    items = write_items(tmp_path / "items.csv", [(item, *side) for item, side in ITEM_SIDE.items()])
    logs = write_log(tmp_path / "events.csv", rows)
    outcome = preprocess(logs, tmp_path / "out", "--items", items, *KEEP_ALL_ITEMS)
    out = tmp_path / "out"
    assert inspect_user(out, "u1")["sessions"][-1]["long_term"] == {**EXPECTED_SIDE, "item": ["ghost", "b", "a"]}

    ghost = {raw: id_ for id_, raw in vocabulary(out, "item").items()}["ghost"]
    side_ids = pl.read_parquet(out / "events" / "items.parquet").filter(pl.col("item") == ghost)
    assert side_ids.select(SIDE).row(0) == (0, 0, 0, 0)
    assert stats(out)["items_missing_from_items_file"] == 1
    summary_line = next(line for line in outcome.stdout.splitlines() if "missing" in line)
    assert re.search(r"\b1\b", summary_line)


def test_conflicting_side_values_resolve_to_the_most_frequent(tmp_path: Path) -> None:
    rows = [("u1", "a", BASE_MS + k * SECOND_MS, brand) for k, brand in enumerate(["rare", "common", "common"])]
    rows += [("u1", "now", BASE_MS + HOUR_MS, "other")]
    out = run(tmp_path, rows, header=("user", "item", "time", "brand"))
    assert last_session_long_term(out, "u1", "brand") == ["common"]
    assert stats(out)["item_conflicts_brand"] == 1


def test_conflicting_rows_of_an_items_file_resolve_to_the_most_frequent(tmp_path: Path) -> None:
    items = write_items(tmp_path / "items.csv", [
        ("a", "leafA", "cat1", "shopA", "brandA"),
        ("a", "leafA", "cat1", "shopZ", "brandA"),
        ("a", "leafA", "cat1", "shopZ", "brandA"),
        ("b", "leafB", "cat1", "shopB", "brandB"),
        ("now", "leafN", "cat2", "shopN", "brandN"),
    ])
    out = run(tmp_path, HISTORY, "--items", items)
    assert last_session_long_term(out, "u1", "shop") == ["shopB", "shopZ"]
    assert stats(out)["item_conflicts_shop"] == 1
    assert stats(out)["item_conflicts_brand"] == 0


@pytest.mark.parametrize("events_per_chunk", [1, 37, 500])
def test_building_in_user_chunks_changes_nothing(tmp_path: Path, events_per_chunk: int) -> None:
    # Large logs are built a few million events at a time; small chunks must give the same sets
    # as one chunk, so users are never split and each chunk is complete on its own.
    from pipeline.long_term import build_long_term, user_aligned_chunks
    from pipeline.synth import SynthConfig, write_synth

    raw = write_synth(SynthConfig(n_events=3_000, seed=3), tmp_path / "raw")
    out = tmp_path / "out"
    preprocess(raw["events"], out, "--items", raw["items"], "--users", raw["users"], "--min-item-count", "1")
    session_events = pl.read_parquet(out / "sessions" / "events.parquet")
    sessions = pl.read_parquet(out / "sessions" / "sessions.parquet")
    items = pl.read_parquet(out / "events" / "items.parquet")
    features = ["leaf", "category", "shop", "brand"]
    chunks = user_aligned_chunks(sessions, events_per_chunk)
    assert len(chunks) > 1
    starts_of_users = set(sessions.group_by("user").agg(pl.col("session").min()).get_column("session").to_list())
    assert {first for first, _ in chunks} <= starts_of_users
    chunked = build_long_term(session_events, sessions, items, features, WEEK_MS, 20, events_per_chunk)
    assert chunked.equals(pl.read_parquet(out / "long_term" / "long_term.parquet"))


# --- the vectorised formulation against the rule, on random logs ---------------------------------

SIDE_POOLS = {"leaf": 6, "category": 3, "shop": 8, "brand": 2}  # distinct values, 0 = none


@st.composite
def user_histories(draw: st.DrawFn) -> tuple[list[list[list[tuple[int, int]]]], dict[int, tuple[int, ...]]]:
    """Per user, sessions of (item, time) in time order (ties included, gaps around the windows
    below), and each item's side values (0: none)."""
    step = st.sampled_from([0, SECOND_MS, HOUR_MS, DAY_MS, 3 * DAY_MS])
    users = []
    for _ in range(draw(st.integers(1, 4))):
        time, sessions = BASE_MS, []
        for _ in range(draw(st.integers(1, 8))):
            session = []
            for _ in range(draw(st.integers(1, 6))):
                time += draw(step)
                session.append((draw(st.integers(1, 12)), time))
            sessions.append(session)
        users.append(sessions)
    side = st.tuples(*(st.integers(0, size) for size in SIDE_POOLS.values()))
    return users, {item: draw(side) for item in range(1, 13)}


def frames(users: list[list[list[tuple[int, int]]]], side: dict[int, tuple[int, ...]]) -> tuple[pl.DataFrame, ...]:
    """(session events, sessions, items) as the sessions stage writes them."""
    events, sessions = [], []
    for user, user_sessions in enumerate(users, start=1):
        for session in user_sessions:
            number = len(sessions)
            events += [(user, item, time, number) for item, time in session]
            sessions.append((number, user, session[0][1], session[-1][1], len(session)))
    schema = {"user": pl.UInt32, "item": pl.UInt32, "time": pl.Int64, "session": pl.UInt32}
    session_schema = {"session": pl.UInt32, "user": pl.UInt32, "start": pl.Int64, "end": pl.Int64, "length": pl.UInt32}
    items = pl.DataFrame([(item, *values) for item, values in side.items()], schema={"item": pl.UInt32, **dict.fromkeys(SIDE_POOLS, pl.UInt32)}, orient="row")
    return pl.DataFrame(events, schema=schema, orient="row"), pl.DataFrame(sessions, schema=session_schema, orient="row"), items


@pytest.mark.parametrize("dense_share", [0.0, 2.0], ids=["side-features-in-item-runs", "side-features-in-own-runs"])
@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    log=user_histories(),
    window=st.sampled_from([None, HOUR_MS, DAY_MS, WEEK_MS]),
    max_long=st.integers(1, 5),
    events_per_chunk=st.sampled_from([1, 7, 1_000]),
)
def test_vectorised_sets_match_the_rule_on_random_logs(
    dense_share: float, log: tuple, window: int | None, max_long: int, events_per_chunk: int
) -> None:
    """build_long_term itself (no CLI) on random histories: every feature's set of every session
    equals the rule applied literally, whether a side feature shares the item records' runs or
    has runs of its own, in one chunk or many, with runs read shallow (max_long is small) or whole."""
    from pipeline import long_term

    users, side = log
    events, sessions, items = frames(users, side)
    with mock.patch.object(long_term, "DENSE_SHARE", dense_share):
        built = long_term.build_long_term(events, sessions, items, list(SIDE_POOLS), window, max_long, events_per_chunk)
    assert built.get_column("session").to_list() == sessions.get_column("session").to_list()
    for feature_index, feature in enumerate(["item", *SIDE_POOLS]):
        expected = []
        for user, user_sessions in enumerate(users, start=1):
            cut = [[Event(str(user), str(item), time) for item, time in session] for session in user_sessions]
            values = None if feature == "item" else {
                str(item): str(codes[feature_index - 1]) for item, codes in side.items() if codes[feature_index - 1] != 0
            }
            expected += reference.long_term_sets(cut, values, window, max_long)
        got = [[str(value) for value in values] for values in built.get_column(f"long_{feature}").to_list()]
        assert got == expected, feature
