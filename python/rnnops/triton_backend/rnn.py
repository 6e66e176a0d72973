"""Triton fused recurrent cells: configuration, search space, autograd Function.

Memory: the forward writes every state per step (fp32; lstm 2, gru 1, slstm 4, elman 1 values
per unit) and the gates' pre-activations (fp32, G per unit, GRU one more) for the backward:
(S + P) * 4 bytes per token, head and unit. dR and db come from one batched matmul over the
gates' gradients in the backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rnnops.autotune.space import Constraint, Space, next_power_of_two, powers_of_two

from .._dispatch import register
from ._common import device_reason, dot_precision, dtype_reason, empty


@dataclass(frozen=True)
class RNNConfig:
    block_b: int = 16  # batch rows per program (>= 16: tl.dot)
    block_d: int = 64  # output units per tile
    block_k: int = 64  # reduction units per tile
    num_warps: int = 4
    num_stages: int = 1


DEFAULT_CONFIG = RNNConfig()


def space(D: int, gates: int, hardware) -> Space:
    return Space(
        {"block_b": powers_of_two(16, 64), "block_d": powers_of_two(16, 128), "block_k": powers_of_two(16, 128),
         "num_warps": [2, 4, 8], "num_stages": [1, 2]},
        (
            Constraint("block_d <= D rounded up to a power of two", ("block_d",), lambda bd: bd <= next_power_of_two(D)),
            Constraint("block_k <= D rounded up to a power of two", ("block_k",), lambda bk: bk <= next_power_of_two(D)),
            Constraint("G gate accumulators and a weight tile fit in 255 registers per thread",
                       ("block_b", "block_d", "block_k", "num_warps"),
                       lambda bb, bd, bk, w: gates * bb * bd + bd * bk <= 255 * hardware.warp_size * w),
        ),
    )


CELLS = {"lstm": 0, "gru": 1, "slstm": 2, "elman": 3}
GATES = {"lstm": 4, "gru": 3, "slstm": 4, "elman": 1}
STATES = {"lstm": 2, "gru": 1, "slstm": 4, "elman": 1}


def supports(*, dtype, device, head_dim=None, **_) -> str | None:
    reasons = [dtype_reason(dtype), device_reason(device)]
    if head_dim is not None and not (head_dim % 16 == 0 and 16 <= head_dim <= 256):
        reasons.append(f"the head dim D must be a multiple of 16 in [16, 256], got {head_dim} (larger heads: the "
                       "cuda backend)")
    reasons = [r for r in reasons if r]
    return "; ".join(reasons) or None


def _kernels():
    from rnnops.triton_kernels import rnn as kernels

    return kernels


class RNNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_gates, R, b, cell, config, *state):
        batch, time, gates, heads, dim = x_gates.shape
        slots = STATES[cell]
        pre_slots = gates + (1 if cell == "gru" else 0)
        x = x_gates.contiguous()
        initial = None if not state else torch.stack([s.float() for s in state]).contiguous()
        f32 = {"dtype": torch.float32, "device": x.device}
        states = empty((batch, time, slots, heads, dim), **f32)
        pre = empty((batch, time, pre_slots, heads, dim), **f32)
        h_seq = empty((batch, time, heads, dim), dtype=x.dtype, device=x.device)
        block_d, block_k = (min(block, next_power_of_two(dim)) for block in (config.block_d, config.block_k))
        meta = dict(H=heads, D=dim, CELL=CELLS[cell], G=gates, S=slots, P=pre_slots, HAS_INITIAL=initial is not None,
                    PRECISION=dot_precision(x.dtype), BB=config.block_b, BD=block_d, BKD=block_k,
                    num_warps=config.num_warps, num_stages=config.num_stages)
        grid = (heads, -(-batch // config.block_b))
        _kernels().rnn_fwd_kernel[grid](x, R.contiguous(), None if b is None else b.contiguous(), initial, states, pre,
                                        h_seq, time, batch, HAS_BIAS=b is not None, **meta)
        ctx.save_for_backward(R, b, initial, states, pre)
        ctx.meta, ctx.grid, ctx.cell = meta, grid, cell
        ctx.dtypes = (x_gates.dtype, R.dtype, None if b is None else b.dtype, [s.dtype for s in state])
        return (h_seq, *states[:, -1].unbind(1))

    @staticmethod
    def backward(ctx, d_h_seq, *d_final):
        R, b, initial, states, pre = ctx.saved_tensors
        batch, time, slots, heads, dim = states.shape
        gates = ctx.meta["G"]
        f32 = {"dtype": torch.float32, "device": states.device}
        carry = torch.stack([torch.zeros((batch, heads, dim), **f32) if d is None else d.float() for d in d_final])
        carry = carry.contiguous()
        dx = empty((batch, time, gates, heads, dim), **f32)
        drec_n = empty((batch, time, heads, dim), **f32) if ctx.cell == "gru" else None
        _kernels().rnn_bwd_kernel[ctx.grid](R.contiguous(), initial, states, pre, d_h_seq.contiguous(), carry, dx,
                                            drec_n, time, batch, **ctx.meta)
        d_rec = dx if drec_n is None else torch.cat([dx[:, :, :2], drec_n[:, :, None]], dim=2)
        h0 = initial[0] if initial is not None else torch.zeros((batch, heads, dim), **f32)
        h_prev = torch.cat([h0[:, None], states[:, :-1, 0]], dim=1)
        dR = torch.einsum("btghi,bthj->ghij", d_rec, h_prev)
        x_dtype, R_dtype, b_dtype, state_dtypes = ctx.dtypes
        db = None if b is None else d_rec.sum((0, 1)).to(b_dtype)
        d_state = [carry[s].to(dtype) for s, dtype in enumerate(state_dtypes)]
        return (dx.to(x_dtype), dR.to(R_dtype), db, None, None, *d_state)


@register("rnn", "triton", supports=supports)
def rnn(x_gates, R, b, state, *, cell, config: RNNConfig = DEFAULT_CONFIG):
    h_seq, *final = RNNFunction.apply(x_gates, R, b, cell, config, *(state or ()))
    return h_seq, tuple(final)
