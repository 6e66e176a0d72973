"""Chunked delta rule (compact WY / UT representation) and DeltaProduct.

Per chunk of C tokens with cumulative log-decay G (zero without a gate), Gamma = exp(G):
    L = strictly_lower(diag(beta) (K K^T * exp(G_i - G_j)))
    [U | W] = (I + L)^-1 [diag(beta) V | diag(beta * Gamma) K]      (one triangular solve)
    X = U - W S_in                       (the chunk's pseudo-values beta_t (v_t - S_{t-1}^T k_t))
    O = (Gamma * Q) S_in + (Q K^T * exp(G_i - G_j), j <= i) X
    S_out = Gamma_C S_in + (K * exp(G_C - G))^T X
Everything but the chunk-to-chunk recurrence S_out = M S_in + Y (M = Gamma_C I - K_out^T W,
Y = K_out^T U, K_out = K * exp(G_C - G)) is batched over all chunks. DeltaProduct runs as the
delta rule on its interleaved steps (``rnnops._delta_product``).
"""
from __future__ import annotations

import torch

from .._delta_product import via_delta_rule
from .._dispatch import register
from .._validate import accumulation_dtype
from ._common import cumulative_log_decay, pair_decay, run_in_chunks, scan_chunks


def _chunked(q, k, v, beta, g, initial_state, chunk, *, scale):
    """One segment: q, k (B, n, H, C, K); v (B, n, H, C, V); beta, g (B, n, H, C) (g may be
    None); state (B, H, K, V) or None. Returns o (B, n, H, C, V) and the state."""
    acc = accumulation_dtype(q.dtype)
    dk, dv = q.shape[-1], v.shape[-1]
    q, k, v, beta = (x.to(acc) for x in (q, k, v, beta))
    q = q * scale
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    kk, qk = k @ k.mT, q @ k.mT
    if g is None:
        qk = qk.masked_fill(~causal, 0.0)
        gamma = gamma_last = None
    else:
        G = cumulative_log_decay(g, -1)
        decay = pair_decay(G, causal, acc)
        kk, qk = kk * decay, qk * decay
        gamma = G.to(acc).exp()[..., None]
        gamma_last = gamma[..., -1:, :]
        out_decay = (G[..., -1:] - G).exp().to(acc)[..., None]
    L = (kk * beta[..., :, None]).tril(-1)
    k_beta = k * beta[..., None]
    rhs = torch.cat([v * beta[..., None], k_beta if gamma is None else k_beta * gamma], dim=-1)
    X = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)  # [U | W]
    q_in = q if gamma is None else q * gamma
    k_out = k if gamma is None else k * out_decay
    QX, KX = qk @ X, k_out.mT @ X
    identity = torch.eye(dk, dtype=acc, device=q.device)
    M = (identity if gamma_last is None else gamma_last * identity) - KX[..., dv:]
    Y = KX[..., :dv].contiguous()
    S = q.new_zeros(q.shape[0], q.shape[2], dk, dv) if initial_state is None else initial_state.to(acc)

    def transition(S, M_i, Y_i):
        """S_out = M S_in + Y, one batched multiply-add over B * H."""
        return torch.baddbmm(Y_i.flatten(0, 1), M_i.flatten(0, 1), S.flatten(0, 1)).view_as(S)

    entering, final = scan_chunks(transition, S, M, Y)
    return QX[..., :dv] + (q_in - QX[..., dv:]) @ entering, final


@register("delta_rule", "chunked")
def delta_rule(q, k, v, beta, g, *, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    del output_final_state
    o, final = run_in_chunks(
        lambda q, k, v, beta, g, s, chunk: _chunked(q, k, v, beta, g, s, chunk, scale=scale),
        chunk_size, cu_seqlens, (q, k, v, beta, g), initial_state,
        per_token_elements=q.shape[0] * q.shape[2] * max(q.shape[3], v.shape[3], chunk_size), heads=True,
    )
    return o.to(q.dtype), final


register("delta_product", "chunked")(via_delta_rule(delta_rule))
