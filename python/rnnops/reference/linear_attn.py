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
    # per step by one unbind: a backward linear in T (indexing [:, t] in the loop would add a
    # zero-filled gradient of the whole input per step: quadratic, 13 s at T = 4096 on a CPU)
    q_t, k_t, v_t = (x.to(acc).unbind(1) for x in (q, k, v))
    g_t = None if g is None else g.to(acc).unbind(1)
    outs = []
    for t in range(time):
        if g is not None:
            decay = g_t[t].exp()
            S = S * (decay[..., None, None] if g.dim() == 3 else decay[..., None])
        S = S + k_t[t][..., :, None] * v_t[t][..., None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q_t[t], S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape, dtype=acc)
    return o.to(q.dtype), S


@register("linear_attn", "reference")
def linear_attn(q, k, v, g, *, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    del output_final_state, chunk_size  # the state is always computed; no chunking here
    return per_sequence(
        lambda q, k, v, g, s: _recurrence(q, k, v, g, scale, s), cu_seqlens, (q, k, v, g), initial_state
    )
