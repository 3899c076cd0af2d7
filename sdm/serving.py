"""Using a trained run: recommendations for a user now, and exported vectors and user tower."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from pipeline.errors import InputError
from pipeline.storage import write_atomic, write_json_atomic
from sdm.data import Batch, Catalogue, SessionData, input_tensors
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


class UserTower(nn.Module):
    """The user side of a model with plain tensor arguments, for TorchScript tracing."""

    def __init__(self, model: Recommender, long_features: list[str]):
        super().__init__()
        self.model = model
        self.long_features = long_features

    def forward(self, items: Tensor, lengths: Tensor, profile: Tensor, user: Tensor, *long_sets: Tensor) -> Tensor:
        batch: Batch = {"items": items, "lengths": lengths, "profile": profile, "user": user}
        for feature, values in zip(self.long_features, long_sets):
            batch[f"long_{feature}"] = values
        return self.model.user_vectors(batch)  # [B, d]


def tower_arguments(batch: Batch, long_features: list[str]) -> tuple[Tensor, ...]:
    return (batch["items"], batch["lengths"], batch["profile"], batch["user"], *(batch[f"long_{f}"] for f in long_features))


def export_run(model: Recommender, data: Path, catalogue: Catalogue, out: Path) -> dict[str, int]:
    """Write item vectors, every user's current vector (after their latest session) and the user
    tower as TorchScript; the files appear only when complete."""
    out.mkdir(parents=True, exist_ok=True)
    item_vocab = pl.read_parquet(data / "events" / "vocab" / "item.parquet")
    user_vocab = pl.read_parquet(data / "events" / "vocab" / "user.parquet")
    with torch.no_grad():
        item_vectors = model.item_vectors().detach()[item_vocab.get_column("id").to_numpy().astype(np.int64)]
    rows = latest_sessions(data)
    inputs = SessionData(input_tensors(rows, data, catalogue))
    user_vectors = embed_cases(model, inputs)
    raw_users = rows.select("user").join(user_vocab.select(pl.col("id").alias("user"), "raw"), on="user", how="left")

    def vector_frame(ids: pl.Series, vectors: Tensor) -> pl.DataFrame:
        return pl.DataFrame({"id": ids, "vector": vectors.numpy().astype(np.float32)})

    example = inputs.batch(torch.arange(min(len(inputs), 8)))
    tower = UserTower(model, catalogue.long_features).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # shapes are symbolic in the trace; the warning is about a fixed 3-way unpack (q, k, v)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(tower, tower_arguments(example, catalogue.long_features), check_trace=False)
    write_atomic(out / "items.parquet", vector_frame(item_vocab.get_column("raw"), item_vectors).write_parquet)
    write_atomic(out / "users.parquet", vector_frame(raw_users.get_column("raw"), user_vectors).write_parquet)
    write_atomic(out / "user_tower.pt", lambda handle: torch.jit.save(traced, handle))
    summary = {"items": item_vectors.shape[0], "users": user_vectors.shape[0], "dim": int(item_vectors.shape[1])}
    write_json_atomic(out / "export.json", {**summary, "tower_inputs": ["items", "lengths", "profile", "user", *(f"long_{f}" for f in catalogue.long_features)]})
    return summary
