"""The preprocess summary says when the paper's session and long-term rules do not fit a log."""

from __future__ import annotations

import json

from helpers.cli import run_sdm_ok
from helpers.logs import BASE_MS, DAY_MS, KEEP_ALL_ITEMS, MINUTE_MS, SECOND_MS, preprocess, stats, write_log

RATING_FLAGS = "--max-session-length 5 --long-window none --max-long 50"


def test_a_day_resolution_log_is_reported_with_the_flags_that_fit(tmp_path):
    # One event a day per user, at midnight: every session holds one item, and with events 10 days
    # apart no session has anything in the 7 days before it.
    rows = [(user, f"i{(user * 7 + day) % 13}", BASE_MS - BASE_MS % DAY_MS + day * 10 * DAY_MS) for user in range(30) for day in range(6)]
    out = tmp_path / "data"
    outcome = preprocess(write_log(tmp_path / "log.csv", rows), out, *KEEP_ALL_ITEMS)
    assert stats(out, "sessions")["single_item_share"] == 1.0
    assert stats(out, "sessions")["time_resolution"] == "day"
    assert stats(out, "long_term")["empty_long_term_share"] == 1.0
    warning = next(line for line in outcome.stderr.splitlines() if "warning" in line)
    assert "day resolution" in warning and "100% of sessions hold one item" in warning and RATING_FLAGS in outcome.stderr
    # One-item sessions have no input to hold out from: the temporal split is left with no case at all.
    assert "no test cases: there is nothing to measure on" in outcome.stderr
    assert RATING_FLAGS in run_sdm_ok("info", out).stderr  # sdm info repeats it
    described = json.loads(run_sdm_ok("info", out, "--json").stdout)
    assert described["sessions"]["single_item_share"] == 1.0
    assert any(RATING_FLAGS in line for line in described["warnings"])


def test_a_click_stream_gets_no_fit_warning(tmp_path):
    # Sessions of 4 clicks a minute apart, a day apart: long-term sets filled, times in milliseconds.
    rows = [(user, f"i{(user + day + click) % 11}", BASE_MS + day * DAY_MS + click * MINUTE_MS + user * 7 + 1)
            for user in range(30) for day in range(5) for click in range(4)]
    out = tmp_path / "data"
    outcome = preprocess(write_log(tmp_path / "log.csv", rows), out, *KEEP_ALL_ITEMS, "--split", "leave-last-out")
    sessions = stats(out, "sessions")
    assert sessions["single_item_share"] == 0.0 and sessions["time_resolution"] == "millisecond"
    assert stats(out, "long_term")["empty_long_term_share"] == 1 / 5  # each user's first session
    assert RATING_FLAGS not in outcome.stderr
    # 30 validation and test cases are too few to measure: said once each.
    assert sum("only 30 valid cases" in line for line in outcome.stderr.splitlines()) == 1


def click_stream_rows() -> list[tuple]:
    return [(user, f"i{(user + day + click) % 11}", BASE_MS + day * DAY_MS + click * MINUTE_MS + user * 7 + 1, (user + click) % 5 + 1)
            for user in range(30) for day in range(5) for click in range(4)]


def test_a_rating_column_marks_a_rating_log_until_the_suggested_flags_are_given(tmp_path):
    # Sittings that pass the share tests (no single-item sessions, few empty long-term sets) but
    # carry a rating and no session or behaviour column, as MovieLens does.
    log = write_log(tmp_path / "ratings.csv", click_stream_rows(), header=("userId", "movieId", "timestamp", "rating"))
    outcome = preprocess(log, tmp_path / "data", *KEEP_ALL_ITEMS, "--split", "leave-last-out")
    assert stats(tmp_path / "data", "events")["rating_column"] == "rating"
    warning = next(line for line in outcome.stderr.splitlines() if RATING_FLAGS in line)
    assert "a rating column ('rating')" in warning
    followed = preprocess(log, tmp_path / "suggested", *KEEP_ALL_ITEMS, "--split", "leave-last-out", *RATING_FLAGS.split())
    assert RATING_FLAGS not in followed.stderr  # the rules have been chosen: no advice repeated
    assert stats(tmp_path / "suggested", "sessions")["max_session_length"] == 5
    assert stats(tmp_path / "suggested", "long_term")["window_days"] == "none"


def test_a_rating_next_to_a_behaviour_column_is_not_a_rating_log(tmp_path):
    rows = [(*row, "click") for row in click_stream_rows()]
    log = write_log(tmp_path / "log.csv", rows, header=("user", "item", "time", "rating", "event_type"))
    outcome = preprocess(log, tmp_path / "data", *KEEP_ALL_ITEMS, "--split", "leave-last-out")
    assert stats(tmp_path / "data", "events")["rating_column"] is None
    assert RATING_FLAGS not in outcome.stderr


def test_resolution_is_the_coarsest_unit_nearly_every_time_is_a_multiple_of(tmp_path):
    rows = [(user, f"i{event % 5}", BASE_MS - BASE_MS % MINUTE_MS + (user * 50 + event) * SECOND_MS * 3) for user in range(4) for event in range(50)]
    out = tmp_path / "data"
    preprocess(write_log(tmp_path / "log.csv", rows), out, *KEEP_ALL_ITEMS)
    assert stats(out, "sessions")["time_resolution"] == "second"
    assert json.loads((out / "sessions" / "manifest.json").read_text())["stats"]["time_resolution"] == "second"


def test_integer_dates_read_as_unix_times_are_pointed_at_time_format(tmp_path):
    # MMDD stamps (Tmall's time_stamp) parse as unix seconds on 1 January 1970.
    rows = [(user, f"i{(user + day) % 7}", 800 + day) for user in range(10) for day in range(1, 29)]
    outcome = preprocess(write_log(tmp_path / "log.csv", rows), tmp_path / "data", *KEEP_ALL_ITEMS, "--split", "leave-last-out")
    warning = next(line for line in outcome.stderr.splitlines() if "1970" in line)
    assert "--time-format '%m%d'" in warning
    assert RATING_FLAGS not in outcome.stderr  # nothing measured on such times is advice
    parsed = preprocess(write_log(tmp_path / "log.csv", rows), tmp_path / "dated", *KEEP_ALL_ITEMS, "--split", "leave-last-out",
                        "--time-format", "%m%d")
    assert "1970" not in parsed.stderr
    assert stats(tmp_path / "dated", "sessions")["time_resolution"] == "day"


def test_a_log_without_repeats_is_told_to_exclude_seen_items(tmp_path):
    # Every user rates each film once (a rating log); the click stream above returns to its 11 items.
    rows = [(user, f"film{(user * 3 + k) % 40}", BASE_MS + k * DAY_MS, 4) for user in range(30) for k in range(6)]
    ratings = preprocess(write_log(tmp_path / "ratings.csv", rows, header=("user", "item", "time", "rating")),
                         tmp_path / "ratings", *KEEP_ALL_ITEMS, "--split", "leave-last-out")
    assert stats(tmp_path / "ratings", "sessions")["repeat_share"] == 0.0
    assert "users never return to an item here" in ratings.stderr and "--include-seen" in ratings.stderr
    clicks = preprocess(write_log(tmp_path / "clicks.csv", [row[:3] for row in click_stream_rows()]), tmp_path / "clicks", *KEEP_ALL_ITEMS)
    assert stats(tmp_path / "clicks", "sessions")["repeat_share"] > 0.5
    assert "never return" not in clicks.stderr
