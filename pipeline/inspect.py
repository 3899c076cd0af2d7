"""Read one user's sessions and long-term sets back from a preprocess output, in raw values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from pipeline.cache import require_stage
from pipeline.errors import InputError
from pipeline.contract import ITEM_FEATURES, DataDir, long_term_column

MS_PER_SECOND = 1000


def vocabulary(out: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(DataDir(out).vocabulary(name))


def to_raw(ids: pl.Expr, vocab: pl.DataFrame) -> pl.Expr:
    """Map a list column of ids to their raw strings."""
    mapping = dict(zip(vocab.get_column("id"), vocab.get_column("raw"), strict=True))
    return ids.list.eval(pl.element().replace_strict(mapping, return_dtype=pl.String))


def user_sessions(out: Path, raw_user: str) -> dict[str, Any]:
    """{"user", "sessions": [{"start", "items", "long_term": {feature: [...]}}]} for one raw user id."""
    for stage in ("events", "sessions", "long_term"):
        require_stage(out, stage)
    users = vocabulary(out, "user").filter(pl.col("raw") == raw_user)
    if users.height == 0:
        raise InputError(f"{out}: no user {raw_user!r} (unknown, or all their events were filtered out)")
    user_id = users.get_column("id")[0]
    long_term = pl.read_parquet(DataDir(out).long_term)
    present = [f for f in ITEM_FEATURES if long_term_column(f) in long_term.columns]
    item_vocab = vocabulary(out, "item")
    sessions = (
        pl.scan_parquet(DataDir(out).sessions)
        .filter(pl.col("user") == user_id)
        .collect()
        .join(long_term, on="session", how="left")
        .sort("session")
        .select(
            (pl.col("start") // MS_PER_SECOND).alias("start"),
            to_raw(pl.col("items"), item_vocab).alias("items"),
            *(to_raw(pl.col(long_term_column(f)), vocabulary(out, f)).alias(f) for f in present),
        )
    )
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
