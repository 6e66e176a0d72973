"""Triton kernels for the fused recurrent cells (LSTM, GRU, sLSTM, Elman) with heads.

One launch runs the whole sequence. A program owns one head and a tile of BB batch rows and
walks the time steps; each step computes the head's recurrent pre-activations
r_g = h_{t-1} R_g^T (+ b_g) for every gate with tl.dot, tiled BD output units by BKD
reduction units, then the cell's pointwise update on the same tile (equations in
rnnops.reference.rnn). Where one tile spans the head (BD = BKD >= D, and the G D x D weights
fit in shared memory: rnnops.triton_backend.rnn.resident_shared_bytes), both kernels are
RESIDENT: R is loaded once and the states (forward) or their gradients (backward) are carried in
registers, so a step's critical path is G tensor-core products and the pointwise update, its
memory traffic only the step's inputs read and its saved values written. Otherwise the step's
new states go to global memory (L1/L2-resident at these sizes) and a block barrier orders them
before the next step reads them; R is re-read from L2 each step, so any head size up to 256
runs (larger heads need the CUDA backend's multi-block grid barrier).

Layout conversions: tl.dot's results and Triton's coalesced loads and stores have different
register layouts, so each tile between them crosses shared memory with two block barriers
(sm_90 SASS, LSTM at D = 64: 22 barriers a forward step with a load per gate and a store per
saved slot). The forward therefore loads a step's G gate inputs as one (BB, BD, 2, 2) tile and
stores its four pre-activation slots as one (_load_four, _store_four): 14 barriers (H100: forward
1.32x). The backward stores its G gate gradients as one and (RESIDENT) multiplies them with R in
one product, the gradients interleaved into a (BB, 4 BD) operand against R's rows stacked the same
way (_stacked_weights): one conversion to the operand layout where a product per gate took one
(LSTM 40 -> 30 barriers a step, GRU 28 -> 24, sLSTM 48 -> 38). It loads the saved slots one by
one: loaded as one, the split tiles took more conversions where they meet the products' layout.
(Loading the next step's inputs a step ahead by hand does not hide their latency: Triton converts
the prefetched tile right after its load, which then waits. Its pipeliner does, where the time loop
names a stage count: STAGES, below.)

RECOMPUTE (RNNConfig.recompute, resident kernels only; off by default until measured): the
forward saves no pre-activations and the backward computes them again from x, b and h_{t-1}
(_saved_pre): sm_90 SASS at D = 64 bf16, forward barriers a step LSTM 14 -> 10, GRU 12 -> 8,
sLSTM 18 -> 14, the backward loop 732 -> 851 instructions (LSTM, barriers 30 -> 28; sLSTM
38 -> 48), and Triton stages the transposed stacked weights as a second copy (40 -> 72 KB: only
heads up to 64 in half precision fit an H100 that way, rnnops.triton_backend.rnn.
recompute_shared_bytes); the pre-activations' fp32 memory (16 bytes a unit and step) is saved.

Saved for the backward, written once: every state per step (fp32, S per unit: lstm h c,
gru h, slstm h c n m, elman h; the resident LSTM and sLSTM write h at the last step only) and
the gates' pre-activations (fp32, G per unit, plus GRU's R_n h + b_n). Where no backward will
run (SAVE False: no_grad, or no input requiring grad) the forward saves no pre-activations and a
resident one writes the last step's states only: sm_90 SASS at D = 64 bf16 (Triton 3.6), forward
barriers a step LSTM 14 -> 8, GRU 12 -> 8, sLSTM 18 -> 8, and no (B, T, P, H, D) fp32 buffer.
The backward walks time in reverse with the same tiling: the pointwise gradients of each tile, then (after a barrier)
dh_{t-1} += sum_g dr_g R_g for every tile; carried gradients live in a (S, B, H, D) fp32 buffer
(RESIDENT: read on entry, written on exit) that ends as the initial states' gradient.
dR = sum_{b,t} dr^T h_{t-1} and db = sum dr are left to the host (rnnops._fused_rnn: batched
matmuls on tensor cores, instead of per-program fp32 accumulators).

CELL ids (rnnops._fused_rnn.CELL_IDS): 0 lstm, 1 gru, 2 slstm, 3 elman.
Layouts (contiguous): x_gates (B, T, G, H, D); R (G, H, D, D); b (G, H, D); states
(B, T, S, H, D); pre (B, T, P, H, D); h_seq (B, T, H, D); initial/carry (S, B, H, D).
Work per step, batch row and head: 2 G D^2 flops (the recurrent matmul) plus about 10 G D
pointwise; reads G D inputs and the G D^2 weights (from L2), writes (S + P + 1) D values. (The
resident backward's product spans four gates: a GRU's zero fourth adds a third to its flops.)
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _prev(states, initial, s, t, rb, ru, mask, T, B, S: tl.constexpr, H: tl.constexpr, D: tl.constexpr, i_h,
          HAS_INITIAL: tl.constexpr):
    """State s at step t - 1 on the (BB, BD) tile: the initial state (or zeros) at t = 0."""
    if t > 0:
        value = tl.load(states + (((rb[:, None] * T + t - 1) * S + s) * H + i_h) * D + ru[None, :], mask=mask,
                        other=0.0)
    else:
        if HAS_INITIAL:
            value = tl.load(initial + ((s * B + rb[:, None]) * H + i_h) * D + ru[None, :], mask=mask, other=0.0)
        else:
            value = tl.zeros(mask.shape, tl.float32)
    return value


@triton.jit
def _weight(R, g, i_h, ri, rj, imask, jmask, H: tl.constexpr, D: tl.constexpr, DTYPE: tl.constexpr):
    """R_g's tile, rows ``ri`` (the units a gate's pre-activation belongs to) by columns ``rj``
    (the units of h_{t-1} it reads), in the input dtype."""
    w = tl.load(R + ((g * H + i_h) * D + ri[:, None]) * D + rj[None, :], mask=imask[:, None] & jmask[None, :],
                other=0.0)
    return w.to(DTYPE)


@triton.jit
def _recurrent(R, states, initial, g, t, rb, bmask, ru, umask, T, B, S: tl.constexpr, H: tl.constexpr,
               D: tl.constexpr, i_h, HAS_INITIAL: tl.constexpr, DTYPE: tl.constexpr, PRECISION: tl.constexpr,
               BB: tl.constexpr, BD: tl.constexpr, BKD: tl.constexpr, RESIDENT: tl.constexpr, w_res, h_res):
    """h_{t-1} R_g^T on the (BB, BD) tile of output units ``ru``: RESIDENT, from the carried
    h_{t-1} and R_g^T held across the steps (``h_res``, ``w_res``); else tile by tile from the
    states in global memory and R in L2."""
    if RESIDENT:
        acc = tl.dot(h_res.to(DTYPE), w_res, input_precision=PRECISION)
    else:
        acc = tl.zeros([BB, BD], tl.float32)
        for i_k in range(tl.cdiv(D, BKD)):
            rk = i_k * BKD + tl.arange(0, BKD)
            kmask = rk < D
            h_prev = _prev(states, initial, 0, t, rb, rk, bmask[:, None] & kmask[None, :], T, B, S, H, D, i_h,
                           HAS_INITIAL)
            acc += tl.dot(h_prev.to(DTYPE), tl.trans(_weight(R, g, i_h, ru, rk, umask, kmask, H, D, DTYPE)),
                          input_precision=PRECISION)
    return acc


@triton.jit
def _state_in(states, initial, s, t, rb, ru, mask, T, B, S: tl.constexpr, H: tl.constexpr, D: tl.constexpr, i_h,
              HAS_INITIAL: tl.constexpr, RESIDENT: tl.constexpr, carried):
    """State s entering step t on the tile: the carried value (RESIDENT), else _prev."""
    if RESIDENT:
        value = carried
    else:
        value = _prev(states, initial, s, t, rb, ru, mask, T, B, S, H, D, i_h, HAS_INITIAL)
    return value


@triton.jit
def _x_steps(x, t, rb, ru, mask, T, G: tl.constexpr, H: tl.constexpr, D: tl.constexpr, i_h):
    """(x_0, .., x_3) at step t on the tile in x's dtype, in one load (one layout conversion;
    gates past G read as zeros)."""
    if G == 1:
        x0 = _load_step(x, 0, G, t, rb, ru, mask, T, H, D, i_h)
        x1, x2, x3 = x0, x0, x0
    else:
        x0, x1, x2, x3 = _load_four(x, G, t, rb, ru, mask, T, H, D, i_h)
    return x0, x1, x2, x3


@triton.jit
def _bias(bias, g, ru, H: tl.constexpr, D: tl.constexpr, i_h):
    """b_g as a (1, BD) row, fp32."""
    return tl.load(bias + (g * H + i_h) * D + ru, mask=ru < D, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _gate_input(x_g, bias, g, ru, H: tl.constexpr, D: tl.constexpr, i_h, HAS_BIAS: tl.constexpr):
    """x_g (the tile loaded by _x_steps) + b_g, fp32."""
    value = x_g.to(tl.float32)
    if HAS_BIAS:
        value += _bias(bias, g, ru, H, D, i_h)
    return value


@triton.jit
def _gru_n_pre(x_n, rec_n, p_r, bias, ru, H: tl.constexpr, D: tl.constexpr, i_h, HAS_BIAS: tl.constexpr):
    """GRU's new-gate pre-activation x_n + r (R_n h + b_n), and R_n h + b_n, from rec_n = R_n h."""
    if HAS_BIAS:
        rec_n += _bias(bias, 2, ru, H, D, i_h)
    return x_n.to(tl.float32) + tl.sigmoid(p_r) * rec_n, rec_n


