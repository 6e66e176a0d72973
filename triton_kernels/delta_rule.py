"""Triton kernels for the chunked (gated) delta rule, forward and backward.

Per head, S: K x V, beta_t the step size, g_t an optional scalar log-decay, scale s:
    S <- e^(g_t) S;   S <- S + beta_t k_t (v_t - S^T k_t)^T;   o_t = s * S^T q_t
Per chunk of BT tokens (G the inclusive cumulative log-decay, Gamma = e^G, D_ij = e^(G_i - G_j)):
    L      = strictly_lower(beta_i (k_i . k_j) D_ij),   T = (I + L)^-1        (UT transform)
    W      = T diag(beta Gamma) K,   U = T diag(beta) V          (``ut_fwd``, or ungated ``ut_inverse``)
    V_new  = U - W S_in                          (the chunk's pseudo-values)  (``states_fwd``)
    S_out  = Gamma_last S_in + (K * e^(G_last - G))^T V_new
    o      = s [(Gamma q) S_in + (q k^T * D, j <= i) V_new]   (linear_attn's output kernel)
T comes from ``ut_inverse`` (blocked forward substitution, see _unit_lower_inverse) in the
forward, which for ungated inputs also forms W and U from it (``ut_fwd`` does for gated ones);
it is saved for the backward, whose ``ut_fwd`` recomputes W and U from it and ``ut_bwd``
differentiates through it. All exponents are <= 0 and clamped so, as in linear_attn.

Backward (dh the gradient of the state leaving a chunk; ``states_bwd`` walks backwards):
    dV_new = s (q k^T * D, j <= i)^T do + (K * e^(G_last - G)) dh             (= dU)
             (the first term for all chunks in parallel by linear_attn's dv_kernel, so the
             sequential loop holds no BT x BT scores: fewer dots on the critical path, no spills)
    dS_in  = Gamma_last dh + s (Gamma q)^T do - W^T dV_new
    dq, dk, dW = -dV_new S_in^T and dG (output and state terms): linear_attn's dqk kernel
    through T (``ut_bwd``): dT = dU (beta V)^T + dW (beta Gamma K)^T,  dL = -T^T dT T^T,
        dv = beta T^T dU,  dk += beta Gamma T^T dW + (E + E^T) K  with E = dL * beta_i * D,
        dbeta = rowsum(V T^T dU) + rowsum(Gamma K T^T dW) + rowsum(dL * KK * D),
        dG += Gamma beta rowsum(K T^T dW) + rowsum(F) - colsum(F),  F = dL * L
              (DeltaProduct: F over pairs of steps of different tokens, TOKEN_PAIRS),
    then dg = reverse cumsum of dG within the chunk.
Saved for the backward: the inputs and T; W, U, the states and V_new are recomputed.
Grouped heads (GROUP value heads a q / k head, ``qk_rows``): beta, g, v and everything derived
(T, W, U, V_new, the states) are per value head; dq and dk are written per value head and summed
over each group by the caller.

Grids (BT chunk, BV tile of V; the state kernels hold all of K, rounded up to a power of two):
    ut_inverse, ut_fwd, ut_bwd   (chunks, H)
    states_fwd/_bwd              (V/BV, sequences * H)
DeltaProduct (n_h steps a token as rows): the forward's states_fwd stores S_in of every n_h-th
chunk only, for linear_attn's output kernel in chunks of BT tokens (n_h row-chunks, KEY_TILES):
B*T / BT states of K*V (T tokens) written and read, where the row-chunks' were n_h times as many
(B8 T2048 n_h 2 H16 K=V=128, bf16: 134 MB each way instead of 268).
Work per token and head: forward 2*(2*BT*K + (BT/16)*BT^2 + BT*(K+V) + 3*K*V + BT*V) flops (the
inverse's blocked products are the (BT/16)*BT^2); reads q, k, v, beta (, g), writes o, and
moves T (BT values), W, U, V_new and one K*V state per chunk, all in the input dtype.
Dots run at PRECISION (rnnops.triton_backend._common.dot_precision: "ieee" for 16-wide head
tiles), but the chunk x chunk x chunk products (the inverse's substitution, dL) at
CHUNK_PRECISION, the dtype's own: no head-dim tile in them.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._math import exp
from ._packed import chunk_rows, qk_rows, query_decay, query_rows, sequence_span, sequence_state, token_pairs


@triton.jit
def _gram(k, rows, row_mask, i_h, H: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr, PRECISION: tl.constexpr,
          BT: tl.constexpr, BK: tl.constexpr):
    """k k^T for one chunk (BT x BT, fp32), K in BK tiles, their loads pipelined at two stages
    (cp.async: the next tile's in flight while one is multiplied) whatever the launch's
    num_stages: at the H100's and H200's 1 (the chunk kernels') the tiles loaded one after the
    other, a memory latency each, in the latency-bound inverse (no register or shared memory
    more: bf16, sm_90, Triton 3.6 and 3.9)."""
    kk = tl.zeros([BT, BT], tl.float32)
    for i_k in tl.range(tl.cdiv(K, BK), num_stages=2):
        rk = i_k * BK + tl.arange(0, BK)
        b_k = tl.load(k + qk_rows(rows, i_h, H, GROUP, K)[:, None] + rk[None, :],
                      mask=row_mask[:, None] & (rk[None, :] < K), other=0.0)
        kk += tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION)
    return kk


@triton.jit
def _pair_decay(G, rows, row_mask, i_h, H: tl.constexpr, GATED: tl.constexpr, BT: tl.constexpr):
    """D_ij = e^(G_i - G_j) for j <= i (0 above the diagonal), fp32."""
    causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
    if GATED:
        g = tl.load(G + rows * H + i_h, mask=row_mask, other=0.0)
        return exp(tl.where(causal, tl.minimum(g[:, None] - g[None, :], 0.0), float("-inf")))
    return tl.where(causal, 1.0, 0.0)


@triton.jit
def _unit_lower_inverse(L, PRECISION: tl.constexpr, BT: tl.constexpr):
    """(I + L)^-1 for strictly lower-triangular L (BT x BT, fp32), blocked by BC = 16 rows.
    The inverses X of the BC x BC diagonal blocks, assembled into a block-diagonal D: forward
    substitution on all BT / BC blocks at once (15 steps on a (BT/BC, BC, BC) tile, where
    substituting the whole matrix would take BT - 1 steps on BT x BT), right-looking: from X = I,
    step j takes row j of X, final once the rows above it are subtracted, off every row below it
    times L's column j (X -= L[:, j] X[j, :]). Both are sums over one axis of the tile whose
    results broadcast back along that same axis, so no step converts a layout; unrolled, the
    columns (which X does not change) are taken off the chain of X's rows. At 4 warps (a diagonal
    block a warp) a step is about 45 SASS instructions and no block barrier, where taking row i of
    L into a sum against X's rows (the left-looking form, a loop) was 99-105 with 5-6 barriers
    (bf16, sm_90, Triton 3.6 and 3.9; sm_80 splits a block's columns over two warps: 2-3 barriers
    a step, 5 before). Then the blocks below:
    T = D (I - L_off T), L_off the part of L below the diagonal blocks, is solved by iterating
    T <- D - P T with P = D L_off from T = D; step n makes block sub-diagonal n exact (P is
    strictly block-lower), so BT / BC - 1 steps, one BT^3 product each, give T with the
    rounding of blocked forward substitution. The products run at ``PRECISION``: "tf32" for
    half inputs, whose kernels round T to half precision for their dot products anyway, "tf32x3"
    for float32 (no spill at BT = 64 and 4 warps on sm_90; 1.1-1.8 KB a thread left-looking)."""
    BC: tl.constexpr = 16
    NB: tl.constexpr = BT // BC
    same_block = tl.arange(0, NB)[:, None, None, None] == tl.arange(0, NB)[None, None, :, None]
    diagonal = tl.sum(tl.where(same_block, tl.reshape(L, (NB, BC, NB, BC)), 0.0), axis=2)
    o = tl.arange(0, BC)
    blocks = tl.zeros([NB, BC, BC], tl.float32) + tl.where(o[:, None] == o[None, :], 1.0, 0.0)[None, :, :]
    for j in tl.static_range(BC - 1):
        column = tl.sum(tl.where(o[None, None, :] == j, diagonal, 0.0), axis=2)
        row = tl.sum(tl.where(o[None, :, None] == j, blocks, 0.0), axis=1)
        blocks -= column[:, :, None] * row[:, None, :]
    diagonal_inverse = tl.reshape(tl.where(same_block, blocks[:, :, None, :], 0.0), (BT, BT))
    T = diagonal_inverse
    if NB > 1:
        block_of = tl.arange(0, BT) // BC
        P = tl.dot(diagonal_inverse, tl.where(block_of[:, None] > block_of[None, :], L, 0.0),
                   input_precision=PRECISION)
        for _ in tl.static_range(NB - 1):
            T = diagonal_inverse - tl.dot(P, T, input_precision=PRECISION)
    return T


@triton.jit
def _beta_gamma(beta, G, rows, row_mask, i_h, H: tl.constexpr, GATED: tl.constexpr):
    """(beta, Gamma = e^G) of one chunk's rows, fp32 (Gamma 0 past the sequence's end)."""
    b_beta = tl.load(beta + rows * H + i_h, mask=row_mask, other=0.0).to(tl.float32)
    if GATED:
        gamma = exp(tl.load(G + rows * H + i_h, mask=row_mask, other=0.0))
    else:
        gamma = tl.where(row_mask, 1.0, 0.0)
    return b_beta, gamma


@triton.jit
def _decayed_gram(k, G, rows, row_mask, i_h, H: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr,
                  GATED: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """M = k k^T * D of one chunk (BT x BT, fp32)."""
    return (_gram(k, rows, row_mask, i_h, H, GROUP, K, PRECISION, BT, BK)
            * _pair_decay(G, rows, row_mask, i_h, H, GATED, BT))


@triton.jit
def _inverse_tile(rows, i_h, H: tl.constexpr, BT: tl.constexpr):
    """Offsets of one chunk's T in T_all: T[(row, head), column in chunk]."""
    return (rows[:, None] * H + i_h) * BT + tl.arange(0, BT)[None, :]


