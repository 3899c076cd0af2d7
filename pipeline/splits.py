"""Stage 4, splits: training sessions and the validation and test cases.

A training row is one session (cut before any held-out event) plus `next_item`, the first item of
the user's next training session: the trainer predicts every position of the session from its
prefix, and the last position predicts `next_item`, so that predicting across a session boundary
is trained as it is evaluated.

An evaluation case is an input session prefix, the session whose long-term sets go with it, and
the ground-truth items. `first_target_order` is the `order` of the first target event: the user's
events before it are what the user had "seen" at prediction time.

- leave-last-out: each user's last event is the test target and the one before it the
  validation target. A target's input is the earlier items of its own session or, when it
  opens a session, the whole previous session (with that session's long-term sets).
- temporal (the paper's protocol): sessions starting in the last `test_days` are test cases, those
  in the `valid_days` before are validation cases; the first `input_fraction` of each such session
  is the input and the rest, deduplicated, the ground truth. Training uses only events before the
  validation period.
"""

from __future__ import annotations

import polars as pl

from pipeline.config import PreprocessConfig
from pipeline.events import ID

DAY_MS = 86_400_000
TRAIN_SCHEMA = {"session": ID, "user": ID, "items": pl.List(ID), "next_item": ID}
CASE_SCHEMA = {"user": ID, "session": ID, "items": pl.List(ID), "targets": pl.List(ID),
               "first_target_order": pl.UInt32}


def training_rows(train_events: pl.LazyFrame) -> pl.DataFrame:
    """Sessions of the training events, with the first item of the user's next training session;
    rows with nothing to predict (one item, no next session) are dropped. Lazy, so that the
    events' filter is fused with the grouping instead of copying every column of every event."""
    return (
        train_events.select("session", "user", "item")
        .group_by("session", maintain_order=True)
        .agg(pl.col("user").first(), pl.col("item").alias("items"))
        .with_columns(next_item=pl.col("items").list.first().shift(-1).over("user").fill_null(0))
        .filter((pl.col("items").list.len() >= 2) | (pl.col("next_item") != 0))
        .select(pl.col(name).cast(dtype) for name, dtype in TRAIN_SCHEMA.items())
        .collect()
    )


def leave_last_out(session_events: pl.DataFrame, sessions: pl.DataFrame) -> dict[str, pl.DataFrame]:
    events = session_events.with_columns(
        from_end=pl.col("order").max().over("user") - pl.col("order"),
        n_events=pl.len().over("user"),
    )
    held_out = ((pl.col("from_end") == 0) & (pl.col("n_events") >= 2)) | (
        (pl.col("from_end") == 1) & (pl.col("n_events") >= 3)
    )
    previous = sessions.select(
        pl.col("session") + 1, pl.col("user").alias("previous_user"), pl.col("items").alias("previous_items")
    )

    def cases(from_end: int) -> pl.DataFrame:
        targets = events.filter(held_out & (pl.col("from_end") == from_end))
        with_inputs = (
            targets.join(sessions.select("session", "items"), on="session")
            .join(previous, on="session", how="left")
            .with_columns(
                opens_session=pl.col("position") == 0,
            )
            .select(
                "user",
                session=pl.when(pl.col("opens_session")).then(pl.col("session") - 1).otherwise("session"),
                items=pl.when(pl.col("opens_session"))
                .then(pl.when(pl.col("previous_user") == pl.col("user")).then("previous_items"))
                .otherwise(pl.col("items").list.head(pl.col("position"))),
                targets=pl.concat_list("item"),
                first_target_order="order",
            )
        )
        return with_inputs.filter(pl.col("items").list.len() > 0).select(
            pl.col(name).cast(dtype) for name, dtype in CASE_SCHEMA.items()
        )

    return {
        "train": training_rows(events.lazy().filter(~held_out)),
        "valid": cases(from_end=1),
        "test": cases(from_end=0),
    }


def temporal(
    session_events: pl.DataFrame, sessions: pl.DataFrame, config: PreprocessConfig, time_max_ms: int
) -> dict[str, pl.DataFrame]:
    """`time_max_ms`, the time of the last event of ALL users, sets the periods, so that every user
    bucket cuts at the same days."""
    last_day_end = (time_max_ms // DAY_MS + 1) * DAY_MS
    test_start = last_day_end - round(config.test_days * DAY_MS)
    valid_start = test_start - round(config.valid_days * DAY_MS)

    def cases(period: pl.Expr) -> pl.DataFrame:
        n_input = (pl.col("length") * config.input_fraction).floor().cast(ID).clip(lower_bound=1)
        return (
            sessions.filter(period & (pl.col("length") >= 2))
            .with_columns(n_input=n_input)
            .select(
                "user",
                "session",
                items=pl.col("items").list.head(pl.col("n_input")),
                targets=pl.col("items").list.slice(pl.col("n_input")).list.unique(maintain_order=True),
                first_target_order=pl.col("first_order") + pl.col("n_input"),
            )
            .select(pl.col(name).cast(dtype) for name, dtype in CASE_SCHEMA.items())
        )

    return {
        "train": training_rows(session_events.lazy().filter(pl.col("time") < valid_start)),
        "valid": cases(pl.col("start").is_between(valid_start, test_start, closed="left")),
        "test": cases(pl.col("start") >= test_start),
    }


def build_splits(
    session_events: pl.DataFrame, sessions: pl.DataFrame, config: PreprocessConfig, time_max_ms: int
) -> dict[str, pl.DataFrame]:
    """The splits of whole users (all of them, or one user bucket); `time_max_ms` is the last event's time."""
    # events come in session order (sessions.assign_sessions): the flag, lost on the way through
    # Parquet, lets each group_by over sessions skip hashing
    session_events = session_events.with_columns(pl.col("session").set_sorted())
    if config.split == "leave-last-out":
        return leave_last_out(session_events, sessions)
    return temporal(session_events, sessions, config, time_max_ms)
