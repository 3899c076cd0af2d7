"""Item-based collaborative filtering (Sarwar et al. 2001), the paper's first baseline.

Similarity is the cosine of session co-occurrence over the training sessions. With X the binary
session x item matrix (X[s, i] = 1 when item i occurs in training session s, however often),
C = X^T X counts the sessions that hold both items and n_i = C_ii the sessions that hold i:

    sim(i, j) = C_ij / sqrt(n_i n_j)        for i != j;  sim(i, i) = 0

Each item keeps only its M most similar items (ties to the smaller id), so the stored model is
two [n_items, M] tables whatever the catalogue. A case scores every item by summing the
similarities from its distinct input items, the session and, unless --no-long-term, the
long-term item set (the same history SDM and YouTube DNN read):

    score(j) = sum_{i in input} sim(i, j)

To reuse the evaluator unchanged (same top-K, same exclusion of seen items, same metrics) this
is written as an inner product: the user vector is the multi-hot of the input items [n_items]
and item j's vector is the column sim(., j), so `item_vectors()` materialises the dense
[n_items, n_items] matrix; `MAX_ITEMS` keeps that within memory. No trainable parameters: the
trainer runs no optimiser steps (as for popularity) and the tables are saved as buffers.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from pipeline.errors import InputError
from sdm.models.config import ModelConfig
from sdm.models.base import Recommender

NEIGHBOURS = 200  # M: similar items kept per item
MAX_ITEMS = 30_000  # dense similarity of 30,000 items: 3.6 GB in float32


def cooccurrence_cosine(sessions: Tensor, n_items: int) -> sp.coo_matrix:
    """sessions [N, T] item ids (0 = padding) -> sim [n_items, n_items], sparse, zero diagonal."""
    items = sessions.numpy()
    session_of = np.broadcast_to(np.arange(items.shape[0])[:, None], items.shape)
    present = items != 0
    X = sp.csr_matrix(
        (np.ones(int(present.sum())), (session_of[present], items[present])), shape=(items.shape[0], n_items)
    )
    X.data[:] = 1.0  # binary: the duplicates just summed count once
    sessions_with = np.asarray(X.sum(axis=0)).ravel()  # n_i [n_items]
    C = (X.T @ X).tocoo()  # [n_items, n_items] co-occurrence counts
    off_diagonal = C.row != C.col
    row, col = C.row[off_diagonal], C.col[off_diagonal]
    sim = C.data[off_diagonal] / np.sqrt(sessions_with[row] * sessions_with[col])
    return sp.coo_matrix((sim, (row, col)), shape=(n_items, n_items))


def top_neighbours(sim: sp.coo_matrix, m: int) -> tuple[Tensor, Tensor]:
    """The m largest entries of each row (ties to the smaller column): neighbour ids [n, m] and
    similarities [n, m], padded with id 0 and similarity 0."""
    order = np.lexsort((sim.col, -sim.data, sim.row))  # by row, similarity descending, column
    row, col, value = sim.row[order], sim.col[order], sim.data[order]
    row_start = np.searchsorted(row, row, side="left")  # first entry of each entry's row
    rank = np.arange(len(row)) - row_start  # [nnz] position within the row
    keep = rank < m
    neighbours = torch.zeros(sim.shape[0], m, dtype=torch.long)
    similarity = torch.zeros(sim.shape[0], m)
    neighbours[row[keep], rank[keep]] = torch.from_numpy(col[keep].astype(np.int64))
    similarity[row[keep], rank[keep]] = torch.from_numpy(value[keep]).to(similarity.dtype)
    return neighbours, similarity


class ItemCF(Recommender):
    def __init__(self, config: ModelConfig, training_sessions: Tensor | None = None):
        """training_sessions [N, T] item ids (0 = padding); None builds empty tables to load a
        checkpoint into."""
        super().__init__()
        if config.n_items > MAX_ITEMS:
            raise InputError(
                f"item-cf scores with a dense {config.n_items:,} x {config.n_items:,} similarity matrix; "
                f"it supports catalogues up to {MAX_ITEMS:,} items"
            )
        self.n_items = config.n_items
        self.use_long_term = config.long_term
        m = min(NEIGHBOURS, config.n_items)
        neighbours, similarity = torch.zeros(config.n_items, m, dtype=torch.long), torch.zeros(config.n_items, m)
        if training_sessions is not None:
            neighbours, similarity = top_neighbours(cooccurrence_cosine(training_sessions, config.n_items), m)
        self.register_buffer("neighbours", neighbours)  # [n_items, M]
        self.register_buffer("similarity", similarity)  # [n_items, M]

    def input_items(self, batch: dict[str, Tensor]) -> Tensor:
        """-> [B, T (+ L)] the items a case scores from (0 = padding)."""
        if self.use_long_term:
            return torch.cat([batch["items"], batch["long_item"]], dim=1)
        return batch["items"]

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """-> [B, T, n_items]: at position t the multi-hot of session items 0..t (and the long-term set)."""
        items = batch["items"]  # [B, T]
        B, T = items.shape
        seen = torch.zeros(B, T, self.n_items).scatter_(2, items.unsqueeze(-1), 1.0).cummax(dim=1).values  # [B, T, n]
        if self.use_long_term:
            long_term = torch.zeros(B, self.n_items).scatter_(1, batch["long_item"], 1.0)  # [B, n]
            seen = seen.maximum(long_term.unsqueeze(1))
        seen[..., 0] = 0.0  # padding is no input
        return seen

    def user_vectors(self, batch: dict[str, Tensor]) -> Tensor:
        """-> [B, n_items] multi-hot of the whole session's items (and the long-term set)."""
        items = self.input_items(batch)  # [B, T (+ L)]
        multi_hot = torch.zeros(items.shape[0], self.n_items).scatter_(1, items, 1.0)  # [B, n]
        multi_hot[:, 0] = 0.0
        return multi_hot

    def item_vectors(self) -> Tensor:
        """-> [n_items, n_items]: row j holds sim(i, j) for every item i (its M-truncated column)."""
        sim = torch.zeros(self.n_items, self.n_items)  # [n, n]
        rows = torch.arange(self.n_items).unsqueeze(1).expand_as(self.neighbours)  # [n, M]
        # Padding slots write 0 into column 0 (the padding item), which nothing reads.
        sim[rows, self.neighbours] = self.similarity
        return sim.T.contiguous()