@triton.jit
def _load_inverse(T_all, rows, row_mask, i_h, H: tl.constexpr, BT: tl.constexpr):
    """One chunk's T from ``ut_inverse_kernel``, in its stored (the input) dtype (rows past the
    sequence's end read as 0)."""
    return tl.load(T_all + _inverse_tile(rows, i_h, H, BT), mask=row_mask[:, None], other=0.0)


@triton.jit
def _apply_inverse(T, k, v, W, U, b_beta, gamma, rows, row_mask, i_h, H: tl.constexpr, GROUP: tl.constexpr,
                   K: tl.constexpr, V: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr):
    """W = T diag(beta Gamma) K and U = T diag(beta) V for one chunk, T in the input dtype (stored in
    v's dtype)."""
    for i_k in tl.range(tl.cdiv(K, BK), num_stages=STAGES):
        rk = i_k * BK + tl.arange(0, BK)
        tile = (rows[:, None] * H + i_h) * K + rk[None, :]
        mask = row_mask[:, None] & (rk[None, :] < K)
        b_k = tl.load(k + qk_rows(rows, i_h, H, GROUP, K)[:, None] + rk[None, :], mask=mask, other=0.0)
        rhs = (b_k * (b_beta * gamma)[:, None]).to(b_k.dtype)
        tl.store(W + tile, tl.dot(T, rhs, input_precision=PRECISION).to(W.dtype.element_ty), mask=mask)
    for i_v in tl.range(tl.cdiv(V, BV), num_stages=STAGES):
        rv = i_v * BV + tl.arange(0, BV)
        tile = (rows[:, None] * H + i_h) * V + rv[None, :]
        mask = row_mask[:, None] & (rv[None, :] < V)
        b_v = tl.load(v + tile, mask=mask, other=0.0)
        rhs = (b_v * b_beta[:, None]).to(b_v.dtype)
        tl.store(U + tile, tl.dot(T, rhs, input_precision=PRECISION).to(U.dtype.element_ty), mask=mask)


