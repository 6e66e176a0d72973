"""Triton kernels for chunked linear attention with no, scalar or per-key log-decay.

Computes, per head (S: K x V state, g the log-decay, scale s):
    S_t = exp(g_t) * S_{t-1} + k_t^T v_t,        o_t = s * q_t S_t
chunk by chunk (BT tokens, G the inclusive cumulative log-decay inside the chunk, S_in the
state entering it, "last" its last valid token):
    o      = s * [(q * e^G) @ S_in + (A * mask) @ v],   A[i, j] = sum_d q_id k_jd e^(G_id - G_jd)
    S_out  = e^(G_last) * S_in + (k * e^(G_last - G))^T @ v
Every exponent is <= 0 (G is non-increasing for g <= 0), and the factored ones are clamped at 0
so that rows past a sequence's end (G read as 0) cannot overflow either: nothing overflows,
however strong the decay. Per-key decay factors exp(G_i - G_j) around the chunk's first token
(exponents up to +span) only where the chunk's decay span (max over keys of G_first - G_last) is
at most SPAN_LIMIT, which keeps e^span in the dot operands' range (one BT x BT product over K:
``intra_scores``, FACTORED); chunks of stronger decay build their scores from BC-token
sub-chunks: off-diagonal blocks factor around the first token of the row block (both factors
<= 1), diagonal blocks are summed exactly per pair.

Gradients (do the output gradient, dS_out the gradient of the state leaving a chunk):
    dS_in  = e^(G_last) * dS_out + s * (q * e^G)^T @ do                      (``states_bwd``)
    dv     = s * (A * mask)^T @ do + (k * e^(G_last - G)) @ dS_out           (``dv``)
    dq     = s * [e^G * (do @ S_in^T) + intra(dA)],  dA = (do @ v^T) * mask  (``dqk``)
    dk     = s * intra^T(dA) + e^(G_last - G) * (v @ dS_out^T)
    dG_t   = q_t * dq_t - k_t * dk_t   (+ rowsum(S_out * dS_out) on the last token)
    dg     = reverse cumsum of dG within the chunk
dG's two products share terms that cancel exactly: each token's own pair (q_t dA_tt k_t, decay 1)
and the last token's own part of S_out (k_last^T v_last against its row of the state term). Where
the decay is strong they dominate what is left, and float32 rounding of the sums they enter had
left dG noise of their size (a lone token's dg ~1e-7 where it is 0; 3e-5 relative error in the
gated delta rule at g ~ -20): dqk_kernel forms dG without them and adds them to dq and dk after
(DIAGONAL), and leaves the last token's state term out of both dG's end term and its last row,
where dk is that term alone (LAST). DeltaProduct's steps of one token share G, so every pair of
them cancels so: dG leaves them all out (TOKEN_PAIRS, _packed.token_pairs; the UT's too).
Nothing but the inputs is saved for the backward: G, the chunk states and the scores are
recomputed (memory per token: none beyond the inputs; per chunk: one K x V state in the input dtype).

Sequences are always handled as packed: a batch is the packed case with equal lengths.
``chunk_indices`` maps each program to (sequence, chunk of that sequence) or (-1, -1) past the
real chunk count; ``chunk_offsets[i]`` is sequence i's first global chunk. Tensors are
contiguous (B*T, H, ...): q, k (., H / GROUP, K); v, o (., H, V); g (., H) or (., H, K). GROUP
consecutive (value) heads share a q / k head; every kernel works per value head, so dq and dk
come out per value head, (., H, K), or summed over HEADS of them by dqk_kernel, (., H / HEADS,
K), and the caller sums each group's. STEPS > 1 (DeltaProduct, through the delta rule): the
rows are Householder steps, STEPS a token, and q, g, o, do and dq are per token, (B*T / STEPS,
...), read and written on a token's last step (g its first; _packed.token_rows); the fused
forward and dv kernels take a chunk's QT queries as one tile (_packed.query_rows), the output
kernel chunks of BT tokens, STEPS row-chunks (KEY_TILES), with their own states and G. VS
(HAS_VSCALE), (., H): a scale s per token and head of v (Mamba-2's dt): every kernel that reads v scales the rows of its
tile as loaded (d_scores: the columns of its dA), and dv_kernel returns s times the gradient of
s v and, per V tile, rowsum(that gradient * v), which the caller sums into ds. SKIP (HAS_SKIP),
(H, V): o += skip * v (Mamba's D; v as given) in the output and fused forward kernels; dv_kernel
adds skip * do to dv and writes colsum(do * v) per chunk, which the caller sums into d skip.

Grids and tiling (BT chunk, BK/BV tiles of K/V, BC = 16 sub-chunk; the state kernels' BK/BV are
the configuration's state tile, the others' its chunk tiles):
    cumsum       (chunks, H)               one chunk's g, all of K in BK tiles (or its TILES row tiles)
    states_fwd   (K/BK, V/BV, seqs * H)    the chunk loop of one sequence, S tile in registers
    intra_scores (chunks, H)               per-key only: A for one chunk, K in BK tiles; launched
                                           twice, factored chunks and the others (each program
                                           leaves the other kind's chunks alone)
    output       (V/BV, chunks, H)         o tile (the chunk's QT queries); K in BK tiles, keys in
                                           KEY_TILES tiles of BT rows
    states_bwd   (K/BK, V/BV, seqs * H)    reverse chunk loop
    intra_dqk    (chunks, H)               per-key only: the intra parts of dq, dk from dA; twice
    dqk          (K/BK, chunks, H/HEADS)   dq, dk, dG for one K tile, HEADS value heads; V in BV tiles
    dv           (V/BV, chunks, H)         dv tile from the chunk's QT queries' scores; K in BK tiles

Work per call, B*T tokens, H heads (bf16 inputs: 2-byte elements):
    forward  reads q, k (K each), v (V), g (0, 1 or K) and writes o (V) per token and head;
             writes and reads one K*V state per chunk (input dtype); 2*(BT*K + BT*V + 2*K*V) flops
             per token and head (plus BT*K for per-key sub-chunk scores).
    backward reads the forward's inputs and do, writes dq, dk, dv, dg, recomputes the states
             (one more state pass) and moves two K*V states per chunk; about twice the
             forward's flops.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._math import exp
from ._packed import (
    chunk_rows,
    qk_rows,
    query_decay,
    query_rows,
    sequence_span,
    sequence_state,
    token_pairs,
    token_rows,
)

NO_GATE, SCALAR_GATE, KEY_GATE = 0, 1, 2
SUB_CHUNK = 16


@triton.jit
def cumsum_kernel(g, G, G_rows, chunk_indices, cu_seqlens, H: tl.constexpr, K: tl.constexpr, GATE: tl.constexpr,
                  STEPS: tl.constexpr, TILES: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """G = inclusive cumulative sum of g inside each chunk of TILES * BT rows, in fp32. STEPS > 1
    (DeltaProduct, scalar decay): g is per token, (rows / STEPS, H), and decays each token's first
    step (G per row); TILES > 1 (scalar decay): BT rows at a time (DeltaProduct's token chunks of
    STEPS row-chunks, not a power of two for every STEPS), and G_rows the sum inside each of those
    BT rows (the row chunks' G besides the token chunks', one pass)."""
    tl.static_assert(TILES == 1 or GATE == 1)
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    valid, t0, eos, _last = chunk_rows(chunk_indices, cu_seqlens, i_c, TILES * BT)
    if valid:
        if GATE == 1:
            carry = 0.0
            for tile in tl.static_range(TILES):
                rows = t0 + tile * BT + tl.arange(0, BT)
                x = tl.load(g + (rows // STEPS) * H + i_h, mask=(rows < eos) & (rows % STEPS == 0), other=0.0)
                x = x.to(tl.float32)
                within = tl.cumsum(x, axis=0)
                tl.store(G + rows * H + i_h, within + carry, mask=rows < eos)
                if TILES > 1:
                    tl.store(G_rows + rows * H + i_h, within, mask=rows < eos)
                carry += tl.sum(x, axis=0)
        else:
            rows = t0 + tl.arange(0, BT)
            for i_k in range(tl.cdiv(K, BK)):
                cols = i_k * BK + tl.arange(0, BK)
                offs = (rows[:, None] * H + i_h) * K + cols[None, :]
                mask = (rows[:, None] < eos) & (cols[None, :] < K)
                x = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(G + offs, tl.cumsum(x, axis=0), mask=mask)


@triton.jit
def _load_decay(G, rows, row_mask, cols, i_h, H: tl.constexpr, K: tl.constexpr, GATE: tl.constexpr):
    """The (BT, BK) cumulative log-decay tile (scalar decay broadcast over K; zeros ungated)."""
    if GATE == 2:
        return tl.load(G + (rows[:, None] * H + i_h) * K + cols[None, :],
                       mask=row_mask[:, None] & (cols[None, :] < K), other=0.0)
    elif GATE == 1:
        return tl.load(G + rows * H + i_h, mask=row_mask, other=0.0)[:, None] + tl.zeros([1, cols.shape[0]], tl.float32)
    else:
        return tl.zeros([rows.shape[0], cols.shape[0]], tl.float32)


@triton.jit
def _load_decay_by_key(G, rows, row_mask, cols, i_h, H: tl.constexpr, K: tl.constexpr, GATE: tl.constexpr):
    """_load_decay's tile transposed, (BK, BT): the layout of a key-major dot operand, the forward
    walk's k^T, scaled where loaded (GLA: 1014 -> 584 SASS instructions a chunk, 254 -> 102
    registers, where its (BT, BK) tiles were scaled, then transposed for the product; Triton 3.6,
    sm_90. The backward walk's q^T compiles the same either way)."""
    if GATE == 2:
        return tl.load(G + (rows[None, :] * H + i_h) * K + cols[:, None],
                       mask=row_mask[None, :] & (cols[:, None] < K), other=0.0)
    elif GATE == 1:
        return tl.load(G + rows * H + i_h, mask=row_mask, other=0.0)[None, :] + tl.zeros([cols.shape[0], 1], tl.float32)
    else:
        return tl.zeros([cols.shape[0], rows.shape[0]], tl.float32)


