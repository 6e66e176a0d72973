"""Pieces shared by the public ops."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _validate as check
from .._validate import accumulation_dtype


class Checked(NamedTuple):
    """What validating a linear-family op's inputs yields."""

    dims: check.Dims
    dtype: torch.dtype
    device: torch.device
    scale: float
    chunk_size: int


def state_or_zeros(initial_state: torch.Tensor | None, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """The state an empty sequence ends in: a copy of ``initial_state`` (in the accumulation
    dtype), or zeros of ``shape``."""
    acc = accumulation_dtype(dtype)
    if initial_state is None:
        return torch.zeros(shape, dtype=acc, device=device)
    return initial_state.to(acc, copy=True)


def add_time_axis(op: str, name: str, x: torch.Tensor | None, layout: str) -> torch.Tensor | None:
    """A decoding input of ``layout`` (batch first, no time axis) as a length-1 sequence."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    letters = layout.split()
    if x.dim() != len(letters):
        raise ValueError(
            f"{op}: {name} must have {len(letters)} dimensions ({', '.join(letters)}), got shape {tuple(x.shape)}"
        )
    return x.unsqueeze(1)


def needs_grad(*tensors) -> bool:
    """Whether autograd will want gradients for any of ``tensors`` (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
