"""Stage 2, sessions: cut each user's time-ordered events into short sessions (paper §3.1).

Two adjacent events of a user stay together when they share a session id, or when the later one
comes less than `session_gap` after the earlier one. A session that already holds
`max_session_length` items is closed and the next event opens a new one.

Sessions are numbered 0.. in (user, time) order over all users. A user bucket (pipeline/buckets.py)
numbers its sessions from each user's `first_session`, the number of sessions of all users with
smaller ids, which one cheap pass over every bucket counts beforehand (`session_counts`).
"""

from __future__ import annotations

import polars as pl

from pipeline.events import ID

SESSION_EVENT_SCHEMA = {"user": ID, "item": ID, "time": pl.Int64, "order": pl.UInt32,
                        "session": ID, "position": ID}
SESSION_SCHEMA = {"session": ID, "user": ID, "start": pl.Int64, "end": pl.Int64,
                  "length": ID, "first_order": pl.UInt32, "items": pl.List(ID)}


def opens_session(session_gap_ms: int) -> pl.Expr:
    """True where an event starts a new session by the gap/id rule (before the length cap).
    Expects events sorted by (user, time, input row)."""
    first_of_user = pl.col("user") != pl.col("user").shift(1)
    long_gap = (pl.col("time") - pl.col("time").shift(1)) >= session_gap_ms
    shared_id = (pl.col("session_key") != 0) & (pl.col("session_key") == pl.col("session_key").shift(1))
    return (first_of_user | (long_gap & ~shared_id)).fill_null(True)


def local_sessions(events: pl.LazyFrame, session_gap_ms: int, max_session_length: int) -> pl.LazyFrame:
    """Events with `session` numbered 0.. over the frame and their `position` in it."""
    # `order` counts a user's events one by one, so an event's position in its gap/id session is
    # its order minus the order of the event that opened that session (carried forward)
    opening_order = pl.when(opens_session(session_gap_ms)).then(pl.col("order")).forward_fill()
    return (
        events.with_columns(rule_position=pl.col("order") - opening_order)
        .with_columns(
            session=((pl.col("rule_position") % max_session_length) == 0).cum_sum() - 1,
            position=pl.col("rule_position") % max_session_length,
        )
    )


def session_counts(events: pl.LazyFrame, session_gap_ms: int, max_session_length: int) -> pl.DataFrame:
    """(user, sessions): how many sessions each user of the frame has."""
    return (
        local_sessions(events.select("user", "time", "session_key", "order"), session_gap_ms, max_session_length)
        .group_by("user")
        .agg((pl.col("position") == 0).sum().cast(ID).alias("sessions"))
        .collect()
    )


def first_sessions(counts: pl.DataFrame) -> pl.DataFrame:
    """(user, first_session) from every user's session count."""
    return counts.sort("user").select("user", first_session=(pl.col("sessions").cum_sum() - pl.col("sessions")).cast(ID))


def assign_sessions(
    events: pl.DataFrame, session_gap_ms: int, max_session_length: int, first_session: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Events with their global `session` number (in user, time order) and `position` in it.
    Without `first_session` the frame must hold every user; with it, any set of whole users."""
    numbered = local_sessions(events.lazy(), session_gap_ms, max_session_length)
    if first_session is not None:
        numbered = numbered.join(first_session.lazy(), on="user", how="left", maintain_order="left").with_columns(
            session=pl.col("first_session") + pl.col("session") - pl.col("session").min().over("user")
        )
    # sessions are numbered in (user, time) order, the order of the events: flagging the column
    # sorted lets each later group_by over it skip hashing
    return (
        numbered.select(pl.col(name).cast(dtype) for name, dtype in SESSION_EVENT_SCHEMA.items())
        .with_columns(pl.col("session").set_sorted())
        .collect()
    )


def summarise_sessions(session_events: pl.DataFrame) -> pl.DataFrame:
    """One row per session: its user, time span, length, first event and items in order."""
    return (
        session_events.group_by("session", maintain_order=True)
        .agg(
            pl.col("user").first(),
            pl.col("time").first().alias("start"),
            pl.col("time").last().alias("end"),
            pl.len().alias("length"),
            pl.col("order").first().alias("first_order"),
            pl.col("item").alias("items"),
        )
        .select(pl.col(name).cast(dtype) for name, dtype in SESSION_SCHEMA.items())
    )
