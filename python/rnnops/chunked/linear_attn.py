"""Chunked linear attention (plain, scalar log-decay, per-key log-decay / GLA).

Per chunk of C tokens with cumulative log-decay G (inclusive, within the chunk):
    o     = (scores @ v) + (q * exp(G)) @ S_in,   scores[i, j] = q_i . (k_j * exp(G_i - G_j)), j <= i
    S_out = exp(G_C) * S_in + (k * exp(G_C - G))^T @ v
For per-key decay, exp(G_i - G_j) = exp(G_i - G_m) exp(G_m - G_j) around the chunk's middle
token m turns the scores into one matmul when no chunk decays by more than ``FACTOR_LIMIT``
(so no factor exceeds exp(FACTOR_LIMIT)). Stronger decays build the scores from sub-blocks of
``SUB_BLOCK`` tokens: off-diagonal blocks factor the decay around the boundary between them
(both factors <= 1), diagonal blocks apply it per pair exactly.
"""
from __future__ import annotations

import torch

from .._dispatch import register
from .._validate import accumulation_dtype
from ._common import cumulative_log_decay, pair_decay, run_in_chunks, scan_chunks

SUB_BLOCK = 16
FACTOR_LIMIT = {torch.float32: 30.0, torch.float64: 300.0}


def gated_scores(q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """scores[i, j] = sum_d q[i, d] k[j, d] exp(G[i, d] - G[j, d]) for j <= i, else 0.

    q, k: (..., C, K); G: (..., C, K) float64, non-increasing along C. Returns (..., C, C) in
    q's dtype.
    """
    size = q.shape[-2]

    def exp(x):
        return x.exp().to(q.dtype)

    if (G[..., 0, :] - G[..., -1, :]).max().item() <= FACTOR_LIMIT[q.dtype]:
        # |G| <= FACTOR_LIMIT here, so the accumulation dtype resolves the differences well
        G = G.to(q.dtype)
        middle = G[..., size // 2 : size // 2 + 1, :]
        return ((q * (G - middle).exp()) @ (k * (middle - G).exp()).mT).masked_fill(~causal, 0.0)
    rows = []
    for start in range(0, size, SUB_BLOCK):
        end = min(start + SUB_BLOCK, size)
        qb, kb, Gb = q[..., start:end, :], k[..., start:end, :], G[..., start:end, :]
        diff = Gb[..., :, None, :] - Gb[..., None, :, :]
        decay = exp(torch.where(causal[start:end, start:end, None], diff, float("-inf")))
        parts = [(qb[..., :, None, :] * kb[..., None, :, :] * decay).sum(-1)]
        if start > 0:
            boundary = G[..., start - 1 : start, :]
            q_part = qb * exp(Gb - boundary)
            k_part = k[..., :start, :] * exp(boundary - G[..., :start, :])
            parts.insert(0, q_part @ k_part.mT)
        if end < size:
            parts.append(q.new_zeros(q.shape[:-2] + (end - start, size - end)))
        rows.append(torch.cat(parts, dim=-1))
    return torch.cat(rows, dim=-2)


def _chunked(q, k, v, g, initial_state, chunk, *, scale):
    """One segment: q, k (B, n, H, C, K); v (B, n, H, C, V); g None, (B, n, H, C) or
    (B, n, H, C, K); state (B, H, K, V) or None. Returns o (B, n, H, C, V) and the state."""
    acc = accumulation_dtype(q.dtype)
    q, k, v = (x.to(acc) for x in (q, k, v))
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    if g is None:
        scores = (q @ k.mT).masked_fill(~causal, 0.0)
        q_in, k_out, chunk_decay = q, k, None
    else:
        if g.dim() == 4:
            G = cumulative_log_decay(g, -1)
            scores = (q @ k.mT) * pair_decay(G, causal, acc)
            G = G[..., None]
        else:
            G = cumulative_log_decay(g, -2)
            scores = gated_scores(q, k, G, causal)
        G_last = G[..., -1:, :]
        q_in = q * G.to(acc).exp()
        k_out = k * (G_last - G).exp().to(acc)
        chunk_decay = G_last.exp().mT.to(acc)
    updates = k_out.mT @ v
    S = q.new_zeros(q.shape[0], q.shape[2], q.shape[4], v.shape[4]) if initial_state is None else initial_state.to(acc)

    if chunk_decay is None:
        entering, final = scan_chunks(lambda S, update: S + update, S, updates)
    else:
        entering, final = scan_chunks(lambda S, decay, update: decay * S + update, S, chunk_decay, updates)
    return scale * (scores @ v + q_in @ entering), final


@register("linear_attn", "chunked")
def linear_attn(q, k, v, g, *, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    del output_final_state
    o, final = run_in_chunks(
        lambda q, k, v, g, s, chunk: _chunked(q, k, v, g, s, chunk, scale=scale),
        chunk_size, cu_seqlens, (q, k, v, g), initial_state,
        per_token_elements=q.shape[0] * q.shape[2] * max(q.shape[3], v.shape[3], chunk_size), heads=True,
    )
    return o.to(q.dtype), final
