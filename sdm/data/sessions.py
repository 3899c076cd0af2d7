"""From `sdm preprocess` Parquet to padded tensors; batches are index gathers.

A batch is a dict of LongTensors (0 = padding everywhere):
    items [B, T], lengths [B], long_<feature> [B, L], profile [B, P], user [B]
and, for training, targets [B, T]: the item each position predicts (0 = nothing to predict).
The training split is memory-mapped from files written once (sdm.data.tensor_store); evaluation
cases, a small fraction of the data, are read into memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl
import torch
from torch import Tensor

from pipeline.cache import require_stage
from pipeline.errors import InputError
from pipeline.contract import DataDir, long_term_column
from pipeline.diagnostics import user_item_pair
from sdm.data.tensor_store import attach_context, context_arrays, open_training_tensors, padded

Batch = dict[str, Tensor]

BLOCK_ROWS = 256  # consecutive training rows read together by the batch plan
WINDOW_BATCHES = 50  # batches planned together: rows are sorted by length within a window


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


def load_catalogue(data: Path) -> Catalogue:
    events_manifest = require_stage(data, "events")
    side_features = events_manifest["stats"]["side_features"]
    profile_fields = events_manifest["stats"]["profile_fields"]
    layout = DataDir(data)
    item_vocab = pl.read_parquet(layout.vocabulary("item"))
    n_items = item_vocab.height + 1
    items = pl.read_parquet(layout.items)
    item_side = torch.zeros(n_items, len(side_features), dtype=torch.long)
    if side_features:
        ids = torch.from_numpy(items.get_column("item").to_numpy().astype(np.int64))
        item_side[ids] = torch.from_numpy(items.select(side_features).to_numpy().astype(np.int64))
    require_stage(data, "splits")
    return Catalogue(
        n_items=n_items,
        n_users=pl.scan_parquet(layout.vocabulary("user")).select(pl.len()).collect().item() + 1,
        side_features=side_features,
        side_vocab={f: pl.scan_parquet(layout.vocabulary(f)).select(pl.len()).collect().item() + 1 for f in side_features},
        profile_fields=profile_fields,
        profile_vocab=[
            pl.scan_parquet(layout.profile_vocabulary(f)).select(pl.len()).collect().item() + 1 for f in profile_fields
        ],
        item_side=item_side,
        item_counts=training_item_counts(data, n_items),
        long_features=["item", *side_features],
    )


def training_item_counts(data: Path, n_items: int) -> Tensor:
    """[n_items] occurrences of each item in the training sessions (a streaming aggregation)."""
    counts = (
        pl.scan_parquet(DataDir(data).split("train")).select(pl.col("items").explode().alias("item"))
        .drop_nulls().group_by("item").len()
        .collect(engine="streaming")
    )
    item_counts = np.zeros(n_items, dtype=np.int64)
    item_counts[counts.get_column("item").to_numpy()] = counts.get_column("len").to_numpy()
    return torch.from_numpy(item_counts)


def training_repeat_share(data: Path) -> float:
    """Share of the training sessions' events whose item their user already had (earlier in the
    session or in an earlier one): about 0 on rating and review logs, where nobody comes back."""
    events = (
        pl.scan_parquet(DataDir(data).split("train")).select("user", pl.col("items").alias("item")).explode("item")
        .drop_nulls().select(pl.len().alias("events"), user_item_pair().n_unique().alias("pairs"))
        .collect(engine="streaming")
    )
    total, distinct = events.row(0)
    return (total - distinct) / total if total else 0.0


def pad_lists(column: pl.Series, width: int | None = None) -> Tensor:
    """A list column -> [N, width] LongTensor, left-aligned and 0-padded (longer lists are cut);
    width defaults to the longest list."""
    return torch.from_numpy(padded(column, width))


@dataclass
class SessionData:
    """Rows of one split as tensors: every field is indexed by row. The tensors may be int32 and
    memory-mapped (training); batches are always int64 and in memory."""

    tensors: Batch
    targets_indptr: Tensor | None = None  # evaluation: CSR of each case's ground truth
    targets_indices: Tensor | None = None
    n_targets: int | None = None  # training: positions with something to predict

    def __len__(self) -> int:
        return self.tensors["items"].shape[0]

    def batch(self, rows: Tensor) -> Batch:
        """Gather rows and trim the padding that no row in the batch needs."""
        lengths = self.tensors["lengths"][rows]
        width = int(lengths.max())
        gathered = {}
        for name, tensor in self.tensors.items():
            picked = tensor[rows]
            gathered[name] = (picked[:, :width] if name in ("items", "targets") else picked).long()
        return gathered

    def rows_between(self, start: int, stop: int) -> SessionData:
        """Rows [start, stop), with their ground truth: one rank's share of the evaluation cases."""
        tensors = {name: tensor[start:stop] for name, tensor in self.tensors.items()}
        if self.targets_indptr is None:
            return SessionData(tensors)
        return SessionData(tensors, *csr_rows((self.targets_indptr, self.targets_indices), start, stop))


