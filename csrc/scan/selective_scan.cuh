// Mamba-1's selective scan in CUDA, forward and backward.
//
//   dt_t = softplus(delta_t + delta_bias) (or not);  x_t = e^(dt_t A_dn) x_{t-1} + dt_t u_t B_tn
//   y_t  = sum_n x_tn C_tn + D_d u_t;  out_t = y_t silu(z_t)
//
// Tiling: a block owns 32 channels (one per lane, so loads of a time step are coalesced in the
// (B, T, Dm) layout) and WARPS x ITEMS consecutive time steps per chunk, warp w taking items
// [w ITEMS, (w + 1) ITEMS). For each state element n a lane scans its items sequentially, the
// warps' segments are composed through shared memory (x -> P x + X per segment), and each
// warp replays its items from the composed prefix. The state crossing chunk boundaries lives in
// shared memory; the state entering every chunk is stored (fp32, Dm x N per chunk) for the
// backward, which walks chunks in reverse, replays the forward inside the chunk, and runs the
// adjoint recurrence dx_t = dy_t C_t + e^(dt_{t+1} A) dx_{t+1} the same way, segments composed
// from the later warps. Reductions over channels (dB, dC) go through warp shuffles and one
// atomicAdd per warp, time step and n; dA, dD, d delta_bias add across sequences atomically.
//
// Operands: u, delta, z, out, du, ddelta, dz of element type T with (b, t, d) strides; A, D,
// delta_bias, B, C in fp32; B, C static (Dm, N), shared (B, T, N) or grouped (B, T, G, N) with
// strides (b, t, g, n) (static: t is the Dm stride). Sequences from cu_seqlens (packed: batch
// row 0; else sequence i is batch row i). Work per step and channel: about 7 N flops forward,
// 15 N backward; bytes: u, delta, z, out (4 Dm T values) plus B, C (2 G N T): memory-bound.
#pragma once
#include "../common/runtime.h"

