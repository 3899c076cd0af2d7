"""Sessions: a new session starts when the previous event of the user is at least --session-gap
earlier and the session ids do not match, or when the session already holds
--max-session-length items (issue "Polars preprocessing", stage 2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from helpers import reference
from helpers.logs import (
    BASE_MS,
    HOUR_MS,
    KEEP_ALL_ITEMS,
    MINUTE_MS,
    SECOND_MS,
    preprocess,
    sessions_of,
    write_log,
)
from helpers.reference import Event

GAP_MS = 10 * MINUTE_MS


def run(tmp_path: Path, rows: Sequence[Sequence[object]], *options: str,
        header: Sequence[str] = ("user", "item", "time")) -> Path:
    logs = write_log(tmp_path / "events.csv", rows, header=header)
    preprocess(logs, tmp_path / "out", *options, *KEEP_ALL_ITEMS)
    return tmp_path / "out"


@pytest.mark.parametrize(
    ("gap_ms", "expected"),
    [
        (GAP_MS - 1, [["a", "b"]]),
        (GAP_MS, [["a"], ["b"]]),
        (GAP_MS + 1, [["a"], ["b"]]),
    ],
    ids=["just-under", "exactly-at", "just-over"],
)
def test_default_gap_of_ten_minutes(tmp_path: Path, gap_ms: int, expected: list[list[str]]) -> None:
    out = run(tmp_path, [("u1", "a", BASE_MS), ("u1", "b", BASE_MS + gap_ms)])
    assert sessions_of(out, "u1") == expected


@pytest.mark.parametrize(("gap_ms", "expected"), [(5 * MINUTE_MS - 1, [["a", "b"]]), (5 * MINUTE_MS, [["a"], ["b"]])])
def test_session_gap_option(tmp_path: Path, gap_ms: int, expected: list[list[str]]) -> None:
    out = run(tmp_path, [("u1", "a", BASE_MS), ("u1", "b", BASE_MS + gap_ms)], "--session-gap", "5m")
    assert sessions_of(out, "u1") == expected


def test_gap_is_measured_from_the_previous_event_not_the_session_start(tmp_path: Path) -> None:
    rows = [("u1", f"i{k}", BASE_MS + k * 9 * MINUTE_MS) for k in range(4)]  # 27 minutes, 9-minute steps
    assert sessions_of(run(tmp_path, rows), "u1") == [["i0", "i1", "i2", "i3"]]


@pytest.mark.parametrize(("n_events", "lengths"), [(50, [50]), (51, [50, 1]), (101, [50, 50, 1])])
def test_at_most_fifty_items_per_session(tmp_path: Path, n_events: int, lengths: list[int]) -> None:
    items = [f"i{k:03d}" for k in range(n_events)]
    out = run(tmp_path, [("u1", item, BASE_MS + k * SECOND_MS) for k, item in enumerate(items)])
    sessions = sessions_of(out, "u1")
    assert [len(session) for session in sessions] == lengths
    assert [item for session in sessions for item in session] == items


def test_max_session_length_option(tmp_path: Path) -> None:
    out = run(tmp_path, [("u1", f"i{k}", BASE_MS + k * SECOND_MS) for k in range(7)], "--max-session-length", "3")
    assert sessions_of(out, "u1") == [["i0", "i1", "i2"], ["i3", "i4", "i5"], ["i6"]]


SESSION_HEADER = ("user", "item", "time", "session_id")


@pytest.mark.parametrize(
    ("ids", "gap_ms", "expected"),
    [
        (("s1", "s2"), MINUTE_MS, [["a", "b"]]),  # ids change inside the gap: the short gap keeps them
        (("s1", "s1"), 2 * HOUR_MS, [["a", "b"]]),  # same id across a long gap: the id keeps them
        (("s1", "s2"), 2 * HOUR_MS, [["a"], ["b"]]),  # neither holds
        ((None, None), 2 * HOUR_MS, [["a"], ["b"]]),  # no ids: the gap alone decides
    ],
    ids=["id-changes-inside-gap", "id-shared-across-long-gap", "id-changes-across-long-gap", "no-ids"],
)
def test_session_ids(tmp_path: Path, ids: tuple, gap_ms: int, expected: list[list[str]]) -> None:
    rows = [("u1", "a", BASE_MS, ids[0]), ("u1", "b", BASE_MS + gap_ms, ids[1])]
    assert sessions_of(run(tmp_path, rows, header=SESSION_HEADER), "u1") == expected


def test_shared_session_id_still_capped_at_max_length(tmp_path: Path) -> None:
    rows = [("u1", f"i{k}", BASE_MS + k * HOUR_MS, "s1") for k in range(5)]
    out = run(tmp_path, rows, "--max-session-length", "2", header=SESSION_HEADER)
    assert sessions_of(out, "u1") == [["i0", "i1"], ["i2", "i3"], ["i4"]]


def test_unsorted_input_is_sorted_by_time(tmp_path: Path) -> None:
    timeline = [("a", 0), ("b", MINUTE_MS), ("c", 2 * MINUTE_MS), ("d", HOUR_MS), ("e", HOUR_MS + MINUTE_MS)]
    shuffled = [timeline[k] for k in (3, 0, 4, 2, 1)]
    out = run(tmp_path, [("u1", item, BASE_MS + offset) for item, offset in shuffled])
    assert sessions_of(out, "u1") == [["a", "b", "c"], ["d", "e"]]
    sessions = pl.read_parquet(out / "sessions" / "sessions.parquet")
    assert sessions.get_column("start").to_list() == [BASE_MS, BASE_MS + HOUR_MS]
    assert sessions.get_column("end").to_list() == [BASE_MS + 2 * MINUTE_MS, BASE_MS + HOUR_MS + MINUTE_MS]


@pytest.mark.parametrize("input_order", [("c", "a", "b"), ("b", "c", "a")])
def test_ties_in_time_keep_input_order(tmp_path: Path, input_order: tuple[str, ...]) -> None:
    rows = [("u2", "z", BASE_MS)] + [("u1", item, BASE_MS + MINUTE_MS) for item in input_order]
    rows.insert(0, ("u1", "first", BASE_MS))
    assert sessions_of(run(tmp_path, rows), "u1") == [["first", *input_order]]


def test_user_with_one_event(tmp_path: Path) -> None:
    rows = [("lonely", "a", BASE_MS), ("u1", "a", BASE_MS), ("u1", "b", BASE_MS + HOUR_MS)]
    out = run(tmp_path, rows)
    assert sessions_of(out, "lonely") == [["a"]]
    assert sessions_of(out, "u1") == [["a"], ["b"]]


def test_interleaved_users_are_sessionised_separately(tmp_path: Path) -> None:
    # u1 and u2 alternate every 30 s; u1 pauses for an hour in the middle, u2 does not.
    u1 = [("u1", f"p{k}", BASE_MS + k * MINUTE_MS) for k in range(3)]
    u1 += [("u1", f"q{k}", BASE_MS + HOUR_MS + k * MINUTE_MS) for k in range(2)]
    u2 = [("u2", f"r{k}", BASE_MS + 30 * SECOND_MS + k * 9 * MINUTE_MS) for k in range(8)]
    rows = sorted(u1 + u2, key=lambda row: row[2])
    out = run(tmp_path, rows)
    assert sessions_of(out, "u1") == [["p0", "p1", "p2"], ["q0", "q1"]]
    assert sessions_of(out, "u2") == [[f"r{k}" for k in range(8)]]


def test_sessions_match_a_plain_reference_on_a_random_log(tmp_path: Path) -> None:
    """Many users, random gaps around the threshold, random session ids and ties: the sessions
    equal those of a straightforward per-user loop written from the rule in the issue."""
    rng = np.random.default_rng(7)
    n = 600
    users = rng.integers(0, 12, n)
    steps = rng.choice([0, SECOND_MS, GAP_MS - 1, GAP_MS, GAP_MS + 1, HOUR_MS], size=n)
    times = BASE_MS + np.cumsum(steps)
    session_ids = rng.choice(["", "s1", "s2"], size=n)
    rows = [(f"u{u}", f"i{k}", int(t), s or None) for k, (u, t, s) in enumerate(zip(users, times, session_ids))]
    permutation = rng.permutation(n)
    out = run(tmp_path, [rows[k] for k in permutation], "--max-session-length", "4", header=SESSION_HEADER)

    shuffled = [Event(*rows[k], row=position) for position, k in enumerate(permutation)]
    for user, timeline in reference.timelines(shuffled).items():
        expected = [[event.item for event in session] for session in reference.sessions(timeline, GAP_MS, 4)]
        assert sessions_of(out, user) == expected, user