@triton.jit
def _load_last_decay(G, last, cols, i_h, H: tl.constexpr, K: tl.constexpr, GATE: tl.constexpr):
    """The (BK,) cumulative log-decay at the chunk's last valid token."""
    if GATE == 2:
        return tl.load(G + (last * H + i_h) * K + cols, mask=cols < K, other=0.0)
    elif GATE == 1:
        return tl.load(G + last * H + i_h) + tl.zeros([cols.shape[0]], tl.float32)
    else:
        return tl.zeros([cols.shape[0]], tl.float32)


@triton.jit
def _value_scale(VS, rows, row_mask, i_h, H: tl.constexpr):
    """The per-token value scale s of one chunk's rows (fp32, VS (rows, H)): v is used as s v."""
    return tl.load(VS + rows * H + i_h, mask=row_mask, other=0.0).to(tl.float32)


@triton.jit
def _scaled_values(b_v, VS, rows, row_mask, i_h, H: tl.constexpr, HAS_VSCALE: tl.constexpr):
    """A (BT x BV) tile of v as the recurrence uses it: its rows times the value scale, if any."""
    if HAS_VSCALE:
        return (b_v * _value_scale(VS, rows, row_mask, i_h, H)[:, None]).to(b_v.dtype)
    return b_v


@triton.jit
def _skip_term(v, SKIP, rows, rv, vmask, i_h, H: tl.constexpr, V: tl.constexpr):
    """skip * v of one (BT x BV) tile, fp32 (SKIP (H, V): Mamba's D; v as given, re-read rather
    than held through the products)."""
    b_v = tl.load(v + (rows[:, None] * H + i_h) * V + rv[None, :], mask=vmask, other=0.0).to(tl.float32)
    return b_v * tl.load(SKIP + i_h * V + rv, mask=rv < V, other=0.0)[None, :]


