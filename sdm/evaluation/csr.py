"""Per-case item sets (each case's targets, or the items it must not be shown) as CSR arrays."""

from __future__ import annotations

import torch
from torch import Tensor

CSR = tuple[Tensor, Tensor]  # (indptr [N + 1], indices [nnz]), int64: row n owns indices[indptr[n]:indptr[n + 1]]


def in_rows(ids: Tensor, rows: CSR) -> Tensor:
    """member [N, K]: whether ids[n, r] is in row n of `rows` (negative ids, padding, never are).
    Each (case, item) pair is packed into one int64 key and looked up among the rows' sorted keys."""
    indptr, indices = rows
    n_cases = ids.shape[0]
    largest = max(int(ids.max()) if ids.numel() else 0, int(indices.max()) if indices.numel() else 0)
    stride = largest + 1
    if n_cases * stride >= 2**63:
        raise ValueError("too many cases and items to pack (case, item) into one int64 key")
    if indices.numel() == 0:
        return torch.zeros(ids.shape, dtype=torch.bool)
    owner = torch.repeat_interleave(torch.arange(n_cases), indptr.diff())  # [nnz]
    keys = (owner * stride + indices).sort().values  # [nnz]
    queries = torch.arange(n_cases).unsqueeze(1) * stride + ids  # [N, K]
    position = torch.searchsorted(keys, queries).clamp(max=keys.numel() - 1)  # [N, K]
    return (keys[position] == queries) & (ids >= 0)


def rows_of(csr: CSR, rows: Tensor) -> CSR:
    """The CSR of the given rows of `csr`, in that order."""
    indptr, indices = csr
    lengths = indptr[rows + 1] - indptr[rows]  # [R]
    new_indptr = torch.cat([indptr.new_zeros(1), lengths.cumsum(0)])
    offsets = torch.arange(int(new_indptr[-1])) - torch.repeat_interleave(new_indptr[:-1], lengths)
    return new_indptr, indices[torch.repeat_interleave(indptr[rows], lengths) + offsets]
