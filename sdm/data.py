"""From `sdm preprocess` Parquet to padded tensors, read once; batches are index gathers.

A batch is a dict of LongTensors (0 = padding everywhere):
    items [B, T], lengths [B], long_<feature> [B, L], profile [B, P], user [B]
and, for training, targets [B, T]: the item each position predicts (0 = nothing to predict).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl
import torch
from torch import Tensor

from pipeline.cache import read_manifest
from pipeline.errors import InputError
from pipeline.long_term import long_term_column

Batch = dict[str, Tensor]


@dataclass
class Catalogue:
    """Vocabulary sizes and per-item side information, shared by every split."""

    n_items: int  # including padding id 0
    n_users: int
    side_features: list[str]
    side_vocab: dict[str, int]
    profile_fields: list[str]
    profile_vocab: list[int]
    item_side: Tensor  # [n_items, S] side feature ids of each item (row 0 = padding)
    item_counts: Tensor  # [n_items] events per item in the training split (no held-out target counted)
    long_features: list[str]  # features with a long-term set: "item" + side features

    def vocab_sizes(self) -> dict[str, Any]:
        return {
            "n_items": self.n_items,
            "n_users": self.n_users,
            "side_vocab": self.side_vocab,
            "profile_fields": self.profile_fields,
            "profile_vocab": self.profile_vocab,
        }


def require_stage(data: Path, stage: str) -> dict[str, Any]:
    manifest = read_manifest(data / stage)
    if manifest is None:
        raise InputError(f"{data}: no complete '{stage}' stage; run `sdm preprocess LOGS --out {data}` first")
    return manifest


def load_catalogue(data: Path) -> Catalogue:
    events_manifest = require_stage(data, "events")
    side_features = events_manifest["stats"]["side_features"]
    profile_fields = events_manifest["stats"]["profile_fields"]
    vocab_dir = data / "events" / "vocab"
    item_vocab = pl.read_parquet(vocab_dir / "item.parquet")
    n_items = item_vocab.height + 1
    items = pl.read_parquet(data / "events" / "items.parquet")
    item_side = torch.zeros(n_items, len(side_features), dtype=torch.long)
    if side_features:
        ids = torch.from_numpy(items.get_column("item").to_numpy().astype(np.int64))
        item_side[ids] = torch.from_numpy(items.select(side_features).to_numpy().astype(np.int64))
    require_stage(data, "splits")
    train_items = pl.read_parquet(data / "splits" / "train.parquet", columns=["items"]).get_column("items").explode()
    item_counts = torch.from_numpy(np.bincount(train_items.drop_nulls().to_numpy(), minlength=n_items).astype(np.int64))
    return Catalogue(
        n_items=n_items,
        n_users=pl.scan_parquet(vocab_dir / "user.parquet").select(pl.len()).collect().item() + 1,
        side_features=side_features,
        side_vocab={f: pl.scan_parquet(vocab_dir / f"{f}.parquet").select(pl.len()).collect().item() + 1 for f in side_features},
        profile_fields=profile_fields,
        profile_vocab=[
            pl.scan_parquet(vocab_dir / f"profile.{f}.parquet").select(pl.len()).collect().item() + 1 for f in profile_fields
        ],
        item_side=item_side,
        item_counts=item_counts,
        long_features=["item", *side_features],
    )


def pad_lists(column: pl.Series, width: int | None = None) -> Tensor:
    """A list column -> [N, width] LongTensor, left-aligned and 0-padded (longer lists are cut)."""
    lengths = column.list.len().fill_null(0).to_numpy().astype(np.int64)
    width = int(lengths.max(initial=1)) if width is None else width
    width = max(width, 1)
    flat = column.explode().drop_nulls().to_numpy().astype(np.int64)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    columns = np.arange(len(flat)) - starts
    keep = columns < width
    padded = np.zeros((len(lengths), width), dtype=np.int64)
    padded[rows[keep], columns[keep]] = flat[keep]
    return torch.from_numpy(padded)


@dataclass
class SessionData:
    """Rows of one split as tensors: every field is indexed by row."""

    tensors: Batch
    targets_indptr: Tensor | None = None  # evaluation: CSR of each case's ground truth
    targets_indices: Tensor | None = None

    def __len__(self) -> int:
        return self.tensors["items"].shape[0]

    def batch(self, rows: Tensor) -> Batch:
        """Gather rows and trim the padding that no row in the batch needs."""
        lengths = self.tensors["lengths"][rows]
        width = int(lengths.max())
        gathered = {}
        for name, tensor in self.tensors.items():
            picked = tensor[rows]
            gathered[name] = picked[:, :width] if name in ("items", "targets") else picked
        return gathered


def _attach_context(rows: pl.DataFrame, data: Path) -> pl.DataFrame:
    """Join each row's long-term sets (by session) and user profile (by user)."""
    long_term = pl.read_parquet(data / "long_term" / "long_term.parquet")
    users = pl.read_parquet(data / "events" / "users.parquet")
    return rows.join(long_term, on="session", how="left", maintain_order="left").join(
        users, on="user", how="left", maintain_order="left"
    )