@triton.jit
def _gate_pre(x_g, bias, R, states, initial, g, t, rb, bmask, ru, umask, mask, T, B, G: tl.constexpr, S: tl.constexpr,
              H: tl.constexpr, D: tl.constexpr, i_h, HAS_BIAS: tl.constexpr, HAS_INITIAL: tl.constexpr,
              DTYPE: tl.constexpr, PRECISION: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, BKD: tl.constexpr,
              RESIDENT: tl.constexpr, w_res, h_res):
    """x_g + h_{t-1} R_g^T + b_g on the tile."""
    return _gate_input(x_g, bias, g, ru, H, D, i_h, HAS_BIAS) + _recurrent(
        R, states, initial, g, t, rb, bmask, ru, umask, T, B, S, H, D, i_h, HAS_INITIAL, DTYPE, PRECISION, BB, BD, BKD,
        RESIDENT, w_res, h_res)


@triton.jit
def _store_step(buffer, value, slot, slots: tl.constexpr, t, rb, ru, mask, T, H: tl.constexpr, D: tl.constexpr, i_h):
    tl.store(buffer + (((rb[:, None] * T + t) * slots + slot) * H + i_h) * D + ru[None, :], value, mask=mask)


@triton.jit
def _four_slots():
    """Slot numbers 0-3 as a (1, 1, 2, 2) tile: slot 2 i + j at [..., i, j], the order of
    tl.join(tl.join(v0, v2), tl.join(v1, v3)) (a join's new axis is last: [..., i, j] holds the
    j-th join's i-th value)."""
    pair = tl.arange(0, 2)
    return 2 * pair[None, None, :, None] + pair[None, None, None, :]