namespace rnnops::scan {

enum BCMode : int { kStatic = 0, kShared = 1, kGrouped = 2 };

struct Operand {  // a (b, t, d) strided activation
  long long b, t, d;
};

struct BCOperand {
  const float* data;
  int mode;
  long long b, t, g, n;
  int channels_per_group;
  __device__ __forceinline__ float at(long long batch, long long step, int channel, int n_index) const {
    if (mode == kStatic) return data[channel * t + n_index * n];
    const long long group = mode == kGrouped ? channel / channels_per_group : 0;
    return data[batch * b + step * t + group * g + n_index * n];
  }
};

struct ScanShape {
  int Dm, N;
  int packed;  // sequences packed along time in batch row 0
  int has_d, has_z, has_bias, softplus;
};

// A block's place: lane (= channel d) and warp, and the one sequence it walks, rows [bos, eos) of
// the packed time axis; that sequence's tensors sit at batch row ``batch``, time ``t - offset``,
// and its first chunk is global chunk ``first``.
struct BlockSpan {
  int lane, warp, d;
  bool live;  // d < Dm
  int seq;
  long long bos, eos, batch, offset, first;
};

__device__ __forceinline__ BlockSpan block_span(const ScanShape& shape, const int* cu_seqlens,
                                                const int* chunk_offsets) {
  const int lane = threadIdx.x % 32, d = blockIdx.x * 32 + lane, seq = blockIdx.y;
  const long long bos = cu_seqlens[seq];
  return BlockSpan{lane, static_cast<int>(threadIdx.x / 32), d, d < shape.Dm, seq, bos, cu_seqlens[seq + 1],
                   shape.packed ? 0 : seq, shape.packed ? 0 : bos, chunk_offsets[seq]};
}

__device__ __forceinline__ float discretise(float raw, int softplus) { return softplus ? rnnops::softplus(raw) : raw; }

template <int WARPS>
struct SegmentSmem {
  float p[WARPS][32];
  float x[WARPS][32];
};

// ---------------------------------------------------------------- forward

template <class T, int WARPS, int ITEMS>
__global__ void __launch_bounds__(WARPS * 32)
    selective_scan_fwd(const T* u, Operand su, const T* delta, Operand sdelta, const float* A, BCOperand Bm,
                       BCOperand Cm, const float* D, const T* z, Operand sz, const float* delta_bias, T* out,
                       Operand sout, float* chunk_states, const float* initial_state, float* final_state,
                       const int* cu_seqlens, const int* chunk_offsets, ScanShape shape) {
  constexpr int CHUNK = WARPS * ITEMS;
  const int Dm = shape.Dm, N = shape.N;
  const auto [lane, warp, d, live, seq, bos, eos, batch, offset, first] = block_span(shape, cu_seqlens, chunk_offsets);

  RNNOPS_SHARED(SegmentSmem<WARPS>, segment, 1);
  RNNOPS_DYNAMIC_SHARED(float, carry);  // [N][32]: the state crossing chunk boundaries

  if (warp == 0)
    for (int n = 0; n < N; ++n)
      carry[n * 32 + lane] = (live && initial_state) ? initial_state[(seq * (long long)Dm + d) * N + n] : 0.0f;
  __syncthreads();

  const float d_weight = (live && shape.has_d) ? D[d] : 0.0f;
  const float bias = (live && shape.has_bias) ? delta_bias[d] : 0.0f;
  for (long long t0 = bos; t0 < eos; t0 += CHUNK) {
    const long long chunk = first + (t0 - bos) / CHUNK;
    if (warp == 0 && live)
      for (int n = 0; n < N; ++n) chunk_states[(chunk * Dm + d) * N + n] = carry[n * 32 + lane];
    float dt[ITEMS], uu[ITEMS], y[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const long long t = t0 + warp * ITEMS + i;
      const bool on = live && t < eos;
      const long long r = t - offset;
      dt[i] = on ? discretise(to_float(delta[batch * sdelta.b + r * sdelta.t + d * sdelta.d]) + bias, shape.softplus)
                 : 0.0f;
      uu[i] = on ? to_float(u[batch * su.b + r * su.t + d * su.d]) : 0.0f;
      y[i] = 0.0f;
    }
    for (int n = 0; n < N; ++n) {
      const float a_n = live ? A[d * N + n] : 0.0f;
      float a[ITEMS], inject[ITEMS];
      float prod = 1.0f, x = 0.0f;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const long long t = t0 + warp * ITEMS + i;
        const bool on = live && t < eos;
        a[i] = __expf(dt[i] * a_n);
        inject[i] = on ? dt[i] * uu[i] * Bm.at(batch, t - offset, d, n) : 0.0f;
        x = a[i] * x + inject[i];
        prod *= a[i];
      }
      segment->p[warp][lane] = prod;
      segment->x[warp][lane] = x;
      __syncthreads();
      x = carry[n * 32 + lane];
      for (int w = 0; w < warp; ++w) x = segment->p[w][lane] * x + segment->x[w][lane];
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const long long t = t0 + warp * ITEMS + i;
        x = a[i] * x + inject[i];
        if (live && t < eos) y[i] += x * Cm.at(batch, t - offset, d, n);
      }
      __syncthreads();  // every warp has read carry[n] and the segments
      if (warp == WARPS - 1) carry[n * 32 + lane] = x;
    }
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const long long t = t0 + warp * ITEMS + i;
      if (!(live && t < eos)) continue;
      const long long r = t - offset;
      float value = y[i] + d_weight * uu[i];
      if (shape.has_z) {
        const float zz = to_float(z[batch * sz.b + r * sz.t + d * sz.d]);
        value *= zz * rnnops::sigmoid(zz);
      }
      out[batch * sout.b + r * sout.t + d * sout.d] = from_float<T>(value);
    }
    __syncthreads();  // the last warp's carry before the next chunk
  }
  if (final_state && warp == 0 && live)
    for (int n = 0; n < N; ++n) final_state[(seq * (long long)Dm + d) * N + n] = carry[n * 32 + lane];
}

