"""flash-linear-attention's function names and signatures on rnnops.

Layouts are fla's current defaults (batch-first, [B, T, H, K]); states [N, H, K, V].
Grouped value heads (fla's GVA: v, g, beta and the states with HV heads, q and k with H dividing
HV, each serving HV / H consecutive value heads) work for every function.
Not supported (a ValueError): ``state_v_first=True``, fused gate activations
(``use_gate_in_kernel``, ``A_log``, ``dt_bias``), and context parallelism (``cp_context``).
``cu_seqlens_cpu`` and ``chunk_indices`` are accepted and unused.
The ``fused_recurrent_*`` variants compute the same results as their ``chunk_*`` twins.
"""
from __future__ import annotations

import torch

import rnnops

from ._common import refuse


def _common_options(name, kwargs):
    kwargs.pop("cu_seqlens_cpu", None)
    kwargs.pop("chunk_indices", None)
    refuse(name, {k: kwargs.pop(k, None) for k in ("state_v_first", "use_gate_in_kernel", "A_log", "dt_bias",
                                                    "cp_context")})
    if kwargs:
        raise TypeError(f"{name}() got unexpected keyword arguments {sorted(kwargs)}")


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kwargs):
    """GLA with per-key log-decay g [B, T, H, K]. Returns (o [B, T, H, V], final_state or None)."""
    _common_options("chunk_gla", kwargs)
    return rnnops.linear_attn(q, k, v, g, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, **kwargs):
    """Head-wise log-decay: g [B, T, H], or the data-independent g_gamma [H] (broadcast, no copy)."""
    _common_options("chunk_simple_gla", kwargs)
    if g is not None and g_gamma is not None:
        raise ValueError("chunk_simple_gla: give g or g_gamma, not both")
    if g_gamma is not None:
        g = g_gamma.to(q.dtype).expand(v.shape[:3])
    return rnnops.linear_attn(q, k, v, g, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):
    _common_options("chunk_delta_rule", kwargs)
    return rnnops.delta_rule(q, k, v, beta, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, qk_l2norm=use_qk_l2norm_in_kernel,
                             cu_seqlens=cu_seqlens)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                           cu_seqlens=None, **kwargs):
    """fla's conventions: g [B, T, H] in log space; with use_beta_sigmoid_in_kernel, beta holds
    logits and the step is sigmoid(beta), or 2 sigmoid(beta) with allow_neg_eigval."""
    _common_options("chunk_gated_delta_rule", kwargs)
    negative = False
    if use_beta_sigmoid_in_kernel:
        beta = torch.sigmoid(beta) * (2.0 if allow_neg_eigval else 1.0)
        negative = allow_neg_eigval
    return rnnops.delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, qk_l2norm=use_qk_l2norm_in_kernel,
                             allow_neg_eigval=negative, cu_seqlens=cu_seqlens)


def chunk_gated_delta_product(q, k, v, g, beta, num_householder, scale=None, initial_state=None,
                              output_final_state=False, use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):
    """k, v [B, T * n_h, H, ...] and beta [B, T * n_h, H] with the n_h steps of a token adjacent
    (fla's interleaving), viewed as rnnops' [B, T, n_h, H, ...] without a copy; g [B, T, H] or None."""
    _common_options("chunk_gated_delta_product", kwargs)
    batch, time = q.shape[:2]
    if k.shape[1] != time * num_householder:
        raise ValueError(f"chunk_gated_delta_product: k must have T * num_householder = {time * num_householder} "
                         f"steps, got {k.shape[1]}")
    steps = (batch, time, num_householder)
    return rnnops.delta_product(q, k.view(steps + k.shape[2:]), v.view(steps + v.shape[2:]),
                                beta.view(steps + beta.shape[2:]), g, num_householder=num_householder, scale=scale,
                                initial_state=initial_state, output_final_state=output_final_state,
                                qk_l2norm=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens)


fused_recurrent_gla = chunk_gla
fused_recurrent_simple_gla = chunk_simple_gla
fused_recurrent_delta_rule = chunk_delta_rule
fused_recurrent_gated_delta_rule = chunk_gated_delta_rule
