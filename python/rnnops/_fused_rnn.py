"""The autograd Function shared by the fused recurrent-cell kernels (Triton and CUDA).

Both backends' kernels use the same buffers: the forward writes every state per step (fp32,
S per unit) and the gates' pre-activations (fp32, P per unit) once; the backward walks time in
reverse with carried gradients in an (S, B, H, D) fp32 buffer, writing the pre-activations'
gradients (and GRU's gradient of R_n h + b_n) in the input dtype: they are what the op returns for
x_gates and, for half inputs, the operands the kernels' own recurrent products and dR take, so
no float32 copy is written or converted. dR = sum_{b,t} dr_t^T h_{t-1} and db = sum dr
are then computed here: dR a batched matmul per gate on strided views (no copy of dr), h_{t-1}
from the saved h_seq (the kernels may keep only the last step's h in the states: the Triton
cells' resident LSTM and sLSTM do). For half inputs the operands are the half values the forward
multiplied (h_seq is exactly what the kernels rounded for their tensor-core products; dr as
returned for x_gates), on tensor cores with fp32 accumulation, dR rounded once to the half
dtype; fp32 inputs keep fp32 operands and CUDA-core products unless TF32 is allowed. db sums in
fp32, one reduction over dx for all gates.
A backend supplies a ``launcher`` with ``forward(x, R, b, initial, states, h_seq) -> pre`` (the
pre-activations it saved, or None where its backward recomputes them: the Triton cells'
resident kernels with RNNConfig.recompute, x and b then saved instead; or where no backward will
run, rnnops._backward_only.needs_backward: the Triton cells then write only the final states) and
``backward(R, initial, states, pre, d_h_seq, carry, dx, drec_n, x, b, h_seq)``.
"""
from __future__ import annotations

import torch

from ._buffers import empty
from .reference.rnn import CELLS

CELL_IDS = {"lstm": 0, "gru": 1, "slstm": 2, "elman": 3}  # the kernels' cell template argument


def pre_slots(cell: str) -> int:
    """Pre-activation slots per unit: one per gate, plus GRU's recurrent n part."""
    return CELLS[cell].gates + (1 if cell == "gru" else 0)


def pre_buffer(cell: str, batch: int, time: int, heads: int, dim: int, device) -> torch.Tensor:
    """The pre-activations a launcher's forward saves: (B, T, P, H, D) fp32."""
    return empty((batch, time, pre_slots(cell), heads, dim), dtype=torch.float32, device=device)


class FusedRNNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, launcher, x_gates, R, b, cell, *state):
        batch, time, _, heads, dim = x_gates.shape
        f32 = {"dtype": torch.float32, "device": x_gates.device}
        initial = torch.stack([s.float() for s in state]).contiguous() if state else None
        states = empty((batch, time, len(CELLS[cell].states), heads, dim), **f32)
        h_seq = empty((batch, time, heads, dim), dtype=x_gates.dtype, device=x_gates.device)
        R_, b_, x_ = R.to(x_gates.dtype).contiguous(), None if b is None else b.float().contiguous(), x_gates.contiguous()
        pre = launcher.forward(x_, R_, b_, initial, states, h_seq)
        recomputed = pre is None
        ctx.save_for_backward(R_, b, initial, states, pre, h_seq, x_ if recomputed else None, b_ if recomputed else None)
        ctx.launcher, ctx.cell = launcher, cell
        ctx.dtypes = (x_gates.dtype, R.dtype, [s.dtype for s in state])
        return (h_seq, *states[:, -1].unbind(1))

    @staticmethod
    def backward(ctx, d_h_seq, *d_final):
        R, b, initial, states, pre, h_seq, x_, b_ = ctx.saved_tensors
        batch, time, _, heads, dim = states.shape
        f32 = {"dtype": torch.float32, "device": states.device}
        carry = torch.stack([torch.zeros((batch, heads, dim), **f32) if d is None else d.float() for d in d_final])
        carry = carry.contiguous()
        x_dtype, R_dtype, state_dtypes = ctx.dtypes
        gradient = {"dtype": x_dtype, "device": states.device}
        dx = empty((batch, time, CELLS[ctx.cell].gates, heads, dim), **gradient)
        drec_n = empty((batch, time, heads, dim), **gradient) if ctx.cell == "gru" else None
        ctx.launcher.backward(R, initial, states, pre, d_h_seq.contiguous(), carry, dx, drec_n, x_, b_, h_seq)
        gate_grads = [dx[:, :, g] for g in range(dx.shape[2])]
        if drec_n is not None:  # GRU: the n gate's recurrent part gets dn * r
            gate_grads[2] = drec_n
        h0 = initial[0] if initial is not None else torch.zeros((batch, heads, dim), **f32)
        h_prev = torch.cat([h0.to(x_dtype)[:, None], h_seq[:, :-1]], dim=1)
        dR = torch.stack([_sum_outer(d, h_prev) for d in gate_grads]).to(R_dtype)
        db = None if b is None else _bias_gradient(dx, drec_n).to(b.dtype)
        d_state = [carry[s].to(dtype) for s, dtype in enumerate(state_dtypes)]
        return (None, dx, dR, db, None, *d_state)


def _bias_gradient(dx: torch.Tensor, drec_n: torch.Tensor | None) -> torch.Tensor:
    """db = sum over (B, T) of each gate's pre-activation gradient, (G, H, D) fp32: one reduction
    over dx's leading dimensions (one per gate, on strided slices, took 4 passes at 0.11 ms for an
    LSTM at B16 T1024 H12 D64, H200), GRU's n gate from its recurrent part."""
    db = dx.sum((0, 1), dtype=torch.float32)
    if drec_n is not None:
        db[2] = drec_n.sum((0, 1), dtype=torch.float32)
    return db


def _sum_outer(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """sum_{b,t} d[b, t, h]^T h[b, t, h] per head: (H, D, D) from two (B, T, H, D) tensors whose
    (B, T) merge into one dimension (contiguous, or one gate of dx), as one batched matmul over
    strided views: no copy."""
    rows, heads, dim = d.shape[0] * d.shape[1], d.shape[2], d.shape[3]
    return torch.bmm(d.reshape(rows, heads, dim).permute(1, 2, 0), h.reshape(rows, heads, dim).permute(1, 0, 2))