@triton.jit
def _four_offsets(slots: tl.constexpr, t, rb, ru, T, H: tl.constexpr, D: tl.constexpr, i_h):
    """Offsets of slots 0-3 of step t on the tile in a (B, T, slots, H, D) buffer, (BB, BD, 2, 2)."""
    return (((rb[:, None, None, None] * T + t) * slots + _four_slots()) * H + i_h) * D + ru[None, :, None, None]


@triton.jit
def _store_four(buffer, v0, v1, v2, v3, slots: tl.constexpr, t, rb, ru, mask, T, H: tl.constexpr, D: tl.constexpr,
                i_h):
    """Slots 0-3 (those below ``slots``) of step t on the tile in one store: one layout conversion
    on the way (through shared memory, two barriers), where a store per slot took one each."""
    tl.store(buffer + _four_offsets(slots, t, rb, ru, T, H, D, i_h), tl.join(tl.join(v0, v2), tl.join(v1, v3)),
             mask=mask[:, :, None, None] & (_four_slots() < slots))


@triton.jit
def _load_four(buffer, slots: tl.constexpr, t, rb, ru, mask, T, H: tl.constexpr, D: tl.constexpr, i_h):
    """Slots 0-3 of step t on the tile in one load, as _store_four (slots past ``slots``: zeros)."""
    four = tl.load(buffer + _four_offsets(slots, t, rb, ru, T, H, D, i_h),
                   mask=mask[:, :, None, None] & (_four_slots() < slots), other=0.0)
    even, odd = tl.split(four)  # slots (0, 2) and (1, 3)
    v0, v2 = tl.split(even)
    v1, v3 = tl.split(odd)
    return v0, v1, v2, v3


@triton.jit
def _load_step(buffer, slot, slots: tl.constexpr, t, rb, ru, mask, T, H: tl.constexpr, D: tl.constexpr, i_h):
    return tl.load(buffer + (((rb[:, None] * T + t) * slots + slot) * H + i_h) * D + ru[None, :], mask=mask,
                   other=0.0)


