"""Masked multi-head self-attention, shared by SDM's short-term encoder and SASRec."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiHeadSelfAttention(nn.Module):
    """W^O concat(head_1..head_h), head_i = Attention(W_i^Q X, W_i^K X, W_i^V X) over the allowed keys;
    subclasses put their residual, normalisation and dropout around `attend`."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def attend(self, x: Tensor, allowed: Tensor) -> Tensor:
        """x [B, T, d], allowed [B, T, T] bool -> [B, T, d]."""
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, d/H]
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1))  # [B, H, T, d/H]
        return self.out(heads.transpose(1, 2).reshape(B, T, d))  # [B, T, d]


def attention_mask(lengths: Tensor, T: int) -> Tensor:
    """allowed[b, t, k]: position t may attend to k. Causal (k <= t) and k not padding.

    For valid t the causal mask alone already excludes the right padding; the padding mask keeps
    padded positions from mixing padding in, and k == t stays allowed so that no row is empty
    (a fully padded row would otherwise make the attention softmax 0/0).
    """
    positions = torch.arange(T, device=lengths.device)
    causal = positions[None, :] <= positions[:, None]  # [T, T]
    valid = positions[None, :] < lengths[:, None]  # [B, T]
    return causal & (valid[:, None, :] | torch.eye(T, dtype=torch.bool, device=lengths.device))  # [B, T, T]