def _context_tensors(frame: pl.DataFrame, catalogue: Catalogue) -> Batch:
    tensors = {
        "user": torch.from_numpy(frame.get_column("user").to_numpy().astype(np.int64)),
        "profile": torch.from_numpy(
            frame.select(catalogue.profile_fields).fill_null(0).to_numpy().astype(np.int64).reshape(frame.height, -1)
        ),
    }
    for feature in catalogue.long_features:
        tensors[f"long_{feature}"] = pad_lists(frame.get_column(long_term_column(feature)))
    return tensors


def load_training(data: Path, catalogue: Catalogue) -> SessionData:
    """Training sessions; targets[:, t] = the next item of the session, and at the last position the
    first item of the user's next session (0 where there is none)."""
    require_stage(data, "splits")
    rows = _attach_context(pl.read_parquet(data / "splits" / "train.parquet"), data)
    items = pad_lists(rows.get_column("items"))
    lengths = torch.from_numpy(rows.get_column("items").list.len().to_numpy().astype(np.int64))
    next_item = torch.from_numpy(rows.get_column("next_item").to_numpy().astype(np.int64))
    targets = torch.zeros_like(items)
    targets[:, :-1] = items[:, 1:]
    targets[torch.arange(len(lengths)), lengths - 1] = next_item
    return SessionData({"items": items, "lengths": lengths, "targets": targets, **_context_tensors(rows, catalogue)})


def input_tensors(rows: pl.DataFrame, data: Path, catalogue: Catalogue) -> Batch:
    """Model inputs for rows of (user, session, items): the items as the short-term input, the
    long-term sets of `session` and the user's profile."""
    rows = _attach_context(rows, data)
    return {
        "items": pad_lists(rows.get_column("items")),
        "lengths": torch.from_numpy(rows.get_column("items").list.len().to_numpy().astype(np.int64)),
        **_context_tensors(rows, catalogue),
    }


def load_cases(data: Path, catalogue: Catalogue, split: str) -> tuple[SessionData, pl.DataFrame]:
    """Evaluation cases of `split` as tensors, plus their (user, first_target_order) keys."""
    require_stage(data, "splits")
    path = data / "splits" / f"{split}.parquet"
    if not path.exists():  # a file, or a directory of bucket parts
        raise InputError(f"{data}: no '{split}' split; expected one of train, valid, test")
    rows = pl.read_parquet(path)
    lengths = rows.get_column("targets").list.len().to_numpy().astype(np.int64)
    indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
    indices = torch.from_numpy(rows.get_column("targets").explode().to_numpy().astype(np.int64))
    return SessionData(input_tensors(rows, data, catalogue), indptr, indices), rows.select("user", "first_target_order")


def seen_items(data: Path, keys: pl.DataFrame) -> tuple[Tensor, Tensor]:
    """CSR (indptr, indices) of the items each case's user interacted with before its first target."""
    events = pl.scan_parquet(data / "sessions" / "events.parquet").select("user", "order", "item")
    pairs = (
        keys.lazy().with_row_index("case")
        .join(events, on="user")
        .filter(pl.col("order") < pl.col("first_target_order"))
        .select("case", "item").unique().sort("case", "item")
        .collect()
    )
    counts = np.bincount(pairs.get_column("case").to_numpy(), minlength=keys.height)
    indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    return indptr, torch.from_numpy(pairs.get_column("item").to_numpy().astype(np.int64))


def length_grouped_batches(lengths: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Shuffled batches of rows with similar lengths (less padding, as in the paper's code):
    shuffle, sort within windows of 50 batches by length, cut into batches, shuffle the batches."""
    order = torch.randperm(len(lengths), generator=generator)
    window = batch_size * 50
    chunks = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunks.append(chunk[torch.argsort(lengths[chunk], stable=True)])
    batches = list(torch.cat(chunks).split(batch_size))
    for index in torch.randperm(len(batches), generator=generator).tolist():
        yield batches[index]
