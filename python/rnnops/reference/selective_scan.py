"""Reference selective scan (Mamba-1), one time step at a time.

    dt_t = softplus(delta_t + delta_bias) if delta_softplus else delta_t + delta_bias
    x_t  = exp(dt_t * A) * x_{t-1} + dt_t * B_t * u_t        x: (batch, Dm, N)
    y_t  = <x_t, C_t> + D * u_t;   y_t *= silu(z_t) if z is given
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dispatch import register
from .._validate import accumulation_dtype
from .._varlen import per_sequence


def bc_steps(M: torch.Tensor, time: int, channels: int, acc: torch.dtype) -> list[torch.Tensor]:
    """B or C at each time step as (batch or 1, Dm or 1, N) in ``acc``, from any accepted layout:
    static (Dm, N), shared (batch, T, N) or grouped (batch, T, G, N) (channel d uses group
    d // (Dm / G), as in mamba_ssm). One unbind: a backward linear in T."""
    M = M.to(acc)
    if M.dim() == 2:
        return [M[None]] * time
    if M.dim() == 3:
        return [m[:, None, :] for m in M.unbind(1)]
    return [m.repeat_interleave(channels // M.shape[2], dim=1) for m in M.unbind(1)]


def discretized_dt(delta, delta_bias, delta_softplus, acc):
    dt = delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)
    return F.softplus(dt) if delta_softplus else dt


def recurrence(u, dt, A, B, C, initial_state):
    """u, dt (batch, T, Dm); B, C in any layout of bc_steps (C None: no output).
    Returns y = <x_t, C_t> (batch, T, Dm) or None, and the final state (batch, Dm, N)."""
    acc = dt.dtype
    batch, time, channels = u.shape
    A = A.to(acc)
    x = u.new_zeros(batch, channels, A.shape[1], dtype=acc) if initial_state is None else initial_state.to(acc)
    ys = []
    dt_steps, u_steps = dt[..., None].unbind(1), u.to(acc)[..., None].unbind(1)
    B_steps = bc_steps(B, time, channels, acc)
    C_steps = None if C is None else bc_steps(C, time, channels, acc)
    for t in range(time):
        dt_t = dt_steps[t]
        x = torch.exp(dt_t * A) * x + dt_t * u_steps[t] * B_steps[t]
        if C is not None:
            ys.append((x * C_steps[t]).sum(-1))
    if C is None:
        return None, x
    return (torch.stack(ys, dim=1) if ys else dt.new_zeros(batch, 0, channels)), x


def skip_and_gate(y, u, D, z):
    """y + D * u, times silu(z) when z is given; in y's (accumulation) dtype."""
    if D is not None:
        y = y + D.to(y.dtype) * u.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


@register("selective_scan", "reference")
def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, *, initial_state,
                   output_final_state, cu_seqlens):
    del output_final_state
    dt = discretized_dt(delta, delta_bias, delta_softplus, accumulation_dtype(u.dtype))

    def run(u, dt, B_t, C_t, state):
        return recurrence(u, dt, A, B if B_t is None else B_t, C if C_t is None else C_t, state)

    varying = [M if M.dim() > 2 else None for M in (B, C)]
    y, state = per_sequence(run, cu_seqlens, (u, dt, *varying), initial_state)
    return skip_and_gate(y, u, D, z).to(u.dtype), state