// ---------------------------------------------------------------- backward

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Whether every live channel of this block reads the same B or C value per step (shared, or all in
// one group), so that their gradient contributions can be summed over the warp first.
__device__ __forceinline__ bool block_shares_row(const BCOperand& M, int Dm) {
  const int first = static_cast<int>(blockIdx.x) * 32, last_live = min(Dm - 1, first + 31);
  return M.mode == kShared || (M.mode == kGrouped && first / M.channels_per_group == last_live / M.channels_per_group);
}

// Adds a per-lane value into an fp32 reduction over channels: one atomic per warp when the
// warp's channels share the target address (every lane must call), else one per live lane.
__device__ __forceinline__ void add_over_channels(float* target, float value, bool shared_by_warp, bool live) {
  if (shared_by_warp) {
    value = warp_sum(value);
    if (threadIdx.x % 32 == 0) atomicAdd(target, value);
  } else if (live) {
    atomicAdd(target, value);
  }
}

template <class T, int WARPS, int ITEMS>
__global__ void __launch_bounds__(WARPS * 32)
    selective_scan_bwd(const T* u, Operand su, const T* delta, Operand sdelta, const float* A, BCOperand Bm,
                       BCOperand Cm, const float* D, const T* z, Operand sz, const float* delta_bias, const T* d_out,
                       Operand sdo, const float* chunk_states, const float* d_final, float* d_initial, float* du,
                       float* d_delta, float* dz, float* dA, float* dB, float* dC, float* dD, float* d_bias,
                       const int* cu_seqlens, const int* chunk_offsets, ScanShape shape) {
  // du, d_delta, dz: contiguous (rows, Dm) fp32 with rows the packed time index; dA (Dm, N),
  // dD, d_bias (Dm): summed over sequences; dB, dC in B's / C's layout, contiguous, fp32.
  constexpr int CHUNK = WARPS * ITEMS;
  const int Dm = shape.Dm, N = shape.N;
  const auto [lane, warp, d, live, seq, bos, eos, batch, offset, first] = block_span(shape, cu_seqlens, chunk_offsets);
  const long long rows_per_batch = shape.packed ? 0 : (eos - bos);
  const bool B_per_warp = block_shares_row(Bm, Dm), C_per_warp = block_shares_row(Cm, Dm);

  RNNOPS_SHARED(SegmentSmem<WARPS>, segment, 1);
  RNNOPS_SHARED(float, head_a, WARPS * 32);  // e^(dt A) at each warp's first item
  RNNOPS_DYNAMIC_SHARED(float, smem);
  float* dcarry = smem;             // [N][32]: dx at the first step of the chunk after this one
  float* dA_acc = smem + N * 32;    // [N][32]
  float* first_a = smem + 2 * N * 32;  // [N][32]: e^(dt A) of the sequence's first step

  if (warp == 0)
    for (int n = 0; n < N; ++n) {
      dcarry[n * 32 + lane] = (live && d_final) ? d_final[(seq * (long long)Dm + d) * N + n] : 0.0f;
      dA_acc[n * 32 + lane] = 0.0f;
      first_a[n * 32 + lane] = 1.0f;
    }
  __syncthreads();

  const float d_weight = (live && shape.has_d) ? D[d] : 0.0f;
  const float bias = (live && shape.has_bias) ? delta_bias[d] : 0.0f;
  float dD_acc = 0.0f, dbias_acc = 0.0f, dB_static = 0.0f, dC_static = 0.0f;
  const long long chunks = (eos - bos + CHUNK - 1) / CHUNK;
  for (long long c = chunks - 1; c >= 0; --c) {
    const long long t0 = bos + c * CHUNK;
    float dt[ITEMS], slope[ITEMS], uu[ITEMS], dy[ITEMS], gout[ITEMS], y[ITEMS], ddt[ITEMS], duu[ITEMS];
    float dt_after = 0.0f;  // dt of the step after this warp's last item
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const long long t = t0 + warp * ITEMS + i;
      const bool on = live && t < eos;
      const long long r = t - offset;
      const float raw = on ? to_float(delta[batch * sdelta.b + r * sdelta.t + d * sdelta.d]) + bias : 0.0f;
      dt[i] = on ? discretise(raw, shape.softplus) : 0.0f;
      slope[i] = shape.softplus ? rnnops::sigmoid(raw) : 1.0f;
      uu[i] = on ? to_float(u[batch * su.b + r * su.t + d * su.d]) : 0.0f;
      gout[i] = on ? to_float(d_out[batch * sdo.b + r * sdo.t + d * sdo.d]) : 0.0f;
      dy[i] = gout[i];
      if (shape.has_z && on) {
        const float zz = to_float(z[batch * sz.b + r * sz.t + d * sz.d]);
        dy[i] *= zz * rnnops::sigmoid(zz);
      }
      y[i] = ddt[i] = duu[i] = 0.0f;
    }
    {
      const long long t = t0 + (warp + 1) * ITEMS;
      if (live && t < eos)
        dt_after = discretise(to_float(delta[batch * sdelta.b + (t - offset) * sdelta.t + d * sdelta.d]) + bias,
                              shape.softplus);
    }
    for (int n = 0; n < N; ++n) {
      const float a_n = live ? A[d * N + n] : 0.0f;
      // replay the forward inside the chunk
      float a[ITEMS], inject[ITEMS], x[ITEMS], Bv[ITEMS], Cv[ITEMS];
      float prod = 1.0f, acc = 0.0f;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const long long t = t0 + warp * ITEMS + i;
        const bool on = live && t < eos;
        a[i] = __expf(dt[i] * a_n);
        Bv[i] = on ? Bm.at(batch, t - offset, d, n) : 0.0f;
        Cv[i] = on ? Cm.at(batch, t - offset, d, n) : 0.0f;
        inject[i] = dt[i] * uu[i] * Bv[i];
        acc = a[i] * acc + inject[i];
        prod *= a[i];
      }
      segment->p[warp][lane] = prod;
      segment->x[warp][lane] = acc;
      head_a[warp * 32 + lane] = a[0];
      __syncthreads();
      float state = (live ? chunk_states[((first + c) * Dm + d) * N + n] : 0.0f);
      for (int w = 0; w < warp; ++w) state = segment->p[w][lane] * state + segment->x[w][lane];
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        state = a[i] * state + inject[i];
        x[i] = state;
        y[i] += state * Cv[i];
      }
      const float a_after = warp < WARPS - 1 ? head_a[(warp + 1) * 32 + lane] : __expf(dt_after * a_n);
      __syncthreads();  // segments are reused below
      // the adjoint recurrence, this warp's segment from a zero carry
      float next_a = a_after, suffix = 1.0f, g = 0.0f;
#pragma unroll
      for (int i = ITEMS - 1; i >= 0; --i) {
        g = dy[i] * Cv[i] + next_a * g;
        suffix *= next_a;
        next_a = a[i];
      }
      segment->p[warp][lane] = suffix;
      segment->x[warp][lane] = g;
      __syncthreads();
      float dnext = dcarry[n * 32 + lane];  // dx at the step after this warp's segment
      for (int w = WARPS - 1; w > warp; --w) dnext = segment->x[w][lane] + segment->p[w][lane] * dnext;
      __syncthreads();  // every warp has composed its carry before the segments are overwritten
      float dA_part = 0.0f;
      next_a = a_after;
      float dx = dnext;
#pragma unroll
      for (int i = ITEMS - 1; i >= 0; --i) {
        dx = dy[i] * Cv[i] + next_a * dx;
        next_a = a[i];
        const float decayed = x[i] - inject[i];
        duu[i] += dx * dt[i] * Bv[i];
        ddt[i] += dx * (a_n * decayed + uu[i] * Bv[i]);
        dA_part += dx * dt[i] * decayed;
        const long long t = t0 + warp * ITEMS + i;
        const bool on = live && t < eos;
        const float db_term = on ? dx * dt[i] * uu[i] : 0.0f, dc_term = on ? dy[i] * x[i] : 0.0f;
        if (Bm.mode == kStatic) {
          dB_static += db_term;
        } else if (t < eos) {
          const long long group = Bm.mode == kGrouped ? d / Bm.channels_per_group : 0;
          const int G = Bm.mode == kGrouped ? Dm / Bm.channels_per_group : 1;
          add_over_channels(dB + ((batch * rows_per_batch + (t - offset)) * G + group) * N + n, db_term, B_per_warp,
                            live);
        }
        if (Cm.mode == kStatic) {
          dC_static += dc_term;
        } else if (t < eos) {
          const long long group = Cm.mode == kGrouped ? d / Cm.channels_per_group : 0;
          const int G = Cm.mode == kGrouped ? Dm / Cm.channels_per_group : 1;
          add_over_channels(dC + ((batch * rows_per_batch + (t - offset)) * G + group) * N + n, dc_term, C_per_warp,
                            live);
        }
      }
      segment->x[warp][lane] = dA_part;
      if (warp == 0) segment->p[0][lane] = dx;  // dx at the chunk's first step
      __syncthreads();
      if (warp == 0) {
        float total = 0.0f;
        for (int w = 0; w < WARPS; ++w) total += segment->x[w][lane];
        dA_acc[n * 32 + lane] += total;
        dcarry[n * 32 + lane] = segment->p[0][lane];
        if (c == 0) first_a[n * 32 + lane] = a[0];
      }
      if (live) {
        if (Bm.mode == kStatic) {
          atomicAdd(dB + d * N + n, dB_static);
          dB_static = 0.0f;
        }
        if (Cm.mode == kStatic) {
          atomicAdd(dC + d * N + n, dC_static);
          dC_static = 0.0f;
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const long long t = t0 + warp * ITEMS + i;
      if (!(live && t < eos)) continue;
      const long long row = shape.packed ? t : (seq * rows_per_batch + (t - bos));
      y[i] += d_weight * uu[i];
      duu[i] += dy[i] * d_weight;
      dD_acc += dy[i] * uu[i];
      if (shape.has_z) {
        const float zz = to_float(z[batch * sz.b + (t - offset) * sz.t + d * sz.d]);
        const float sig = rnnops::sigmoid(zz);
        dz[row * Dm + d] = gout[i] * y[i] * sig * (1.0f + zz * (1.0f - sig));
      }
      const float draw = ddt[i] * slope[i];
      dbias_acc += draw;
      du[row * Dm + d] = duu[i];
      d_delta[row * Dm + d] = draw;
    }
  }
  // block totals: dD and d_bias over warps (lanes are channels), then across sequences
  segment->x[warp][lane] = dD_acc;
  segment->p[warp][lane] = dbias_acc;
  __syncthreads();
  if (warp == 0 && live) {
    float total_d = 0.0f, total_bias = 0.0f;
    for (int w = 0; w < WARPS; ++w) {
      total_d += segment->x[w][lane];
      total_bias += segment->p[w][lane];
    }
    if (shape.has_d) atomicAdd(dD + d, total_d);
    if (shape.has_bias) atomicAdd(d_bias + d, total_bias);
    for (int n = 0; n < N; ++n) {
      atomicAdd(dA + d * N + n, dA_acc[n * 32 + lane]);
      if (d_initial) d_initial[(seq * (long long)Dm + d) * N + n] = first_a[n * 32 + lane] * dcarry[n * 32 + lane];
    }
  }
}

}  // namespace rnnops::scan