@triton.jit
def ut_inverse_kernel(k, v, beta, G, T_all, W, U, chunk_indices, cu_seqlens, H: tl.constexpr, GROUP: tl.constexpr,
                      K: tl.constexpr, V: tl.constexpr, GATED: tl.constexpr, PRECISION: tl.constexpr,
                      CHUNK_PRECISION: tl.constexpr, APPLY: tl.constexpr, STAGES: tl.constexpr, BT: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr):
    """The forward's UT transform of one chunk: T = (I + strictly_lower(diag(beta) M))^-1, computed in
    fp32 and stored as T[(row, head), column in chunk] (the layout of linear_attn's intra-chunk
    scores) in T_all's dtype, the input dtype, for ut_fwd_kernel and the backward. APPLY: then W and
    U from T so rounded, as ut_fwd_kernel forms them from the stored T (which is then not read back,
    and k's tiles come from L2): ungated only, where the kernel keeps the standalone inverse's 128
    registers (four programs an SM for its latency-bound substitution chain); gated it took 148-162
    whatever the order of its loads (three an SM; bf16, sm_90, Triton 3.6, the H200's tiles). Their
    loops take STAGES, the chunk kernels' stages: at two, where the H200's entries take one, 146
    registers (three an SM)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    valid, t0, eos, _last = chunk_rows(chunk_indices, cu_seqlens, i_c, BT)
    if valid:
        rows = t0 + tl.arange(0, BT)
        row_mask = rows < eos
        b_beta, gamma = _beta_gamma(beta, G, rows, row_mask, i_h, H, GATED)
        M = _decayed_gram(k, G, rows, row_mask, i_h, H, GROUP, K, GATED, PRECISION, BT, BK)
        strict = tl.arange(0, BT)[:, None] > tl.arange(0, BT)[None, :]
        T = _unit_lower_inverse(tl.where(strict, b_beta[:, None] * M, 0.0), CHUNK_PRECISION, BT)
        T = T.to(T_all.dtype.element_ty)
        tl.store(T_all + _inverse_tile(rows, i_h, H, BT), T, mask=row_mask[:, None])
        if APPLY:
            _apply_inverse(T, k, v, W, U, b_beta, gamma, rows, row_mask, i_h, H, GROUP, K, V, PRECISION, STAGES, BK,
                           BV)


@triton.jit
def ut_fwd_kernel(k, v, beta, G, T_all, W, U, chunk_indices, cu_seqlens, H: tl.constexpr, GROUP: tl.constexpr,
                  K: tl.constexpr, V: tl.constexpr, GATED: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
                  BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """W and U for one chunk from the saved T (the gated forward's, and the backward's
    recomputation), k's and v's tiles pipelined at STAGES (linear_attn's k_loop_stages)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    valid, t0, eos, _last = chunk_rows(chunk_indices, cu_seqlens, i_c, BT)
    if valid:
        rows = t0 + tl.arange(0, BT)
        row_mask = rows < eos
        b_beta, gamma = _beta_gamma(beta, G, rows, row_mask, i_h, H, GATED)
        T = _load_inverse(T_all, rows, row_mask, i_h, H, BT)
        _apply_inverse(T, k, v, W, U, b_beta, gamma, rows, row_mask, i_h, H, GROUP, K, V, PRECISION, STAGES, BK,
                       BV)


@triton.jit
def states_fwd_kernel(k, W, U, G, h, v_new, initial_state, final_state, chunk_offsets, state_offsets, cu_seqlens,
                      H: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, GATED: tl.constexpr,
                      HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr, PRECISION: tl.constexpr,
                      STATE_EVERY: tl.constexpr, BT: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr):
    """The chunk loop of one sequence: v_new = U - W S_in, S_out, and S_in of every STATE_EVERY-th
    chunk into h, indexed from ``state_offsets`` (each sequence's first state): 1 and the chunk
    layout's offsets, every chunk's; DeltaProduct's forward n_h and its token chunks' offsets, one
    state a token chunk."""
    i_v, i_sh = tl.program_id(0), tl.program_id(1)
    seq, i_h = i_sh // H, i_sh % H
    bos, eos, _first, chunks = sequence_span(chunk_offsets, cu_seqlens, seq)
    first_state = tl.load(state_offsets + seq).to(tl.int64)
    rk = tl.arange(0, BKF)
    rv = i_v * BV + tl.arange(0, BV)
    state_offs, state_mask, S = sequence_state(initial_state, seq, i_h, rk, rv, H, K, V, HAS_INITIAL)
    for n in range(chunks):
        if n % STATE_EVERY == 0:
            tl.store(h + ((first_state + n // STATE_EVERY) * H + i_h) * K * V + state_offs, S.to(h.dtype.element_ty),
                     mask=state_mask)
        t0 = bos + n * BT
        rows = t0 + tl.arange(0, BT)
        row_mask = rows < eos
        kmask = row_mask[:, None] & (rk[None, :] < K)
        vtile = (rows[:, None] * H + i_h) * V + rv[None, :]
        vmask = row_mask[:, None] & (rv[None, :] < V)
        b_k = tl.load(k + qk_rows(rows, i_h, H, GROUP, K)[:, None] + rk[None, :], mask=kmask, other=0.0)
        b_W = tl.load(W + (rows[:, None] * H + i_h) * K + rk[None, :], mask=kmask, other=0.0)
        b_u = tl.load(U + vtile, mask=vmask, other=0.0).to(tl.float32)
        b_new = b_u - tl.dot(b_W, S.to(b_W.dtype), input_precision=PRECISION)
        tl.store(v_new + vtile, b_new.to(v_new.dtype.element_ty), mask=vmask)
        if GATED:
            last = tl.minimum(t0 + BT, eos) - 1
            g_last = tl.load(G + last * H + i_h)
            g = tl.load(G + rows * H + i_h, mask=row_mask, other=0.0)
            S *= exp(g_last)
            # (K * e^(G_last - G))^T V_new as K^T (e^(G_last - G) * V_new): the decay scales V_new's
            # rows in registers, k's tile feeds the product unchanged (scaling it took a register copy
            # and a shared-memory round trip: H100 tiles, bf16, Triton 3.6: 754 -> 497 SASS
            # instructions a chunk, 9 -> 3 exponentials, 164 -> 116 registers, but 74 -> 80 KB of
            # shared memory, two programs an SM instead of three, as the plain kernel; A100 767 -> 602)
            b_new *= exp(tl.minimum(g_last - g, 0.0))[:, None]
        S += tl.dot(tl.trans(b_k), b_new.to(b_k.dtype), input_precision=PRECISION)
    if STORE_FINAL:
        tl.store(final_state + (seq * H + i_h) * K * V + state_offs, S, mask=state_mask)


@triton.jit
def states_bwd_kernel(q, k, W, G, do, dh, dv_new, d_final, d_initial, chunk_offsets, cu_seqlens, scale,
                      H: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, GATED: tl.constexpr,
                      HAS_D_FINAL: tl.constexpr, STORE_D_INITIAL: tl.constexpr, PRECISION: tl.constexpr,
                      FOLD_SCALE: tl.constexpr, STEPS: tl.constexpr, BT: tl.constexpr, QT: tl.constexpr,
                      BKF: tl.constexpr, BV: tl.constexpr):
    """One sequence backwards: dh[chunk] = dS_out, dv_new (input dtype, holding the intra-chunk term on
    entry: linear_attn's dv_kernel) += the state term, and d_initial = dS_in of the first chunk.
    q and do per token, a chunk's QT queries (query_rows: DeltaProduct's STEPS). FOLD_SCALE (half
    inputs; ungated only): the scale multiplies q's tile rather than the product (below)."""
    i_v, i_sh = tl.program_id(0), tl.program_id(1)
    seq, i_h = i_sh // H, i_sh % H
    bos, eos, first, chunks = sequence_span(chunk_offsets, cu_seqlens, seq)
    rk = tl.arange(0, BKF)
    rv = i_v * BV + tl.arange(0, BV)
    state_offs, state_mask, dS = sequence_state(d_final, seq, i_h, rk, rv, H, K, V, HAS_D_FINAL)
    for m in range(chunks):
        n = chunks - 1 - m
        tl.store(dh + ((first + n) * H + i_h) * K * V + state_offs, dS.to(dh.dtype.element_ty), mask=state_mask)
        t0 = bos + n * BT
        rows = t0 + tl.arange(0, BT)
        row_mask = rows < eos
        kmask = row_mask[:, None] & (rk[None, :] < K)
        ktile = (rows[:, None] * H + i_h) * K + rk[None, :]
        vtile = (rows[:, None] * H + i_h) * V + rv[None, :]
        vmask = row_mask[:, None] & (rv[None, :] < V)
        rq, q_rows, q_mask = query_rows(rows, row_mask, t0, tl.minimum(t0 + BT, eos), STEPS, QT)
        q_tile = qk_rows(q_rows, i_h, H, GROUP, K)[:, None] + rk[None, :]
        b_q = tl.load(q + q_tile, mask=q_mask[:, None] & (rk[None, :] < K), other=0.0)
        qk_tile = qk_rows(rows, i_h, H, GROUP, K)[:, None] + rk[None, :]
        b_k = tl.load(k + qk_tile, mask=kmask, other=0.0)
        b_W = tl.load(W + ktile, mask=kmask, other=0.0)
        do_tile = (q_rows[:, None] * H + i_h) * V + rv[None, :]
        b_do = tl.load(do + do_tile, mask=q_mask[:, None] & (rv[None, :] < V), other=0.0)
        if GATED:
            last = tl.minimum(t0 + BT, eos) - 1
            g_last = tl.load(G + last * H + i_h)
            g = tl.load(G + rows * H + i_h, mask=row_mask, other=0.0)
            q_in, q_scale = (b_q * exp(query_decay(G, g, rq, q_mask, i_h, H, STEPS))[:, None]).to(b_q.dtype), scale
        elif FOLD_SCALE:
            # scale folded into q, which then reaches its product through registers, and the pipeline
            # keeps no copies of q's tiles: 118784 -> 110592 B of shared memory at the H100's tiles
            # (4 warps, 32 columns, 2 stages), two programs an SM instead of one (Triton 3.6 and 3.9,
            # sm_90), for ~190 more SASS instructions a chunk (FMUL, F2FP, PRMT, STS and a barrier:
            # DeltaRuleConfig.state_backward_num_stages). float32 and the gated kernel grow instead
            # (float32 147 -> 197 KB, past an A100's 163; gated 99 -> 115 KB, at the edge of two an SM)
            q_in, q_scale = (b_q * scale).to(b_q.dtype), 1.0
        else:
            q_in, q_scale = b_q, scale
        # the state term (K * e^(G_last - G)) dS: the decay as a row factor of the product, so k's
        # tile feeds it unchanged (scaling k took a register copy of it and a shared-memory round
        # trip: gated, H100 tiles, bf16, Triton 3.6: 1109 -> 931 SASS instructions a chunk, 17 -> 11
        # exponentials, 10 -> 9 block barriers; A100 1270 -> 1044; float32 on an A100 213 -> 148 KB
        # of shared memory, which now fits its 163)
        b_state = tl.dot(b_k, dS.to(b_k.dtype), input_precision=PRECISION)
        if GATED:
            b_state *= exp(tl.minimum(g_last - g, 0.0))[:, None]
        b_dv = tl.load(dv_new + vtile, mask=vmask, other=0.0).to(tl.float32) + b_state
        tl.store(dv_new + vtile, b_dv.to(dv_new.dtype.element_ty), mask=vmask)
        if GATED:
            dS *= exp(g_last)
        dS += q_scale * tl.dot(tl.trans(q_in), b_do, input_precision=PRECISION)
        dS -= tl.dot(tl.trans(b_W), b_dv.to(b_W.dtype), input_precision=PRECISION)
    if STORE_D_INITIAL:
        tl.store(d_initial + (seq * H + i_h) * K * V + state_offs, dS, mask=state_mask)


@triton.jit
def ut_bwd_kernel(k, v, beta, G, T_all, dU, dW, dk, dv, dbeta, dG, dg, chunk_indices, cu_seqlens,
                  total_rows, H: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  GATED: tl.constexpr, PRECISION: tl.constexpr, CHUNK_PRECISION: tl.constexpr, STEPS: tl.constexpr,
                  BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Gradients through the UT transform for one chunk: dv and dbeta; dk (k's dtype, holding the
    output and state terms on entry) += the UT terms, summed in fp32; gated: dg = reverse cumsum of (dG summed
    over its K tiles + the UT terms) within the chunk. Gated DeltaProduct (STEPS > 1): dG's pair
    terms F leave out the pairs of a token's own steps (TOKEN_PAIRS, _packed.token_pairs)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    valid, t0, eos, _last = chunk_rows(chunk_indices, cu_seqlens, i_c, BT)
    if valid:
        rows = t0 + tl.arange(0, BT)
        row_mask = rows < eos
        b_beta, gamma = _beta_gamma(beta, G, rows, row_mask, i_h, H, GATED)
        # the products with V and K take T and the scaled tiles in the input dtype, as ut_fwd
        # multiplied them (the gradient of what the forward computed; half-precision tensor
        # cores); dL below multiplies in fp32
        T_in = _load_inverse(T_all, rows, row_mask, i_h, H, BT)
        T = T_in.to(tl.float32)
        dT = tl.zeros([BT, BT], tl.float32)
        d_beta = tl.zeros([BT], tl.float32)
        d_gate = tl.zeros([BT], tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            rv = i_v * BV + tl.arange(0, BV)
            tile = (rows[:, None] * H + i_h) * V + rv[None, :]
            mask = row_mask[:, None] & (rv[None, :] < V)
            b_v = tl.load(v + tile, mask=mask, other=0.0)
            b_dU = tl.load(dU + tile, mask=mask, other=0.0).to(b_v.dtype)
            x = tl.dot(tl.trans(T_in), b_dU, input_precision=PRECISION)
            tl.store(dv + tile, (b_beta[:, None] * x).to(dv.dtype.element_ty), mask=mask)
            d_beta += tl.sum(b_v.to(tl.float32) * x, axis=1)
            dT += tl.dot(b_dU, tl.trans((b_v * b_beta[:, None]).to(b_v.dtype)), input_precision=PRECISION)
        for i_k in range(tl.cdiv(K, BK)):
            rk = i_k * BK + tl.arange(0, BK)
            tile = (rows[:, None] * H + i_h) * K + rk[None, :]
            mask = row_mask[:, None] & (rk[None, :] < K)
            b_k = tl.load(k + qk_rows(rows, i_h, H, GROUP, K)[:, None] + rk[None, :], mask=mask, other=0.0)
            b_dW = tl.load(dW + tile, mask=mask, other=0.0).to(b_k.dtype)
            y = tl.dot(tl.trans(T_in), b_dW, input_precision=PRECISION)
            k_y = tl.sum(b_k.to(tl.float32) * y, axis=1)
            d_beta += gamma * k_y
            d_gate += gamma * b_beta * k_y
            dT += tl.dot(b_dW, tl.trans((b_k * (b_beta * gamma)[:, None]).to(b_k.dtype)), input_precision=PRECISION)
        strict = tl.arange(0, BT)[:, None] > tl.arange(0, BT)[None, :]
        dL = -tl.dot(tl.trans(T), tl.dot(dT, tl.trans(T), input_precision=CHUNK_PRECISION),
                     input_precision=CHUNK_PRECISION)
        dL = tl.where(strict, dL, 0.0)
        # the terms with M = k k^T * D as products with k instead (no gram recomputed, no BT x BT
        # M live): with dLD = dL * D and E = beta_i dLD,  rowsum(dL * M) = rowsum(k * dLD k),
        # colsum(beta_i dL * M) = rowsum(k * E^T k) and (E + E^T) k = beta dLD k + E^T k
        # (bf16 sm_90, 8 warps: 185/205 -> 168/184 registers plain/gated, one pass over k fewer).
        # Their products with k take dLD and E rounded to k's dtype, k as loaded (half tensor
        # cores; float32 unchanged): with float32 operands (k converted, tf32) the loop held 690
        # SASS instructions a K tile, 38 of them shuffles, and the gated kernel spilled 28 B; now 470,
        # none, no spill (Triton 3.6, sm_90, H100 tiles; float16 errors unchanged, 4-6e-4)
        dLD = dL * _pair_decay(G, rows, row_mask, i_h, H, GATED, BT)
        E = dLD * b_beta[:, None]
        dLD_in, E_in = dLD.to(k.dtype.element_ty), E.to(k.dtype.element_ty)
        for i_k in range(tl.cdiv(K, BK)):
            rk = i_k * BK + tl.arange(0, BK)
            tile = (rows[:, None] * H + i_h) * K + rk[None, :]
            mask = row_mask[:, None] & (rk[None, :] < K)
            b_k = tl.load(k + qk_rows(rows, i_h, H, GROUP, K)[:, None] + rk[None, :], mask=mask, other=0.0)
            b_dW = tl.load(dW + tile, mask=mask, other=0.0).to(b_k.dtype)
            k32 = b_k.to(tl.float32)
            y = tl.dot(tl.trans(T_in), b_dW, input_precision=PRECISION)
            if GATED and STEPS > 1:  # TOKEN_PAIRS: dG's products first, a token's own pairs after
                P = tl.dot(token_pairs(dLD_in, rows, STEPS, False), b_k, input_precision=PRECISION)
                Q = tl.dot(tl.trans(token_pairs(E_in, rows, STEPS, False)), b_k, input_precision=PRECISION)
                d_gate += b_beta * tl.sum(k32 * P, axis=1) - tl.sum(k32 * Q, axis=1)
                P += tl.dot(token_pairs(dLD_in, rows, STEPS, True), b_k, input_precision=PRECISION)
                Q += tl.dot(tl.trans(token_pairs(E_in, rows, STEPS, True)), b_k, input_precision=PRECISION)
                d_beta += tl.sum(k32 * P, axis=1)
            else:
                P = tl.dot(dLD_in, b_k, input_precision=PRECISION)
                Q = tl.dot(tl.trans(E_in), b_k, input_precision=PRECISION)
                k_p = tl.sum(k32 * P, axis=1)
                d_beta += k_p
                d_gate += b_beta * k_p - tl.sum(k32 * Q, axis=1)
            b_dk = tl.load(dk + tile, mask=mask, other=0.0) + (b_beta * gamma)[:, None] * y
            tl.store(dk + tile, (b_dk + b_beta[:, None] * P + Q).to(dk.dtype.element_ty), mask=mask)
        tl.store(dbeta + rows * H + i_h, d_beta, mask=row_mask)
        if GATED:
            for i_k in range(tl.cdiv(K, BK)):
                d_gate += tl.load(dG + (i_k * total_rows + rows) * H + i_h, mask=row_mask, other=0.0)
            tl.store(dg + rows * H + i_h, tl.cumsum(d_gate, axis=0, reverse=True), mask=row_mask)
