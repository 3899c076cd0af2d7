"""What the summary says about how well the paper's session and long-term rules fit a log.

The 10-minute gap and the 7-day window suit click streams. On rating or review logs (times at day
resolution, a user's events weeks apart) they give single-item sessions and empty long-term sets,
and SDM degrades to a popularity model of one item. The counts are taken while the stages are
built (`session_measures`, `empty_long_term_sessions`); `warnings` turns the summary into advice.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from pipeline.config import PreprocessConfig

# Coarsest first: a log's resolution is the first unit that nearly every time is a multiple of.
TIME_UNITS_MS = {"day": 86_400_000, "hour": 3_600_000, "minute": 60_000, "second": 1_000, "millisecond": 1}
ON_UNIT_SHARE = 0.99
DEGENERATE_SHARE = 0.5
NO_REPEATS_SHARE = 0.001  # below it, a log's users never come back to an item (ratings, reviews)
FEW_CASES = 200
SHORT_LOG_MS = 7 * 86_400_000  # shorter than the default long-term window
# Integer times read as unix seconds that all fall in 1970 are almost surely something else:
# Tmall's `time_stamp` is MMDD (829 = Aug 29), which reads as 00:13:49 on 1 January 1970.
YEAR_1971_MS = 365 * 86_400_000
# The public SDM's configuration for MovieLens (DeepMatch's SDM example): a short-term session of
# at most 5 items and a long-term set of the 50 items before it, whatever their age.
RATING_LOG_FLAGS = "--max-session-length 5 --long-window none --max-long 50"
# A log with one of these columns and neither a session nor a behaviour column is taken for a
# rating log: MovieLens 100K's sittings pass the share tests above (15% single-item sessions, 38%
# empty long-term sets), yet the flags help SDM there (test HR@50 0.356 -> 0.419).
RATING_NAMES = ("rating", "ratings", "score", "stars", "starrating", "reviewscore", "overall")


def session_measures(session_events: pl.DataFrame, sessions: pl.DataFrame) -> dict[str, int]:
    """Counts summed over buckets (a bucket holds whole users): single-item sessions, events whose
    time is a whole unit, and events whose item its user already had."""
    on_units = session_events.select(
        (pl.col("time") % unit_ms == 0).sum().alias(f"times_on_{unit}") for unit, unit_ms in TIME_UNITS_MS.items()
    )
    return {
        "single_item_sessions": int((sessions.get_column("length") == 1).sum()),
        **{name: int(value) for name, value in on_units.row(0, named=True).items()},
        "repeat_events": session_events.height - session_events.select(user_item_pair().n_unique()).item(),
    }


def user_item_pair() -> pl.Expr:
    """(user, item) as one UInt64 (both ids are UInt32): counting distinct pairs is ten times
    faster on it than on a struct."""
    return pl.col("user").cast(pl.UInt64) * 2**32 + pl.col("item").cast(pl.UInt64)


def time_resolution(times_on_unit: dict[str, int], n_events: int) -> str:
    for unit in TIME_UNITS_MS:
        if times_on_unit[f"times_on_{unit}"] >= ON_UNIT_SHARE * n_events:
            return unit
    return "millisecond"


def empty_long_term_sessions(long_term: pl.DataFrame) -> int:
    return int((long_term.get_column("long_item").list.len() == 0).sum())


def warnings(summary: dict[str, dict[str, Any]]) -> list[str]:
    """One line per degenerate measure of a preprocess summary, with the flags that would fit."""
    events, sessions, long_term, splits = (summary.get(stage, {}) for stage in ("events", "sessions", "long_term", "splits"))
    lines = []
    single = sessions.get("single_item_share", 0.0)
    empty = long_term.get("empty_long_term_share", 0.0)
    resolution = sessions.get("time_resolution")
    span_ms = events.get("time_max_ms", 0) - events.get("time_min_ms", 0)
    if events.get("time_max_ms", YEAR_1971_MS) < YEAR_1971_MS:
        lines.append("every time falls in 1970 when read as a unix time: if the time column holds dates such as "
                     "MMDD (829 = Aug 29), rerun with --time-format, e.g. --time-format '%m%d'")
        return lines  # sessions, windows and splits computed from such times say nothing
    from_sessions = events.get("users_from_sessions", 0)
    if from_sessions and events.get("user_column") is None:
        # No window can help either: every user has exactly one session.
        lines.append("no user column: each session is its own user, so there are no long-term sets and SDM reads "
                     "the session alone; if the log has users, name their column with --column user=NAME")
        empty = 0.0
    elif from_sessions:
        lines.append(f"{from_sessions:,} events ({from_sessions / max(events.get('rows_read', 1), 1):.0%} of the rows) have no "
                     f"{events['user_column']!r}: each is taken as the user of its session, with no long-term sets")
    if empty > DEGENERATE_SHARE and span_ms < SHORT_LOG_MS:
        # No window can help: most users have no earlier session at all in so short a log.
        lines.append(f"{empty:.0%} of sessions have no earlier session of their user (the log spans "
                     f"{span_ms / 3_600_000:.1f} hours): the long-term part has little to read here")
        empty = 0.0
    # The advice is for the paper's rules; a user who has changed them has already chosen.
    paper_window_days = PreprocessConfig.long_window_ms / 86_400_000
    paper_rules = (sessions.get("max_session_length", PreprocessConfig.max_session_length) == PreprocessConfig.max_session_length
                   and long_term.get("window_days", paper_window_days) == paper_window_days)
    rating = events.get("rating_column")
    if paper_rules and (single > DEGENERATE_SHARE or empty > DEGENERATE_SHARE or resolution == "day" or rating):
        facts = [f"a rating column ({rating!r}) and no session or behaviour column"] if rating else []
        facts += [f"times at {resolution} resolution"] if resolution in ("day", "hour") else []
        facts += [f"{single:.0%} of sessions hold one item"] if single > DEGENERATE_SHARE else []
        facts += [f"{empty:.0%} have empty long-term sets"] if empty > DEGENERATE_SHARE else []
        lines.append(f"{', '.join(facts)}: the 10-minute sessions and 7-day window do not fit this log; "
                     f"for rating or review logs try `{RATING_LOG_FLAGS}`")
    repeats = sessions.get("repeat_share")
    if repeats is not None and repeats < NO_REPEATS_SHARE:
        lines.append(f"users never return to an item here ({repeats:.2%} of events repeat one): sdm train, evaluate, "
                     "recommend and serve will rank without each user's seen items (--include-seen to rank them)")
    for name in ("valid_cases", "test_cases"):
        cases = splits.get(name)
        advice = "try `--split leave-last-out` or more --valid-days/--test-days"
        if cases == 0:
            lines.append(f"no {name.replace('_', ' ')}: there is nothing to measure on; {advice}")
        elif cases is not None and cases < FEW_CASES:
            lines.append(f"only {cases} {name.replace('_', ' ')}: metrics will be noisy (a hit rate's standard error is "
                         f"about {0.5 / cases ** 0.5:.2f}); {advice}")
    return lines
