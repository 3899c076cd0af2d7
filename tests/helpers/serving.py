"""Reference answers for the recommend, export and server tests: model inputs after a user's latest
session, built here from the Parquet tables, and top-k by sorting every score."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import torch

from sdm.data.sessions import SessionData, input_tensors
from helpers.cli import run_sdm_ok
from helpers.training import read_vocab


def latest_session_inputs(data: Path, catalogue, users: list[int]) -> SessionData:
    """Model inputs after each user's most recent session (by start time), from sessions.parquet."""
    sessions = pl.read_parquet(data / "sessions" / "sessions.parquet")
    latest = (
        sessions.filter(pl.col("user").is_in(users)).sort("start").group_by("user").last()
        .join(pl.DataFrame({"user": users}, schema={"user": pl.UInt32}).with_row_index("wanted"), on="user")
        .sort("wanted").select("user", "session", "items")
    )
    return SessionData(input_tensors(latest, data, catalogue))


def items_seen_by(data: Path, user: int) -> set[int]:
    events = pl.read_parquet(data / "sessions" / "events.parquet", columns=["user", "item"])
    return set(events.filter(pl.col("user") == user).get_column("item").to_list())


def brute_force_top(model, inputs: SessionData, k: int, excluded: list[set[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores, ids) by sorting the full score matrix; padding and excluded items never returned."""
    with torch.no_grad():
        scores = model.user_vectors(inputs.batch(torch.arange(len(inputs)))) @ model.item_vectors().T  # [N, n_items]
    scores[:, 0] = -torch.inf
    for row, items in enumerate(excluded or []):
        scores[row, sorted(items)] = -torch.inf
    ranked_scores, ranked_ids = scores.sort(dim=1, descending=True, stable=True)
    return ranked_scores[:, :k], ranked_ids[:, :k]


def recommended(run: Path, raw_user: str, *options: object) -> pl.DataFrame:
    outcome = run_sdm_ok("recommend", "--run", run, "--user", raw_user, *options, "--json")
    return pl.DataFrame([json.loads(line) for line in outcome.stdout.splitlines() if line.strip()])


def raw_items(data: Path, ids: list[int]) -> list[str]:
    raw = dict(read_vocab(data, "item").select("id", "raw").iter_rows())
    return [raw[i] for i in ids]
