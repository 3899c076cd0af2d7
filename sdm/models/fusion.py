"""Fusion of short-term s [B, T, d] and long-term p [B, d] interests (paper §3.5), and the
ablations of Table 4. p is shared by all positions of a session, so it is broadcast over T."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdm.models.config import ModelConfig


class GatedFusion(nn.Module):
    """G = sigmoid(W1 e_u + W2 s + W3 p + b);  o = (1 - G) * p + G * s."""

    def __init__(self, dim: int):
        super().__init__()
        self.W1 = nn.Linear(dim, dim)  # carries b
        self.W2 = nn.Linear(dim, dim, bias=False)
        self.W3 = nn.Linear(dim, dim, bias=False)

    def forward(self, e_u: Tensor, s: Tensor, p: Tensor) -> Tensor:
        """e_u [B, d], s [B, T, d], p [B, d] -> o [B, T, d]."""
        per_user = (self.W1(e_u) + self.W3(p)).unsqueeze(1)  # [B, 1, d]
        G = torch.sigmoid(per_user + self.W2(s))  # [B, T, d]
        return (1 - G) * p.unsqueeze(1) + G * s


class AddFusion(nn.Module):
    """o = s + p."""

    def forward(self, e_u: Tensor, s: Tensor, p: Tensor) -> Tensor:
        return s + p.unsqueeze(1)


class ConcatFusion(nn.Module):
    """o = W [s; p] + b."""

    def __init__(self, dim: int):
        super().__init__()
        self.W = nn.Linear(2 * dim, dim)

    def forward(self, e_u: Tensor, s: Tensor, p: Tensor) -> Tensor:
        return self.W(torch.cat([s, p.unsqueeze(1).expand_as(s)], dim=-1))


class MultiplyFusion(nn.Module):
    """o = s * p (element-wise)."""

    def forward(self, e_u: Tensor, s: Tensor, p: Tensor) -> Tensor:
        return s * p.unsqueeze(1)


def build_fusion(config: ModelConfig) -> nn.Module:
    if config.fusion == "gated":
        return GatedFusion(config.dim)
    if config.fusion == "concat":
        return ConcatFusion(config.dim)
    return AddFusion() if config.fusion == "add" else MultiplyFusion()
