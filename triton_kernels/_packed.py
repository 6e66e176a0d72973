"""Where a program works in the packed-sequence layout (rnnops.triton_backend._common.ChunkLayout):
every batch is handled as packed sequences, ``cu_seqlens`` their row offsets, ``chunk_offsets``
each sequence's first global chunk, ``chunk_indices`` each chunk program's (sequence, chunk);
and the per-sequence states (sequences, H, K, V) a walk over a sequence's chunks starts from;
and the rows of grouped q / k heads."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_rows(chunk_indices, cu_seqlens, i_c, BT: tl.constexpr):
    """For chunk program ``i_c``: (valid, first row, exclusive end row of the sequence, last valid
    row of the chunk)."""
    seq = tl.load(chunk_indices + 2 * i_c).to(tl.int64)
    n = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64)
    valid = seq >= 0
    seq = tl.maximum(seq, 0)
    bos = tl.load(cu_seqlens + seq).to(tl.int64)
    eos = tl.load(cu_seqlens + seq + 1).to(tl.int64)
    t0 = bos + n * BT
    last = tl.minimum(t0 + BT, eos) - 1
    return valid, t0, eos, last


@triton.jit
def sequence_span(chunk_offsets, cu_seqlens, seq):
    """For a program that walks sequence ``seq``: (first row, exclusive end row, first global
    chunk, number of chunks)."""
    bos = tl.load(cu_seqlens + seq).to(tl.int64)
    eos = tl.load(cu_seqlens + seq + 1).to(tl.int64)
    first = tl.load(chunk_offsets + seq).to(tl.int64)
    chunks = tl.load(chunk_offsets + seq + 1).to(tl.int64) - first
    return bos, eos, first, chunks


@triton.jit
def sequence_state(state, seq, i_h, rk, rv, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   HAS_STATE: tl.constexpr):
    """The (rk, rv) tile of a (K, V) state for a walk over sequence ``seq`` and head ``i_h``: (its
    offsets and mask in a (K, V) state, and, fp32, the tile of ``state`` (sequences, H, K, V) where
    HAS_STATE, else zeros: the initial state forward, the final state's gradient backward)."""
    offs = rk[:, None] * V + rv[None, :]
    mask = (rk[:, None] < K) & (rv[None, :] < V)
    tile = tl.zeros([rk.shape[0], rv.shape[0]], tl.float32)
    if HAS_STATE:
        tile += tl.load(state + (seq * H + i_h) * K * V + offs, mask=mask, other=0.0)
    return offs, mask, tile


@triton.jit
def qk_rows(rows, i_h, H: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr):
    """Offsets of the q and k rows value head i_h reads in a contiguous (rows, H // GROUP, K)
    tensor: GROUP consecutive value heads share one q / k head (grouped heads: GVA, Mamba-2's B
    and C groups; GROUP 1: one each)."""
    return (rows * (H // GROUP) + i_h // GROUP) * K


@triton.jit
def query_rows(rows, row_mask, t0, end, STEPS: tl.constexpr, QT: tl.constexpr):
    """The queries of a chunk (its ``rows`` from t0, ``row_mask``, the chunk's exclusive end row
    ``end``) as a tile of QT: (their rows among the kernels' rows, their rows of the per-token
    tensors, their mask). STEPS 1: the chunk's rows and mask (QT its length). DeltaProduct's
    queries sit on every STEPS-th row, a token's last step (token_rows), so its kernels multiply a
    tile of ceil(chunk / STEPS) queries (QT: that, rounded up to a power of two, at least 16) where
    a chunk-tall one wasted the other steps' rows as zeros."""
    if STEPS == 1:
        return rows, rows, row_mask
    else:
        rq = t0 + (STEPS - 1 - t0 % STEPS) % STEPS + tl.arange(0, QT) * STEPS
        return rq, rq // STEPS, rq < end


@triton.jit
def query_decay(G, g_rows, rq, q_mask, i_h, H: tl.constexpr, STEPS: tl.constexpr):
    """The cumulative log-decay G (rows, H) at a chunk's queries (query_rows' ``rq``): ``g_rows``,
    the chunk's rows' as loaded, where STEPS is 1 (its queries are its rows), else loaded at rq."""
    if STEPS == 1:
        return g_rows
    else:
        return tl.load(G + rq * H + i_h, mask=q_mask, other=0.0)


@triton.jit
def token_rows(rows, row_mask, STEPS: tl.constexpr):
    """The rows of the per-token tensors (q, do, o, dq) behind a tile of the kernels' rows, and
    their mask. DeltaProduct walks STEPS rows a token (its Householder steps, interleaved: a
    sequence's rows start at a multiple of STEPS) but reads q and do, and writes o and dq, once a
    token, on its last step (row // STEPS of the (tokens, ...) tensors); the other steps' rows are
    masked off, as zeros. Only q needs the mask: every product that takes do pairs its rows with
    q's (q^T do) or with scores built from q (scores^T do), or makes rows only the masked dq
    keeps (do S^T, do v^T), so do is read at row // STEPS on every step under the v tile's mask
    (a mask of its own took registers: the DeltaProduct's dv kernel 114 -> 144, bf16, sm_90).
    STEPS 1: the rows themselves."""
    if STEPS == 1:
        return rows, row_mask
    else:
        return rows // STEPS, row_mask & (rows % STEPS == STEPS - 1)


@triton.jit
def token_pairs(pairs, rows, STEPS: tl.constexpr, SAME: tl.constexpr):
    """A chunk's BT x BT matrix of row pairs (i, j) over ``rows``, kept where both rows are steps
    of one token (SAME) or of different tokens (not SAME), zero elsewhere.

    TOKEN_PAIRS (gated DeltaProduct): G is the same on every step of a token (g sits on its
    first), so the gate terms of a pair within one token (what it adds to dG_i and takes from
    dG_j, decay e^(G_i - G_j) = 1) have both rows at or past a token's first row or both before
    it, and cancel in the reverse cumulative sum that makes dg at that row, the only row of a
    token whose dg is read. dG leaves them out (they still enter dq, dk and the UT's dk, after
    dG's products are taken), which is exact, where summing them left float32 noise of their
    size against a dg that strong decay makes small (packed sequences of one or two tokens at
    g ~ -20, 3 steps a token: every dg off by ~5e-8, 3e-4 relative; now 2e-7)."""
    same = rows[:, None] // STEPS == rows[None, :] // STEPS
    if SAME:
        return tl.where(same, pairs, 0.0)
    else:
        return tl.where(same, 0.0, pairs)
