"""Sequence parallelism: one long sequence split along time over the ranks of a process group.

Rank r holds the r-th contiguous slice of every per-token input. It receives the state entering
its slice from rank r - 1, runs the op from it, and sends its final state to rank r + 1; in the
backward the gradient of that state travels the other way. Every rank returns the output of its
own slice and the state after the whole sequence (the last rank's, broadcast). Point-to-point
messages follow the ranks' order (torch.distributed send / recv: gloo on CPUs, NCCL on GPUs), so
the ranks work one after another: this spreads memory, not time, over the devices (chunked
prefill of sequences too long for one device).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import rnnops
from rnnops._validate import accumulation_dtype


class _ReceiveState(torch.autograd.Function):
    """Forward: the state from rank - 1 (into ``template``'s shape). Backward: its gradient back."""

    @staticmethod
    def forward(ctx, template, source, group):
        ctx.source, ctx.group = source, group
        state = torch.empty_like(template)
        dist.recv(state, src=source, group=group)
        return state

    @staticmethod
    def backward(ctx, grad):
        dist.send(grad.contiguous(), dst=ctx.source, group=ctx.group)
        return None, None, None


class _SendState(torch.autograd.Function):
    """Forward: send ``state`` to rank + 1 and pass ``output`` through. Backward: receive the
    state's gradient from rank + 1."""

    @staticmethod
    def forward(ctx, state, output, destination, group):
        ctx.destination, ctx.group, ctx.shape, ctx.dtype = destination, group, state.shape, state.dtype
        dist.send(state.detach().contiguous(), dst=destination, group=group)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        grad_state = torch.empty(ctx.shape, dtype=ctx.dtype, device=grad_output.device)
        dist.recv(grad_state, src=ctx.destination, group=ctx.group)
        return grad_state, grad_output, None, None


def _global_rank(group, rank):
    return dist.get_global_rank(group, rank) if group is not None else rank


def _run(op, state_shape, inputs, initial_state, group, **kwargs):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank == 0:
        state = initial_state
    else:
        # the template requires grad so that the received state does, and its backward sends the gradient back
        template = torch.empty(state_shape, dtype=accumulation_dtype(inputs[0].dtype), device=inputs[0].device,
                               requires_grad=torch.is_grad_enabled())
        state = _ReceiveState.apply(template, _global_rank(group, rank - 1), group)
    output, final = op(*inputs, initial_state=state, **kwargs)
    if rank < world - 1:
        output = _SendState.apply(final, output, _global_rank(group, rank + 1), group)
    last = final.detach().clone()
    dist.broadcast(last, src=_global_rank(group, world - 1), group=group)
    return output, last


def linear_attn(q, k, v, g=None, *, initial_state=None, group=None, **kwargs):
    """:func:`rnnops.linear_attn` over a sequence split along time (dim 1) across ``group``.
    Returns (o of this rank's slice, the final state of the whole sequence)."""
    batch, _, heads, dk = q.shape
    return _run(lambda q, k, v, g, **kw: rnnops.linear_attn(q, k, v, g, output_final_state=True, **kw),
                (batch, heads, dk, v.shape[-1]), (q, k, v, g), initial_state, group, **kwargs)


def delta_rule(q, k, v, beta, g=None, *, initial_state=None, group=None, **kwargs):
    """:func:`rnnops.delta_rule` over a sequence split along time across ``group``."""
    batch, _, heads, dk = q.shape
    return _run(lambda q, k, v, beta, g, **kw: rnnops.delta_rule(q, k, v, beta, g, output_final_state=True, **kw),
                (batch, heads, dk, v.shape[-1]), (q, k, v, beta, g), initial_state, group, **kwargs)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *, initial_state=None,
                   group=None, **kwargs):
    """:func:`rnnops.selective_scan` over a sequence split along time across ``group``; B and C
    are either static or split along time like u."""
    def op(u, delta, B, C, z, **kw):
        return rnnops.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True, **kw)

    return _run(op, (u.shape[0], u.shape[2], A.shape[1]), (u, delta, B, C, z), initial_state, group, **kwargs)
