"""Triton decoding steps for linear attention, the delta rule and DeltaProduct: one fused kernel
per step (``rnnops.triton_kernels.recurrent_step``). Inference only: with gradients required,
``auto`` takes a sequence backend instead."""
from __future__ import annotations

import torch

from rnnops.autotune.space import next_power_of_two

from .._buffers import empty
from .._dispatch import register
from ._common import device_reason, dtype_reason, join_reasons, launch


def supports(*, dtype, device, head_dims=None, requires_grad=False, **_) -> str | None:
    reasons = [dtype_reason(dtype), device_reason(device)]
    if head_dims is not None and head_dims[0] > 256:
        reasons.append(f"K must be at most 256, got {head_dims[0]}")
    if requires_grad:
        reasons.append("the decoding kernel has no backward; gradients need a sequence backend")
    return join_reasons(*reasons)


def _step(q, k, v, beta, g, state, scale, delta: bool):
    from rnnops.triton_kernels.recurrent_step import recurrent_step_kernel

    batch, heads, dk = q.shape
    steps = k.shape[1] if k.dim() == 4 else 1
    dv = v.shape[-1]
    gate = 0 if g is None else (1 if g.dim() == 2 else 2)
    o = empty((batch, heads, dv), dtype=q.dtype, device=q.device)
    new_state = empty((batch, heads, dk, dv), dtype=torch.float32, device=q.device)
    block_v = min(64, next_power_of_two(dv))
    launch(
        recurrent_step_kernel, (-(-dv // block_v), batch * heads), q.contiguous(), k.contiguous(), v.contiguous(),
        None if beta is None else beta.contiguous(), None if g is None else g.contiguous(),
        None if state is None else state.float().contiguous(), new_state, o, scale, H=heads, K=dk, V=dv, NH=steps,
        DELTA=delta, GATE=gate, HAS_STATE=state is not None, BKF=next_power_of_two(dk), BV=block_v)
    return o, new_state


@register("linear_attn_step", "triton", supports=supports)
def linear_attn_step(q, k, v, g, *, state, scale):
    return _step(q, k, v, None, g, state, scale, delta=False)


@register("delta_rule_step", "triton", supports=supports)
@register("delta_product_step", "triton", supports=supports)
def delta_rule_step(q, k, v, beta, g, *, state, scale):
    return _step(q, k, v, beta, g, state, scale, delta=True)
