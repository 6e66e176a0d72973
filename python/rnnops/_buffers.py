"""Allocation of kernel outputs, shared by every kernel backend.

With POISON on (RNNOPS_POISON=1, which tests/conftest.py sets), every buffer a kernel writes is filled with NaN
first, so that an element a kernel forgets to write fails instead of passing with whatever the
allocator left there.
"""
from __future__ import annotations

import os

import torch

POISON = os.environ.get("RNNOPS_POISON", "0") == "1"


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty for kernel outputs (NaN-filled when POISON is on)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON else out


def empty_in_order_of(reference: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A dense kernel output of ``reference``'s shape (and dtype unless given) whose dimensions lie in
    memory in the order of ``reference``'s strides, largest first, whether or not ``reference`` is
    dense: a (B, T, D) view of a (B, D, T) tensor, even one sliced from a wider tensor, gets a
    (B, D, T)-contiguous output viewed as (B, T, D) (torch.empty_like keeps strides only for dense
    tensors)."""
    order = sorted(range(reference.dim()), key=lambda i: (-reference.stride(i), i))
    out = empty([reference.shape[i] for i in order], dtype=dtype or reference.dtype, device=reference.device)
    return out.permute([order.index(i) for i in range(reference.dim())])
