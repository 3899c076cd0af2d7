"""Using a trained run: recommendations for a user now (exports are in sdm.serving.export, the server in sdm.serving.server).

`recommend` reads only what one user needs: every table is a lazy Parquet scan filtered on the
user, their session or the ranked items, which polars pushes into the reader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline.errors import InputError
from pipeline.contract import DataDir, long_term_column
from sdm.data.sessions import Batch, Catalogue, SessionData, pad_lists
from sdm.evaluation.evaluate import embed_cases
from sdm.models.base import Recommender
from sdm.evaluation.retrieval import top_k
from sdm.data.tensor_store import attach_context, context_arrays


def latest_sessions(data: Path, user_ids: pl.Series | None = None) -> pl.DataFrame:
    """(user, session, items): each user's most recent session, the input for "what next"."""
    sessions = pl.scan_parquet(DataDir(data).sessions).select("user", "session", "items")
    if user_ids is not None:
        sessions = sessions.filter(pl.col("user").is_in(user_ids.implode()))
    return sessions.group_by("user").agg(pl.all().sort_by("session").last()).sort("user").collect()


def user_id_of(data: Path, raw_user: str) -> int:
    match = pl.scan_parquet(DataDir(data).vocabulary("user")).filter(pl.col("raw") == raw_user).select("id").collect()
    if match.height == 0:
        raise InputError(f"{data}: no user {raw_user!r} (unknown, or all their events were filtered out)")
    return int(match.get_column("id")[0])


def recommend(
    model: Recommender, data: Path, catalogue: Catalogue, raw_user: str, k: int, exclude_seen: bool
) -> pl.DataFrame:
    """Top-k items for one user after their latest session: rank, raw item id, score, side values."""
    user = user_id_of(data, raw_user)
    rows = latest_sessions(data, pl.Series([user], dtype=pl.UInt32))
    vectors = embed_cases(model, SessionData(few_input_tensors(rows, data, catalogue)))  # [1, d]
    exclude = None
    if exclude_seen:
        seen = pl.scan_parquet(DataDir(data).session_events).filter(pl.col("user") == user)
        seen_ids = torch.from_numpy(seen.select(pl.col("item").unique().sort()).collect().to_series().to_numpy().astype(np.int64))
        exclude = (torch.tensor([0, len(seen_ids)]), seen_ids)
    scores, ids = top_k(vectors, model.item_vectors().detach(), k, exclude=exclude)
    found = ids[0] >= 0
    ranked = pl.DataFrame(
        {"rank": np.arange(1, int(found.sum()) + 1), "item": ids[0][found].numpy(), "score": scores[0][found].numpy()}
    ).with_columns(pl.col("item").cast(pl.UInt32))
    return with_raw_values(ranked, data, catalogue)


def few_input_tensors(rows: pl.DataFrame, data: Path, catalogue: Catalogue) -> Batch:
    """sdm.data.sessions.input_tensors for a few rows of (user, session, items): their long-term sets and
    profiles come from scans filtered on their sessions and users, not from whole tables."""
    long_columns = [long_term_column(f) for f in catalogue.long_features]
    long_term = (
        pl.scan_parquet(DataDir(data).long_term)
        .filter(pl.col("session").is_in(rows.get_column("session").implode())).select("session", *long_columns).collect()
    )
    users = pl.scan_parquet(DataDir(data).users).filter(pl.col("user").is_in(rows.get_column("user").implode())).collect()
    arrays = context_arrays(attach_context(rows, long_term, users), catalogue.profile_fields, dict.fromkeys(catalogue.long_features))
    return {
        "items": pad_lists(rows.get_column("items")),
        "lengths": torch.from_numpy(rows.get_column("items").list.len().to_numpy().astype(np.int64)),
        **{name: torch.from_numpy(array) for name, array in arrays.items()},
    }


def with_raw_values(ranked: pl.DataFrame, data: Path, catalogue: Catalogue) -> pl.DataFrame:
    """Replace item ids by raw ids and add the raw side values of each item (the rows of the ranked
    items and of their side values only)."""
    items = pl.scan_parquet(DataDir(data).items).filter(pl.col("item").is_in(ranked.get_column("item").implode())).collect()
    result = ranked.join(items, on="item", how="left")
    for feature in ("item", *catalogue.side_features):
        raw = (
            pl.scan_parquet(DataDir(data).vocabulary(feature)).filter(pl.col("id").is_in(result.get_column(feature).drop_nulls().implode()))
            .select(pl.col("id").alias(feature), pl.col("raw").alias(f"{feature}_raw")).collect()
        )
        result = result.join(raw, on=feature, how="left").drop(feature).rename({f"{feature}_raw": feature})
    return result.sort("rank").select("rank", "item", "score", *catalogue.side_features)
