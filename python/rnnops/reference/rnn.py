"""Reference recurrent cells, one time step at a time.

For every cell the recurrent pre-activation of gate g, head h, unit i is
    r[g, h, i] = sum_j R[g, h, i, j] * h_prev[h, j] + b[g, h, i]
and x_gates holds the input projections (input-side bias included). The cells:

lstm  (gates i, f, z, o; state h, c)
    c = sigmoid(f) * c + sigmoid(i) * tanh(z);  h = sigmoid(o) * tanh(c)        (x + r per gate)
gru   (gates r, z, n; state h), PyTorch's convention
    rg = sigmoid(x_r + r_r); zg = sigmoid(x_z + r_z); n = tanh(x_n + rg * r_n)
    h = (1 - zg) * n + zg * h_prev
slstm (gates i, f, z, o; state h, c, n, m), xLSTM's stabilised exponential gating
    log_f = logsigmoid(f);  m_new = max(log_f + m, i)
    ig = exp(i - m_new);   fg = exp(log_f + m - m_new)
    c = fg * c + ig * tanh(z);  n = fg * n + ig;  h = sigmoid(o) * c / n
    (h does not depend on m; c and n carry the factor exp(-m). Zero initial states are valid.
    A loss on the final c, n or m is not differentiable where the max ties: there its gradient
    jumps, and half-precision kernels, whose rounding flips near-ties, differ from this
    reference in a few elements; a loss on h is smooth.)
elman (gate x; state h)
    h = tanh(x + r)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._dispatch import register
from .._validate import accumulation_dtype


def _lstm(x, r, state):
    _, c = state
    i, f, z, o = (x + r).unbind(1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(z)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (h, c)


def _gru(x, r, state):
    (h_prev,) = state
    reset = torch.sigmoid(x[:, 0] + r[:, 0])
    update = torch.sigmoid(x[:, 1] + r[:, 1])
    candidate = torch.tanh(x[:, 2] + reset * r[:, 2])
    return ((1 - update) * candidate + update * h_prev,)


def _slstm(x, r, state):
    _, c, n, m = state
    i, f, z, o = (x + r).unbind(1)
    log_f = F.logsigmoid(f)
    m_new = torch.maximum(log_f + m, i)
    input_gate = torch.exp(i - m_new)
    forget_gate = torch.exp(log_f + m - m_new)
    c = forget_gate * c + input_gate * torch.tanh(z)
    n = forget_gate * n + input_gate
    return (torch.sigmoid(o) * c / n, c, n, m_new)


def _elman(x, r, state):
    return (torch.tanh(x[:, 0] + r[:, 0]),)


@dataclass(frozen=True)
class Cell:
    """A cell's gate count, state names (h first) and pointwise update
    ``update(x (B, G, H, D), r (B, G, H, D), state) -> new state``."""

    gates: int
    states: tuple[str, ...]
    update: Callable[..., tuple[torch.Tensor, ...]]


CELLS = {
    "lstm": Cell(4, ("h", "c"), _lstm),
    "gru": Cell(3, ("h",), _gru),
    "slstm": Cell(4, ("h", "c", "n", "m"), _slstm),
    "elman": Cell(1, ("h",), _elman),
}


@register("rnn", "reference")
def rnn(x_gates, R, b, state, *, cell):
    """x_gates (B, T, G, H, D); R (G, H, D, D); b (G, H, D) or None; state tuple of (B, H, D)."""
    acc = accumulation_dtype(x_gates.dtype)
    batch, time, _, heads, dim = x_gates.shape
    spec = CELLS[cell]
    if state is None:
        state = tuple(x_gates.new_zeros(batch, heads, dim, dtype=acc) for _ in spec.states)
    state = tuple(s.to(acc) for s in state)
    R = R.to(acc)
    hs = []
    x_t = x_gates.to(acc).unbind(1)  # per step by unbind (linear backward: see reference.linear_attn)
    for t in range(time):
        r = torch.einsum("ghij,bhj->bghi", R, state[0])
        if b is not None:
            r = r + b.to(acc)
        state = spec.update(x_t[t], r, state)
        hs.append(state[0])
    h_seq = torch.stack(hs, dim=1) if hs else x_gates.new_zeros(batch, 0, heads, dim, dtype=acc)
    return h_seq.to(x_gates.dtype), state
