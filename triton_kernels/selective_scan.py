"""Triton kernels for Mamba-1's selective scan, forward, backward and one decoding step.

Per channel d and state element n (x: the state, dt = softplus(delta + delta_bias) or not):
    x_t = a_t x_{t-1} + b_t,   a_t = e^(dt_t A_dn),   b_t = dt_t u_t B_tn
    y_t = sum_n x_tn C_tn + D_d u_t;   out_t = y_t * silu(z_t)   (z optional)
Grid (Dm / BD, sequences): one program walks one sequence for BD channels; both directions may
split each sequence into SEGMENTS runs of chunks (grid (Dm / BD, sequences x SEGMENTS)). Forward:
a LOCAL pass walks each from a zero state to its end state and sum of dt,
scan_segment_states_kernel composes them in order (a segment maps x to 2^(A2 sum dt) x + its local
end) into the state entering each, and the OUTPUTS pass walks each again from that state: about
1.6x the single pass's work. Backward: scan_bwd_local_kernel runs the adjoint recurrence alone
over each from a zero gradient at its end, the composition walks them last first into the
gradient entering each segment's end, then scan_bwd_kernel runs per segment.
Forward: step by step, the state (NP x BD) in registers with a channel's state elements in one
thread (channels across lanes; blocks narrower than a warp split them over 32 / BD lanes), so a
step is elementwise (2^(dt A log2 e) on the MUFU, one FMA into x, <x, C> summed in the thread);
in sub-blocks of UNROLL steps whose loads all issue one sub-block ahead (_sub_block_loads), so
they arrive while the sub-block before runs: loaded step by step, each step's loads queued behind
the previous step's store and waited for, a program spent about a memory latency a step (1 us a
step at B8 T2048 D2048, H100: 2.1 ms forward, a sixth of its instruction issue rate). The state
entering every chunk of BT steps is stored (fp32, N x Dm per chunk and sequence) for the backward.
SASS (N 16, bf16, sm_90, UNROLL 4 / 2): about 34 / 38 instructions per (step, channel, state
element) at BD 8 (164 / 102 registers), 22 / 24 at BD 16 (242 / 162), 17 at BD 32 and UNROLL 2
(249; UNROLL 4 spills: the B and C of the 8 steps in flight), where a tl.associative_scan over
each chunk took 100 (shuffles and shared memory per element); a quarter of them the softplus (a
precise log and exp, per channel).
Backward: the same layout, walking the chunks backwards; inside a chunk, the states entering
its sub-blocks of UNROLL (2) steps are recomputed from the stored state into a per-program
scratch (checkpoints, L2-resident), then each sub-block (last first) issues all its steps' loads
(_sub_block_loads: one memory latency a sub-block, where loads step by step behind the previous
step's stores waited one a step), recomputes its UNROLL states into a register tile (selects on
the unrolled step index fold to register moves) and runs the steps backwards with G = dL/dx
entering the step (two forward recomputations in all):
    g = G + dy C,  du = dt sum_n g B (+ D dy),  ddt = sum_n g (A a x_prev + u B),  G <- a g,
    dA += g a x_prev dt,  dB = sum over channels of g dt u,  dC = sum over channels of dy x
(dB, dC per step and group, or per channel and state for static B, C: partial sums per channel
block / program, reduced by the caller). SASS (N 16, bf16, sm_90, Triton 3.6): about 103
instructions per (step, channel, state element) at BD 8 and 75 at BD 16 (BD 32 spills; UNROLL 4
with its loads together spills at BD 16), both recomputations included, a sixth of them the
shuffles of dB and dC's sums over the channels (was 211 with associative scans per n).
Every factor a_t <= 1 for A <= 0: stable for any length and any |A dt|.
Layouts: u, delta, z, out (B, T, Dm) with any strides, du, d_delta and dz with any one set of
strides (the op gives them u's dimension order, so mamba's (B, D, L) views get (B, D, L)
gradients, which autograd would otherwise copy into the leaves); B, C (fp32) shared (B, T, N) or grouped
(B, T, G, N), any strides, a channel block never straddling two groups (BD divides Dm / G);
every state-shaped operand contiguous n-major, (N, Dm) per sequence or chunk (_state_offsets):
A, static B and C, the initial, final and stored states, and their gradients. Work per step and
channel: about 7 N flops and N exponentials; reads u, delta, z and writes out (4 Dm values per
token) plus B, C (2 G N values per token).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._packed import sequence_span

STATIC, SHARED, GROUPED = 0, 1, 2
# scan_fwd_kernel's PASS (the kernel compares the values): outputs from the entering state; a segment's end from zero
OUTPUTS, LOCAL = 0, 1


@triton.jit
def _discretised_dt(raw_delta, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(dt, d dt / d delta) of a loaded delta tile (any float dtype; ``bias``: the channels'
    delta_bias, broadcastable to it), fp32; zeros outside ``mask`` (no step)."""
    raw = raw_delta.to(tl.float32)
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
def _state_offsets(ch, rn, row_stride):
    """Offsets of an (NP, BD) state tile stored n-major, (N, row_stride): channels contiguous.

    Every state-shaped operand (A, static B and C, the stored states, their gradients) is laid out
    so. Its true contiguity along the channels makes the compiler order them first and put them
    across lanes, and ``multiple_of(1)`` stops it from vectorising several channels into one
    thread, so a channel's state elements stay in one thread (the sum over n a register sum) in
    every Triton version. With the (Dm, N) layout neither dim looked contiguous and the tie went to
    n with Triton 3.6 (the GPU machine's): state elements across 16 lanes, every channel's dt
    computed 16 times, 2.7 times the forward's instructions a step (SASS, sm_90)."""
    return tl.multiple_of(rn[:, None] * row_stride + ch[None, :], [1, 1])


