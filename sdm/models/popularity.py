"""Popularity: every user gets the training split's most frequent items."""

from __future__ import annotations

import torch
from torch import Tensor

from sdm.models.base import Recommender


class Popularity(Recommender):
    """Ranks every user's candidates by training popularity: user vector 1, item vector log(1 + count)."""

    def __init__(self, item_counts: Tensor):
        super().__init__()
        self.register_buffer("log_counts", torch.log1p(item_counts.double()).to(torch.get_default_dtype()).unsqueeze(1))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """-> ones [B, T, 1]."""
        return self.log_counts.new_ones(*batch["items"].shape, 1)

    def item_vectors(self) -> Tensor:
        """-> log(1 + count) [n_items, 1]."""
        return self.log_counts
