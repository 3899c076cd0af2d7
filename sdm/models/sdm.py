"""SDM (Lv et al., CIKM 2019): user vector o_t from the short-term session and the long-term history,
scored against an item output matrix V by inner product."""

from __future__ import annotations

from torch import Tensor

from sdm.models.base import TwoTowerRecommender
from sdm.models.config import ModelConfig
from sdm.models.embedding import ItemEmbedding, UserEmbedding
from sdm.models.fusion import build_fusion
from sdm.models.long_term import LongTermEncoder
from sdm.models.short_term import ShortTermEncoder


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
