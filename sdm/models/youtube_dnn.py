"""YouTube DNN (Covington et al., RecSys 2016) as a session model: the mean of the session prefix's
items, the mean of each long-term set and the profile, through a ReLU tower."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdm.models.config import ModelConfig
from sdm.models.embedding import ItemEmbedding, UserEmbedding
from sdm.models.base import TwoTowerRecommender


def masked_mean(vectors: Tensor, mask: Tensor) -> Tensor:
    """vectors [B, N, d], mask [B, N] -> mean over the entries where mask is True [B, d]; zeros if none are."""
    weights = mask.unsqueeze(-1).to(vectors.dtype)  # [B, N, 1]
    return (vectors * weights).sum(1) / weights.sum(1).clamp(min=1)


class YouTubeDNN(TwoTowerRecommender):
    """Covington et al. 2016: mean-pooled watched items and the user profile through a ReLU tower.

    Position t pools session items 0..t (cumulative mean) and, unless long_term is off, the
    long-term item ids.
    """

    def __init__(self, config: ModelConfig, item_side: Tensor):
        super().__init__(config)
        d = config.dim
        self.item_embedding = ItemEmbedding(config, item_side)
        self.user_embedding = UserEmbedding(config)
        n_inputs = 3 if config.long_term else 2
        # ReLU on the last layer too: the paper's user vector is the top ReLU layer's output.
        self.tower = nn.Sequential(nn.Linear(n_inputs * d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU())

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """-> [B, T, d]."""
        items = batch["items"]  # [B, T]
        embedded = self.item_embedding(items)  # [B, T, d]
        valid = (items != 0).unsqueeze(-1).to(embedded.dtype)  # [B, T, 1]
        item_sums = (embedded * valid).cumsum(dim=1)  # [B, T, d]
        session = item_sums / valid.cumsum(dim=1).clamp(min=1)  # [B, T, d]: mean of items 0..t
        per_user = [self.user_embedding(batch)]  # [B, d]
        if self.config.long_term:
            long_items = batch["long_item"]  # [B, L]
            per_user.append(masked_mean(self.item_embedding(long_items), long_items != 0))  # [B, d]
        broadcast = torch.cat(per_user, dim=-1).unsqueeze(1).expand(-1, items.shape[1], -1)  # [B, T, (1|2) d]
        return self.tower(torch.cat([session, broadcast], dim=-1))  # [B, T, d]
