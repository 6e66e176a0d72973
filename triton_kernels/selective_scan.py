"""Triton kernels for Mamba-1's selective scan, forward, backward and one decoding step.

Per channel d and state element n (x: the state, dt = softplus(delta + delta_bias) or not):
    x_t = a_t x_{t-1} + b_t,   a_t = e^(dt_t A_dn),   b_t = dt_t u_t B_tn
    y_t = sum_n x_tn C_tn + D_d u_t;   out_t = y_t * silu(z_t)   (z optional)
Grid (Dm / BD, sequences): one program walks one sequence for BD channels.
Forward: step by step, the state (NP x BD) in registers with a channel's state elements in one
thread (channels across lanes; blocks narrower than a warp split them over 32 / BD lanes), so a
step is elementwise (2^(dt A log2 e) on the MUFU, one FMA into x, <x, C> summed in the thread);
UNROLL steps unrolled so their loads issue together. The state entering every chunk of BT steps
is stored (fp32, Dm x N per chunk and sequence) for the backward. SASS at (BD 32, bf16, sm_90):
about 13 instructions per (step, channel, state element), 22 at BD 16 (was 100 with a
tl.associative_scan over each chunk: shuffles and shared memory per element).
Backward: walks the chunks backwards; inside each it recomputes x from the stored state with
``tl.associative_scan`` over time on a (BT, BD) tile per n and runs the adjoint recurrence
dx_t = dy_t C_t + a_{t+1} dx_{t+1} as a reverse scan:
    du    += dx dt B,   dA += sum_t dx dt (x - dt u B),   ddt = sum_n dx (A (x - dt u B) + u B)
    dB    = sum over channels of dx dt u,   dC = sum over channels of dy x   (per group, or per
    channel and state for static B, C: partial sums per channel block / sequence, reduced by the
    caller)
Every factor a_t <= 1 for A <= 0: stable for any length and any |A dt|.
Layouts: u, delta, z, out (B, T, Dm) with any strides; B, C (fp32) static (Dm, N), shared
(B, T, N) or grouped (B, T, G, N), any strides; a channel block never straddles two groups (BD
divides Dm / G). Work per step and channel: about 7 N flops and N exponentials; reads u, delta,
z and writes out (4 Dm values per token) plus B, C (2 G N values per token).
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
def _discretised_dt(delta, offs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(dt, d dt / d delta) on a tile (``bias``: the channels' delta_bias, broadcastable to it);
    zeros outside ``mask`` (no step)."""
    raw = tl.load(delta + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias
    if SOFTPLUS:
        dt = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(tl.minimum(raw, 20.0))))
        slope = tl.sigmoid(raw)
    else:
        dt = raw
        slope = tl.zeros_like(raw) + 1.0
    return tl.where(mask, dt, 0.0), slope