@triton.jit
def rnn_fwd_kernel(x, R, bias, initial, states, pre, h_seq, T, B, H: tl.constexpr, D: tl.constexpr,
                   CELL: tl.constexpr, G: tl.constexpr, S: tl.constexpr, P: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_INITIAL: tl.constexpr, PRECISION: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr,
                   BKD: tl.constexpr, RESIDENT: tl.constexpr, RECOMPUTE: tl.constexpr, SAVE: tl.constexpr,
                   STAGES: tl.constexpr):
    """RESIDENT (one tile spans the head: BD = BKD >= D): R_g^T is loaded once and h, c, n, m are
    carried in registers from step to step, so a step reads only its inputs from memory and
    needs no barrier; else the tiles exchange the states through global memory. RECOMPUTE
    (resident only): the pre-activations are not saved (``pre`` unused). SAVE False (no backward
    will run: inference): no pre-activations either, and a resident kernel writes the states of
    the last step only (the final states), sparing a store and its layout conversion a state.
    STAGES (RNNConfig.num_stages) > 1: Triton's pipeliner copies the steps' inputs (x_t; tiled, the
    states read back too) into shared memory STAGES - 1 steps ahead (cp.async), so a step no longer
    waits a memory latency for them; only an explicit tl.range stage count does that (the launch's
    num_stages left this loop alone: no cp.async in its SASS)."""
    i_h, i_b = tl.program_id(0), tl.program_id(1)
    rb = i_b * BB + tl.arange(0, BB)
    bmask = rb < B
    DTYPE: tl.constexpr = x.dtype.element_ty
    if RESIDENT:
        ru = tl.arange(0, BD)
        umask = ru < D
        mask = bmask[:, None] & umask[None, :]
        w0 = tl.trans(_weight(R, 0, i_h, ru, ru, umask, umask, H, D, DTYPE))
        w1 = tl.trans(_weight(R, 1 % G, i_h, ru, ru, umask, umask, H, D, DTYPE))  # 1 % G: a cell's unused gates repeat 0
        w2 = tl.trans(_weight(R, 2 % G, i_h, ru, ru, umask, umask, H, D, DTYPE))
        w3 = tl.trans(_weight(R, 3 % G, i_h, ru, ru, umask, umask, H, D, DTYPE))
        h_r = _prev(states, initial, 0, 0, rb, ru, mask, T, B, S, H, D, i_h, HAS_INITIAL).to(tl.float32)
        c_r = _prev(states, initial, 1 % S, 0, rb, ru, mask, T, B, S, H, D, i_h, HAS_INITIAL).to(tl.float32)
        n_r = _prev(states, initial, 2 % S, 0, rb, ru, mask, T, B, S, H, D, i_h, HAS_INITIAL).to(tl.float32)
        m_r = _prev(states, initial, 3 % S, 0, rb, ru, mask, T, B, S, H, D, i_h, HAS_INITIAL).to(tl.float32)
    else:
        w0, w1, w2, w3, h_r, c_r, n_r, m_r = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0  # unused
    for t in tl.range(0, T, num_stages=STAGES):
        for i_u in range(tl.cdiv(D, BD)):
            ru = i_u * BD + tl.arange(0, BD)
            umask = ru < D
            mask = bmask[:, None] & umask[None, :]
            x0, x1, x2, x3 = _x_steps(x, t, rb, ru, mask, T, G, H, D, i_h)
            if CELL == 1:  # GRU: r, z from x + R h + b; n = tanh(x_n + r (R_n h + b_n))
                p_r = _gate_pre(x0, bias, R, states, initial, 0, t, rb, bmask, ru, umask, mask, T, B, G, S, H, D, i_h,
                                HAS_BIAS, HAS_INITIAL, DTYPE, PRECISION, BB, BD, BKD, RESIDENT, w0, h_r)
                p_z = _gate_pre(x1, bias, R, states, initial, 1, t, rb, bmask, ru, umask, mask, T, B, G, S, H, D, i_h,
                                HAS_BIAS, HAS_INITIAL, DTYPE, PRECISION, BB, BD, BKD, RESIDENT, w1, h_r)
                rec_n = _recurrent(R, states, initial, 2, t, rb, bmask, ru, umask, T, B, S, H, D, i_h, HAS_INITIAL,
                                   DTYPE, PRECISION, BB, BD, BKD, RESIDENT, w2, h_r)
                p_n, rec_n = _gru_n_pre(x2, rec_n, p_r, bias, ru, H, D, i_h, HAS_BIAS)
                update = tl.sigmoid(p_z)
                h_prev = _state_in(states, initial, 0, t, rb, ru, mask, T, B, S, H, D, i_h, HAS_INITIAL, RESIDENT, h_r)
                candidate = 2.0 * tl.sigmoid(2.0 * p_n) - 1.0
                h = (1.0 - update) * candidate + update * h_prev
                if SAVE and not RECOMPUTE:  # (else the backward recomputes them, or none runs)
                    _store_four(pre, p_r, p_z, p_n, rec_n, P, t, rb, ru, mask, T, H, D, i_h)
            elif CELL == 3:  # Elman
                p = _gate_pre(x0, bias, R, states, initial, 0, t, rb, bmask, ru, umask, mask, T, B, G, S, H, D, i_h,
                              HAS_BIAS, HAS_INITIAL, DTYPE, PRECISION, BB, BD, BKD, RESIDENT, w0, h_r)
                h = 2.0 * tl.sigmoid(2.0 * p) - 1.0
                if SAVE and not RECOMPUTE:
                    _store_step(pre, p, 0, P, t, rb, ru, mask, T, H, D, i_h)
            else:  # LSTM and sLSTM: gates i, f, z, o
                p_i = _gate_pre(x0, bias, R, states, initial, 0, t, rb, bmask, ru, umask, mask, T, B, G, S, H, D, i_h,
                                HAS_BIAS, HAS_INITIAL, DTYPE, PRECISION, BB, BD, BKD, RESIDENT, w0, h_r)
                p_f = _gate_pre(x1, bias, R, states, initial, 1, t, rb, bmask, ru, umask, mask, T, B, G, S, H, D, i_h,
                                HAS_BIAS, HAS_INITIAL, DTYPE, PRECISION, BB, BD, BKD, RESIDENT, w1, h_r)
                p_z = _gate_pre(x2, bias, R, states, initial, 2, t, rb, bmask, ru, umask, mask, T, B, G, S, H, D, i_h,
                                HAS_BIAS, HAS_INITIAL, DTYPE, PRECISION, BB, BD, BKD, RESIDENT, w2, h_r)
                p_o = _gate_pre(x3, bias, R, states, initial, 3, t, rb, bmask, ru, umask, mask, T, B, G, S, H, D, i_h,
                                HAS_BIAS, HAS_INITIAL, DTYPE, PRECISION, BB, BD, BKD, RESIDENT, w3, h_r)
                c_prev = _state_in(states, initial, 1, t, rb, ru, mask, T, B, S, H, D, i_h, HAS_INITIAL, RESIDENT, c_r)
                z_act = 2.0 * tl.sigmoid(2.0 * p_z) - 1.0
                if CELL == 0:
                    c = tl.sigmoid(p_f) * c_prev + tl.sigmoid(p_i) * z_act
                    h = tl.sigmoid(p_o) * (2.0 * tl.sigmoid(2.0 * c) - 1.0)
                else:
                    n_prev = _state_in(states, initial, 2, t, rb, ru, mask, T, B, S, H, D, i_h, HAS_INITIAL, RESIDENT,
                                       n_r)
                    m_prev = _state_in(states, initial, 3, t, rb, ru, mask, T, B, S, H, D, i_h, HAS_INITIAL, RESIDENT,
                                       m_r)
                    log_f = tl.minimum(p_f, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(p_f)))
                    m = tl.maximum(log_f + m_prev, p_i)
                    input_gate = tl.exp(p_i - m)
                    forget_gate = tl.exp(log_f + m_prev - m)
                    c = forget_gate * c_prev + input_gate * z_act
                    n = forget_gate * n_prev + input_gate
                    h = tl.sigmoid(p_o) * c / n
                    if SAVE or not RESIDENT:
                        _store_step(states, n, 2, S, t, rb, ru, mask, T, H, D, i_h)
                        _store_step(states, m, 3, S, t, rb, ru, mask, T, H, D, i_h)
                    if RESIDENT:
                        n_r, m_r = n, m
                if SAVE or not RESIDENT:
                    _store_step(states, c, 1, S, t, rb, ru, mask, T, H, D, i_h)
                if SAVE and not RECOMPUTE:
                    _store_four(pre, p_i, p_f, p_z, p_o, P, t, rb, ru, mask, T, H, D, i_h)
                if RESIDENT:
                    c_r = c
            if not RESIDENT or ((CELL == 1 or CELL == 3) and SAVE):  # (else at the last step: below)
                _store_step(states, h, 0, S, t, rb, ru, mask, T, H, D, i_h)
            tl.store(h_seq + ((rb[:, None] * T + t) * H + i_h) * D + ru[None, :], h.to(DTYPE), mask=mask)
            if RESIDENT:
                h_r = h
        if not RESIDENT:
            tl.debug_barrier()  # this step's states before the next step reads them
    if RESIDENT and (CELL == 0 or CELL == 2 or not SAVE):
        # h of the last step only (the final state): no one reads an LSTM's or sLSTM's saved h but
        # the tiled path's next step (the backward's dR takes h_seq), so a store and its layout
        # conversion a step are spared; without SAVE, every state's
        ru = tl.arange(0, BD)
        last = bmask[:, None] & (ru[None, :] < D)
        _store_step(states, h_r, 0, S, T - 1, rb, ru, last, T, H, D, i_h)
        if not SAVE:
            if S > 1:
                _store_step(states, c_r, 1, S, T - 1, rb, ru, last, T, H, D, i_h)
            if S > 2:
                _store_step(states, n_r, 2, S, T - 1, rb, ru, last, T, H, D, i_h)
                _store_step(states, m_r, 3, S, T - 1, rb, ru, last, T, H, D, i_h)