@triton.jit
def _bc_step(M, static_tile, offs, rn, mask, s_n, MODE: tl.constexpr):
    """B or C of one step, broadcastable to (NP, BD) in fp32: the static tile, or the step's row
    (``offs``: its batch, step and group offset; ``mask``: live state elements, none after the
    sequence's end)."""
    if MODE == 0:
        return static_tile
    else:
        return tl.load(M + offs + rn * s_n, mask=mask, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _step_loads(row, bos, eos, b, ch, ch_mask, rn, n_mask, u, delta, B, C, B_static, C_static, B_base, C_base,
                s_ub, s_ut, s_ud, s_db, s_dt, s_dd, s_Bt, s_Bn, s_Ct, s_Cn,
                B_MODE: tl.constexpr, C_MODE: tl.constexpr, PACKED: tl.constexpr):
    """What one step reads, as loaded (delta and u in their own dtype, nothing computed from
    them, so the loads can be issued well ahead of their use): (its row in the (B, T) layout, live
    channels, delta, u, B, C (fp32)); a step past the sequence's end has delta = u = 0 and
    B = C = 0."""
    if PACKED:  # packed sequences live in batch row 0
        b_row = row
    else:
        b_row = row - bos
    # vector comparisons: in Triton's interpreter a vector mask & a scalar one is not boolean
    mask = ch_mask & (ch * 0 + row < eos)
    n_live = n_mask & (rn * 0 + row < eos)
    raw_delta = tl.load(delta + b * s_db + b_row * s_dt + ch * s_dd, mask=mask, other=0.0)
    raw_u = tl.load(u + b * s_ub + b_row * s_ut + ch * s_ud, mask=mask, other=0.0)
    B_t = _bc_step(B, B_static, B_base + b_row * s_Bt, rn, n_live, s_Bn, B_MODE)
    C_t = _bc_step(C, C_static, C_base + b_row * s_Ct, rn, n_live, s_Cn, C_MODE)
    return b_row, mask, raw_delta, raw_u, B_t, C_t


@triton.jit
def _step_inputs(row, bos, eos, b, ch, ch_mask, rn, n_mask, u, delta, bias, B, C, B_static, C_static, B_base, C_base,
                 s_ub, s_ut, s_ud, s_db, s_dt, s_dd, s_Bt, s_Bn, s_Ct, s_Cn,
                 B_MODE: tl.constexpr, C_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                 PACKED: tl.constexpr):
    """What one step reads (_step_loads), discretised: (its row in the (B, T) layout, live
    channels, dt, d dt / d delta, u, B, C), all fp32; a step past the sequence's end has dt = u = 0
    and B = C = 0 (the identity)."""
    b_row, mask, raw_delta, raw_u, B_t, C_t = _step_loads(
        row, bos, eos, b, ch, ch_mask, rn, n_mask, u, delta, B, C, B_static, C_static, B_base, C_base,
        s_ub, s_ut, s_ud, s_db, s_dt, s_dd, s_Bt, s_Bn, s_Ct, s_Cn, B_MODE, C_MODE, PACKED)
    dt, slope = _discretised_dt(raw_delta, mask, bias, HAS_BIAS, SOFTPLUS)
    return b_row, mask, dt, slope, raw_u.to(tl.float32), B_t, C_t


@triton.jit
def _sub_block_loads(row0, bos, eos, b, ch, ch_mask, rn, n_mask, u, delta, z, d_out, B, C, B_static, C_static, B_base,
                     C_base, s_ub, s_ut, s_ud, s_db, s_dt, s_dd, s_zb, s_zt, s_zd, s_ob, s_ot, s_od, s_Bt, s_Bn, s_Ct,
                     s_Cn, B_MODE: tl.constexpr, C_MODE: tl.constexpr, LOAD_Z: tl.constexpr,
                     LOAD_D_OUT: tl.constexpr, PACKED: tl.constexpr, UNROLL: tl.constexpr):
    """_step_loads of the UNROLL steps from ``row0``, their z (LOAD_Z) and output gradient
    (LOAD_D_OUT; else 0), as a tuple of per-step tuples (row, mask, delta, u, B, C, z, d_out), all
    loads issued together and nothing computed from them. Loaded step by step, a step's loads
    queue behind the previous step's stores and are waited for at once: a memory latency a step.
    Loaded so, a sub-block pays one (the backward), or none where its loads issue a sub-block
    ahead (the forward)."""
    steps = ()
    for i in tl.static_range(UNROLL):
        b_row, mask, raw_delta, raw_u, B_t, C_t = _step_loads(
            row0 + i, bos, eos, b, ch, ch_mask, rn, n_mask, u, delta, B, C, B_static, C_static, B_base, C_base,
            s_ub, s_ut, s_ud, s_db, s_dt, s_dd, s_Bt, s_Bn, s_Ct, s_Cn, B_MODE, C_MODE, PACKED)
        raw_z = tl.zeros_like(raw_u)
        if LOAD_Z:
            raw_z = tl.load(z + b * s_zb + b_row * s_zt + ch * s_zd, mask=mask, other=0.0)
        raw_d_out = tl.zeros_like(raw_u)
        if LOAD_D_OUT:
            raw_d_out = tl.load(d_out + b * s_ob + b_row * s_ot + ch * s_od, mask=mask, other=0.0)
        steps = steps + ((b_row, mask, raw_delta, raw_u, B_t, C_t, raw_z, raw_d_out),)
    return steps


@triton.jit
def _decay_tile(A, i_d, Dm: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr):
    """A program's BD channels: (channels, their mask, state elements, their mask, offsets and
    mask of (NP, BD) state tiles in (., N, Dm), A log2 e: e^(dt A) = 2^(dt A2))."""
    ch = i_d * BD + tl.arange(0, BD)
    ch_mask = ch < Dm
    rn = tl.arange(0, NP)
    n_mask = rn < N
    state_offs = _state_offsets(ch, rn, Dm)
    state_mask = n_mask[:, None] & ch_mask[None, :]
    A2 = tl.load(A + state_offs, mask=state_mask, other=0.0).to(tl.float32) * 1.4426950408889634
    return ch, ch_mask, rn, n_mask, state_offs, state_mask, A2


@triton.jit
def _segment(chunk_offsets, cu_seqlens, pid, SEGMENTS: tl.constexpr, PACKED: tl.constexpr):
    """Where program ``pid`` works: (sequence, its batch row (packed sequences live in row 0),
    first row, exclusive end row, the sequence's first global chunk, the segment's first chunk in
    the sequence, its chunk count): segment pid % SEGMENTS of sequence pid // SEGMENTS,
    ceil(chunks / SEGMENTS) chunks each (the last ones shorter or empty)."""
    seq = pid // SEGMENTS
    bos, eos, first, chunks = sequence_span(chunk_offsets, cu_seqlens, seq)
    per = tl.cdiv(chunks, SEGMENTS)
    c0 = (pid % SEGMENTS) * per
    if PACKED:
        b = 0
    else:
        b = seq
    return seq, b, bos, eos, first, c0, tl.minimum(tl.maximum(chunks - c0, 0), per)


@triton.jit
def _live_sub_blocks(bos, eos, c, BT: tl.constexpr, UNROLL: tl.constexpr):
    """Sub-blocks of UNROLL steps in chunk c of a sequence that hold a step (the sequence's last
    chunk: its live part)."""
    return tl.cdiv(tl.minimum(eos - bos - c * BT, BT), UNROLL)


@triton.jit
def _channel_block(A, B, C, D, delta_bias, i_d, b, s_Bb, s_Bg, s_Cb, s_Cg,
                   channels_per_group_B, channels_per_group_C, Dm: tl.constexpr, N: tl.constexpr,
                   NP: tl.constexpr, B_MODE: tl.constexpr, C_MODE: tl.constexpr, HAS_D: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BD: tl.constexpr):
    """What a program reads once for its BD channels: (channels, their mask, state elements, their
    mask, offsets and mask of (NP, BD) state tiles in (., N, Dm), A log2 e, static B and C tiles,
    B / C offsets of the program's batch row and group, D, delta_bias)."""
    ch, ch_mask, rn, n_mask, state_offs, state_mask, A2 = _decay_tile(A, i_d, Dm, N, NP, BD)
    B_static = tl.zeros([NP, BD], tl.float32)
    C_static = tl.zeros([NP, BD], tl.float32)
    if B_MODE == 0:
        B_static = tl.load(B + state_offs, mask=state_mask, other=0.0)
    if C_MODE == 0:
        C_static = tl.load(C + state_offs, mask=state_mask, other=0.0)
    B_base = b * s_Bb + ((i_d * BD) // channels_per_group_B) * s_Bg
    C_base = b * s_Cb + ((i_d * BD) // channels_per_group_C) * s_Cg
    d_weight = tl.zeros([BD], tl.float32)
    if HAS_D:
        d_weight = tl.load(D + ch, mask=ch_mask, other=0.0).to(tl.float32)
    bias = tl.zeros([BD], tl.float32)
    if HAS_BIAS:
        bias = tl.load(delta_bias + ch, mask=ch_mask, other=0.0).to(tl.float32)
    return ch, ch_mask, rn, n_mask, state_offs, state_mask, A2, B_static, C_static, B_base, C_base, d_weight, bias


@triton.jit
def _advance(X, A2, dt, b_u, B_t):
    """The state after one step: e^(dt A) x + dt u B."""
    return tl.exp2(dt[None, :] * A2) * X + (dt * b_u)[None, :] * B_t


@triton.jit
def scan_fwd_kernel(u, delta, A, B, C, D, z, delta_bias, out, h, initial_state, final_state, segment_states, dt_sums,
                    cu_seqlens, chunk_offsets, s_ub, s_ut, s_ud, s_db, s_dt, s_dd, s_zb, s_zt, s_zd, s_ob, s_ot, s_od,
                    s_Bb, s_Bt, s_Bg, s_Bn, s_Cb, s_Ct, s_Cg, s_Cn, channels_per_group_B, channels_per_group_C,
                    Dm: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, B_MODE: tl.constexpr, C_MODE: tl.constexpr,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                    HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr, STORE_STATES: tl.constexpr,
                    PACKED: tl.constexpr, SEGMENTS: tl.constexpr, PASS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                    UNROLL: tl.constexpr):
    """One segment (_segment: the whole sequence where SEGMENTS = 1) and BD channels, step by step:
    the state X (NP, BD; the state elements of a channel in one thread, channels across lanes) in
    registers, each step's e^(dt A), dt u B and <x, C> elementwise, in sub-blocks of UNROLL
    steps, each one's loads issued while the one before it runs.
    PASS OUTPUTS: from the state entering the segment (the initial state, or with SEGMENTS > 1
    ``segment_states``), writes out, the state entering each chunk of BT steps for the backward
    (STORE_STATES; not where no backward will run), and (SEGMENTS = 1) the final state.
    PASS LOCAL: from a zero state, writes only the segment's end state to ``segment_states`` and
    its channels' sum of dt to ``dt_sums``, for scan_segment_states_kernel."""
    i_d, pid = tl.program_id(0), tl.program_id(1)
    seq, b, bos, eos, first, c0, chunks = _segment(chunk_offsets, cu_seqlens, pid, SEGMENTS, PACKED)
    ch, ch_mask, rn, n_mask, state_offs, state_mask, A2, B_static, C_static, B_base, C_base, d_weight, bias = \
        _channel_block(A, B, C, D, delta_bias, i_d, b, s_Bb, s_Bg, s_Cb, s_Cg,
                       channels_per_group_B, channels_per_group_C, Dm, N, NP, B_MODE, C_MODE, HAS_D,
                       HAS_BIAS, BD)
    X = tl.zeros([NP, BD], tl.float32)
    dt_sum = tl.zeros([BD], tl.float32)
    if PASS == 0:  # OUTPUTS
        if SEGMENTS > 1:
            X += tl.load(segment_states + pid * N * Dm + state_offs, mask=state_mask, other=0.0)
        elif HAS_INITIAL:
            X += tl.load(initial_state + seq * N * Dm + state_offs, mask=state_mask, other=0.0)
    start = bos + c0 * BT  # the segment's first row; its sub-blocks of UNROLL steps never straddle a chunk
    sub_blocks = tl.cdiv(tl.minimum(eos, start + chunks * BT) - start, UNROLL)  # (<= 0 for an empty segment)
    ahead = _sub_block_loads(start, bos, eos, b, ch, ch_mask, rn, n_mask, u, delta, z, None, B, C, B_static, C_static,
                             B_base, C_base, s_ub, s_ut, s_ud, s_db, s_dt, s_dd, s_zb, s_zt, s_zd, 0, 0, 0, s_Bt,
                             s_Bn, s_Ct, s_Cn, B_MODE, C_MODE, HAS_Z and PASS == 0, False, PACKED, UNROLL)
    for j in range(sub_blocks):
        if PASS == 0 and STORE_STATES and j % (BT // UNROLL) == 0:  # a chunk's first sub-block: the state entering it
            tl.store(h + (first + c0 + j // (BT // UNROLL)) * N * Dm + state_offs, X, mask=state_mask)
        current = ahead
        # the next sub-block's loads issue before this one's steps (past the segment's end: masked or unused)
        ahead = _sub_block_loads(start + (j + 1) * UNROLL, bos, eos, b, ch, ch_mask, rn, n_mask, u, delta, z, None, B,
                                 C, B_static, C_static, B_base, C_base, s_ub, s_ut, s_ud, s_db, s_dt, s_dd, s_zb, s_zt,
                                 s_zd, 0, 0, 0, s_Bt, s_Bn, s_Ct, s_Cn, B_MODE, C_MODE, HAS_Z and PASS == 0, False,
                                 PACKED, UNROLL)
        for i in tl.static_range(UNROLL):
            b_row, mask, raw_delta, raw_u, B_t, C_t, raw_z, _ = current[i]
            dt, _ = _discretised_dt(raw_delta, mask, bias, HAS_BIAS, SOFTPLUS)
            b_u = raw_u.to(tl.float32)
            X = _advance(X, A2, dt, b_u, B_t)
            if PASS == 1:  # LOCAL
                dt_sum += dt
            else:
                y = tl.sum(X * C_t, axis=0) + d_weight * b_u
                if HAS_Z:
                    b_z = raw_z.to(tl.float32)
                    y *= b_z * tl.sigmoid(b_z)
                tl.store(out + b * s_ob + b_row * s_ot + ch * s_od, y.to(out.dtype.element_ty), mask=mask)
    if PASS == 1:
        tl.store(segment_states + pid * N * Dm + state_offs, X, mask=state_mask)
        tl.store(dt_sums + pid * Dm + ch, dt_sum, mask=ch_mask)
    elif SEGMENTS == 1 and STORE_FINAL:  # (else scan_segment_states_kernel writes it)
        tl.store(final_state + seq * N * Dm + state_offs, X, mask=state_mask)


@triton.jit
def scan_segment_states_kernel(segment_states, dt_sums, A, initial_state, final_state, Dm: tl.constexpr,
                               N: tl.constexpr, NP: tl.constexpr, SEGMENTS: tl.constexpr, HAS_INITIAL: tl.constexpr,
                               STORE_FINAL: tl.constexpr, REVERSE: tl.constexpr, BD: tl.constexpr):
    """One sequence and BD channels, over its segments in order (REVERSE: last first): a segment
    maps v to 2^(A2 sum dt) v + local (the product of its steps' decays is one exponential of
    the sum of their dt). ``segment_states`` holds each segment's local term on entry (its end
    state from a zero state: scan_fwd_kernel's LOCAL pass; REVERSE, the gradient it passes to
    the state before it from a zero gradient at its end: scan_bwd_local_kernel), replaced by the
    v entering it (the state entering it; REVERSE, the gradient entering its end); ``initial``
    is v entering the first segment walked (the initial state; REVERSE, the final state's
    gradient), ``final`` v leaving the last (the final state; REVERSE, the initial state's
    gradient)."""
    i_d, seq = tl.program_id(0), tl.program_id(1)
    ch, ch_mask, _, _, state_offs, state_mask, A2 = _decay_tile(A, i_d, Dm, N, NP, BD)
    V = tl.zeros([NP, BD], tl.float32)
    if HAS_INITIAL:
        V += tl.load(initial_state + seq * N * Dm + state_offs, mask=state_mask, other=0.0)
    for k in range(SEGMENTS):
        if REVERSE:
            slot = seq * SEGMENTS + SEGMENTS - 1 - k
        else:
            slot = seq * SEGMENTS + k
        local = tl.load(segment_states + slot * N * Dm + state_offs, mask=state_mask, other=0.0)
        tl.store(segment_states + slot * N * Dm + state_offs, V, mask=state_mask)
        dt_sum = tl.load(dt_sums + slot * Dm + ch, mask=ch_mask, other=0.0)
        V = tl.exp2(dt_sum[None, :] * A2) * V + local
    if STORE_FINAL:
        tl.store(final_state + seq * N * Dm + state_offs, V, mask=state_mask)


@triton.jit
def _channel_sum(a, b):
    """sum over channels (axis 1) of a * b, every product rounded before the sum. With products
    fused into adds (Triton's default), a lane's first step of the sum across lanes (a butterfly
    of shuffles) fuses its own product, unrounded, with its partner's rounded one, so the lanes that
    each hold the whole sum disagree in its last bits, and their copies race (compute-sanitizer
    racecheck: writes of different values) in the shared memory that carries the sum to its
    store. An FMA with a zero addend rounds the product where the plain product would be fused."""
    return tl.sum(tl.fma(a, b, 0.0), axis=1)


@triton.jit
def _output_gradient(raw_d_out, raw_z, HAS_Z: tl.constexpr):
    """(dL/d out, dy = dL/dy, z, sigmoid(z)) of a step's channels from their loaded d_out and z
    (fp32; z and its sigmoid 0 without z)."""
    g_out = raw_d_out.to(tl.float32)
    b_z = tl.zeros_like(g_out)
    sig = tl.zeros_like(g_out)
    dy = g_out
    if HAS_Z:
        b_z = raw_z.to(tl.float32)
        sig = tl.sigmoid(b_z)
        dy = g_out * b_z * sig
    return g_out, dy, b_z, sig


@triton.jit
def scan_bwd_local_kernel(u, delta, A, B, C, z, delta_bias, d_out, segment_grads, dt_sums, cu_seqlens, chunk_offsets,
                          s_ub, s_ut, s_ud, s_db, s_dt, s_dd, s_zb, s_zt, s_zd, s_ob, s_ot, s_od,
                          s_Bb, s_Bt, s_Bg, s_Bn, s_Cb, s_Ct, s_Cg, s_Cn, channels_per_group_B, channels_per_group_C,
                          Dm: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, B_MODE: tl.constexpr,
                          C_MODE: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                          PACKED: tl.constexpr, SEGMENTS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                          UNROLL: tl.constexpr):
    """One segment (_segment) and BD channels: the adjoint recurrence alone, from a zero gradient
    at the segment's end, steps last first: g = G + dy C, G <- e^(dt A) g (no state needed);
    writes the G it passes to the state before the segment to ``segment_grads`` and its
    channels' sum of dt to ``dt_sums``, for scan_segment_states_kernel (REVERSE)."""
    i_d, pid = tl.program_id(0), tl.program_id(1)
    _, b, bos, eos, _, c0, chunks = _segment(chunk_offsets, cu_seqlens, pid, SEGMENTS, PACKED)
    ch, ch_mask, rn, n_mask, state_offs, state_mask, A2, B_static, C_static, B_base, C_base, _, bias = \
        _channel_block(A, B, C, None, delta_bias, i_d, b, s_Bb, s_Bg, s_Cb, s_Cg,
                       channels_per_group_B, channels_per_group_C, Dm, N, NP, B_MODE, C_MODE, False,
                       HAS_BIAS, BD)
    G = tl.zeros([NP, BD], tl.float32)
    dt_sum = tl.zeros([BD], tl.float32)
    for m in range(chunks):
        c = c0 + chunks - 1 - m
        sub_blocks = _live_sub_blocks(bos, eos, c, BT, UNROLL)
        for kk in range(sub_blocks):
            k = sub_blocks - 1 - kk
            steps = _sub_block_loads(bos + c * BT + k * UNROLL, bos, eos, b, ch, ch_mask, rn, n_mask, u, delta, z,
                                     d_out, B, C, B_static, C_static, B_base, C_base, s_ub, s_ut, s_ud, s_db, s_dt,
                                     s_dd, s_zb, s_zt, s_zd, s_ob, s_ot, s_od, s_Bt, s_Bn, s_Ct, s_Cn, B_MODE, C_MODE,
                                     HAS_Z, True, PACKED, UNROLL)
            for i in tl.static_range(UNROLL - 1, -1, -1):
                _, mask, raw_delta, _, _, C_t, raw_z, raw_d_out = steps[i]
                dt, _ = _discretised_dt(raw_delta, mask, bias, HAS_BIAS, SOFTPLUS)
                _, dy, _, _ = _output_gradient(raw_d_out, raw_z, HAS_Z)
                G = tl.exp2(dt[None, :] * A2) * (G + dy[None, :] * C_t)
                dt_sum += dt
    tl.store(segment_grads + pid * N * Dm + state_offs, G, mask=state_mask)
    tl.store(dt_sums + pid * Dm + ch, dt_sum, mask=ch_mask)


@triton.jit
def scan_bwd_kernel(u, delta, A, B, C, D, z, delta_bias, d_out, h, checkpoints, d_final, d_initial, segment_grads,
                    du, d_delta, dz, dA, dB, dC, dD, d_bias, cu_seqlens, chunk_offsets, total_rows,
                    s_ub, s_ut, s_ud, s_db, s_dt, s_dd, s_zb, s_zt, s_zd, s_ob, s_ot, s_od,
                    s_Bb, s_Bt, s_Bg, s_Bn, s_Cb, s_Ct, s_Cg, s_Cn, channels_per_group_B, channels_per_group_C,
                    s_gb, s_gt, s_gd,
                    Dm: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, B_MODE: tl.constexpr, C_MODE: tl.constexpr,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                    HAS_D_FINAL: tl.constexpr, STORE_D_INITIAL: tl.constexpr, PACKED: tl.constexpr,
                    SEGMENTS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, UNROLL: tl.constexpr):
    """Gradients for one segment (_segment: the whole sequence where SEGMENTS = 1) and BD
    channels, step by step backwards, in the forward's layout, from the gradient entering the
    segment's end (the final state's, or with SEGMENTS > 1 ``segment_grads``: the composition of
    the later segments' scan_bwd_local_kernel terms).

    Per chunk (last first): from its stored state, the states entering its sub-blocks of UNROLL
    steps go to this program's ``checkpoints`` (BT / UNROLL x NP x BD fp32); then per sub-block
    (last first) its UNROLL states are recomputed into a register tile and the steps run
    backwards with G = dL/dx entering the step:
        g = G + dy C,  du = dt sum_n g B (+ dy D),  ddt = sum_n g (A a x_prev + u B),
        dA += g a x_prev dt,  dB = sum_ch g dt u,  dC = sum_ch dy x,  G <- a g.
    du, d_delta, dz are written in their inputs' dtypes to (B or 1, T, Dm) buffers of strides
    (s_gb, s_gt, s_gd) (the op gives them u's dimension order); dA, dD,
    d_bias (per program, to be summed), dB, dC (per channel block: (Dm / BD, T_total, N) for
    time-varying B/C, (program, N, Dm) for static ones) are partial sums for the caller."""
    i_d, pid = tl.program_id(0), tl.program_id(1)
    seq, b, bos, eos, first, c0, chunks = _segment(chunk_offsets, cu_seqlens, pid, SEGMENTS, PACKED)
    ch, ch_mask, rn, n_mask, state_offs, state_mask, A2, B_static, C_static, B_base, C_base, d_weight, bias = \
        _channel_block(A, B, C, D, delta_bias, i_d, b, s_Bb, s_Bg, s_Cb, s_Cg,
                       channels_per_group_B, channels_per_group_C, Dm, N, NP, B_MODE, C_MODE, HAS_D,
                       HAS_BIAS, BD)
    ru = tl.arange(0, UNROLL)
    own = checkpoints + (pid * tl.num_programs(0) + i_d) * (BT // UNROLL) * NP * BD  # this program's checkpoints
    own_offs = _state_offsets(tl.arange(0, BD), rn, BD)
    G = tl.zeros([NP, BD], tl.float32)  # dL / dx entering the step being differentiated
    if SEGMENTS > 1:
        G += tl.load(segment_grads + pid * N * Dm + state_offs, mask=state_mask, other=0.0)
    elif HAS_D_FINAL:
        G += tl.load(d_final + seq * N * Dm + state_offs, mask=state_mask, other=0.0)
    dA_acc = tl.zeros([NP, BD], tl.float32)
    dB_static = tl.zeros([NP, BD], tl.float32)
    dC_static = tl.zeros([NP, BD], tl.float32)
    dD_acc = tl.zeros([BD], tl.float32)
    dbias_acc = tl.zeros([BD], tl.float32)
    for m in range(chunks):
        c = c0 + chunks - 1 - m
        X = tl.load(h + (first + c) * N * Dm + state_offs, mask=state_mask, other=0.0)
        sub_blocks = _live_sub_blocks(bos, eos, c, BT, UNROLL)
        for k in range(sub_blocks):
            tl.store(own + k * NP * BD + own_offs, X)
            if k < sub_blocks - 1:
                for i in tl.static_range(UNROLL):
                    _, _, dt, _, b_u, B_t, _ = _step_inputs(
                        bos + c * BT + k * UNROLL + i, bos, eos, b, ch, ch_mask, rn, n_mask, u, delta, bias, B, C,
                        B_static, C_static, B_base, C_base, s_ub, s_ut, s_ud, s_db, s_dt, s_dd, s_Bt, s_Bn, s_Ct, s_Cn,
                        B_MODE, C_MODE, HAS_BIAS, SOFTPLUS, PACKED)
                    X = _advance(X, A2, dt, b_u, B_t)
        for kk in range(sub_blocks):
            k = sub_blocks - 1 - kk
            # every load of the sub-block's steps first, then its state recomputation and its steps
            steps = _sub_block_loads(bos + c * BT + k * UNROLL, bos, eos, b, ch, ch_mask, rn, n_mask, u, delta, z,
                                     d_out, B, C, B_static, C_static, B_base, C_base, s_ub, s_ut, s_ud, s_db, s_dt,
                                     s_dd, s_zb, s_zt, s_zd, s_ob, s_ot, s_od, s_Bt, s_Bn, s_Ct, s_Cn, B_MODE, C_MODE,
                                     HAS_Z, True, PACKED, UNROLL)
            X = tl.load(own + k * NP * BD + own_offs)
            states = tl.zeros([UNROLL, NP, BD], tl.float32)  # the state entering each step
            for i in tl.static_range(UNROLL):
                states = tl.where(ru[:, None, None] == i, X[None, :, :], states)
                _, mask, raw_delta, raw_u, B_t, _, _, _ = steps[i]
                dt, _ = _discretised_dt(raw_delta, mask, bias, HAS_BIAS, SOFTPLUS)
                X = _advance(X, A2, dt, raw_u.to(tl.float32), B_t)
            for i in tl.static_range(UNROLL - 1, -1, -1):
                row = bos + c * BT + k * UNROLL + i
                b_row, mask, raw_delta, raw_u, B_t, C_t, raw_z, raw_d_out = steps[i]
                grad_offs = b * s_gb + b_row * s_gt + ch * s_gd
                dt, slope = _discretised_dt(raw_delta, mask, bias, HAS_BIAS, SOFTPLUS)
                b_u = raw_u.to(tl.float32)
                g_out, dy, b_z, sig = _output_gradient(raw_d_out, raw_z, HAS_Z)
                a = tl.exp2(dt[None, :] * A2)
                # -0.0 fill: the select and sum over the unrolled index fold to picking a register
                decayed = a * tl.sum(tl.where(ru[:, None, None] == i, states, -0.0), axis=0)
                dtu = dt * b_u
                x = decayed + dtu[None, :] * B_t
                g = G + dy[None, :] * C_t
                g_B = tl.sum(g * B_t, axis=0)
                g_decayed = g * decayed
                d_u = dt * g_B + dy * d_weight
                d_raw = (tl.sum(g_decayed * A2, axis=0) * 0.6931471805599453 + b_u * g_B) * slope
                dA_acc += g_decayed * dt[None, :]
                if B_MODE == 0:
                    dB_static += g * dtu[None, :]
                else:
                    tl.store(dB + (i_d * total_rows + row) * N + rn, _channel_sum(g, dtu[None, :]),
                             mask=n_mask & (rn * 0 + row < eos))
                if C_MODE == 0:
                    dC_static += dy[None, :] * x
                else:
                    tl.store(dC + (i_d * total_rows + row) * N + rn, _channel_sum(dy[None, :], x),
                             mask=n_mask & (rn * 0 + row < eos))
                if HAS_Z:
                    y = tl.sum(x * C_t, axis=0) + d_weight * b_u
                    tl.store(dz + grad_offs, g_out * y * sig * (1.0 + b_z * (1.0 - sig)), mask=mask)
                dD_acc += dy * b_u
                dbias_acc += tl.where(mask, d_raw, 0.0)
                tl.store(du + grad_offs, d_u, mask=mask)
                tl.store(d_delta + grad_offs, d_raw, mask=mask)
                G = a * g
    program_offs = pid * N * Dm + state_offs
    tl.store(dA + program_offs, dA_acc, mask=state_mask)
    if B_MODE == 0:
        tl.store(dB + program_offs, dB_static, mask=state_mask)
    if C_MODE == 0:
        tl.store(dC + program_offs, dC_static, mask=state_mask)
    if HAS_D:
        tl.store(dD + pid * Dm + ch, dD_acc, mask=ch_mask)
    if HAS_BIAS:
        tl.store(d_bias + pid * Dm + ch, dbias_acc, mask=ch_mask)
    if SEGMENTS == 1 and STORE_D_INITIAL:  # (else scan_segment_states_kernel writes it)
        tl.store(d_initial + seq * N * Dm + state_offs, G, mask=state_mask)


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
