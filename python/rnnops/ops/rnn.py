"""Fused nonlinear recurrent cells with head-wise recurrent weights."""
from __future__ import annotations

import torch

from .. import _validate as check
from rnnops.autotune.kernels import rnn_shape

from .._dispatch import resolve
from .._library import LibraryOp, tracing
from .._validate import accumulation_dtype
from ..reference.rnn import CELLS
from ._common import add_time_axis, state_or_zeros


def rnn(
    x_gates: torch.Tensor,
    R: torch.Tensor,
    b: torch.Tensor | None = None,
    state: tuple[torch.Tensor, ...] | None = None,
    *,
    cell: str = "lstm",
    backend: str = "auto",
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run a recurrent cell over a sequence, FlashRNN-style: H independent heads of size D.

    The recurrent pre-activation of gate g, head h, unit i is
    ``sum_j R[g, h, i, j] * h_prev[h, j] + b[g, h, i]``, so ``torch.nn.LSTM.weight_hh_l0.view(4,
    1, D, D)`` is R for H = 1 and b is the recurrent-side bias (``bias_hh``); the input-side
    bias belongs in x_gates. Cell equations: :mod:`rnnops.reference.rnn`.

    Args:
        x_gates: (B, T, G, H, D) input projections; G = 4 (lstm: i, f, z, o), 3 (gru: r, z, n),
            4 (slstm: i, f, z, o), 1 (elman).
        R: (G, H, D, D) recurrent weights. b: None or (G, H, D).
        state: None (zeros) or a tuple of (B, H, D) tensors: lstm (h, c); gru (h,);
            slstm (h, c, n, m); elman (h,).
        cell: "lstm", "gru", "slstm" or "elman".
        backend: "auto", "reference".

    Returns:
        h_seq (B, T, H, D) in x_gates' dtype and the final state tuple in float32 (float64 for
        float64 inputs). T = 0 gives an empty h_seq and the initial state (or zeros).
    """
    op = "rnn"
    check.check_choice(op, "cell", cell, tuple(CELLS))
    spec = CELLS[cell]
    check.require_tensor(op, "x_gates", x_gates)
    check.require_tensor(op, "R", R)
    check.require_tensor(op, "b", b, optional=True)
    dims = check.Dims(op)
    dims.bind_int("G", spec.gates, f"cell={cell!r}")
    dims.bind("x_gates", x_gates, "B T G H D")
    dims.bind("R", R, "G H D D")
    if b is not None:
        dims.bind("b", b, "G H D")
    states = {}
    if state is not None:
        if not isinstance(state, (tuple, list)) or len(state) != len(spec.states):
            raise ValueError(
                f"{op}: state must be None or a tuple of {len(spec.states)} tensors "
                f"({', '.join(spec.states)}) for cell={cell!r}, got "
                f"{len(state) if isinstance(state, (tuple, list)) else type(state).__name__}"
            )
        for name, s in zip(spec.states, state):
            check.require_tensor(op, f"state[{name}]", s)
            dims.bind(f"state[{name}]", s, "B H D")
            states[f"state[{name}]"] = s
    dtype = check.activation_dtype(op, {"x_gates": x_gates})
    check.parameter_dtypes(op, {"R": R, "b": b, **states}, dtype)
    device = check.same_device(op, {"x_gates": x_gates, "R": R, "b": b, **states})
    if tracing(x_gates):
        h_seq, *final = _RNN(x_gates, R, b, None if state is None else list(state), cell, backend)
        return h_seq, tuple(final)

    if dims["T"] == 0:
        shape = (dims["B"], dims["H"], dims["D"])
        initial = state if state is not None else (None,) * len(spec.states)
        final = tuple(state_or_zeros(s, shape, dtype, device) for s in initial)
        return x_gates.new_empty(x_gates.shape[:2] + shape[1:]), final
    _, impl = resolve(op, backend, device, dtype=dtype, cell=cell, head_dim=dims["D"],
                      shape=rnn_shape(x_gates, cell))
    return impl(x_gates, R, b, None if state is None else tuple(state), cell=cell)


def _fake_rnn(x_gates, R, b, state, cell, backend):
    batch, time, _, heads, size = x_gates.shape
    final = tuple(x_gates.new_empty((batch, heads, size), dtype=accumulation_dtype(x_gates.dtype))
                  for _ in CELLS[cell].states)
    return x_gates.new_empty((batch, time, heads, size)), final


_RNN = LibraryOp("rnn", "Tensor x_gates, Tensor R, Tensor? b, Tensor[]? state, str cell, str backend", rnn, _fake_rnn)


def rnn_step(
    x_gates: torch.Tensor,
    R: torch.Tensor,
    b: torch.Tensor | None = None,
    state: tuple[torch.Tensor, ...] | None = None,
    *,
    cell: str = "lstm",
    backend: str = "auto",
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One step of :func:`rnn`: x_gates (B, G, H, D). Returns h (B, H, D) and the new state."""
    h_seq, new_state = rnn(add_time_axis("rnn_step", "x_gates", x_gates, "B G H D"), R, b, state,
                           cell=cell, backend=backend)
    return h_seq[:, 0], new_state
