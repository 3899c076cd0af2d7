"""SDM (Lv et al., CIKM 2019): user vector o_t from the short-term session and the long-term history,
scored against an item output matrix V by inner product."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from sdm.config import ModelConfig
from sdm.embedding import ItemEmbedding, UserEmbedding
from sdm.fusion import build_fusion
from sdm.long_term import LongTermEncoder
from sdm.short_term import ShortTermEncoder


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
        if self.output_items is None:
            all_items = torch.arange(self.config.n_items, device=self.item_embedding.item_side.device)
            return self.item_embedding(all_items)
        return self.output_items.weight

    def vectors_of(self, items: Tensor) -> Tensor:
        """items [...] -> V_items [..., d]."""
        return self.item_embedding(items) if self.output_items is None else self.output_items(items)


class SDM(TwoTowerRecommender):
    def __init__(self, config: ModelConfig, item_side: Tensor):
        super().__init__(config)
        self.item_embedding = ItemEmbedding(config, item_side, project=config.short_term or config.tie_output)
        self.user_embedding = UserEmbedding(config)
        self.short_term = ShortTermEncoder(config) if config.short_term else None
        self.long_term = LongTermEncoder(config) if config.long_term else None
        both = config.short_term and config.long_term
        self.fusion = build_fusion(config) if both else None

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """-> o [B, T, d]: the user vector after each prefix of the session (causal)."""
        e_u = self.user_embedding(batch)  # [B, d]
        if self.short_term is None:
            p = self.long_term(batch, e_u, self.item_embedding)  # [B, d]
            return p.unsqueeze(1).expand(-1, batch["items"].shape[1], -1)  # [B, T, d]
        s = self.short_term(self.item_embedding(batch["items"]), batch["lengths"], e_u)  # [B, T, d]
        if self.long_term is None:
            return s
        p = self.long_term(batch, e_u, self.item_embedding)  # [B, d]
        return self.fusion(e_u, s, p)  # [B, T, d]
