"""DeltaProduct on top of any delta-rule implementation.

The n_h Householder steps of a token become n_h consecutive delta-rule steps of a sequence
n_h times longer: the gate on the first step, the query on the last (zeros elsewhere), and
the output read at the last step of each token. ``k``, ``v``, ``beta`` of shape (B, T, n_h,
...) are already in that interleaved order, so they are only reshaped. (The Triton backend does
without the zeros: its kernels read q and g, and write o, once a token themselves.)
"""
from __future__ import annotations

import torch


def interleave(x: torch.Tensor) -> torch.Tensor:
    """(B, T, n_h, ...) -> (B, T * n_h, ...): a token's n_h Householder steps as consecutive rows."""
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def step_offsets(cu_seqlens: torch.Tensor | None, steps: int) -> torch.Tensor | None:
    """Packed sequences' offsets in the interleaved rows (n_h rows a token)."""
    return None if cu_seqlens is None else cu_seqlens * steps


def via_delta_rule(delta_rule):
    """A delta_product backend implementation from a delta_rule one (same keyword arguments)."""

    def delta_product(q, k, v, beta, g, *, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
                      **options):
        batch, time, steps = k.shape[:3]

        def on_step(x, position):
            """A per-token tensor on one Householder step, zeros on the others."""
            zeros = x.new_zeros((batch, time, steps - 1) + x.shape[2:])
            parts = [zeros, x[:, :, None]] if position == "last" else [x[:, :, None], zeros]
            return interleave(torch.cat(parts, dim=2))

        o, final = delta_rule(
            on_step(q, "last"), interleave(k), interleave(v), interleave(beta),
            None if g is None else on_step(g, "first"),
            scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=step_offsets(cu_seqlens, steps), chunk_size=chunk_size, **options,
        )
        return o.reshape((batch, time, steps) + o.shape[2:])[:, :, -1], final

    return delta_product