@triton.jit
def states_fwd_kernel(k, v, VS, G, h, initial_state, final_state, chunk_offsets, cu_seqlens,
                      H: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, GATE: tl.constexpr,
                      HAS_VSCALE: tl.constexpr, HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr,
                      PRECISION: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """h[chunk] = the state entering each chunk of one sequence; final_state after the last."""
    i_k, i_v, i_sh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, i_h = i_sh // H, i_sh % H
    bos, eos, first, chunks = sequence_span(chunk_offsets, cu_seqlens, seq)
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    state_offs, state_mask, S = sequence_state(initial_state, seq, i_h, rk, rv, H, K, V, HAS_INITIAL)
    for n in range(chunks):
        tl.store(h + ((first + n) * H + i_h) * K * V + state_offs, S.to(h.dtype.element_ty), mask=state_mask)
        t0 = bos + n * BT
        rows = t0 + tl.arange(0, BT)
        row_mask = rows < eos
        b_kT = tl.load(k + qk_rows(rows, i_h, H, GROUP, K)[None, :] + rk[:, None],
                       mask=row_mask[None, :] & (rk[:, None] < K), other=0.0)
        b_v = tl.load(v + (rows[:, None] * H + i_h) * V + rv[None, :], mask=row_mask[:, None] & (rv[None, :] < V),
                      other=0.0)
        b_v = _scaled_values(b_v, VS, rows, row_mask, i_h, H, HAS_VSCALE)
        if GATE != 0:
            last = tl.minimum(t0 + BT, eos) - 1
            g_last = _load_last_decay(G, last, rk, i_h, H, K, GATE)
            S *= exp(g_last)[:, None]
            b_gT = _load_decay_by_key(G, rows, row_mask, rk, i_h, H, K, GATE)
            b_kT = (b_kT * exp(g_last[:, None] - b_gT)).to(b_v.dtype)
        S += tl.dot(b_kT, b_v, input_precision=PRECISION)
    if STORE_FINAL:
        tl.store(final_state + (seq * H + i_h) * K * V + state_offs, S, mask=state_mask)


@triton.jit
def fused_fwd_kernel(q, k, v, VS, SKIP, W, G, o, initial_state, final_state, chunk_offsets, cu_seqlens, scale,
                     H: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, GATE: tl.constexpr,
                     HAS_VSCALE: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_INITIAL: tl.constexpr,
                     STORE_FINAL: tl.constexpr, PRECISION: tl.constexpr, DELTA: tl.constexpr, STEPS: tl.constexpr,
                     BT: tl.constexpr, QT: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr):
    """The forward of one sequence, head and V tile in one walk over its chunks, for no gate or a
    scalar decay (GATE 0 or 1): states_fwd_kernel and output_kernel in one, with no per-chunk
    states in memory; the state S (all K rows, KP = K rounded up to a power of two, x BV) stays in
    registers:
        o = scale * (e^G (q @ S_in) + scores @ v),   S_out = e^(G_last) S_in + k^T (e^(G_last - G) v)
    (the decay as row factors of (BT x BV) tiles: q and k go to the tensor cores as loaded).
    Per chunk it reads q and k (BT x K) and v (BT x BV) and writes o: 2 K + 2 BV values a token
    and V tile, against output_kernel's 2 K + 2 BV plus the (K x BV) states states_fwd_kernel
    wrote (the largest traffic of the two-pass forward); q and k are read once per V tile, and
    the chunk's (BT x BT) scores computed once per V tile too. Flops per chunk and V tile:
    2 BT K BV (q S) + 2 BT^2 K (q k^T) + 2 BT^2 BV (scores v) + 2 K BT BV (k^T v).
    DELTA (the delta rule's forward, triton_kernels.delta_rule): v holds the UT transform's U and
    W its W (BT x K a chunk), and each chunk's values are its pseudo-values V_new = U - W S_in
    (rounded to the input dtype, as the two-pass forward stores them): one more tile read (K
    values a token) and 2 BT K BV flops a chunk and V tile, and neither the states nor V_new
    written."""
    i_v, i_sh = tl.program_id(0), tl.program_id(1)
    seq, i_h = i_sh // H, i_sh % H
    bos, eos, _first, chunks = sequence_span(chunk_offsets, cu_seqlens, seq)
    rk = tl.arange(0, KP)
    rv = i_v * BV + tl.arange(0, BV)
    state_offs, state_mask, S = sequence_state(initial_state, seq, i_h, rk, rv, H, K, V, HAS_INITIAL)
    for n in range(chunks):
        t0 = bos + n * BT
        rows = t0 + tl.arange(0, BT)
        row_mask = rows < eos
        rq, q_rows, q_mask = query_rows(rows, row_mask, t0, tl.minimum(t0 + BT, eos), STEPS, QT)
        q_tile = qk_rows(q_rows, i_h, H, GROUP, K)[:, None] + rk[None, :]
        b_q = tl.load(q + q_tile, mask=q_mask[:, None] & (rk[None, :] < K), other=0.0)
        qk_tile = qk_rows(rows, i_h, H, GROUP, K)[:, None] + rk[None, :]
        tile_mask = row_mask[:, None] & (rk[None, :] < K)
        b_k = tl.load(k + qk_tile, mask=tile_mask, other=0.0)
        vmask = row_mask[:, None] & (rv[None, :] < V)
        b_v = tl.load(v + (rows[:, None] * H + i_h) * V + rv[None, :], mask=vmask, other=0.0)
        b_v = _scaled_values(b_v, VS, rows, row_mask, i_h, H, HAS_VSCALE)
        if DELTA:
            b_W = tl.load(W + (rows[:, None] * H + i_h) * K + rk[None, :], mask=tile_mask, other=0.0)
            b_v = (b_v.to(tl.float32) - tl.dot(b_W, S.to(b_W.dtype), input_precision=PRECISION)).to(b_W.dtype)
        qk = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
        scores = _masked_scores(qk, G, None, rq, q_mask, rows, row_mask, i_h, H, GATE, STEPS, BT)
        acc = tl.dot(b_q, S.to(b_v.dtype), input_precision=PRECISION)
        v_in = b_v  # v as it enters the state
        if GATE == 1:  # a decay per token, applied as row factors of (q S) and of v rather than of q and k
            g_rows = tl.load(G + rows * H + i_h, mask=row_mask, other=0.0)
            g_last = tl.load(G + (tl.minimum(t0 + BT, eos) - 1) * H + i_h)
            acc *= exp(query_decay(G, g_rows, rq, q_mask, i_h, H, STEPS))[:, None]
            v_in = (b_v * exp(g_last - g_rows)[:, None]).to(b_v.dtype)
            S *= exp(g_last)
        acc += tl.dot(scores.to(b_v.dtype), b_v, input_precision=PRECISION)
        out = acc * scale
        if HAS_SKIP:
            out += _skip_term(v, SKIP, rq, rv, q_mask[:, None] & (rv[None, :] < V), i_h, H, V)
        tl.store(o + (q_rows[:, None] * H + i_h) * V + rv[None, :], out.to(o.dtype.element_ty),
                 mask=q_mask[:, None] & (rv[None, :] < V))
        S += tl.dot(tl.trans(b_k), v_in, input_precision=PRECISION)
    if STORE_FINAL:
        tl.store(final_state + (seq * H + i_h) * K * V + state_offs, S, mask=state_mask)


@triton.jit
def _chunk_span(G, t0, last, i_h, H: tl.constexpr, K: tl.constexpr, KP: tl.constexpr):
    """The chunk's decay span, max over keys of G_first - G_last (>= 0: G is non-increasing): how
    far e^(G_first - G_j) can grow inside the chunk."""
    every_k = tl.arange(0, KP)
    g_first = tl.load(G + (t0 * H + i_h) * K + every_k, mask=every_k < K, other=0.0)
    g_last = tl.load(G + (last * H + i_h) * K + every_k, mask=every_k < K, other=0.0)
    return tl.max(g_first - g_last, axis=0)


@triton.jit
def _factors(G, t0, rows, row_mask, rk, kmask, i_h, H: tl.constexpr, K: tl.constexpr):
    """(e^(G_i - G_first), e^(G_first - G_i)) for a (rows, rk) tile: the first <= 1, the second <=
    e^span for valid rows; rows past the end (G read as 0) get 1 and e^G_first <= 1."""
    g = tl.load(G + (rows[:, None] * H + i_h) * K + rk[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0)
    g_first = tl.load(G + (t0 * H + i_h) * K + rk, mask=kmask, other=0.0)
    return exp(tl.minimum(g - g_first[None, :], 0.0)), exp(g_first[None, :] - g)


@triton.jit
def intra_scores_kernel(q, k, G, A, chunk_indices, cu_seqlens, H: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr,
                        PRECISION: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                        KP: tl.constexpr, SPAN_LIMIT: tl.constexpr, FACTORED: tl.constexpr):
    """Per-key decay: A[i, j] = sum_d q_id k_jd exp(G_id - G_jd) for j <= i (else 0), stored as
    A[(row, head), column-in-chunk] in fp32. Launched twice, FACTORED and not, each program
    leaving the chunks of the other kind alone: each compiles to its own registers.

    A chunk whose decay span is at most SPAN_LIMIT (the host's bound for the dot operands' dtype:
    e^span times a key stays in range) factors every pair around its first token, one product over
    K: (q e^(G - G_first)) @ (k e^(G_first - G))^T, both parts' exponents in [-span, span]. Other
    chunks (strong decay) go by sub-chunks of BC tokens: blocks below the diagonal are one matmul
    each, factored around the row block's first token (both factors <= 1); diagonal blocks are
    summed exactly, one column at a time over all K (KP: K rounded up to a power of two) with the
    block's queries and decays loaded once, each column stored as computed (gathering the columns
    into a block tile first took a layout conversion, 18 block barriers, per column and K tile)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    valid, t0, eos, last = chunk_rows(chunk_indices, cu_seqlens, i_c, BT)
    if valid:
        span = _chunk_span(G, t0, last, i_h, H, K, KP)
        if not FACTORED:
            if span > SPAN_LIMIT:
                _sub_chunk_scores(q, k, G, A, t0, eos, last, i_h, H, GROUP, K, PRECISION, BT, BC, BK, KP)
        elif span <= SPAN_LIMIT:
            rows = t0 + tl.arange(0, BT)
            row_mask = rows < eos
            scores = tl.zeros([BT, BT], tl.float32)
            for i_k in range(tl.cdiv(K, BK)):
                rk = i_k * BK + tl.arange(0, BK)
                kmask = rk < K
                qk_tile = qk_rows(rows, i_h, H, GROUP, K)[:, None] + rk[None, :]
                tile_mask = row_mask[:, None] & kmask[None, :]
                b_q = tl.load(q + qk_tile, mask=tile_mask, other=0.0)
                b_k = tl.load(k + qk_tile, mask=tile_mask, other=0.0)
                up, down = _factors(G, t0, rows, row_mask, rk, kmask, i_h, H, K)
                scores += tl.dot((b_q * up).to(b_q.dtype), tl.trans((b_k * down).to(b_k.dtype)),
                                 input_precision=PRECISION)
            causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
            tl.store(A + (rows[:, None] * H + i_h) * BT + tl.arange(0, BT)[None, :], tl.where(causal, scores, 0.0),
                     mask=row_mask[:, None])


@triton.jit
def _sub_chunk_scores(q, k, G, A, t0, eos, last, i_h, H: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr,
                      PRECISION: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr):
    """intra_scores_kernel's chunks of strong decay, by sub-chunks (its docstring)."""
    r = tl.arange(0, BC)
    for i_i in tl.static_range(BT // BC):
        rows = t0 + i_i * BC + r
        row_mask = rows < eos
        for i_j in tl.static_range(BT // BC):
            if i_j == i_i:
                every_k = tl.arange(0, KP)
                tile_mask = row_mask[:, None] & (every_k < K)[None, :]
                q_diag = tl.load(q + qk_rows(rows, i_h, H, GROUP, K)[:, None] + every_k[None, :], mask=tile_mask,
                                 other=0.0).to(tl.float32)
                g_diag = tl.load(G + (rows[:, None] * H + i_h) * K + every_k[None, :], mask=tile_mask, other=0.0)
                for c in range(BC):
                    col = tl.minimum(t0 + i_i * BC + c, last)  # past the end: feeds masked rows only
                    k_col = tl.load(k + qk_rows(col, i_h, H, GROUP, K) + every_k, mask=every_k < K,
                                    other=0.0).to(tl.float32)
                    g_col = tl.load(G + (col * H + i_h) * K + every_k, mask=every_k < K, other=0.0)
                    # (clamped: rows past the end read G as 0 against a valid column's)
                    exponent = tl.where(r[:, None] >= c, tl.minimum(g_diag - g_col[None, :], 0.0), float("-inf"))
                    column = tl.sum(q_diag * k_col[None, :] * exp(exponent), axis=1)
                    tl.store(A + (rows * H + i_h) * BT + i_i * BC + c, column, mask=row_mask)
            else:
                cols = t0 + i_j * BC + r
                col_mask = cols < eos
                block = tl.zeros([BC, BC], tl.float32)
                if i_j < i_i:
                    ref = tl.minimum(t0 + i_i * BC, last)  # a row past the end has no valid rows anyway
                    for i_k in range(tl.cdiv(K, BK)):
                        rk = i_k * BK + tl.arange(0, BK)
                        kmask = rk < K
                        b_q = tl.load(q + qk_rows(rows, i_h, H, GROUP, K)[:, None] + rk[None, :],
                                      mask=row_mask[:, None] & kmask[None, :], other=0.0)
                        b_k = tl.load(k + qk_rows(cols, i_h, H, GROUP, K)[:, None] + rk[None, :],
                                      mask=col_mask[:, None] & kmask[None, :], other=0.0)
                        g_row = tl.load(G + (rows[:, None] * H + i_h) * K + rk[None, :],
                                        mask=row_mask[:, None] & kmask[None, :], other=0.0)
                        g_col = tl.load(G + (cols[:, None] * H + i_h) * K + rk[None, :],
                                        mask=col_mask[:, None] & kmask[None, :], other=0.0)
                        g_ref = tl.load(G + (ref * H + i_h) * K + rk, mask=kmask, other=0.0)
                        q_part = (b_q * exp(tl.minimum(g_row - g_ref[None, :], 0.0))).to(b_q.dtype)
                        k_part = (b_k * exp(tl.minimum(g_ref[None, :] - g_col, 0.0))).to(b_k.dtype)
                        block += tl.dot(q_part, tl.trans(k_part), input_precision=PRECISION)
                tl.store(A + (rows[:, None] * H + i_h) * BT + i_j * BC + r[None, :], block,
                         mask=row_mask[:, None])


@triton.jit
def _masked_scores(qk, G, A, rq, q_mask, rows, row_mask, i_h, H: tl.constexpr, GATE: tl.constexpr,
                   STEPS: tl.constexpr, BT: tl.constexpr):
    """The chunk's masked scores of its queries at rows ``rq`` (query_rows; the chunk's ``rows``
    where STEPS is 1) against its keys at ``rows``: from A for per-key decay (STEPS 1), else ``qk``
    (q k^T, fp32, which the caller accumulates in its own loop over K tiles) times the decay."""
    if GATE == 2:
        return tl.load(A + (rq[:, None] * H + i_h) * BT + tl.arange(0, BT)[None, :], mask=q_mask[:, None],
                       other=0.0)
    if STEPS == 1:  # the same mask, which the compiler then sees is constant (the fused forward: no spills)
        causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
    else:
        causal = rows[None, :] <= rq[:, None]
    if GATE == 1:
        g_keys = tl.load(G + rows * H + i_h, mask=row_mask, other=0.0)
        g_queries = query_decay(G, g_keys, rq, q_mask, i_h, H, STEPS)
        exponent = tl.where(causal, tl.minimum(g_queries[:, None] - g_keys[None, :], 0.0), float("-inf"))
        return qk * exp(exponent)
    return tl.where(causal, qk, 0.0)


@triton.jit
def output_kernel(q, k, v, VS, SKIP, G, A, h, o, chunk_indices, cu_seqlens, scale, H: tl.constexpr,
                  GROUP: tl.constexpr, HAS_VSCALE: tl.constexpr, HAS_SKIP: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, GATE: tl.constexpr, PRECISION: tl.constexpr, STEPS: tl.constexpr,
                  KEY_TILES: tl.constexpr, K_STAGES: tl.constexpr, BT: tl.constexpr, QT: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr):
    """o = scale * ((q * e^G) @ S_in + scores @ v) (+ skip * v) for one chunk of KEY_TILES * BT rows
    and V tile; one pass over the K tiles reads q once for both terms (a scalar decay: e^G (q @ S_in),
    q as loaded), the scores taken against the chunk's keys BT rows at a time. q and o per token, the
    chunk's QT queries (query_rows: DeltaProduct's STEPS). KEY_TILES > 1 (DeltaProduct: STEPS, a chunk
    of BT tokens; its states, G and chunk_indices in chunks of that many rows): query tiles of BT
    tokens, on warpgroup tensor cores where a row-chunk's BT / STEPS were not (mma.sync at 32 rows),
    and one state read a token chunk instead of STEPS (the state walk stores only those).
    K_STAGES: the K loop's pipeline stages (a tile's q, k and state copied into shared memory a
    tile ahead, cp.async)."""
    tl.static_assert(KEY_TILES == 1 or (STEPS > 1 and GATE != 2))
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    valid, t0, eos, last = chunk_rows(chunk_indices, cu_seqlens, i_c, KEY_TILES * BT)
    if valid:
        first_rows = t0 + tl.arange(0, BT)
        rq, q_rows, q_mask = query_rows(first_rows, first_rows < eos, t0, last + 1, STEPS, QT)
        rv = i_v * BV + tl.arange(0, BV)
        acc = tl.zeros([QT, BV], tl.float32)
        for tile in tl.static_range(KEY_TILES):
            rows = t0 + tile * BT + tl.arange(0, BT)
            row_mask = rows < eos
            vmask = row_mask[:, None] & (rv[None, :] < V)
            b_v = tl.load(v + (rows[:, None] * H + i_h) * V + rv[None, :], mask=vmask, other=0.0)
            b_v = _scaled_values(b_v, VS, rows, row_mask, i_h, H, HAS_VSCALE)
            qk = tl.zeros([QT, BT], tl.float32)
            for i_k in tl.range(tl.cdiv(K, BK), num_stages=K_STAGES):
                rk = i_k * BK + tl.arange(0, BK)
                q_tile = qk_rows(q_rows, i_h, H, GROUP, K)[:, None] + rk[None, :]
                b_q = tl.load(q + q_tile, mask=q_mask[:, None] & (rk[None, :] < K), other=0.0)
                if tile == 0:
                    b_S = tl.load(h + (i_c * H + i_h) * K * V + rk[:, None] * V + rv[None, :],
                                  mask=(rk[:, None] < K) & (rv[None, :] < V), other=0.0)
                if GATE != 2:
                    qk_tile = qk_rows(rows, i_h, H, GROUP, K)[:, None] + rk[None, :]
                    b_k = tl.load(k + qk_tile, mask=row_mask[:, None] & (rk[None, :] < K), other=0.0)
                    qk += tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
                if tile == 0:
                    if GATE == 2:
                        b_q = (b_q * exp(_load_decay(G, rq, q_mask, rk, i_h, H, K, GATE))).to(b_v.dtype)
                    acc += tl.dot(b_q, b_S.to(b_v.dtype), input_precision=PRECISION)
            if tile == 0 and GATE == 1:  # a decay per token: a row factor of (q S), not of every q tile
                acc *= exp(tl.load(G + rq * H + i_h, mask=q_mask, other=0.0))[:, None]
            scores = _masked_scores(qk, G, A, rq, q_mask, rows, row_mask, i_h, H, GATE, STEPS, BT)
            acc += tl.dot(scores.to(b_v.dtype), b_v, input_precision=PRECISION)
        out = acc * scale
        if HAS_SKIP:
            out += _skip_term(v, SKIP, rq, rv, q_mask[:, None] & (rv[None, :] < V), i_h, H, V)
        tl.store(o + (q_rows[:, None] * H + i_h) * V + rv[None, :], out.to(o.dtype.element_ty),
                 mask=q_mask[:, None] & (rv[None, :] < V))


@triton.jit
def states_bwd_kernel(q, do, G, dh, d_final, d_initial, chunk_offsets, cu_seqlens, scale,
                      H: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, GATE: tl.constexpr,
                      HAS_D_FINAL: tl.constexpr, STORE_D_INITIAL: tl.constexpr, PRECISION: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """dh[chunk] = the gradient of the state leaving each chunk, walking one sequence backwards;
    d_initial is the gradient of the state entering its first chunk."""
    i_k, i_v, i_sh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, i_h = i_sh // H, i_sh % H
    bos, eos, first, chunks = sequence_span(chunk_offsets, cu_seqlens, seq)
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    state_offs, state_mask, dS = sequence_state(d_final, seq, i_h, rk, rv, H, K, V, HAS_D_FINAL)
    for m in range(chunks):
        n = chunks - 1 - m
        tl.store(dh + ((first + n) * H + i_h) * K * V + state_offs, dS.to(dh.dtype.element_ty), mask=state_mask)
        t0 = bos + n * BT
        rows = t0 + tl.arange(0, BT)
        row_mask = rows < eos
        b_q = tl.load(q + qk_rows(rows, i_h, H, GROUP, K)[:, None] + rk[None, :],
                      mask=row_mask[:, None] & (rk[None, :] < K), other=0.0)
        b_do = tl.load(do + (rows[:, None] * H + i_h) * V + rv[None, :], mask=row_mask[:, None] & (rv[None, :] < V),
                       other=0.0)
        # scale folded into q: the product then accumulates into dS in place, where scale times
        # the product needed it whole beside dS (H100 tiles, bf16, Triton 3.6: GLA 228 -> 96
        # registers, 2 -> 4 walks an SM; ungated 100 -> 84, scalar decay 120 -> 90)
        if GATE != 0:
            last = tl.minimum(t0 + BT, eos) - 1
            dS *= exp(_load_last_decay(G, last, rk, i_h, H, K, GATE))[:, None]
            b_q = (b_q * (scale * exp(_load_decay(G, rows, row_mask, rk, i_h, H, K, GATE)))).to(b_do.dtype)
        else:
            b_q = (b_q * scale).to(b_do.dtype)
        dS += tl.dot(tl.trans(b_q), b_do, input_precision=PRECISION)
    if STORE_D_INITIAL:
        tl.store(d_initial + (seq * H + i_h) * K * V + state_offs, dS, mask=state_mask)


@triton.jit
def d_scores_kernel(do, v, VS, dA, chunk_indices, cu_seqlens, scale, H: tl.constexpr, V: tl.constexpr,
                    HAS_VSCALE: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """Per-key decay: dA = scale * (do @ v^T) * causal mask, fp32, layout as A (v scaled by VS:
    a column factor). intra_dqk_kernel takes the pairs below the diagonal, dqk_kernel the
    diagonal's (DIAGONAL there)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    valid, t0, eos, _last = chunk_rows(chunk_indices, cu_seqlens, i_c, BT)
    if valid:
        rows = t0 + tl.arange(0, BT)
        row_mask = rows < eos
        acc = tl.zeros([BT, BT], tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            rv = i_v * BV + tl.arange(0, BV)
            mask = row_mask[:, None] & (rv[None, :] < V)
            b_do = tl.load(do + (rows[:, None] * H + i_h) * V + rv[None, :], mask=mask, other=0.0)
            b_v = tl.load(v + (rows[:, None] * H + i_h) * V + rv[None, :], mask=mask, other=0.0)
            acc += tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        if HAS_VSCALE:
            acc *= _value_scale(VS, rows, row_mask, i_h, H)[None, :]
        causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
        tl.store(dA + (rows[:, None] * H + i_h) * BT + tl.arange(0, BT)[None, :], tl.where(causal, acc * scale, 0.0),
                 mask=row_mask[:, None])


@triton.jit
def intra_dqk_kernel(q, k, G, dA, dq, dk, chunk_indices, cu_seqlens, H: tl.constexpr, GROUP: tl.constexpr,
                     K: tl.constexpr,
                     PRECISION: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                     KP: tl.constexpr, SPAN_LIMIT: tl.constexpr, FACTORED: tl.constexpr):
    """Per-key decay, the intra-chunk parts of the gradients but the diagonal's (fp32; dqk_kernel's
    DIAGONAL):
        dq_i = sum_{j < i} dA_ij k_j e^(G_i - G_j),   dk_j = sum_{i > j} dA_ij q_i e^(G_i - G_j)
    as in intra_scores_kernel: a chunk of decay span at most SPAN_LIMIT by two products per K tile,
    dq = e^(G - G_first) * (dA @ (k e^(G_first - G))), dk = e^(G_first - G) * (dA^T @ (q e^(G - G_first)));
    others by sub-chunks (factored below the diagonal, exact on it); launched twice as
    intra_scores_kernel."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    valid, t0, eos, last = chunk_rows(chunk_indices, cu_seqlens, i_c, BT)
    if valid:
        span = _chunk_span(G, t0, last, i_h, H, K, KP)
        if not FACTORED:
            if span > SPAN_LIMIT:
                _sub_chunk_gradients(q, k, G, dA, dq, dk, t0, eos, last, i_h, H, GROUP, K, PRECISION, BT, BC, BK)
        elif span <= SPAN_LIMIT:
            rows = t0 + tl.arange(0, BT)
            row_mask = rows < eos
            below = tl.arange(0, BT)[:, None] > tl.arange(0, BT)[None, :]
            b_dA = tl.load(dA + (rows[:, None] * H + i_h) * BT + tl.arange(0, BT)[None, :], mask=row_mask[:, None] & below,
                           other=0.0).to(q.dtype.element_ty)  # rounded once, as the dot would each K tile
            # one gradient at a time: both in one K loop took 150 registers (one program an SM) at 8
            # warps, and spilled at 4 or on an A100; apart, 120-128 (SASS, bf16)
            _factored_gradient(k, b_dA, G, dq, t0, rows, row_mask, i_h, H, GROUP, K, PRECISION, BK, True)
            _factored_gradient(q, tl.trans(b_dA), G, dk, t0, rows, row_mask, i_h, H, GROUP, K, PRECISION, BK, False)


@triton.jit
def _factored_gradient(x, dA_tile, G, out, t0, rows, row_mask, i_h, H: tl.constexpr, GROUP: tl.constexpr,
                       K: tl.constexpr, PRECISION: tl.constexpr, BK: tl.constexpr, FOR_QUERIES: tl.constexpr):
    """A factored chunk's intra-chunk dq (FOR_QUERIES: x the keys, dA_tile = dA) or dk (x the
    queries, dA_tile = dA^T), K tile by K tile: dq = e^(G - G_first) * (dA @ (k e^(G_first - G))),
    dk = e^(G_first - G) * (dA^T @ (q e^(G - G_first)))."""
    for i_k in range(tl.cdiv(K, BK)):
        rk = i_k * BK + tl.arange(0, BK)
        kmask = rk < K
        tile = (rows[:, None] * H + i_h) * K + rk[None, :]
        tile_mask = row_mask[:, None] & kmask[None, :]
        up, down = _factors(G, t0, rows, row_mask, rk, kmask, i_h, H, K)
        if FOR_QUERIES:
            inner, outer = down, up
        else:
            inner, outer = up, down
        b_x = tl.load(x + qk_rows(rows, i_h, H, GROUP, K)[:, None] + rk[None, :], mask=tile_mask, other=0.0)
        part = tl.dot(dA_tile, (b_x * inner).to(b_x.dtype), input_precision=PRECISION) * outer
        tl.store(out + tile, part, mask=tile_mask)


@triton.jit
def _sub_chunk_gradients(q, k, G, dA, dq, dk, t0, eos, last, i_h, H: tl.constexpr, GROUP: tl.constexpr,
                         K: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                         BK: tl.constexpr):
    """intra_dqk_kernel's chunks of strong decay, by sub-chunks as in _sub_chunk_scores."""
    r = tl.arange(0, BC)
    for i_k in range(tl.cdiv(K, BK)):
        rk = i_k * BK + tl.arange(0, BK)
        kmask = rk < K
        for i_i in tl.static_range(BT // BC):
            rows = t0 + i_i * BC + r
            row_mask = rows < eos
            tile_mask = row_mask[:, None] & kmask[None, :]
            g_i = tl.load(G + (rows[:, None] * H + i_h) * K + rk[None, :], mask=tile_mask, other=0.0)
            acc_q = tl.zeros([BC, BK], tl.float32)
            acc_k = tl.zeros([BC, BK], tl.float32)
            for i_j in tl.static_range(BT // BC):
                cols = t0 + i_j * BC + r
                col_mask = cols < eos
                other_mask = col_mask[:, None] & kmask[None, :]
                if i_j < i_i:  # dq_i from keys of block j, factored around block i's first token
                    ref = tl.minimum(t0 + i_i * BC, last)
                    g_ref = tl.load(G + (ref * H + i_h) * K + rk, mask=kmask, other=0.0)
                    b_dA = tl.load(dA + (rows[:, None] * H + i_h) * BT + i_j * BC + r[None, :],
                                   mask=row_mask[:, None], other=0.0)
                    k_j = tl.load(k + qk_rows(cols, i_h, H, GROUP, K)[:, None] + rk[None, :], mask=other_mask,
                                  other=0.0)
                    g_j = tl.load(G + (cols[:, None] * H + i_h) * K + rk[None, :], mask=other_mask, other=0.0)
                    k_part = (k_j * exp(tl.minimum(g_ref[None, :] - g_j, 0.0))).to(k_j.dtype)
                    acc_q += (tl.dot(b_dA.to(k_j.dtype), k_part, input_precision=PRECISION)
                              * exp(tl.minimum(g_i - g_ref[None, :], 0.0)))
                elif i_j > i_i:  # dk_i from queries of block j, factored around block j's first token
                    ref = tl.minimum(t0 + i_j * BC, last)  # past the end: block j's queries are zeros
                    g_ref = tl.load(G + (ref * H + i_h) * K + rk, mask=kmask, other=0.0)
                    b_dA = tl.load(dA + (cols[:, None] * H + i_h) * BT + i_i * BC + r[None, :],
                                   mask=col_mask[:, None], other=0.0)
                    q_j = tl.load(q + qk_rows(cols, i_h, H, GROUP, K)[:, None] + rk[None, :], mask=other_mask,
                                  other=0.0)
                    g_j = tl.load(G + (cols[:, None] * H + i_h) * K + rk[None, :], mask=other_mask, other=0.0)
                    q_part = (q_j * exp(tl.minimum(g_j - g_ref[None, :], 0.0))).to(q_j.dtype)
                    acc_k += (tl.dot(tl.trans(b_dA).to(q_j.dtype), q_part, input_precision=PRECISION)
                              * exp(tl.minimum(g_ref[None, :] - g_i, 0.0)))
                else:  # the diagonal block, exactly, one partner token at a time
                    for c in range(BC):
                        in_range = (t0 + i_i * BC + c < eos).to(tl.float32)
                        col = tl.minimum(t0 + i_i * BC + c, last)
                        k_c = tl.load(k + qk_rows(col, i_h, H, GROUP, K) + rk, mask=kmask, other=0.0).to(tl.float32)
                        q_c = tl.load(q + qk_rows(col, i_h, H, GROUP, K) + rk, mask=kmask, other=0.0).to(tl.float32)
                        g_c = tl.load(G + (col * H + i_h) * K + rk, mask=kmask, other=0.0)
                        # dq rows i > c use dA[i, c]; dk rows i < c use dA[c, i] (zero past the end)
                        dA_col = tl.load(dA + (rows * H + i_h) * BT + i_i * BC + c, mask=row_mask, other=0.0)
                        dA_row = in_range * tl.load(dA + (col * H + i_h) * BT + i_i * BC + r, mask=row_mask,
                                                    other=0.0)
                        below = r[:, None] > c
                        acc_q += tl.where(below, dA_col[:, None] * k_c[None, :]  # (clamped: rows past the end)
                                          * exp(tl.where(below, tl.minimum(g_i - g_c[None, :], 0.0), 0.0)), 0.0)
                        above = r[:, None] < c
                        acc_k += tl.where(above, dA_row[:, None] * q_c[None, :]
                                          * exp(tl.where(above, g_c[None, :] - g_i, 0.0)), 0.0)
            offs = (rows[:, None] * H + i_h) * K + rk[None, :]
            tl.store(dq + offs, acc_q, mask=tile_mask)
            tl.store(dk + offs, acc_k, mask=tile_mask)


@triton.jit
def _dqk_v_tile(v, VS, rows, row_mask, rk, kmask, i_v, i_c, i_h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                HAS_VSCALE: tl.constexpr, BV: tl.constexpr):
    """V tile ``i_v`` of dqk_kernel's walks: (its columns, their mask on the chunk's rows, the
    offsets and mask of its (K tile x V tile) part of a chunk state, and the v tile as the
    recurrence uses it)."""
    rv = i_v * BV + tl.arange(0, BV)
    vmask = row_mask[:, None] & (rv[None, :] < V)
    state = (i_c * H + i_h) * K * V + rk[:, None] * V + rv[None, :]
    state_mask = kmask[:, None] & (rv[None, :] < V)
    b_v = tl.load(v + (rows[:, None] * H + i_h) * V + rv[None, :], mask=vmask, other=0.0)
    return rv, vmask, state, state_mask, _scaled_values(b_v, VS, rows, row_mask, i_h, H, HAS_VSCALE)


@triton.jit
def _state_gradient(b_v, b_S, dh, state, state_mask, dk_state, end_term, GATE: tl.constexpr,
                    PRECISION: tl.constexpr):
    """One V tile's part of dk's state term (v @ dS^T) and, gated, of the end term (rowsum(S * dS)):
    (dk_state, end_term) with it added."""
    b_dS = tl.load(dh + state, mask=state_mask, other=0.0)
    dk_state += tl.dot(b_v, tl.trans(b_dS).to(b_v.dtype), input_precision=PRECISION)
    if GATE != 0:
        end_term += tl.sum(b_S.to(tl.float32) * b_dS.to(tl.float32), axis=1)
    return dk_state, end_term


@triton.jit
def dqk_kernel(q, k, v, VS, G, h, dh, do, dq_intra, dk_intra, d_scores, dv2, dq, dk, dW, dG, chunk_indices, cu_seqlens,
               scale, total_rows, H: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
               GATE: tl.constexpr, HAS_VSCALE: tl.constexpr, DELTA: tl.constexpr, PRECISION: tl.constexpr,
               STEPS: tl.constexpr, HEADS: tl.constexpr, TWO_WALKS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr):
    """dq, dk for one chunk and K tile, and (gated) the reverse-cumulated dG of that K tile:
    dG_t = q_t dq_t - k_t dk_t (+ rowsum(S_out * dS_out) on the last token), summed over the
    tile's columns for scalar decay, into dG[K tile] of shape (K tiles, total_rows, H) (the caller
    adds the K tiles).

    DELTA (the delta rule, v its pseudo-values, dv2 their gradient): also dW = -dv2 @ S_in^T,
    and dk and dG are partial (the UT transform adds its terms), dG not yet reverse-cumulated.
    q, do and dq per token (token_rows: DeltaProduct's STEPS).

    HEADS > 1 (linear attention's grouped heads, HEADS a divisor of GROUP; not DELTA): a program
    walks HEADS consecutive value heads of one group and writes dq and dk summed over them, in
    fp32 until stored, into (total_rows, H / HEADS, K) (the caller sums the group's H / HEADS
    parts, if more than one): HEADS times less of the per-value-head gradients written and read
    again (Mamba-2's SSD: 80 value heads a q / k group), for H / HEADS programs a chunk and K tile.
    The group's q and k tiles are read once per head, from L2 after the first.

    TWO_WALKS (ungated: GATE 0, not DELTA): the V tiles are walked twice, do's products first (dq
    finished and stored before dk's state term is taken), then dS's, so two fp32 tiles are live
    at a time instead of three, for the v tiles read again (from L2): at the H200's 64 x 128 tiles
    and 8 warps, 132 -> 120 registers, one program an SM -> two (Triton 3.6, sm_90). The gated
    kernels gain no program an SM that way and the gated delta rule's spill more."""
    tl.static_assert(HEADS == 1 or (GROUP % HEADS == 0 and not DELTA))
    tl.static_assert(not TWO_WALKS or (GATE == 0 and not DELTA))
    tl.static_assert(STEPS == 1 or GATE != 2)
    i_k, i_c, i_heads = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    valid, t0, eos, last = chunk_rows(chunk_indices, cu_seqlens, i_c, BT)
    if valid:
        rows = t0 + tl.arange(0, BT)
        row_mask = rows < eos
        q_rows, q_mask = token_rows(rows, row_mask, STEPS)
        rk = i_k * BK + tl.arange(0, BK)
        kmask = rk < K
        tile_mask = row_mask[:, None] & kmask[None, :]
        q_tile_mask = q_mask[:, None] & kmask[None, :]
        if HEADS > 1:
            dq_sum = tl.zeros([BT, BK], tl.float32)
            dk_sum = tl.zeros([BT, BK], tl.float32)
        for j in range(HEADS):
            i_h = i_heads * HEADS + j
            tile = (rows[:, None] * H + i_h) * K + rk[None, :]
            dq_inter = tl.zeros([BT, BK], tl.float32)
            dk_state = tl.zeros([BT, BK], tl.float32)
            dA = tl.zeros([BT, BT], tl.float32)
            end_term = tl.zeros([BK], tl.float32)
            b_dW = tl.zeros([BT, BK], tl.float32)
            for i_v in range(tl.cdiv(V, BV)):
                rv, vmask, state, state_mask, b_v = _dqk_v_tile(v, VS, rows, row_mask, rk, kmask, i_v, i_c, i_h, H, K,
                                                                V, HAS_VSCALE, BV)
                b_do = tl.load(do + (q_rows[:, None] * H + i_h) * V + rv[None, :], mask=vmask, other=0.0)
                b_S = tl.load(h + state, mask=state_mask, other=0.0)
                dq_inter += tl.dot(b_do, tl.trans(b_S).to(b_do.dtype), input_precision=PRECISION)
                if not TWO_WALKS:
                    dk_state, end_term = _state_gradient(b_v, b_S, dh, state, state_mask, dk_state, end_term, GATE,
                                                         PRECISION)
                if GATE != 2:
                    dA += tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
                if DELTA:
                    b_dv2 = tl.load(dv2 + (rows[:, None] * H + i_h) * V + rv[None, :], mask=vmask, other=0.0)
                    b_dW -= tl.dot(b_dv2.to(b_do.dtype), tl.trans(b_S).to(b_do.dtype), input_precision=PRECISION)
            # DeltaProduct: dW stored once whole, for the registers TOKEN_PAIRS' dots take (gated, the
            # H200's tiles, Triton 3.6: 276 B spilled if stored last, 80 B so); the delta rule's last, below
            if DELTA and STEPS > 1:
                tl.store(dW + tile, b_dW.to(dW.dtype.element_ty), mask=tile_mask)
            q_tile = qk_rows(q_rows, i_h, H, GROUP, K)[:, None] + rk[None, :]
            b_q = tl.load(q + q_tile, mask=q_tile_mask, other=0.0)  # after the V loop: not live across it
            qk_tile = qk_rows(rows, i_h, H, GROUP, K)[:, None] + rk[None, :]
            b_k = tl.load(k + qk_tile, mask=tile_mask, other=0.0)
            if GATE == 2:  # dA's diagonal (scaled), from d_scores_kernel
                diagonal = tl.load(d_scores + (rows * H + i_h) * BT + tl.arange(0, BT), mask=row_mask, other=0.0)
                b_g = _load_decay(G, rows, row_mask, rk, i_h, H, K, GATE)
                g_last = _load_last_decay(G, last, rk, i_h, H, K, GATE)
                end_term *= exp(g_last)
                dq_inter *= exp(b_g)
                dk_state *= exp(g_last[None, :] - b_g)
            elif GATE == 1:  # a decay per token: row factors, one exponential a row
                g_rows = tl.load(G + rows * H + i_h, mask=row_mask, other=0.0)
                g_end = tl.load(G + last * H + i_h)
                end_term *= exp(g_end)
                dq_inter *= exp(g_rows)[:, None]
                dk_state *= exp(g_end - g_rows)[:, None]
            if GATE != 2:
                if GATE == 1:  # the diagonal apart, as the per-key decay's (DIAGONAL below)
                    diagonal = scale * tl.sum(tl.where(tl.arange(0, BT)[:, None] == tl.arange(0, BT)[None, :], dA, 0.0),
                                              axis=1)
                    below = tl.arange(0, BT)[:, None] > tl.arange(0, BT)[None, :]
                    dA = dA * exp(tl.where(below, tl.minimum(g_rows[:, None] - g_rows[None, :], 0.0), float("-inf")))
                else:
                    dA = tl.where(tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :], dA, 0.0)
                dA = (dA * scale).to(b_q.dtype)
            # dq finished (stored or summed, its gate term taken) before dk's product: the two fp32 tiles are
            # never live together
            if GATE == 2:
                b_dq = scale * dq_inter + tl.load(dq_intra + tile, mask=tile_mask, other=0.0)
            elif GATE == 1 and STEPS > 1:  # TOKEN_PAIRS: a token's own pairs once dG's products are taken
                b_dq = scale * dq_inter + tl.dot(token_pairs(dA, rows, STEPS, False), b_k, input_precision=PRECISION)
            else:
                b_dq = scale * dq_inter + tl.dot(dA, b_k, input_precision=PRECISION)
            # DIAGONAL (gated): the pairs i = j enter dq and dk apart, after dG's terms q dq - k dk are
            # taken: they are the same there (q_i dA_ii k_i, decay 1) and cancel, but only to float32's
            # rounding of sums they dominate where the decay is strong, which had left dG noise of their
            # size (T = 1: dg ~1e-7 where it is 0; GLA and the gated delta rule at g ~ -20)
            if GATE == 2:
                d_gate = b_q.to(tl.float32) * b_dq
            elif GATE == 1:  # summed over the tile's K first: the reverse cumulative sum runs over a row vector
                d_row = tl.sum(b_q.to(tl.float32) * b_dq, axis=1)
            if GATE == 1 and STEPS > 1:
                b_dq += tl.dot(token_pairs(dA, rows, STEPS, True), b_k, input_precision=PRECISION)
            if GATE != 0:
                b_dq += diagonal[:, None] * b_k.to(tl.float32)
            if HEADS == 1:
                dq_tile = (q_rows[:, None] * H + i_h) * K + rk[None, :]
                tl.store(dq + dq_tile, b_dq.to(dq.dtype.element_ty), mask=q_tile_mask)
            else:
                dq_sum += b_dq
            if TWO_WALKS:  # dS's products, with dq out (ungated: no end term, no decay)
                for i_v in range(tl.cdiv(V, BV)):
                    _, _, state, state_mask, b_v = _dqk_v_tile(v, VS, rows, row_mask, rk, kmask, i_v, i_c, i_h, H, K, V,
                                                               HAS_VSCALE, BV)
                    dk_state, end_term = _state_gradient(b_v, None, dh, state, state_mask, dk_state, end_term, GATE,
                                                         PRECISION)
            # LAST: likewise the last token's own part of S_out, k_last^T v_last (decay 1), its row of
            # the state term, enters neither the end term nor dG's last row: the last row's k dk is that
            # term alone (no later query sees the last key; its own pair is DIAGONAL's, so its column of
            # dA, and of the intra dk, is 0), so dG's last row takes the end term without it. Neither
            # tile is rebuilt (moving the state term out of dk and back took the gated delta rule's
            # spills from 4 to 128 B; Triton 3.6, the H200's tiles). Six tokens at g ~ -20 had every dg
            # of the delta rule off by ~4e-7, 3e-4 relative (its dG is small there)
            # (DeltaProduct: the last token's steps, TOKEN_PAIRS; STEPS 1: the last row)
            in_last_token = rows // STEPS == last // STEPS
            if GATE != 0:
                end_term += tl.sum(tl.where(in_last_token[:, None], 0.0, b_k.to(tl.float32) * dk_state), axis=0)
            if GATE == 2:
                b_dk = dk_state + tl.load(dk_intra + tile, mask=tile_mask, other=0.0)
                d_gate += tl.where(in_last_token[:, None], end_term[None, :], -b_k.to(tl.float32) * b_dk)
            elif GATE == 1 and STEPS > 1:
                b_dk = dk_state + tl.dot(tl.trans(token_pairs(dA, rows, STEPS, False)), b_q, input_precision=PRECISION)
            else:
                b_dk = dk_state + tl.dot(tl.trans(dA), b_q, input_precision=PRECISION)
            if GATE == 1:
                d_row += tl.where(rows == last, tl.sum(end_term, axis=0),
                                  tl.where(in_last_token, 0.0, -tl.sum(b_k.to(tl.float32) * b_dk, axis=1)))
            if GATE == 1 and STEPS > 1:
                b_dk += tl.dot(tl.trans(token_pairs(dA, rows, STEPS, True)), b_q, input_precision=PRECISION)
            if GATE != 0:
                b_dk += diagonal[:, None] * b_q.to(tl.float32)
            if HEADS == 1:
                tl.store(dk + tile, b_dk.to(dk.dtype.element_ty), mask=tile_mask)
            else:
                dk_sum += b_dk
            if DELTA and STEPS == 1:  # (stored once whole, the gated delta rule's spilled 68 B instead of 20)
                tl.store(dW + tile, b_dW.to(dW.dtype.element_ty), mask=tile_mask)
            if GATE == 2:
                if not DELTA:
                    d_gate = tl.cumsum(d_gate, axis=0, reverse=True)
                tl.store(dG + tile, d_gate.to(dG.dtype.element_ty), mask=tile_mask)
            elif GATE == 1:
                if not DELTA:
                    d_row = tl.cumsum(d_row, axis=0, reverse=True)
                tl.store(dG + (i_k * total_rows + rows) * H + i_h, d_row, mask=row_mask)
        if HEADS > 1:
            summed = (rows[:, None] * (H // HEADS) + i_heads) * K + rk[None, :]
            tl.store(dq + summed, dq_sum.to(dq.dtype.element_ty), mask=tile_mask)
            tl.store(dk + summed, dk_sum.to(dk.dtype.element_ty), mask=tile_mask)


@triton.jit
def dv_kernel(q, k, v, VS, SKIP, G, A, dh, do, dv, d_scale, d_skip, chunk_indices, cu_seqlens, scale, total_rows,
              H: tl.constexpr, GROUP: tl.constexpr, HAS_VSCALE: tl.constexpr, HAS_SKIP: tl.constexpr, K: tl.constexpr,
              V: tl.constexpr, GATE: tl.constexpr, HAS_DH: tl.constexpr, PRECISION: tl.constexpr,
              STEPS: tl.constexpr, K_STAGES: tl.constexpr, BT: tl.constexpr, QT: tl.constexpr, BK: tl.constexpr,
              BV: tl.constexpr):
    """dv = scale * scores^T @ do + (k * e^(G_last - G)) @ dS_out for one chunk and V tile; without
    dh (HAS_DH false) only the intra-chunk term (the delta rule's states_bwd adds the state term).
    q and do per token, the chunk's QT queries (query_rows: DeltaProduct's STEPS). K_STAGES: the K
    loop's pipeline stages, as output_kernel's."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    valid, t0, eos, last = chunk_rows(chunk_indices, cu_seqlens, i_c, BT)
    if valid:
        rows = t0 + tl.arange(0, BT)
        row_mask = rows < eos
        rq, q_rows, q_mask = query_rows(rows, row_mask, t0, last + 1, STEPS, QT)
        rv = i_v * BV + tl.arange(0, BV)
        vmask = row_mask[:, None] & (rv[None, :] < V)
        acc = tl.zeros([BT, BV], tl.float32)
        qk = tl.zeros([QT, BT], tl.float32)
        for i_k in tl.range(tl.cdiv(K, BK), num_stages=K_STAGES):
            rk = i_k * BK + tl.arange(0, BK)
            qk_tile = qk_rows(rows, i_h, H, GROUP, K)[:, None] + rk[None, :]
            b_k = tl.load(k + qk_tile, mask=row_mask[:, None] & (rk[None, :] < K), other=0.0)
            if GATE != 2:
                q_tile = qk_rows(q_rows, i_h, H, GROUP, K)[:, None] + rk[None, :]
                b_q = tl.load(q + q_tile, mask=q_mask[:, None] & (rk[None, :] < K), other=0.0)
                qk += tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
            if HAS_DH:
                b_dS = tl.load(dh + (i_c * H + i_h) * K * V + rk[:, None] * V + rv[None, :],
                               mask=(rk[:, None] < K) & (rv[None, :] < V), other=0.0)
                if GATE == 2:
                    g_last = _load_last_decay(G, last, rk, i_h, H, K, GATE)
                    b_g = _load_decay(G, rows, row_mask, rk, i_h, H, K, GATE)
                    b_k = (b_k * exp(g_last[None, :] - b_g)).to(do.dtype.element_ty)
                acc += tl.dot(b_k, b_dS.to(do.dtype.element_ty), input_precision=PRECISION)
        if HAS_DH and GATE == 1:  # a decay per token: a row factor of (k dS), not of every k tile
            g_rows = tl.load(G + rows * H + i_h, mask=row_mask, other=0.0)
            acc *= exp(tl.load(G + last * H + i_h) - g_rows)[:, None]
        scores = _masked_scores(qk, G, A, rq, q_mask, rows, row_mask, i_h, H, GATE, STEPS, BT)
        b_do = tl.load(do + (q_rows[:, None] * H + i_h) * V + rv[None, :], mask=q_mask[:, None] & (rv[None, :] < V),
                       other=0.0)
        # (scale on the scores, not the product: accumulated in place; ungated 171 -> 164 registers
        # at the H100's tiles, 2 -> 3 programs an SM)
        acc = tl.dot(tl.trans(scores * scale).to(b_do.dtype), b_do, acc, input_precision=PRECISION)
        if HAS_VSCALE or HAS_SKIP:
            b_v = tl.load(v + (rows[:, None] * H + i_h) * V + rv[None, :], mask=vmask, other=0.0).to(tl.float32)
        if HAS_VSCALE:  # acc is the gradient of s v: dv = s acc, and this V tile's part of ds = rowsum(acc v)
            tl.store(d_scale + (i_v * total_rows + rows) * H + i_h, tl.sum(acc * b_v, axis=1), mask=row_mask)
            acc *= _value_scale(VS, rows, row_mask, i_h, H)[:, None]
        if HAS_SKIP:  # o += skip v: dv += skip do, and this chunk's part of d skip = colsum(do v)
            tl.static_assert(STEPS == 1, "a skip term takes one row a token (do's rows are the chunk's)")
            acc += tl.load(SKIP + i_h * V + rv, mask=rv < V, other=0.0)[None, :] * b_do.to(tl.float32)
            tl.store(d_skip + (i_c * H + i_h) * V + rv, tl.sum(b_do.to(tl.float32) * b_v, axis=0), mask=rv < V)
        tl.store(dv + (rows[:, None] * H + i_h) * V + rv[None, :], acc.to(dv.dtype.element_ty), mask=vmask)