@triton.jit
def _stacked_weights(R, i_h, ru, umask, G: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DTYPE: tl.constexpr,
                     BD: tl.constexpr):
    """(4 BD, BD): row 4 i + g is R_g's row i (zeros for gates past G), so that one product of the
    gates' (BB, BD) gradients interleaved the same way (the reshaped (BB, BD, 2, 2) tile of
    _four_slots' order) sums dr_g R_g over the gates: one conversion of the gradients to the
    product's operand layout, where a product per gate took one each. One gate (Elman): R_0."""
    if G == 1:
        w = _weight(R, 0, i_h, ru, ru, umask, umask, H, D, DTYPE)
    else:
        k = tl.arange(0, 4 * BD)
        i, g = k // 4, k % 4
        w = tl.load(R + ((g[:, None] * H + i_h) * D + i[:, None]) * D + ru[None, :],
                    mask=((i < D) & (g < G))[:, None] & umask[None, :], other=0.0).to(DTYPE)
    return w


@triton.jit
def _saved_pre(pre, x, bias, h_seq, initial, w_all, t, rb, ru, mask, T, B, CELL: tl.constexpr, G: tl.constexpr,
               P: tl.constexpr, H: tl.constexpr, D: tl.constexpr, i_h, HAS_BIAS: tl.constexpr,
               HAS_INITIAL: tl.constexpr, DTYPE: tl.constexpr, PRECISION: tl.constexpr, BB: tl.constexpr,
               BD: tl.constexpr, RECOMPUTE: tl.constexpr):
    """The four pre-activation slots of step t (LSTM, sLSTM: i f z o; GRU: r z n and R_n h + b_n):
    loaded from ``pre``, or (RECOMPUTE) computed again as the forward computed them,
    x + b + h_{t-1} R^T, in one product of h_{t-1} (the forward's own operand, from h_seq) with the
    stacked weights, transposed: column 4 i + g is gate g of unit i, split apart in registers."""
    if RECOMPUTE:
        if t > 0:
            h_prev = tl.load(h_seq + ((rb[:, None] * T + t - 1) * H + i_h) * D + ru[None, :], mask=mask,
                             other=0.0).to(DTYPE)
        else:
            h_prev = _prev(h_seq, initial, 0, 0, rb, ru, mask, T, B, 1, H, D, i_h, HAS_INITIAL).to(DTYPE)
        products = tl.dot(h_prev, tl.trans(w_all), input_precision=PRECISION)
        even, odd = tl.split(tl.reshape(products, (BB, BD, 2, 2)))  # gates (0, 2) and (1, 3)
        r0, r2 = tl.split(even)
        r1, r3 = tl.split(odd)
        x0, x1, x2, x3 = _x_steps(x, t, rb, ru, mask, T, G, H, D, i_h)
        p0 = _gate_input(x0, bias, 0, ru, H, D, i_h, HAS_BIAS) + r0
        p1 = _gate_input(x1, bias, 1, ru, H, D, i_h, HAS_BIAS) + r1
        if CELL == 1:  # GRU: slots n and R_n h + b_n
            p2, p3 = _gru_n_pre(x2, r2, p0, bias, ru, H, D, i_h, HAS_BIAS)
        else:
            p2 = _gate_input(x2, bias, 2, ru, H, D, i_h, HAS_BIAS) + r2
            p3 = _gate_input(x3, bias, 3, ru, H, D, i_h, HAS_BIAS) + r3
    else:
        p0 = _load_step(pre, 0, P, t, rb, ru, mask, T, H, D, i_h)
        p1 = _load_step(pre, 1, P, t, rb, ru, mask, T, H, D, i_h)
        p2 = _load_step(pre, 2, P, t, rb, ru, mask, T, H, D, i_h)
        p3 = _load_step(pre, 3, P, t, rb, ru, mask, T, H, D, i_h)
    return p0, p1, p2, p3