def csr_rows(csr: tuple[Tensor, Tensor], start: int, stop: int) -> tuple[Tensor, Tensor]:
    """Rows [start, stop) of a CSR (indptr, indices), as a CSR of their own."""
    indptr, indices = csr
    first, last = int(indptr[start]), int(indptr[stop])
    return indptr[start:stop + 1] - first, indices[first:last]


def to_device(batch: Batch, device: torch.device) -> Batch:
    return batch if device.type == "cpu" else {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def input_tensors(rows: pl.DataFrame, data: Path, catalogue: Catalogue) -> Batch:
    """Model inputs for rows of (user, session, items): the items as the short-term input, the
    long-term sets of `session` and the user's profile."""
    long_columns = [long_term_column(f) for f in catalogue.long_features]
    long_term = pl.read_parquet(DataDir(data).long_term, columns=["session", *long_columns])
    frame = attach_context(rows, long_term, pl.read_parquet(DataDir(data).users))
    arrays = context_arrays(frame, catalogue.profile_fields, dict.fromkeys(catalogue.long_features))
    return {
        "items": pad_lists(rows.get_column("items")),
        "lengths": torch.from_numpy(rows.get_column("items").list.len().to_numpy().astype(np.int64)),
        **{name: torch.from_numpy(array) for name, array in arrays.items()},
    }


def load_training(data: Path, catalogue: Catalogue) -> SessionData:
    """Training sessions, memory-mapped; targets[:, t] = the next item of the session, and at the
    last position the first item of the user's next session (0 where there is none)."""
    require_stage(data, "splits")
    vocab = {"item": catalogue.n_items, "user": catalogue.n_users, **catalogue.side_vocab, "profile": catalogue.profile_vocab}
    tensors, n_targets = open_training_tensors(data, catalogue.profile_fields, catalogue.long_features, vocab)
    return SessionData(tensors, n_targets=n_targets)


def load_cases(data: Path, catalogue: Catalogue, split: str) -> tuple[SessionData, pl.DataFrame]:
    """Evaluation cases of `split` as tensors, plus their (user, first_target_order) keys."""
    require_stage(data, "splits")
    path = DataDir(data).split(split)
    if not path.exists():  # a file, or a directory of bucket parts
        raise InputError(f"{data}: no '{split}' split; expected one of train, valid, test")
    rows = pl.read_parquet(path)
    lengths = rows.get_column("targets").list.len().to_numpy().astype(np.int64)
    indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
    indices = torch.from_numpy(rows.get_column("targets").explode().to_numpy().astype(np.int64))
    return SessionData(input_tensors(rows, data, catalogue), indptr, indices), rows.select("user", "first_target_order")


def seen_items(data: Path, keys: pl.DataFrame) -> tuple[Tensor, Tensor]:
    """CSR (indptr, indices) of the items each case's user interacted with before its first target."""
    events = pl.scan_parquet(DataDir(data).session_events).select("user", "order", "item")
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
    """Shuffled batches of at most batch_size rows with similar lengths (less padding, as in the
    paper's code), planned one window at a time so that memory and reads stay local whatever the
    number of rows:

        cut the rows into blocks of BLOCK_ROWS consecutive rows and shuffle the blocks;
        take them WINDOW_BATCHES batches' worth at a time (a window); in each window,
        shuffle the rows, sort them by length (stable), cut them into equal batches
        and yield those in random order.

    A batch thus mixes rows from many places of the split, while a window reads whole blocks
    of the memory-mapped files. The plan depends only on (lengths, batch_size, generator): DDP
    ranks that share the generator plan the same batches, and a process with batch 2B the same
    batches as two ranks with B each.
    """
    n_rows = len(lengths)
    blocks_per_window = -(-batch_size * WINDOW_BATCHES // BLOCK_ROWS)
    block_order = torch.randperm(-(-n_rows // BLOCK_ROWS), generator=generator)
    offsets = torch.arange(BLOCK_ROWS)
    for window in block_order.split(blocks_per_window):
        rows = (window.unsqueeze(1) * BLOCK_ROWS + offsets).flatten()  # [blocks * BLOCK_ROWS]
        rows = rows[rows < n_rows]
        rows = rows[torch.randperm(len(rows), generator=generator)]
        rows = rows[torch.argsort(lengths[rows], stable=True)]
        batches = rows.tensor_split(-(-len(rows) // batch_size))
        for index in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[index]