@triton.jit
def _bc_static(M, ch, ch_mask, rn, n_mask, s_d, s_n, opaque_one):
    """A static B or C, (NP, BD) in fp32 (its Dm stride passed as the t stride)."""
    return tl.load(M + ch[None, :] * s_d + rn[:, None] * (s_n * opaque_one), mask=n_mask[:, None] & ch_mask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _bc_step(M, static_tile, offs, rn, mask, s_n, MODE: tl.constexpr):
    """B or C of one step, broadcastable to (NP, BD) in fp32: the static tile, or the step's row
    (``offs``: its batch, step and group offset; ``mask``: live state elements, none after the
    sequence's end)."""
    if MODE == 0:
        return static_tile
    else:
        return tl.load(M + offs + rn * s_n, mask=mask, other=0.0).to(tl.float32)[:, None]


@triton.jit(do_not_specialize=["opaque_one"])
def scan_fwd_kernel(u, delta, A, B, C, D, z, delta_bias, out, h, initial_state, final_state, cu_seqlens, chunk_offsets,
                    s_ub, s_ut, s_ud, s_db, s_dt, s_dd, s_zb, s_zt, s_zd, s_ob, s_ot, s_od,
                    s_Bb, s_Bt, s_Bg, s_Bn, s_Cb, s_Ct, s_Cg, s_Cn, channels_per_group_B, channels_per_group_C, opaque_one,
                    Dm: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, B_MODE: tl.constexpr, C_MODE: tl.constexpr,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                    HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr, PACKED: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr, UNROLL: tl.constexpr):
    """One sequence and BD channels, step by step: the state X (NP, BD; the state elements of a
    channel in one thread, channels across lanes) in registers, each step's e^(dt A), dt u B and
    <x, C> elementwise, UNROLL steps unrolled (so their loads issue ahead of the recurrence), the
    state entering each chunk of BT steps stored for the backward.
    ``opaque_one`` (1, never specialised) multiplies the state element's offset in the (NP, BD)
    tiles' loads and stores: unable to prove them contiguous along n, the compiler lays those tiles
    out as wanted, one channel per lane and every state element in its thread, where vectorising
    along n would split n over lanes (and the sum over n into shuffles every step)."""
    i_d, seq = tl.program_id(0), tl.program_id(1)
    bos, eos, first, chunks = sequence_span(chunk_offsets, cu_seqlens, seq)
    if PACKED:  # packed sequences live in batch row 0
        b = 0
    else:
        b = seq
    ch = i_d * BD + tl.arange(0, BD)
    ch_mask = ch < Dm
    rn = tl.arange(0, NP)
    n_mask = rn < N
    state_offs = ch[None, :] * N + rn[:, None] * opaque_one  # (NP, BD) into (., Dm, N) states
    state_mask = n_mask[:, None] & ch_mask[None, :]
    A2 = tl.load(A + state_offs, mask=state_mask, other=0.0).to(tl.float32) * 1.4426950408889634  # e^(dt A) = 2^(dt A2)
    B_static = tl.zeros([NP, BD], tl.float32)
    C_static = tl.zeros([NP, BD], tl.float32)
    if B_MODE == 0:
        B_static = _bc_static(B, ch, ch_mask, rn, n_mask, s_Bt, s_Bn, opaque_one)
    if C_MODE == 0:
        C_static = _bc_static(C, ch, ch_mask, rn, n_mask, s_Ct, s_Cn, opaque_one)
    B_base = b * s_Bb + ((i_d * BD) // channels_per_group_B) * s_Bg
    C_base = b * s_Cb + ((i_d * BD) // channels_per_group_C) * s_Cg
    d_weight = tl.zeros([BD], tl.float32)
    if HAS_D:
        d_weight = tl.load(D + ch, mask=ch_mask, other=0.0).to(tl.float32)
    bias = tl.zeros([BD], tl.float32)
    if HAS_BIAS:
        bias = tl.load(delta_bias + ch, mask=ch_mask, other=0.0).to(tl.float32)
    X = tl.zeros([NP, BD], tl.float32)
    if HAS_INITIAL:
        X += tl.load(initial_state + seq * Dm * N + state_offs, mask=state_mask, other=0.0)
    for c in range(chunks):
        tl.store(h + (first + c) * Dm * N + state_offs, X, mask=state_mask)
        for j in range(BT // UNROLL):
            for i in tl.static_range(UNROLL):
                row = bos + c * BT + j * UNROLL + i
                if PACKED:
                    b_row = row
                else:
                    b_row = row - bos
                # vector comparisons: in Triton's interpreter a vector mask & a scalar one is not boolean
                mask = ch_mask & (ch * 0 + row < eos)
                n_live = n_mask & (rn * 0 + row < eos)
                dt, _ = _discretised_dt(delta, b * s_db + b_row * s_dt + ch * s_dd, mask, bias, HAS_BIAS, SOFTPLUS)
                b_u = tl.load(u + b * s_ub + b_row * s_ut + ch * s_ud, mask=mask, other=0.0).to(tl.float32)
                B_t = _bc_step(B, B_static, B_base + b_row * s_Bt, rn, n_live, s_Bn, B_MODE)
                C_t = _bc_step(C, C_static, C_base + b_row * s_Ct, rn, n_live, s_Cn, C_MODE)
                X = tl.exp2(dt[None, :] * A2) * X + (dt * b_u)[None, :] * B_t
                y = tl.sum(X * C_t, axis=0) + d_weight * b_u
                if HAS_Z:
                    b_z = tl.load(z + b * s_zb + b_row * s_zt + ch * s_zd, mask=mask, other=0.0).to(tl.float32)
                    y *= b_z * tl.sigmoid(b_z)
                tl.store(out + b * s_ob + b_row * s_ot + ch * s_od, y.to(out.dtype.element_ty), mask=mask)
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
    bias = tl.zeros([1, BD], tl.float32)
    if HAS_BIAS:
        bias = tl.load(delta_bias + ch, mask=ch_mask, other=0.0).to(tl.float32)[None, :]
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
        dt, slope = _discretised_dt(delta, tile_d, mask, bias, HAS_BIAS, SOFTPLUS)
        dt_next, _ = _discretised_dt(delta, tile_d + s_dt, next_mask[:, None] & ch_mask[None, :], bias, HAS_BIAS,
                                     SOFTPLUS)
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
