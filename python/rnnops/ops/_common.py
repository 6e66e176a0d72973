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


def fake_linear_outputs(q: torch.Tensor, v: torch.Tensor, states: int | None):
    """Output shapes of the linear family without computing them (for tracing): o (q's leading
    sizes, v's heads and V) in q's dtype, and a (states, H, K, V) state in the accumulation dtype
    (None: no state). Works for sequences (B, T, Hk, K) and single steps (B, Hk, K)."""
    o = q.new_empty(q.shape[:-2] + v.shape[-2:])
    if states is None:
        return o, None
    return o, q.new_empty((states,) + v.shape[-2:-1] + q.shape[-1:] + v.shape[-1:], dtype=accumulation_dtype(q.dtype))


def sequence_count(batch: int, cu_seqlens: torch.Tensor | None) -> int:
    """The number of states: the batch size, or len(cu_seqlens) - 1 for packed sequences."""
    return batch if cu_seqlens is None else cu_seqlens.numel() - 1


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


def check_grouped_heads(op: str, dims: check.Dims) -> None:
    """q and k's heads (Hk) must divide v's (H): each q / k head serves H / Hk consecutive value
    heads (grouped heads; Hk = H is the usual one each)."""
    if dims["H"] % dims["Hk"]:
        raise ValueError(f"{op}: q and k have {dims['Hk']} heads, which must divide v's {dims['H']} (grouped heads)")


def reads_grouped_heads(backend: str) -> bool:
    """Whether a linear-family sequence backend reads grouped q / k heads in place (the Triton
    kernels); the others get them repeated (:func:`repeat_heads`)."""
    return backend == "triton"


def repeat_heads(q: torch.Tensor, k: torch.Tensor, dims: check.Dims) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped q and k (Hk heads, the second-to-last axis) repeated to v's H heads, each for its
    H / Hk value heads: for the backends that take one q / k head per value head."""
    group = dims["H"] // dims["Hk"]
    if group == 1:
        return q, k
    return q.repeat_interleave(group, dim=-2), k.repeat_interleave(group, dim=-2)
