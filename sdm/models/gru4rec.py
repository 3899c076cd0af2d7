"""GRU4Rec (Hidasi et al., ICLR 2016): a GRU over the session, its hidden state as the user vector.

Here it shares SDM's item tower (id + side information, tied or separate output matrix V) and its
loss, so the comparison isolates the sequence encoder. h_t = GRU(e_{i_0}, ..., e_{i_t}) depends
on items 0..t only, so every position is trained in one pass and right padding changes nothing.
Like the original, it reads the session alone: no user profile, no long-term sets.
"""

from __future__ import annotations

from torch import Tensor, nn

from sdm.models.config import ModelConfig
from sdm.models.embedding import ItemEmbedding
from sdm.models.base import TwoTowerRecommender


class GRU4Rec(TwoTowerRecommender):
    """config.lstm_layers stacked GRU layers of width d, dropout on their inputs."""

    def __init__(self, config: ModelConfig, item_side: Tensor):
        super().__init__(config)
        d = config.dim
        self.item_embedding = ItemEmbedding(config, item_side)
        self.dropout = nn.Dropout(config.dropout)
        between_layers = config.dropout if config.lstm_layers > 1 else 0.0  # nn.GRU warns about it for one layer
        self.gru = nn.GRU(d, d, num_layers=config.lstm_layers, batch_first=True, dropout=between_layers)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """-> h [B, T, d]: the hidden state after each item of the session."""
        x = self.dropout(self.item_embedding(batch["items"]))  # [B, T, d]
        h, _ = self.gru(x)  # [B, T, d]
        return h
