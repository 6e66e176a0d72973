"""Reference linear attention: S_t = exp(g_t) * S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t."""
from __future__ import annotations

import torch

from .._dispatch import register
from .._validate import accumulation_dtype
from .._varlen import per_sequence


def _recurrence(q, k, v, g, scale, initial_state):
    """q, k (B, T, H, K); v (B, T, H, V); g None, (B, T, H) or (B, T, H, K); state (B, H, K, V)."""
    acc = accumulation_dtype(q.dtype)
    batch, time, heads, dk = q.shape
    S = q.new_zeros(batch, heads, dk, v.shape[-1], dtype=acc) if initial_state is None else initial_state.to(acc)
    outs = []
    for t in range(time):
        if g is not None:
            decay = g[:, t].to(acc).exp()
            S = S * (decay[..., None, None] if g.dim() == 3 else decay[..., None])
        S = S + k[:, t].to(acc)[..., :, None] * v[:, t].to(acc)[..., None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t].to(acc), S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape, dtype=acc)
    return o.to(q.dtype), S


@register("linear_attn", "reference")
def linear_attn(q, k, v, g, *, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    del output_final_state, chunk_size  # the state is always computed; no chunking here
    return per_sequence(
        lambda q, k, v, g, s: _recurrence(q, k, v, g, scale, s), cu_seqlens, (q, k, v, g), initial_state
    )
