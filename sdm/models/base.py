"""The interface every model implements, so that training, evaluation and serving need not know
which one runs: forward gives the user vector after each prefix of the session, item_vectors the
catalogue's vectors; a user's score for an item is their inner product."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from sdm.models.config import ModelConfig
from sdm.models.embedding import ItemEmbedding


class Recommender(nn.Module, ABC):
    """Interface shared by every model, so training and evaluation need not know which one runs.

    Subclasses implement forward(batch) -> [B, T, d]: the user vector after each prefix of the session.
    """

    def user_vectors(self, batch: dict[str, Tensor]) -> Tensor:
        """-> [B, d]: the user vector after the whole session (position lengths - 1)."""
        per_position = self(batch)  # [B, T, d]
        rows = torch.arange(per_position.shape[0], device=per_position.device)
        return per_position[rows, batch["lengths"] - 1]

    @abstractmethod
    def item_vectors(self) -> Tensor:
        """-> [n_items, d], row 0 (padding) included; callers mask it."""

    def vectors_of(self, items: Tensor) -> Tensor:
        """items [...] -> their rows of item_vectors() [..., d]; models with an item tower override it
        to embed just these items."""
        return self.item_vectors()[items]


class TwoTowerRecommender(Recommender):
    """A recommender whose items are scored with an output matrix V, either its own table or the
    item embedding itself (tie_output)."""

    item_embedding: ItemEmbedding

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        if config.tie_output:
            self.output_items = None
        else:
            self.output_items = nn.Embedding(config.n_items, config.dim, padding_idx=0)
            # |V_v| ~ 1, so initial logits are on the scale of o's entries.
            nn.init.normal_(self.output_items.weight, std=config.dim**-0.5)
            self.output_items.weight.data[0].zero_()

    def item_vectors(self) -> Tensor:
        """-> V [n_items, d], row 0 (padding) included; callers mask it."""
        return self.item_embedding.catalogue() if self.output_items is None else self.output_items.weight

    def vectors_of(self, items: Tensor) -> Tensor:
        """items [...] -> V_items [..., d]."""
        return self.item_embedding(items) if self.output_items is None else self.output_items(items)
