"""Chunked selective scan (Mamba-1).

Mamba-1's decay is per (channel, state) element, so there is no matmul form; the win on the CPU
is fewer, larger operations. Time is cut into n chunks of C ~ sqrt(T) steps and processed in
three passes of about sqrt(T) steps each instead of T:
    1. every chunk from a zero state, all chunks at once (C steps): the chunk's end state;
       its total decay is exp(A * sum(dt)).
    2. chunk to chunk (n steps): S_next = decay * S_in + end state.
    3. every chunk again from its true entering state (C steps), producing y.
All factors are exponentials of non-positive numbers for A <= 0, as in the recurrence itself.
"""
from __future__ import annotations

import math

import torch

from .._dispatch import register
from .._validate import accumulation_dtype
from ..reference.selective_scan import discretized_dt, recurrence, skip_and_gate
from ._common import run_in_chunks, scan_chunks


def _chunked(u, dt, B, C, initial_state, chunk, *, A):
    """One segment: u, dt (batch, n, chunk, Dm); B, C time-varying (batch, n, chunk, [G,] N) or
    static (Dm, N); state (batch, Dm, N) or None. Returns y (batch, n, chunk, Dm) and the state."""
    batch, n, _, channels = u.shape

    def fold(x):
        """Chunks become batch entries: (batch, n, chunk, ...) -> (batch * n, chunk, ...)."""
        return x if x.dim() == 2 else x.flatten(0, 1)

    u_c, dt_c, B_c, C_c = fold(u), fold(dt), fold(B), fold(C)
    _, chunk_end = recurrence(u_c, dt_c, A, B_c, None, None)
    decay = torch.exp(dt_c.sum(1)[..., None] * A.to(dt.dtype)).unflatten(0, (batch, n))
    chunk_end = chunk_end.unflatten(0, (batch, n))
    state = u.new_zeros(batch, channels, A.shape[1], dtype=dt.dtype) if initial_state is None else initial_state.to(dt.dtype)
    entering, final = scan_chunks(lambda S, decay_i, end_i: decay_i * S + end_i, state, decay, chunk_end)
    y, _ = recurrence(u_c, dt_c, A, B_c, C_c, entering.flatten(0, 1))
    return y.unflatten(0, (batch, n)), final


@register("selective_scan", "chunked")
def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, *, initial_state,
                   output_final_state, cu_seqlens):
    del output_final_state
    dt = discretized_dt(delta, delta_bias, delta_softplus, accumulation_dtype(u.dtype))
    static = {name: M for name, M in (("B", B), ("C", C)) if M.dim() == 2}

    def run(u, dt, B_t, C_t, state, chunk):
        return _chunked(u, dt, static.get("B", B_t), static.get("C", C_t), state, chunk, A=A)

    varying = [None if M.dim() == 2 else M for M in (B, C)]
    chunk = math.isqrt(max(u.shape[1] - 1, 0)) + 1
    y, final = run_in_chunks(run, chunk, cu_seqlens, (u, dt, *varying), initial_state,
                             per_token_elements=max(1, u.shape[0] * A.numel() // chunk), heads=False)
    return skip_and_gate(y, u, D, z).to(u.dtype), final
