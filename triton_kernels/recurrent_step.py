"""Triton kernel for one decoding step of linear attention, the delta rule and DeltaProduct.

Per head (S: K x V, the state read from ``state`` and written to ``new_state``):
    S <- e^g S                  (g: none, scalar, or per key: e^(g_d) scales row d)
    linear attention:  S <- S + k v^T
    delta rule:        for each of the NH Householder steps j:  S <- S + beta_j k_j (v_j - S^T k_j)^T
    o = scale * S^T q
Grid (V / BV, B * H): each program holds all of K (rounded up to a power of two, BKF) times
BV of the state in registers. Inputs are contiguous: q (B, H, K); k (B, NH, H, K);
v (B, NH, H, V); beta (B, NH, H); g (B, H) or (B, H, K); state (B, H, K, V) fp32.
Work per step and head: reads and writes the K*V state (fp32) once, about (2 + 4 NH) K V
flops: a memory-bound kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def recurrent_step_kernel(q, k, v, beta, g, state, new_state, o, scale, H: tl.constexpr, K: tl.constexpr,
                          V: tl.constexpr, NH: tl.constexpr, DELTA: tl.constexpr, GATE: tl.constexpr,
                          HAS_STATE: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rk = tl.arange(0, BKF)
    rv = i_v * BV + tl.arange(0, BV)
    kmask, vmask = rk < K, rv < V
    offs = (i_bh * K + rk[:, None]) * V + rv[None, :]
    mask = kmask[:, None] & vmask[None, :]
    S = tl.zeros([BKF, BV], tl.float32)
    if HAS_STATE:
        S += tl.load(state + offs, mask=mask, other=0.0)
    if GATE == 1:
        S *= tl.exp(tl.load(g + i_bh).to(tl.float32))
    elif GATE == 2:
        S *= tl.exp(tl.load(g + i_bh * K + rk, mask=kmask, other=0.0).to(tl.float32))[:, None]
    for j in range(NH):
        row = (i_b * NH + j) * H + i_h
        b_k = tl.load(k + row * K + rk, mask=kmask, other=0.0).to(tl.float32)
        b_v = tl.load(v + row * V + rv, mask=vmask, other=0.0).to(tl.float32)
        if DELTA:
            b_beta = tl.load(beta + row).to(tl.float32)
            b_v = b_beta * (b_v - tl.sum(S * b_k[:, None], axis=0))
        S += b_k[:, None] * b_v[None, :]
    b_q = tl.load(q + i_bh * K + rk, mask=kmask, other=0.0).to(tl.float32)
    tl.store(o + i_bh * V + rv, (scale * tl.sum(S * b_q[:, None], axis=0)).to(o.dtype.element_ty), mask=vmask)
    tl.store(new_state + offs, S, mask=mask)
