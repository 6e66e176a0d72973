"""Reference delta rule and DeltaProduct.

Per token t (state S of shape (K, V) per head):
    S <- exp(g_t) * S                                   (if gated)
    for j in 0..n_h-1:  S <- S + beta_j k_j (v_j - S^T k_j)^T
    o_t = scale * S^T q_t
The delta rule is the case n_h = 1.
"""
from __future__ import annotations

import torch

from .._dispatch import register
from .._validate import accumulation_dtype
from .._varlen import per_sequence


def _recurrence(q, k, v, beta, g, scale, initial_state):
    """q (B, T, H, K); k (B, T, n_h, H, K); v (B, T, n_h, H, V); beta (B, T, n_h, H);
    g None or (B, T, H); state (B, H, K, V)."""
    acc = accumulation_dtype(q.dtype)
    batch, time, heads, dk = q.shape
    S = q.new_zeros(batch, heads, dk, v.shape[-1], dtype=acc) if initial_state is None else initial_state.to(acc)
    # per step, then per Householder step, by unbind (linear backward: see reference.linear_attn)
    q_t, g_t = q.to(acc).unbind(1), None if g is None else g.to(acc).unbind(1)
    k_t, v_t, beta_t = ([step.unbind(1) for step in x.to(acc).unbind(1)] for x in (k, v, beta))
    outs = []
    for t in range(time):
        if g is not None:
            S = S * g_t[t].exp()[..., None, None]
        for kj, vj, bj in zip(k_t[t], v_t[t], beta_t[t]):
            residual = vj - torch.einsum("bhkv,bhk->bhv", S, kj)
            S = S + bj[..., None, None] * kj[..., :, None] * residual[..., None, :]
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q_t[t]))
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(batch, 0, heads, v.shape[-1], dtype=acc)
    return o.to(q.dtype), S


@register("delta_product", "reference")
def delta_product(q, k, v, beta, g, *, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    del output_final_state, chunk_size
    return per_sequence(
        lambda q, k, v, beta, g, s: _recurrence(q, k, v, beta, g, scale, s),
        cu_seqlens,
        (q, k, v, beta, g),
        initial_state,
    )


@register("delta_rule", "reference")
def delta_rule(q, k, v, beta, g, **kwargs):
    return delta_product(q, k.unsqueeze(2), v.unsqueeze(2), beta.unsqueeze(2), g, **kwargs)
