"""mamba_ssm's selective-scan functions on rnnops.

``selective_scan_fn`` / ``selective_scan_ref`` take mamba's layouts: u, delta, z [B, D, L];
A [D, N]; B, C [D, N] (static), [B, N, L] or [B, G, N, L]; D, delta_bias [D]. They are passed
to rnnops as transposed views (no copies) and the output comes back as a [B, D, L] view.
``selective_state_update`` updates ``state`` in place and returns the output, as mamba_ssm's does.
Not supported (a ValueError): complex A, and the multi-head state layout [B, nheads, dim, N] of
selective_state_update.
"""
from __future__ import annotations

import rnnops


def _time_last_to_time_major(M):
    """[B, N, L] -> [B, L, N] and [B, G, N, L] -> [B, L, G, N] views; static [D, N] unchanged."""
    if M.dim() == 3:
        return M.transpose(1, 2)
    if M.dim() == 4:
        return M.permute(0, 3, 1, 2)
    return M


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, backend="auto"):
    if A.is_complex():
        raise ValueError("selective_scan_fn: complex A is not supported by rnnops")
    out = rnnops.selective_scan(u.transpose(1, 2), delta.transpose(1, 2), A, _time_last_to_time_major(B),
                                _time_last_to_time_major(C), D, None if z is None else z.transpose(1, 2), delta_bias,
                                delta_softplus, return_last_state=return_last_state, backend=backend)
    if return_last_state:
        y, last = out
        return y.transpose(1, 2), last
    return out.transpose(1, 2)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """mamba_ssm's pure-PyTorch reference: rnnops' reference backend."""
    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                             backend="reference")


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One step: state [B, D, N] (updated in place), x, dt, z [B, D], B, C [B, N] or [B, G, N].
    Returns out [B, D]."""
    if state.dim() != 3:
        raise ValueError(f"selective_state_update: state must be [batch, dim, dstate] (the multi-head layout is not "
                         f"supported), got shape {tuple(state.shape)}")
    out, new_state = rnnops.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    state.copy_(new_state)
    return out
