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
