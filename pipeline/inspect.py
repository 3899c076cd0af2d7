"""Read one user's sessions and long-term sets back from a preprocess output, in raw values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from pipeline.cache import require_stage
from pipeline.errors import InputError
from pipeline.contract import ITEM_FEATURES, DataDir, long_term_column

MS_PER_SECOND = 1000


def as_raw(sessions: pl.LazyFrame, column: str, vocabulary: Path) -> pl.LazyFrame:
    """(session, column): the list of ids in `column` as their raw values, in order. A session whose
    list is empty has no row (explode drops it): the caller's left join fills it in."""
    raw = pl.scan_parquet(vocabulary).select("id", "raw")
    return (
        sessions.select("session", column)
        .explode(column)
        .join(raw, left_on=column, right_on="id", how="left", maintain_order="left")
        .group_by("session", maintain_order=True)
        .agg(pl.col("raw").drop_nulls().alias(column))
    )


def user_sessions(out: Path, raw_user: str) -> dict[str, Any]:
    """{"user", "sessions": [{"start", "items", "long_term": {feature: [...]}}]} for one raw user id.
    Only that user's rows are read (filtered scans)."""
    for stage in ("events", "sessions", "long_term"):
        require_stage(out, stage)
    layout = DataDir(out)
    users = pl.scan_parquet(layout.vocabulary("user")).filter(pl.col("raw") == raw_user).collect()
    if users.height == 0:
        raise InputError(f"{out}: no user {raw_user!r} (unknown, or all their events were filtered out)")
    present = [f for f in ITEM_FEATURES if long_term_column(f) in pl.scan_parquet(layout.long_term).collect_schema()]
    own = pl.scan_parquet(layout.sessions).filter(pl.col("user") == users.get_column("id")[0]).select("session", "start", "items")
    own = own.join(pl.scan_parquet(layout.long_term), on="session", how="left").collect().lazy()
    sessions = own.select("session", (pl.col("start") // MS_PER_SECOND).alias("start")).join(
        as_raw(own, "items", layout.vocabulary("item")), on="session", how="left"
    )
    for feature in present:
        sessions = sessions.join(as_raw(own, long_term_column(feature), layout.vocabulary(feature)), on="session", how="left")
    lists = ["items", *(long_term_column(f) for f in present)]
    empty = pl.lit([], dtype=pl.List(pl.String))
    sessions = sessions.with_columns(pl.col(lists).fill_null(empty)).sort("session").rename({long_term_column(f): f for f in present}).collect()
    return {
        "user": raw_user,
        "sessions": [
            {
                "start": row["start"],
                "items": row["items"],
                "long_term": {f: row.get(f, []) for f in ITEM_FEATURES},
            }
            for row in sessions.iter_rows(named=True)
        ],
    }
