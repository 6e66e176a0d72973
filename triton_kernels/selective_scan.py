"""Triton kernels for Mamba-1's selective scan, forward, backward and one decoding step.

Per channel d and state element n (x: the state, dt = softplus(delta + delta_bias) or not):
    x_t = a_t x_{t-1} + b_t,   a_t = e^(dt_t A_dn),   b_t = dt_t u_t B_tn
    y_t = sum_n x_tn C_tn + D_d u_t;   out_t = y_t * silu(z_t)   (z optional)
Grid (Dm / BD, sequences): one program walks one sequence for BD channels in chunks of BT
steps, the state (BD x N) in registers. Inside a chunk each state element's recurrence is a
first-order linear scan, done with ``tl.associative_scan`` over time on a (BT, BD) tile per
n and continued from the carried state. Every factor a_t <= 1 for A <= 0: stable for any
length and any |A dt|. The state entering every chunk is stored (fp32, Dm x N per chunk and
sequence) for the backward, which walks the chunks backwards, recomputes x inside each
chunk from it, and runs the adjoint recurrence dx_t = dy_t C_t + a_{t+1} dx_{t+1} as a
reverse scan:
    du    += dx dt B,   dA += sum_t dx dt (x - dt u B),   ddt = sum_n dx (A (x - dt u B) + u B)
    dB    = sum over channels of dx dt u,   dC = sum over channels of dy x   (per group, or per
    channel and state for static B, C: partial sums per channel block / sequence, reduced by the
    caller)
Layouts: u, delta, z, out (B, T, Dm) with any strides; B, C static (Dm, N), shared (B, T, N) or
grouped (B, T, G, N), any strides; a channel block never straddles two groups (BD divides
Dm / G). Work per step and channel: about 7 N flops; reads u, delta, z and writes out (4 Dm
values per token) plus B, C (2 G N values per token); a memory-bound kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._packed import sequence_span

STATIC, SHARED, GROUPED = 0, 1, 2


@triton.jit
def _linear_recurrence(a1, b1, a2, b2):
    """Compose x -> a1 x + b1 (earlier) with x -> a2 x + b2 (later)."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _bc_column(M, n, b, rows, row_mask, ch, ch_mask, s_b, s_t, s_g, s_n, group,
               MODE: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """B or C for state element n on the chunk's (BT, BD) tile (broadcast), in fp32."""
    if MODE == 0:
        col = tl.load(M + ch * s_t + n * s_n, mask=ch_mask, other=0.0).to(tl.float32)  # static: s_t is the Dm stride
        return col[None, :] + tl.zeros([BT, BD], tl.float32)
    else:
        col = tl.load(M + b * s_b + rows * s_t + group * s_g + n * s_n, mask=row_mask, other=0.0).to(tl.float32)
        return col[:, None] + tl.zeros([BT, BD], tl.float32)


@triton.jit
def _column(X, n, NP: tl.constexpr):
    """Column n of a (BD, NP) register tile."""
    return tl.sum(tl.where(tl.arange(0, NP)[None, :] == n, X, 0.0), axis=1)


@triton.jit
def _set_column(X, n, value, NP: tl.constexpr):
    return tl.where(tl.arange(0, NP)[None, :] == n, value[:, None], X)