@triton.jit
def _carry(buffer, s, rb, ru, B, H: tl.constexpr, D: tl.constexpr, i_h):
    """Pointers to state s's (BB, BD) tile in the (S, B, H, D) carry buffer."""
    return buffer + ((s * B + rb[:, None]) * H + i_h) * D + ru[None, :]


@triton.jit
def _carried(carry, s, rb, ru, mask, B, H: tl.constexpr, D: tl.constexpr, i_h, RESIDENT: tl.constexpr, register):
    """The gradient reaching state s from the later steps: the register (RESIDENT), else the
    carry buffer."""
    if RESIDENT:
        value = register
    else:
        value = tl.load(_carry(carry, s, rb, ru, B, H, D, i_h), mask=mask, other=0.0)
    return value


@triton.jit
def rnn_bwd_kernel(R, initial, states, pre, d_h_seq, carry, dx, drec_n, x, bias, h_seq, T, B, H: tl.constexpr,
                   D: tl.constexpr, CELL: tl.constexpr, G: tl.constexpr, S: tl.constexpr, P: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_INITIAL: tl.constexpr, PRECISION: tl.constexpr, BB: tl.constexpr,
                   BD: tl.constexpr, BKD: tl.constexpr, RESIDENT: tl.constexpr, RECOMPUTE: tl.constexpr):
    """Reverse time walk. ``carry`` (S, B, H, D) fp32 holds on entry the final states'
    gradient, between steps the gradient reaching the previous states, and on exit the
    initial states' gradient. Writes dx (the gates' pre-activation gradients) and, for GRU,
    drec_n = dn * r (the gradient of R_n h + b_n), both in the input dtype. RESIDENT (as in the forward): R_g is
    loaded once and the carried gradients stay in registers, the carry buffer read on entry and
    written on exit only; else the tiles exchange them through the buffer, two barriers a step."""
    DTYPE: tl.constexpr = d_h_seq.dtype.element_ty
    i_h, i_b = tl.program_id(0), tl.program_id(1)
    rb = i_b * BB + tl.arange(0, BB)
    bmask = rb < B
    if RESIDENT:
        ru = tl.arange(0, BD)
        umask = ru < D
        mask = bmask[:, None] & umask[None, :]
        w_all = _stacked_weights(R, i_h, ru, umask, G, H, D, DTYPE, BD)
        dh_r = tl.load(_carry(carry, 0, rb, ru, B, H, D, i_h), mask=mask, other=0.0)
        dc_r = tl.load(_carry(carry, 1 % S, rb, ru, B, H, D, i_h), mask=mask, other=0.0)
        dn_r = tl.load(_carry(carry, 2 % S, rb, ru, B, H, D, i_h), mask=mask, other=0.0)
        dm_r = tl.load(_carry(carry, 3 % S, rb, ru, B, H, D, i_h), mask=mask, other=0.0)
    else:
        w_all, dh_r, dc_r, dn_r, dm_r = 0.0, 0.0, 0.0, 0.0, 0.0  # unused
    for m in range(T):
        t = T - 1 - m
        for i_u in range(tl.cdiv(D, BD)):
            ru = i_u * BD + tl.arange(0, BD)
            mask = bmask[:, None] & (ru[None, :] < D)
            dh = _carried(carry, 0, rb, ru, mask, B, H, D, i_h, RESIDENT, dh_r)
            dh += tl.load(d_h_seq + ((rb[:, None] * T + t) * H + i_h) * D + ru[None, :], mask=mask,
                          other=0.0).to(tl.float32)
            h = _load_step(states, 0, S, t, rb, ru, mask, T, H, D, i_h)
            dh_direct = tl.zeros([BB, BD], tl.float32)
            if CELL == 1:
                p_r, p_z, p_n, rec_n = _saved_pre(pre, x, bias, h_seq, initial, w_all, t, rb, ru, mask, T, B, CELL, G,
                                                  P, H, D, i_h, HAS_BIAS, HAS_INITIAL, DTYPE, PRECISION, BB, BD,
                                                  RECOMPUTE)
                h_prev = _prev(states, initial, 0, t, rb, ru, mask, T, B, S, H, D, i_h, HAS_INITIAL)
                reset, update = tl.sigmoid(p_r), tl.sigmoid(p_z)
                candidate = 2.0 * tl.sigmoid(2.0 * p_n) - 1.0
                d_pn = dh * (1.0 - update) * (1.0 - candidate * candidate)
                d_pz = dh * (h_prev - candidate) * update * (1.0 - update)
                d_pr = d_pn * rec_n * reset * (1.0 - reset)
                dh_direct = dh * update
                _store_four(dx, d_pr, d_pz, d_pn, d_pn, G, t, rb, ru, mask, T, H, D, i_h)  # (G = 3: 3 slots)
                tl.store(drec_n + ((rb[:, None] * T + t) * H + i_h) * D + ru[None, :], d_pn * reset, mask=mask)
                d_rec0, d_rec1, d_rec2, d_rec3 = d_pr, d_pz, d_pn * reset, d_pn
            elif CELL == 3:
                d_p = dh * (1.0 - h * h)
                _store_step(dx, d_p, 0, G, t, rb, ru, mask, T, H, D, i_h)
                d_rec0, d_rec1, d_rec2, d_rec3 = d_p, d_p, d_p, d_p
            else:
                p_i, p_f, p_z, p_o = _saved_pre(pre, x, bias, h_seq, initial, w_all, t, rb, ru, mask, T, B, CELL, G,
                                                P, H, D, i_h, HAS_BIAS, HAS_INITIAL, DTYPE, PRECISION, BB, BD,
                                                RECOMPUTE)
                c = _load_step(states, 1, S, t, rb, ru, mask, T, H, D, i_h)
                c_prev = _prev(states, initial, 1, t, rb, ru, mask, T, B, S, H, D, i_h, HAS_INITIAL)
                dc = _carried(carry, 1, rb, ru, mask, B, H, D, i_h, RESIDENT, dc_r)
                z_act = 2.0 * tl.sigmoid(2.0 * p_z) - 1.0
                o_gate = tl.sigmoid(p_o)
                if CELL == 0:
                    i_gate, f_gate = tl.sigmoid(p_i), tl.sigmoid(p_f)
                    tanh_c = 2.0 * tl.sigmoid(2.0 * c) - 1.0
                    dc += dh * o_gate * (1.0 - tanh_c * tanh_c)
                    d_pi = dc * z_act * i_gate * (1.0 - i_gate)
                    d_pf = dc * c_prev * f_gate * (1.0 - f_gate)
                    d_pz = dc * i_gate * (1.0 - z_act * z_act)
                    d_po = dh * tanh_c * o_gate * (1.0 - o_gate)
                    if RESIDENT:
                        dc_r = dc * f_gate
                    else:
                        tl.store(_carry(carry, 1, rb, ru, B, H, D, i_h), dc * f_gate, mask=mask)
                else:
                    n = _load_step(states, 2, S, t, rb, ru, mask, T, H, D, i_h)
                    m_new = _load_step(states, 3, S, t, rb, ru, mask, T, H, D, i_h)
                    n_prev = _prev(states, initial, 2, t, rb, ru, mask, T, B, S, H, D, i_h, HAS_INITIAL)
                    m_prev = _prev(states, initial, 3, t, rb, ru, mask, T, B, S, H, D, i_h, HAS_INITIAL)
                    dn = _carried(carry, 2, rb, ru, mask, B, H, D, i_h, RESIDENT, dn_r)
                    dm = _carried(carry, 3, rb, ru, mask, B, H, D, i_h, RESIDENT, dm_r)
                    log_f = tl.minimum(p_f, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(p_f)))
                    input_gate = tl.exp(p_i - m_new)
                    forget_gate = tl.exp(log_f + m_prev - m_new)
                    n_safe = tl.where(mask, n, 1.0)
                    d_po = dh * c / n_safe * o_gate * (1.0 - o_gate)
                    dc += dh * o_gate / n_safe
                    dn -= dh * o_gate * c / (n_safe * n_safe)
                    d_forget = dc * c_prev + dn * n_prev
                    d_input = dc * z_act + dn
                    d_pz = dc * input_gate * (1.0 - z_act * z_act)
                    d_pi = d_input * input_gate
                    d_logf = d_forget * forget_gate
                    dm_prev = d_forget * forget_gate
                    dm += -d_input * input_gate - d_forget * forget_gate
                    # m_new = max(log_f + m_prev, p_i): the larger argument takes dm (ties split it)
                    lhs = log_f + m_prev
                    to_lhs = tl.where(lhs > p_i, dm, tl.where(lhs == p_i, 0.5 * dm, 0.0))
                    d_pi += dm - to_lhs
                    d_logf += to_lhs
                    dm_prev += to_lhs
                    d_pf = d_logf * (1.0 - tl.sigmoid(p_f))
                    if RESIDENT:
                        dc_r, dn_r, dm_r = dc * forget_gate, dn * forget_gate, dm_prev
                    else:
                        tl.store(_carry(carry, 1, rb, ru, B, H, D, i_h), dc * forget_gate, mask=mask)
                        tl.store(_carry(carry, 2, rb, ru, B, H, D, i_h), dn * forget_gate, mask=mask)
                        tl.store(_carry(carry, 3, rb, ru, B, H, D, i_h), dm_prev, mask=mask)
                _store_four(dx, d_pi, d_pf, d_pz, d_po, G, t, rb, ru, mask, T, H, D, i_h)
                d_rec0, d_rec1, d_rec2, d_rec3 = d_pi, d_pf, d_pz, d_po
            if RESIDENT:  # dh_{t-1} = its direct term + sum_g dr_g R_g (the tiled path's second phase)
                if G == 1:
                    stacked = d_rec0
                else:
                    stacked = tl.reshape(tl.join(tl.join(d_rec0, d_rec2), tl.join(d_rec1, d_rec3)), (BB, 4 * BD))
                dh_r = dh_direct + tl.dot(stacked.to(DTYPE), w_all, input_precision=PRECISION)
            else:
                tl.store(_carry(carry, 0, rb, ru, B, H, D, i_h), dh_direct, mask=mask)
        if not RESIDENT:
            tl.debug_barrier()  # every tile's gate gradients before the recurrent products read them
            for i_u in range(tl.cdiv(D, BD)):
                rj = i_u * BD + tl.arange(0, BD)
                jmask = rj < D
                mask = bmask[:, None] & jmask[None, :]
                acc = tl.zeros([BB, BD], tl.float32)
                for g in tl.static_range(G):
                    for i_k in range(tl.cdiv(D, BKD)):
                        ri = i_k * BKD + tl.arange(0, BKD)
                        imask = bmask[:, None] & (ri[None, :] < D)
                        if CELL == 1 and g == 2:
                            d_rec = tl.load(drec_n + ((rb[:, None] * T + t) * H + i_h) * D + ri[None, :], mask=imask,
                                            other=0.0)
                        else:
                            d_rec = _load_step(dx, g, G, t, rb, ri, imask, T, H, D, i_h)
                        # in the input dtype, as the forward multiplied h and R (half tensor cores)
                        acc += tl.dot(d_rec.to(DTYPE), _weight(R, g, i_h, ri, rj, ri < D, jmask, H, D, DTYPE),
                                      input_precision=PRECISION)
                pointer = _carry(carry, 0, rb, rj, B, H, D, i_h)
                tl.store(pointer, tl.load(pointer, mask=mask, other=0.0) + acc, mask=mask)
            tl.debug_barrier()
    if RESIDENT:  # the initial states' gradient
        ru = tl.arange(0, BD)
        mask = bmask[:, None] & (ru[None, :] < D)
        tl.store(_carry(carry, 0, rb, ru, B, H, D, i_h), dh_r, mask=mask)
        if S > 1:
            tl.store(_carry(carry, 1, rb, ru, B, H, D, i_h), dc_r, mask=mask)
        if S > 2:
            tl.store(_carry(carry, 2, rb, ru, B, H, D, i_h), dn_r, mask=mask)
            tl.store(_carry(carry, 3, rb, ru, B, H, D, i_h), dm_r, mask=mask)
