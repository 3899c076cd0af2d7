"""Stage 3, long-term sets: what each user did in the `long_window` before a session (paper §3.1).

For session s of a user and each feature f (item, leaf, category, shop, brand), L_f(s) holds the
distinct non-null values of f on the user's events in EARLIER sessions whose time is at least
start(s) - long_window, most recent first, at most `max_long` of them.

Building it without materialising every (session, event in its window) pair:
1. each session is reduced to its `max_long` most recent distinct values per feature. A value
   that is not among the `max_long` most recent of its own session cannot be among the `max_long`
   most recent of any later window either: the window cuts only the oldest end, so the values
   more recent than it are in every window it is in;
2. each session is paired with the earlier sessions of its user that end inside its window (a
   sessions x sessions-in-window join, found with an as-of join on session end times, which
   grow with the session number);
3. the paired values, in recency order, are filtered by the window, deduplicated keeping the
   most recent occurrence, and the first `max_long` kept.
"""

from __future__ import annotations

import polars as pl

from pipeline.events import ID

LONG_TERM_FEATURES = ("item", "leaf", "category", "shop", "brand")


def long_term_column(feature: str) -> str:
    return f"long_{feature}"


def prior_sessions(sessions: pl.DataFrame, long_window_ms: int | None) -> pl.LazyFrame:
    """(session, cutoff, prior): every earlier session of the same user that ends at or after
    the session's window start `cutoff` (= start - long_window; no cutoff when unlimited),
    sorted by session and, within it, most recent prior session first."""
    cutoff = (pl.col("start") - long_window_ms) if long_window_ms is not None else pl.lit(None, pl.Int64)
    windows = sessions.lazy().select("session", "user", "start", cutoff.alias("cutoff"))
    if long_window_ms is None:
        first_prior = windows.with_columns(first_prior=pl.col("session").min().over("user"))
    else:
        ends = sessions.lazy().select("user", "end", pl.col("session").alias("first_prior")).sort("end", "first_prior")
        first_prior = windows.sort("cutoff").join_asof(
            ends, left_on="cutoff", right_on="end", by="user", strategy="forward",
            check_sortedness=False,  # sorted just above; polars cannot verify it per group
        )
    return (
        first_prior.filter(pl.col("first_prior") < pl.col("session"))
        .sort("session")
        .select(
            "session",
            "cutoff",
            # most recent prior session first: the order the long-term set is built in
            prior=pl.int_ranges(pl.col("session").cast(pl.Int64) - 1, pl.col("first_prior").cast(pl.Int64) - 1, step=-1),
        )
        .explode("prior")
        .with_columns(pl.col("prior").cast(ID))
    )


def recent_values_per_session(session_events: pl.DataFrame, feature_values: pl.Expr, max_long: int) -> pl.LazyFrame:
    """(session, value, last_order, last_time): each session's `max_long` most recent distinct values."""
    return (
        session_events.lazy()
        .select("session", "order", "time", feature_values.alias("value"))
        .filter(pl.col("value") != 0)
        .group_by("session", "value")
        .agg(pl.col("order").max().alias("last_order"), pl.col("time").max().alias("last_time"))
        .filter(pl.col("last_order").rank("ordinal", descending=True).over("session") <= max_long)
        .sort("session", "last_order", descending=[False, True])
    )


def long_term_set(
    pairs: pl.LazyFrame, recent: pl.LazyFrame, max_long: int, column: str
) -> pl.LazyFrame:
    """(session, column): the feature's long-term set of each session that has one.

    `pairs` come most recent prior session first and `recent` most recent value first, and the
    join keeps both orders, so each session's values arrive most recent first without a sort."""
    return (
        pairs.join(recent, left_on="prior", right_on="session", maintain_order="left_right")
        .filter(pl.col("cutoff").is_null() | (pl.col("last_time") >= pl.col("cutoff")))
        .group_by("session", maintain_order=True)
        .agg(pl.col("value").unique(maintain_order=True).head(max_long).alias(column))
    )


def user_aligned_chunks(sessions: pl.DataFrame, events_per_chunk: int) -> list[tuple[int, int]]:
    """Contiguous row ranges [first, stop) of `sessions` with about `events_per_chunk` events that
    never split a user (a long-term set only looks at its own user's sessions), to bound the
    memory of a step. Rows, not session numbers: a user bucket's sessions are not numbered from 0."""
    users = sessions.with_row_index("row").group_by("user", maintain_order=True).agg(
        pl.col("row").first().alias("first"), pl.col("length").sum().alias("events")
    )
    starts = (
        users.with_columns(chunk=(pl.col("events").cum_sum() - pl.col("events")) // events_per_chunk)
        .group_by("chunk", maintain_order=True).agg(pl.col("first").first())
        .get_column("first").to_list()
    )
    return list(zip(starts, [*starts[1:], sessions.height][: len(starts)], strict=True))


def build_long_term(
    session_events: pl.DataFrame,
    sessions: pl.DataFrame,
    items: pl.DataFrame,
    side_features: list[str],
    long_window_ms: int | None,
    max_long: int,
    events_per_chunk: int = 2_000_000,
) -> pl.DataFrame:
    """One row per session: `session` and a list column per feature (empty when nothing qualifies).
    Expects whole users, sessions numbered consecutively within each user in (user, time) order,
    and events sorted the same way."""
    features = ["item", *side_features]
    event_offsets = [0, *sessions.get_column("length").cum_sum().to_list()]
    parts = []
    for first, stop in user_aligned_chunks(sessions, events_per_chunk):
        chunk_sessions = sessions.slice(first, stop - first)
        chunk_events = session_events.slice(event_offsets[first], event_offsets[stop] - event_offsets[first])
        pairs = prior_sessions(chunk_sessions, long_window_ms).collect().lazy()
        with_side = chunk_events.join(items, on="item", how="left") if side_features else chunk_events
        result = chunk_sessions.lazy().select("session")
        for feature in features:
            recent = recent_values_per_session(with_side, pl.col(feature).fill_null(0), max_long)
            result = result.join(
                long_term_set(pairs, recent, max_long, long_term_column(feature)), on="session", how="left", maintain_order="left"
            )
        parts.append(result.collect())
    if not parts:  # a user bucket without users
        return pl.DataFrame(schema={"session": ID, **{long_term_column(f): pl.List(ID) for f in features}})
    return pl.concat(parts).with_columns(pl.col(long_term_column(f)).fill_null([]).cast(pl.List(ID)) for f in features)
