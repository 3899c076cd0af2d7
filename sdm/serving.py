"""Using a trained run: recommendations for a user now (exports are in sdm.export, the server in sdm.server)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline.errors import InputError
from sdm.data import Catalogue, SessionData, input_tensors
from sdm.evaluate import embed_cases
from sdm.model import Recommender
from sdm.retrieval import top_k


def latest_sessions(data: Path, user_ids: pl.Series | None = None) -> pl.DataFrame:
    """(user, session, items): each user's most recent session, the input for "what next"."""
    sessions = pl.scan_parquet(data / "sessions" / "sessions.parquet").select("user", "session", "items")
    if user_ids is not None:
        sessions = sessions.filter(pl.col("user").is_in(user_ids.implode()))
    return sessions.group_by("user").agg(pl.all().sort_by("session").last()).sort("user").collect()


def user_id_of(data: Path, raw_user: str) -> int:
    match = pl.read_parquet(data / "events" / "vocab" / "user.parquet").filter(pl.col("raw") == raw_user)
    if match.height == 0:
        raise InputError(f"{data}: no user {raw_user!r} (unknown, or all their events were filtered out)")
    return int(match.get_column("id")[0])


def recommend(
    model: Recommender, data: Path, catalogue: Catalogue, raw_user: str, k: int, exclude_seen: bool
) -> pl.DataFrame:
    """Top-k items for one user after their latest session: rank, raw item id, score, side values."""
    user = user_id_of(data, raw_user)
    rows = latest_sessions(data, pl.Series([user], dtype=pl.UInt32))
    vectors = embed_cases(model, SessionData(input_tensors(rows, data, catalogue)))  # [1, d]
    exclude = None
    if exclude_seen:
        seen = pl.scan_parquet(data / "sessions" / "events.parquet").filter(pl.col("user") == user)
        seen_ids = torch.from_numpy(seen.select(pl.col("item").unique().sort()).collect().to_series().to_numpy().astype(np.int64))
        exclude = (torch.tensor([0, len(seen_ids)]), seen_ids)
    scores, ids = top_k(vectors, model.item_vectors().detach(), k, exclude=exclude)
    found = ids[0] >= 0
    ranked = pl.DataFrame(
        {"rank": np.arange(1, int(found.sum()) + 1), "item": ids[0][found].numpy(), "score": scores[0][found].numpy()}
    ).with_columns(pl.col("item").cast(pl.UInt32))
    return with_raw_values(ranked, data, catalogue)


def with_raw_values(ranked: pl.DataFrame, data: Path, catalogue: Catalogue) -> pl.DataFrame:
    """Replace item ids by raw ids and add the raw side values of each item."""
    vocab = data / "events" / "vocab"
    items = pl.read_parquet(data / "events" / "items.parquet")
    result = ranked.join(items, on="item", how="left")
    for feature in ("item", *catalogue.side_features):
        raw = pl.read_parquet(vocab / f"{feature}.parquet").select(pl.col("id").alias(feature), pl.col("raw").alias(f"{feature}_raw"))
        result = result.join(raw, on=feature, how="left").drop(feature).rename({f"{feature}_raw": feature})
    return result.sort("rank").select("rank", "item", "score", *catalogue.side_features)
