"""Baselines behind SDM's interface (forward / user_vectors / item_vectors), and `build_model`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdm.config import ModelConfig
from sdm.embedding import ItemEmbedding, UserEmbedding
from sdm.gru4rec import GRU4Rec
from sdm.item_cf import ItemCF
from sdm.model import SDM, Recommender, TwoTowerRecommender
from sdm.sasrec import SASRec


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


MODEL_NAMES = ("sdm", "youtube-dnn", "popularity", "gru4rec", "sasrec", "item-cf")


def build_model(
    name: str, config: ModelConfig, item_side: Tensor, item_counts: Tensor, training_sessions: Tensor | None = None
) -> Recommender:
    """name in MODEL_NAMES; item_side [n_items, S] side-feature ids, item_counts [n_items] training counts,
    training_sessions [N, T] training session items, which item-cf computes its similarities from
    (without them its tables stay empty, ready for load_state_dict)."""
    if name == "sdm":
        return SDM(config, item_side)
    if name == "youtube-dnn":
        return YouTubeDNN(config, item_side)
    if name == "popularity":
        return Popularity(item_counts)
    if name == "gru4rec":
        return GRU4Rec(config, item_side)
    if name == "sasrec":
        return SASRec(config, item_side)
    if name == "item-cf":
        return ItemCF(config, training_sessions)
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