@triton.jit
def _discretised_dt(delta, delta_bias, offs, mask, ch, ch_mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(dt, d dt / d delta) on a tile; zeros outside ``mask`` (no step)."""
    raw = tl.load(delta + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(delta_bias + ch, mask=ch_mask, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        dt = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(tl.minimum(raw, 20.0))))
        slope = tl.sigmoid(raw)
    else:
        dt = raw
        slope = tl.zeros_like(raw) + 1.0
    return tl.where(mask, dt, 0.0), slope


@triton.jit
def scan_fwd_kernel(u, delta, A, B, C, D, z, delta_bias, out, h, initial_state, final_state, cu_seqlens, chunk_offsets,
                    s_ub, s_ut, s_ud, s_db, s_dt, s_dd, s_zb, s_zt, s_zd, s_ob, s_ot, s_od,
                    s_Bb, s_Bt, s_Bg, s_Bn, s_Cb, s_Ct, s_Cg, s_Cn, channels_per_group_B, channels_per_group_C,
                    Dm: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, B_MODE: tl.constexpr, C_MODE: tl.constexpr,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                    HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr, PACKED: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr):
    i_d, seq = tl.program_id(0), tl.program_id(1)
    bos, eos, first, chunks = sequence_span(chunk_offsets, cu_seqlens, seq)
    if PACKED:  # packed sequences live in batch row 0
        b = 0
    else:
        b = seq
    ch = i_d * BD + tl.arange(0, BD)
    ch_mask = ch < Dm
    group_B = (i_d * BD) // channels_per_group_B
    group_C = (i_d * BD) // channels_per_group_C
    rn = tl.arange(0, NP)
    state_offs = ch[:, None] * N + rn[None, :]
    state_mask = ch_mask[:, None] & (rn[None, :] < N)
    X = tl.zeros([BD, NP], tl.float32)
    if HAS_INITIAL:
        X += tl.load(initial_state + seq * Dm * N + state_offs, mask=state_mask, other=0.0)
    for c in range(chunks):
        tl.store(h + (first + c) * Dm * N + state_offs, X, mask=state_mask)
        rows = bos + c * BT + tl.arange(0, BT)
        row_mask = rows < eos
        mask = row_mask[:, None] & ch_mask[None, :]
        if PACKED:
            b_rows = rows
        else:
            b_rows = rows - bos
        dt, _ = _discretised_dt(delta, delta_bias, b * s_db + b_rows[:, None] * s_dt + ch[None, :] * s_dd, mask, ch,
                                ch_mask, HAS_BIAS, SOFTPLUS)
        b_u = tl.load(u + b * s_ub + b_rows[:, None] * s_ut + ch[None, :] * s_ud, mask=mask, other=0.0).to(tl.float32)
        y = tl.zeros([BT, BD], tl.float32)
        for n in range(N):
            a_n = tl.load(A + ch * N + n, mask=ch_mask, other=0.0).to(tl.float32)
            a = tl.exp(dt * a_n[None, :])
            B_n = _bc_column(B, n, b, b_rows, row_mask, ch, ch_mask, s_Bb, s_Bt, s_Bg, s_Bn, group_B, B_MODE, BT, BD)
            C_n = _bc_column(C, n, b, b_rows, row_mask, ch, ch_mask, s_Cb, s_Ct, s_Cg, s_Cn, group_C, C_MODE, BT, BD)
            prod, x = tl.associative_scan((a, dt * b_u * B_n), axis=0, combine_fn=_linear_recurrence)
            x += prod * _column(X, n, NP)[None, :]
            y += x * C_n
            X = _set_column(X, n, tl.sum(tl.where(tl.arange(0, BT)[:, None] == BT - 1, x, 0.0), axis=0), NP)
        if HAS_D:
            y += b_u * tl.load(D + ch, mask=ch_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_Z:
            b_z = tl.load(z + b * s_zb + b_rows[:, None] * s_zt + ch[None, :] * s_zd, mask=mask, other=0.0).to(tl.float32)
            y *= b_z * tl.sigmoid(b_z)
        tl.store(out + b * s_ob + b_rows[:, None] * s_ot + ch[None, :] * s_od, y.to(out.dtype.element_ty), mask=mask)
    if STORE_FINAL:
        tl.store(final_state + seq * Dm * N + state_offs, X, mask=state_mask)


@triton.jit
def scan_bwd_kernel(u, delta, A, B, C, D, z, delta_bias, d_out, h, d_final, d_initial,
                    du, d_delta, dz, dA, dB, dC, dD, d_bias, cu_seqlens, chunk_offsets, total_rows,
                    s_ub, s_ut, s_ud, s_db, s_dt, s_dd, s_zb, s_zt, s_zd, s_ob, s_ot, s_od,
                    s_Bb, s_Bt, s_Bg, s_Bn, s_Cb, s_Ct, s_Cg, s_Cn, channels_per_group_B, channels_per_group_C,
                    Dm: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, B_MODE: tl.constexpr, C_MODE: tl.constexpr,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                    HAS_D_FINAL: tl.constexpr, STORE_D_INITIAL: tl.constexpr, PACKED: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr):
    """Gradients for one sequence and channel block, walking its chunks backwards.

    du, d_delta, dz are written in the (contiguous, (B or 1, T, Dm)) fp32 buffers; dA, dD,
    d_bias (per sequence, to be summed), dB, dC (per channel block: (Dm / BD, T_total, N) for
    time-varying B/C, (sequence, Dm, N) for static ones) are partial sums for the caller."""
    i_d, seq = tl.program_id(0), tl.program_id(1)
    bos, eos, first, chunks = sequence_span(chunk_offsets, cu_seqlens, seq)
    if PACKED:
        b = 0
    else:
        b = seq
    ch = i_d * BD + tl.arange(0, BD)
    ch_mask = ch < Dm
    group_B = (i_d * BD) // channels_per_group_B
    group_C = (i_d * BD) // channels_per_group_C
    rn = tl.arange(0, NP)
    state_offs = ch[:, None] * N + rn[None, :]
    state_mask = ch_mask[:, None] & (rn[None, :] < N)
    r = tl.arange(0, BT)
    dX = tl.zeros([BD, NP], tl.float32)  # dx at the first row of the chunk after this one
    if HAS_D_FINAL:
        dX += tl.load(d_final + seq * Dm * N + state_offs, mask=state_mask, other=0.0)
    dA_acc = tl.zeros([BD, NP], tl.float32)
    dB_static = tl.zeros([BD, NP], tl.float32)
    dC_static = tl.zeros([BD, NP], tl.float32)
    dD_acc = tl.zeros([BD], tl.float32)
    dbias_acc = tl.zeros([BD], tl.float32)
    a_first = tl.zeros([BD, NP], tl.float32) + 1.0  # e^(dt A) of the first step (none: empty sequence)
    for m in range(chunks):
        c = chunks - 1 - m
        X0 = tl.load(h + (first + c) * Dm * N + state_offs, mask=state_mask, other=0.0)
        rows = bos + c * BT + r
        row_mask = rows < eos
        next_mask = (rows + 1) < eos
        mask = row_mask[:, None] & ch_mask[None, :]
        if PACKED:
            b_rows = rows
        else:
            b_rows = rows - bos
        tile_d = b * s_db + b_rows[:, None] * s_dt + ch[None, :] * s_dd
        dt, slope = _discretised_dt(delta, delta_bias, tile_d, mask, ch, ch_mask, HAS_BIAS, SOFTPLUS)
        dt_next, _ = _discretised_dt(delta, delta_bias, tile_d + s_dt, next_mask[:, None] & ch_mask[None, :], ch,
                                     ch_mask, HAS_BIAS, SOFTPLUS)
        b_u = tl.load(u + b * s_ub + b_rows[:, None] * s_ut + ch[None, :] * s_ud, mask=mask, other=0.0).to(tl.float32)
        g_out = tl.load(d_out + b * s_ob + b_rows[:, None] * s_ot + ch[None, :] * s_od, mask=mask,
                        other=0.0).to(tl.float32)
        if HAS_Z:
            b_z = tl.load(z + b * s_zb + b_rows[:, None] * s_zt + ch[None, :] * s_zd, mask=mask, other=0.0).to(tl.float32)
            gate = b_z * tl.sigmoid(b_z)
            dy = g_out * gate
        else:
            dy = g_out
        y = tl.zeros([BT, BD], tl.float32)
        d_dt = tl.zeros([BT, BD], tl.float32)
        d_u = tl.zeros([BT, BD], tl.float32)
        for n in range(N):
            a_n = tl.load(A + ch * N + n, mask=ch_mask, other=0.0).to(tl.float32)
            a = tl.exp(dt * a_n[None, :])
            B_n = _bc_column(B, n, b, b_rows, row_mask, ch, ch_mask, s_Bb, s_Bt, s_Bg, s_Bn, group_B, B_MODE, BT, BD)
            C_n = _bc_column(C, n, b, b_rows, row_mask, ch, ch_mask, s_Cb, s_Ct, s_Cg, s_Cn, group_C, C_MODE, BT, BD)
            inject = dt * b_u * B_n
            prod, x = tl.associative_scan((a, inject), axis=0, combine_fn=_linear_recurrence)
            x += prod * _column(X0, n, NP)[None, :]
            y += x * C_n
            suffix, dx = tl.associative_scan((tl.exp(dt_next * a_n[None, :]), dy * C_n), axis=0,
                                             combine_fn=_linear_recurrence, reverse=True)
            dx += suffix * _column(dX, n, NP)[None, :]
            decayed = x - inject  # a_t x_{t-1}
            d_u += dx * dt * B_n
            d_dt += dx * (a_n[None, :] * decayed + b_u * B_n)
            dA_acc = _set_column(dA_acc, n, _column(dA_acc, n, NP) + tl.sum(dx * dt * decayed, axis=0), NP)
            dB_term = dx * dt * b_u
            dC_term = dy * x
            if B_MODE == 0:
                dB_static = _set_column(dB_static, n, _column(dB_static, n, NP) + tl.sum(dB_term, axis=0), NP)
            else:
                tl.store(dB + (i_d * total_rows + rows) * N + n, tl.sum(dB_term, axis=1), mask=row_mask)
            if C_MODE == 0:
                dC_static = _set_column(dC_static, n, _column(dC_static, n, NP) + tl.sum(dC_term, axis=0), NP)
            else:
                tl.store(dC + (i_d * total_rows + rows) * N + n, tl.sum(dC_term, axis=1), mask=row_mask)
            first_row = tl.sum(tl.where(r[:, None] == 0, dx, 0.0), axis=0)
            dX = _set_column(dX, n, first_row, NP)
            a_first = _set_column(a_first, n, tl.sum(tl.where(r[:, None] == 0, a, 0.0), axis=0), NP)
        if HAS_D:
            d_weight = tl.load(D + ch, mask=ch_mask, other=0.0).to(tl.float32)
            y += b_u * d_weight[None, :]
            d_u += dy * d_weight[None, :]
            dD_acc += tl.sum(dy * b_u, axis=0)
        if HAS_Z:
            sig = tl.sigmoid(b_z)
            tl.store(dz + rows[:, None] * Dm + ch[None, :], g_out * y * sig * (1.0 + b_z * (1.0 - sig)), mask=mask)
        d_raw = d_dt * slope
        dbias_acc += tl.sum(tl.where(mask, d_raw, 0.0), axis=0)
        tl.store(du + rows[:, None] * Dm + ch[None, :], d_u, mask=mask)
        tl.store(d_delta + rows[:, None] * Dm + ch[None, :], d_raw, mask=mask)
    sequence_offs = seq * Dm * N + state_offs
    tl.store(dA + sequence_offs, dA_acc, mask=state_mask)
    if B_MODE == 0:
        tl.store(dB + sequence_offs, dB_static, mask=state_mask)
    if C_MODE == 0:
        tl.store(dC + sequence_offs, dC_static, mask=state_mask)
    if HAS_D:
        tl.store(dD + seq * Dm + ch, dD_acc, mask=ch_mask)
    if HAS_BIAS:
        tl.store(d_bias + seq * Dm + ch, dbias_acc, mask=ch_mask)
    if STORE_D_INITIAL:
        tl.store(d_initial + sequence_offs, a_first * dX, mask=state_mask)


@triton.jit
def state_update_kernel(state, u, delta, A, B, C, D, z, delta_bias, new_state, out, channels_per_group_B,
                        channels_per_group_C, Dm: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                        GB: tl.constexpr, GC: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BD: tl.constexpr):
    """One decoding step: x = e^(dt A) x + dt u B; out = (<x, C> + D u) silu(z). Contiguous
    inputs: state (batch, Dm, N); u, delta, z (batch, Dm); B (batch, GB, N); C (batch, GC, N)."""
    i_d, b = tl.program_id(0), tl.program_id(1)
    ch = i_d * BD + tl.arange(0, BD)
    ch_mask = ch < Dm
    rn = tl.arange(0, NP)
    nmask = rn < N
    mask = ch_mask[:, None] & nmask[None, :]
    raw = tl.load(delta + b * Dm + ch, mask=ch_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(delta_bias + ch, mask=ch_mask, other=0.0).to(tl.float32)
    if SOFTPLUS:
        raw = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(tl.minimum(raw, 20.0))))
    b_u = tl.load(u + b * Dm + ch, mask=ch_mask, other=0.0).to(tl.float32)
    b_A = tl.load(A + ch[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    b_B = tl.load(B + (b * GB + ch // channels_per_group_B)[:, None] * N + rn[None, :], mask=mask, other=0.0)
    b_C = tl.load(C + (b * GC + ch // channels_per_group_C)[:, None] * N + rn[None, :], mask=mask, other=0.0)
    x = tl.load(state + (b * Dm + ch[:, None]) * N + rn[None, :], mask=mask, other=0.0)
    x = tl.exp(raw[:, None] * b_A) * x + (raw * b_u)[:, None] * b_B.to(tl.float32)
    y = tl.sum(x * b_C.to(tl.float32), axis=1)
    if HAS_D:
        y += b_u * tl.load(D + ch, mask=ch_mask, other=0.0).to(tl.float32)
    if HAS_Z:
        b_z = tl.load(z + b * Dm + ch, mask=ch_mask, other=0.0).to(tl.float32)
        y *= b_z * tl.sigmoid(b_z)
    tl.store(new_state + (b * Dm + ch[:, None]) * N + rn[None, :], x, mask=mask)
    tl.store(out + b * Dm + ch, y.to(out.dtype.element_ty), mask=ch_mask)
