"""Embedding layer (paper §3.2): items as the concatenation of their feature embeddings, users from
their profile."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdm.models.config import ModelConfig

# nn.Embedding's N(0, 1) rows give projected item vectors of norm ~5 and initial logits far
# wider than ln(n_items): on a small log Adam's ~lr-sized steps never undo that in the few hundred
# steps it gets, and the model only learns to flatten its scores (the loss stays at ln(n_items)).
# Small rows start every logit near zero, and the softmax learns from the first step.
EMBEDDING_INIT_STD = 0.05


def small_embedding(vocab_size: int, width: int) -> nn.Embedding:
    """An embedding table with N(0, EMBEDDING_INIT_STD^2) rows and a zero padding row 0."""
    table = nn.Embedding(vocab_size, width, padding_idx=0)
    nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
    with torch.no_grad():
        table.weight[0].zero_()
    return table


class ItemEmbedding(nn.Module):
    """e_i = W concat({e_i^f | f in F}) + b, with one table per feature f (id, leaf, category, shop, brand).

    The same tables embed the long-term behaviour sets L^u_f (`embed_feature`), so a brand learnt from
    the session and a brand in last week's history share one vector.
    """

    def __init__(self, config: ModelConfig, item_side: Tensor, project: bool = True):
        super().__init__()
        expected = (config.n_items, len(config.side_features))
        if tuple(item_side.shape) != expected:
            raise ValueError(f"item_side has shape {tuple(item_side.shape)}, expected {expected}")
        self.features = config.item_features
        self.tables = nn.ModuleDict(
            {f: small_embedding(config.vocab_size(f), config.embedding_widths[f]) for f in self.features}
        )
        # item id -> ids of the side features in use; row 0 (padding item) maps to padding ids.
        self.register_buffer("item_side", item_side[:, : len(self.features) - 1].long().clone())
        # project=False: the owner only needs the tables (SDM without a short-term encoder or tied outputs).
        concat_width = sum(config.embedding_widths[f] for f in self.features)
        self.project = nn.Linear(concat_width, config.dim) if project else None

    def embed_feature(self, feature: str, ids: Tensor) -> Tensor:
        """ids [...] in `feature`'s vocabulary -> [..., width_f]; padding id 0 gives zeros.

        A plain row gather: its backward is about twice as fast as nn.Embedding's on CPU for the
        long-term sets (B x L ids per feature). Unlike nn.Embedding it would pass gradient to the
        padding row, but the callers mask padding entries out of everything they compute.
        """
        table = self.tables[feature].weight  # [V_f, width_f]
        return table.index_select(0, ids.flatten()).view(*ids.shape, table.shape[1])

    def forward(self, items: Tensor) -> Tensor:
        """items [...] -> item representations [..., d]."""
        side = self.item_side[items]  # [..., S]
        parts = [self.tables["item"](items)]
        parts += [self.tables[f](side[..., j]) for j, f in enumerate(self.features[1:])]
        return self.project(torch.cat(parts, dim=-1))  # [..., d]

    def catalogue(self) -> Tensor:
        """-> e_i of every item id [n_items, d]: forward(arange(n_items)), equal to rounding.

        W concat(e^f) + b = (W_item e^item + b) + sum_f W_f e^f, with W_f the columns of W that meet
        feature f. The id part is one matrix product over the id table; each side table is
        projected once (V_f rows, far fewer than items) and one embedding_bag sums an item's
        projected side rows. The [n_items, sum of widths] concatenation of forward never exists:
        a third of forward's time over a 1M-item catalogue. Row 0 of the id table (the padding
        item) gets gradient if row 0 of the result is scored, which no loss does.
        """
        widths = [self.tables[f].weight.shape[1] for f in self.features]
        W_item, *W_side = self.project.weight.split(widths, dim=1)  # W_f [d, width_f] per feature
        vectors = torch.addmm(self.project.bias, self.tables["item"].weight, W_item.T)  # [n_items, d]
        if not W_side:
            return vectors
        # The side tables without their padding rows, stacked behind one constant zero row 0 that
        # every padding id maps to: it adds nothing and takes no gradient, as padding_idx does in
        # forward (embedding_bag's own padding_idx is 3x slower).
        side_tables = [self.tables[f].weight[1:] @ W_f.T for f, W_f in zip(self.features[1:], W_side)]  # [V_f - 1, d]
        stacked = torch.cat([vectors.new_zeros(1, vectors.shape[1]), *side_tables])  # [1 + sum_f (V_f - 1), d]
        first_row = torch.tensor([0] + [len(table) for table in side_tables[:-1]], device=vectors.device).cumsum(0)  # [S]
        rows = torch.where(self.item_side > 0, self.item_side + first_row, 0)  # [n_items, S]
        return vectors.add_(F.embedding_bag(rows, stacked, mode="sum"))  # [n_items, d]


class UserEmbedding(nn.Module):
    """e_u = W concat({e_u^p | p in P}) + b over the profile fields (and the user id if enabled).

    With neither profile fields nor user ids, e_u is one learned vector shared by every user: the
    attention layers still get a (global) query and the gate a (global) bias.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.profile_tables = nn.ModuleList(
            small_embedding(vocab, config.profile_width) for vocab in config.profile_vocab
        )
        self.user_table = small_embedding(config.n_users, config.dim) if config.user_id else None
        concat_width = len(config.profile_vocab) * config.profile_width + (config.dim if config.user_id else 0)
        if concat_width:
            self.project = nn.Linear(concat_width, config.dim)
            self.shared = None
        else:
            self.project = None
            self.shared = nn.Parameter(torch.randn(config.dim) / config.dim**0.5)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """-> e_u [B, d]."""
        if self.shared is not None:
            return self.shared.expand(batch["items"].shape[0], -1)
        parts = [table(batch["profile"][:, j]) for j, table in enumerate(self.profile_tables)]  # P x [B, w]
        if self.user_table is not None:
            parts.append(self.user_table(batch["user"]))  # [B, d]
        return self.project(torch.cat(parts, dim=-1))  # [B, d]
