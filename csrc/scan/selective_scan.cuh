// Mamba-1's selective scan in CUDA, forward and backward.
//
//   dt_t = softplus(delta_t + delta_bias) (or not);  x_t = e^(dt_t A_dn) x_{t-1} + dt_t u_t B_tn
//   y_t  = sum_n x_tn C_tn + D_d u_t;  out_t = y_t silu(z_t)
//
// Tiling: a block owns 32 channels (one per lane, so loads of a time step are coalesced in the
// (B, T, Dm) layout) and walks its sequence in chunks of CHUNK = WARPS x ITEMS steps; the state
// entering every chunk is stored (fp32, Dm x N per chunk) for the backward, which walks the
// chunks in reverse and replays the forward inside each (a sequence may be split into segments of
// chunks walked by blocks of their own: "segments" below). Where every channel of the block reads
// the same B and C rows (STAGED: Mamba's shared B and C, or groups of a multiple of 32 channels)
// both directions split the state elements over the warps: the chunk's dt, dt u (dy) and B and C
// rows are staged in shared memory, each warp walks the chunk's steps for its groups of four
// state elements (four independent recurrences a lane, no barrier between steps), and the warps'
// per-step sums over their elements (y; the backward's dx B, dx a x_{t-1} A and x C) meet in
// shared memory (fwd_by_state_elements, bwd_by_state_elements). Otherwise the steps are split:
// warp w takes items [w ITEMS, (w + 1) ITEMS), and for each state element n it scans its items
// sequentially, the warps' segments are composed through shared memory (x -> P x + X per
// segment, P = 2^(a2 sum dt)), and each warp replays its items from the composed prefix (a
// barrier per state element and phase); the backward runs the adjoint recurrence dx_t = dy_t C_t
// + e^(dt_{t+1} A) dx_{t+1} the same way, segments composed from the later warps. Reductions over
// channels (dB, dC) sum a warp's values by recursive halving (warp_reduce_scatter) and add one
// atomic per step and n; dA, dD, d delta_bias add across sequences atomically.
//
// Operands: u, delta, z, out, du, ddelta, dz of element type T with (b, t, d) strides; A, D,
// delta_bias, B, C in fp32; B, C static (Dm, N), shared (B, T, N) or grouped (B, T, G, N) with
// strides (b, t, g, n) (static: t is the Dm stride). Sequences from cu_seqlens (packed: batch
// row 0; else sequence i is batch row i).
// Work per step, channel and state element: forward 7 flops and one e^x, backward about 25
// flops and two; bytes: u, delta, z, out (4 Dm T values) plus B, C (2 G N T) forward, about
// twice that backward. The inner loops are what bound the time: at (4 warps, 8 items), sm_90a,
// the SASS holds about 7 instructions per (step, channel, n) forward STAGED (one e^x, four FMUL /
// FFMA and a quarter of two 16-byte broadcasts; the step-split forward took 12, and 23 reading B
// and C from global memory) and 30 backward in its walk (replay, adjoint, dA, the sums and the dB
// / dC halving; about 7 more in the replay to the sub-block starts and the per-step gradients),
// where the step-split backward took 55 (120 from global memory): at B8 Dm2048 T2048 N16 about
// 0.13 and 0.7 ms of an H100's instruction issue, where its exponential rate allows 0.13 ms
// forward and its bandwidth 0.09 ms. Measured on the H200 with the rows staged (dd69b80): 0.99 ms
// forward, 3.72 backward, against mamba_ssm's 0.59 and 2.27: the SASS then showed every chunk
// waiting for its global loads one step at a time (a step's delta, then after its softplus, whose
// logf branches, its u; the output's z between the stores of out, which nvcc may not pass): 32
// rounds of loads a 32-step chunk forward, 35 backward, each a memory latency (0.99 ms is 15 us a
// chunk). Each
// phase now loads all its steps' values before using any (load_items), the staging of B and C
// rows (and backward of the chunk's state) loads while they are in flight (stage_rows), and the
// backward stages what its per-step gradients take (StepTerms), so a chunk waits for one round of
// loads. In mamba_ssm's (B, D, L) layout a lane reads its contiguous steps as 16-byte words, and
// writes out, du, ddelta and dz (which the op allocates in u's dimension order) likewise
// (store_items; there the staged backward keeps a chunk's gradients in its step terms' slots and
// stores them at the chunk's end, a lane its ITEMS steps; in other layouts it stores each step's at
// once, as before: kept, the H200 timed (B, T, D) 3.01 ms f+b at 4e23ac8, 2.87 before). The H200
// at 76b5d92 timed the staged kernels at 0.61 / 2.23 ms (B, T, D) and 0.53 / 2.09 (B, D, L),
// mamba_ssm's 0.59 / 2.27, but the (B, D, L) gradients came out (B, T, D)-contiguous and autograd
// spent 0.64 ms copying them to the leaves.
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
};

// Where one lane reads B or C: step r's row starts at base + r * t_stride (a static operand's
// channel row serves every step: t_stride 0), element n at n * n_stride. The kernels resolve
// the mode and group once per block and each step's 32-bit byte offset from the chunk's first
// row once per chunk (the caller keeps t_stride below 2^24), so a read inside the loop over n
// is one add and one load.
struct BCRows {
  const float* base;
  long long t_stride, n_stride;
  unsigned step_bytes;  // 4 t_stride
  __device__ __forceinline__ const float* row(long long r) const { return base + r * t_stride; }
};

__device__ __forceinline__ BCRows bc_rows(const BCOperand& M, long long batch, int channel) {
  if (M.mode == kStatic) return BCRows{M.data + channel * M.t, 0, M.n, 0u};
  const long long group = M.mode == kGrouped ? channel / M.channels_per_group : 0;
  return BCRows{M.data + batch * M.b + group * M.g, M.t, M.n, static_cast<unsigned>(M.t * 4)};
}

// Whether every live channel of this block reads the same B or C value per step (shared, or all in
// one group), so that their gradient contributions can be summed over the warp first.
__device__ __forceinline__ bool block_shares_row(const BCOperand& M, int Dm) {
  const int first = static_cast<int>(blockIdx.x) * 32, last_live = min(Dm - 1, first + 31);
  return M.mode == kShared || (M.mode == kGrouped && first / M.channels_per_group == last_live / M.channels_per_group);
}

// Copies the B and C rows of a chunk's CHUNK steps from t0 into Bstage / Cstage[s * N4 + n]
// (step-major, n fastest: coalesced reads, conflict-free stores), zeros past the sequence's end eos
// and for n in [N, N4): a warp then reads four state elements of one step as one 16-byte broadcast.
// With STATE (the staged backward) also the state entering the chunk into starts[n * 32 + channel],
// from the block's 32 channels' stored rows (``state``, contiguous, N each; ``channels`` of them
// live). Every load is in flight together (a thread's values of each index): staged one operand
// after the other, each operand's loads waited behind the previous one's stores, a memory latency
// each. The rows are a few KB, L2-resident; the caller synchronises the block after.
template <int CHUNK, bool STATE = false>
__device__ __forceinline__ void stage_rows(float* Bstage, float* Cstage, const BCRows& Brows, const BCRows& Crows,
                                           long long t0, long long eos, long long offset, int N, int N4,
                                           const float* state = nullptr, float* starts = nullptr, int channels = 0) {
  struct Staged {
    float b, c, state;
  };
  constexpr int ROWS = STATE && CHUNK < 32 ? 32 : CHUNK;  // steps, or the state's 32 channels where more
  in_flight<4>(
      ROWS * N4,
      [&](int f) {
        const int row = f / N4, n = f % N4;
        const bool on = row < CHUNK && t0 + row < eos && n < N;
        Staged value{on ? __ldg(Brows.row(t0 + row - offset) + n * Brows.n_stride) : 0.0f,
                     on ? __ldg(Crows.row(t0 + row - offset) + n * Crows.n_stride) : 0.0f, 0.0f};
        if constexpr (STATE) value.state = row < 32 && row < channels && n < N ? state[row * N + n] : 0.0f;
        return value;
      },
      [&](int f, Staged value) {
        const int row = f / N4, n = f % N4;
        if (row < CHUNK) {
          Bstage[f] = value.b;
          Cstage[f] = value.c;
        }
        if constexpr (STATE)
          if (row < 32) starts[n * 32 + row] = value.state;
      });
}

// B or C of a warp's ITEMS steps for state element n, from global memory at byte offsets off[i]
// from element n's address in the chunk's first row.
template <int ITEMS>
__device__ __forceinline__ void read_items(float (&v)[ITEMS], const char* chunk_row, const BCRows& rows,
                                           const unsigned (&off)[ITEMS], int n) {
  const char* row_n = chunk_row + n * rows.n_stride * 4;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) v[i] = __ldg(reinterpret_cast<const float*>(row_n + off[i]));
}

// The 16-byte words a lane's ITEMS steps of type T fill (0 where they fill no whole number), and
// whether the steps at ``at`` move as such words: contiguous (a time stride of 1), all ``items``
// of them present and 16-byte aligned (load_items and store_items choose alike).
template <int ITEMS, class T>
constexpr int kStepWords = ITEMS * sizeof(T) % sizeof(Chunk16) == 0 ? ITEMS * sizeof(T) / sizeof(Chunk16) : 0;
template <int ITEMS, class T>
__device__ __forceinline__ bool steps_as_words(const T* at, Operand s, int items) {
  return s.t == 1 && items == ITEMS && reinterpret_cast<unsigned long long>(at) % sizeof(Chunk16) == 0;
}

// A lane's values of a (b, t, d) operand at ITEMS consecutive rows r0, r0 + 1, ... as floats (0 from
// item ``items`` on). Every load is issued before any value is used: a loop that loads a step's
// values and computes with them (a softplus, whose logf branches) or stores between steps waits a
// whole memory latency per step, since nvcc does not move a load above a branch or above a store
// it cannot prove to another address (the header: what that cost). The kernels load a chunk's
// values of every operand this way before computing with any of them.
// Where the steps are contiguous (a time stride of 1: mamba_ssm's (B, D, L) layout, which
// rnnops.compat.mamba_ssm passes as transposed views) a lane whose ITEMS steps all exist and start
// 16-byte aligned loads them as 16-byte words (ITEMS x the element size a multiple of 16: 8 half-type
// or 4 / 8 float steps): its lanes' addresses are a channel (T elements) apart, so element by element
// each warp-wide load touched 32 cache lines for 2 or 4 bytes a lane, where one word takes 16. The
// choice is per lane and predicated (no branch): the other lanes, and every lane of an operand in
// another layout, load element by element as before, in the same round.
template <int ITEMS, class T>
__device__ __forceinline__ void load_items(float (&v)[ITEMS], const T* p, Operand s, long long batch, long long r0,
                                           int d, int items) {
  const T* at = p + batch * s.b + r0 * s.t + d * s.d;
  constexpr int kWords = kStepWords<ITEMS, T>;
  bool whole = false;
  Chunk16 words[kWords > 0 ? kWords : 1];
  if constexpr (kWords > 0) {
    whole = steps_as_words<ITEMS>(at, s, items);
#pragma unroll
    for (int k = 0; k < kWords; ++k) words[k] = whole ? load16(at + k * (sizeof(Chunk16) / sizeof(T))) : Chunk16{};
  }
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) v[i] = !whole && i < items ? to_float(at[i * s.t]) : 0.0f;
  // (unpacked step by step: one T[ITEMS] copy of the words stopped g++ 12.2, the simulator's
  // compiler, with an internal compiler error)
  if constexpr (kWords > 0)
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      T step;
      memcpy(&step, reinterpret_cast<const char*>(words) + i * sizeof(T), sizeof(T));
      v[i] = whole ? to_float(step) : v[i];
    }
}

// The store of load_items: a lane's values v[0 .. items) to ITEMS consecutive rows r0, r0 + 1, ... of
// a (b, t, d) operand of type T. Where the steps are contiguous (the outputs and gradients take u's
// dimension order, so (B, D, L) inputs get (B, D, L) outputs) a lane whose ITEMS steps all exist and
// start 16-byte aligned stores them as 16-byte words, where element by element each warp-wide store
// wrote 2 or 4 bytes to each of 32 cache lines; other lanes store element by element.
template <int ITEMS, class T>
__device__ __forceinline__ void store_items(T* p, Operand s, long long batch, long long r0, int d, int items,
                                            const float (&v)[ITEMS]) {
  T* at = p + batch * s.b + r0 * s.t + d * s.d;
  constexpr int kWords = kStepWords<ITEMS, T>;
  if constexpr (kWords > 0)
    if (steps_as_words<ITEMS>(at, s, items)) {
      Chunk16 words[kWords];
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const T step = from_float<T>(v[i]);
        memcpy(reinterpret_cast<char*>(words) + i * sizeof(T), &step, sizeof(T));
      }
#pragma unroll
      for (int k = 0; k < kWords; ++k) store16(at + k * (sizeof(Chunk16) / sizeof(T)), words[k]);
      return;
    }
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
    if (i < items) at[i * s.t] = from_float<T>(v[i]);
}

// How many of a warp's ITEMS steps from step0 exist before the sequence's end eos (32-bit, so
// per-step tests inside the loop over n are cheap to recompute).
template <int ITEMS>
__device__ __forceinline__ int steps_before(long long step0, long long eos) {
  return static_cast<int>(min(max(eos - step0, 0LL), static_cast<long long>(ITEMS)));
}

struct ScanShape {
  int Dm, N;
  int packed;  // sequences packed along time in batch row 0
  int has_d, has_z, has_bias, softplus;
  int segments;  // runs of chunks a sequence is split into, walked by blocks of their own (block_span)
};

// A block's place: lane (= channel d) and warp, and the span of one sequence it walks, rows [bos,
// eos) of the packed time axis: the whole sequence, or with shape.segments > 1 segment k = blockIdx.y
// % segments of sequence blockIdx.y / segments, chunks [k per, (k + 1) per) of its ceil(length /
// chunk), per = ceil(chunks / segments) (the last segments shorter or empty). The sequence's
// tensors sit at batch row ``batch``, time ``t - offset``, ``rows`` long; the span's first chunk is
// global chunk ``first``, and its states (initial, final, a segment's) are row ``span`` of theirs.
// ``channel`` is d, or for a dead lane (d >= Dm) the last live channel, whose B / C rows it reads
// (and contributes 0).
struct BlockSpan {
  int lane, warp, d;
  bool live;  // d < Dm
  int channel, seq, span;
  long long bos, eos, batch, offset, first, rows;
};

__device__ __forceinline__ BlockSpan block_span(const ScanShape& shape, const int* cu_seqlens, const int* chunk_offsets,
                                                int chunk) {
  // (32-bit: cu_seqlens are int32; a 64-bit division by the runtime segment count cost the (8 warps,
  // 4 items) backward the registers it then spilled, 4 B on sm_90a)
  const int lane = threadIdx.x % 32, d = blockIdx.x * 32 + lane, span = blockIdx.y, seq = span / shape.segments;
  const int start = cu_seqlens[seq], end = cu_seqlens[seq + 1];
  const int per = ((end - start + chunk - 1) / chunk + shape.segments - 1) / shape.segments;
  const int skipped = (span % shape.segments) * per, bos = min(end, start + skipped * chunk);
  return BlockSpan{lane, static_cast<int>(threadIdx.x / 32), d, d < shape.Dm, min(d, shape.Dm - 1), seq, span, bos,
                   min(end, bos + per * chunk), shape.packed ? 0 : seq, shape.packed ? 0 : start,
                   chunk_offsets[seq] + skipped, end - start};
}

// Where a channel adds its gradient of a time-varying B or C ((rows, groups, N), fp32): the
// operand's group count and the channel's group (1 and 0 unless grouped).
struct BCGradRows {
  int groups, group;
  __device__ __forceinline__ float* at(float* grad, long long row, int N, int n) const {
    return grad + (row * groups + group) * N + n;
  }
};

__device__ __forceinline__ BCGradRows bc_grad_rows(const BCOperand& M, int Dm, int channel) {
  return M.mode == kGrouped ? BCGradRows{Dm / M.channels_per_group, channel / M.channels_per_group}
                            : BCGradRows{1, 0};
}

__device__ __forceinline__ float discretise(float raw, int softplus) { return softplus ? rnnops::softplus(raw) : raw; }

template <int WARPS>
struct SegmentSmem {
  float p[WARPS][32];
  float x[WARPS][32];
};

// ---------------------------------------------------------------- forward

constexpr float kLog2e = 1.4426950408889634f;

// The forward where every channel of the block reads the same B and C rows (the STAGED
// instantiation): the state elements, not the steps, are split over the warps. Per chunk of CHUNK
// steps the warps stage dt and dt u (each its ITEMS steps, [CHUNK][32]) and the chunk's B and C rows
// ([CHUNK][N4], step-major, N4 = N rounded up to 4) in shared memory; then each warp walks the whole
// chunk (in sub-blocks of up to 32 steps) for its groups of four state elements (groups warp,
// warp + WARPS, ...), four independent recurrences a lane with no barrier between steps, and sums
// their y terms per step in registers; the warps' sums meet in shared memory ([WARPS][CHUNK][32])
// and each warp adds D u, gates with z (staged with dt, in the input type: the output waits for no
// load) and writes its ITEMS steps. Two barriers a chunk (after the staging, after the sums), where
// splitting the steps took one per state element; about 7 SASS instructions per (step, channel,
// state element): an exponential, 4 FMUL / FFMA, and a 16-byte broadcast of B and of C per four
// elements. The state crossing chunk boundaries stays in shared memory ([N4][32]); inside the chunk
// loop only the element's owner reads and writes it.
template <class T, int WARPS, int ITEMS>
__device__ __forceinline__ void fwd_by_state_elements(
    const T* u, Operand su, const T* delta, Operand sdelta, const float* A, BCOperand Bm, BCOperand Cm, const float* D,
    const T* z, Operand sz, const float* delta_bias, T* out, Operand sout, float* chunk_states,
    const float* initial_state, float* final_state, const int* cu_seqlens, const int* chunk_offsets, ScanShape shape) {
  constexpr int CHUNK = WARPS * ITEMS, SUB = CHUNK < 32 ? CHUNK : 32;
  const int Dm = shape.Dm, N = shape.N, N4 = (N + 3) / 4 * 4;
  const auto [lane, warp, d, live, channel, seq, span, bos, eos, batch, offset, first, rows] =
      block_span(shape, cu_seqlens, chunk_offsets, CHUNK);
  const BCRows Brows = bc_rows(Bm, batch, channel), Crows = bc_rows(Cm, batch, channel);
  RNNOPS_DYNAMIC_SHARED(float, smem);  // carry, B and C rows, dt, dt u, the warps' y sums, z
  float *carry = smem, *Bstage = carry + N4 * 32, *Cstage = Bstage + CHUNK * N4;
  float *dt_stage = Cstage + CHUNK * N4, *dtu_stage = dt_stage + CHUNK * 32, *y_sums = dtu_stage + CHUNK * 32;
  // z as loaded (type T: for half types half the bytes of a float gate, 32 KB blocks where a float
  // gate made 34, three an SM on the GPUs of 100 KB), read back by the thread that staged it
  T* z_stage = reinterpret_cast<T*>(y_sums + WARPS * CHUNK * 32);

  for (int n = warp; n < N4; n += WARPS)  // (read after the first chunk's first barrier)
    carry[n * 32 + lane] = (live && initial_state && n < N) ? initial_state[(span * (long long)Dm + d) * N + n] : 0.0f;
  const float d_weight = (live && shape.has_d) ? D[d] : 0.0f;
  const float bias = (live && shape.has_bias) ? delta_bias[d] : 0.0f;
  for (long long t0 = bos; t0 < eos; t0 += CHUNK) {
    const long long chunk = first + (t0 - bos) / CHUNK, step0 = t0 + warp * ITEMS, r0 = step0 - offset;
    const int items = live ? steps_before<ITEMS>(step0, eos) : 0;
    // this warp's ITEMS steps: delta, u and z, then the chunk's B and C rows, all loads in flight
    // together; dt and dt u staged for every warp, z for the output (its own thread's), D u kept in
    // registers for it; steps past the end get dt = 0 (the identity step)
    float raw[ITEMS], uu[ITEMS], zz[ITEMS], y_direct[ITEMS];
    load_items(raw, delta, sdelta, batch, r0, d, items);
    load_items(uu, u, su, batch, r0, d, items);
    load_items(zz, z, sz, batch, r0, d, shape.has_z ? items : 0);  // (exact in T)
    stage_rows<CHUNK>(Bstage, Cstage, Brows, Crows, t0, eos, offset, N, N4);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int step = warp * ITEMS + i;
      const float dt = i < items ? discretise(raw[i] + bias, shape.softplus) : 0.0f;
      dt_stage[step * 32 + lane] = dt;
      dtu_stage[step * 32 + lane] = dt * uu[i];
      z_stage[step * 32 + lane] = from_float<T>(zz[i]);
      y_direct[i] = d_weight * uu[i];
    }
    __syncthreads();  // the staged chunk (every reader of the previous one passed the barrier below)

    for (int s0 = 0; s0 < CHUNK; s0 += SUB) {  // (sub-blocks of at most 32 steps: y's registers)
      float y[SUB];
#pragma unroll
      for (int s = 0; s < SUB; ++s) y[s] = 0.0f;
      for (int group = warp; 4 * group < N4; group += WARPS) {
        float x[4], a2[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int n = 4 * group + j;
          a2[j] = (live && n < N) ? A[d * N + n] * kLog2e : 0.0f;  // e^(dt A) = 2^(dt a2)
          x[j] = carry[n * 32 + lane];
        }
        if (s0 == 0 && chunk_states && live)  // (null where no backward will run)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            if (4 * group + j < N) chunk_states[(chunk * Dm + d) * N + 4 * group + j] = x[j];
#pragma unroll
        for (int s = 0; s < SUB; ++s) {
          const float dt = dt_stage[(s0 + s) * 32 + lane], dtu = dtu_stage[(s0 + s) * 32 + lane];
          const Chunk16 b = load16(Bstage + (s0 + s) * N4 + 4 * group);
          const Chunk16 c = load16(Cstage + (s0 + s) * N4 + 4 * group);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            x[j] = exp2_approx(dt * a2[j]) * x[j] + dtu * b.f[j];
            y[s] += x[j] * c.f[j];
          }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) carry[(4 * group + j) * 32 + lane] = x[j];
      }
#pragma unroll
      for (int s = 0; s < SUB; ++s) y_sums[(warp * CHUNK + s0 + s) * 32 + lane] = y[s];
    }
    __syncthreads();  // every warp's sums

    float values[ITEMS];  // (no loads from global memory between the stores)
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int step = warp * ITEMS + i;
      values[i] = y_direct[i];
#pragma unroll
      for (int w = 0; w < WARPS; ++w) values[i] += y_sums[(w * CHUNK + step) * 32 + lane];
      const float zz = to_float(z_stage[step * 32 + lane]);
      if (shape.has_z) values[i] *= zz * rnnops::sigmoid(zz);
    }
    store_items(out, sout, batch, r0, d, items, values);
  }
  if (final_state && live)
    for (int n = warp; n < N; n += WARPS)  // (written before the last chunk's second barrier, or above)
      final_state[(span * (long long)Dm + d) * N + n] = carry[n * 32 + lane];
}

template <class T, int WARPS, int ITEMS, bool STAGED>
__global__ void __launch_bounds__(WARPS * 32, 16 / WARPS)
    selective_scan_fwd(const T* u, Operand su, const T* delta, Operand sdelta, const float* A, BCOperand Bm,
                       BCOperand Cm, const float* D, const T* z, Operand sz, const float* delta_bias, T* out,
                       Operand sout, float* chunk_states, const float* initial_state, float* final_state,
                       const int* cu_seqlens, const int* chunk_offsets, ScanShape shape) {
  if constexpr (STAGED) {
    fwd_by_state_elements<T, WARPS, ITEMS>(u, su, delta, sdelta, A, Bm, Cm, D, z, sz, delta_bias, out, sout,
                                           chunk_states, initial_state, final_state, cu_seqlens, chunk_offsets, shape);
  } else {  // B and C read per lane from global memory: time split over the warps, as below
    constexpr int CHUNK = WARPS * ITEMS;
    const int Dm = shape.Dm, N = shape.N;
    const auto [lane, warp, d, live, channel, seq, span, bos, eos, batch, offset, first, rows] =
        block_span(shape, cu_seqlens, chunk_offsets, CHUNK);
    const BCRows Brows = bc_rows(Bm, batch, channel), Crows = bc_rows(Cm, batch, channel);

    // one barrier per state element: the segments alternate between two buffers (a warp writes
    // buffer n & 1 only after every warp has passed the barrier of element n - 1, so after it read
    // the buffer's previous use, element n - 2), and the state crossing chunk boundaries between two
    // [N][32] halves, read from carry_in and written to carry_out, swapped at the chunk's end
    RNNOPS_SHARED(SegmentSmem<WARPS>, segment, 2);
    RNNOPS_DYNAMIC_SHARED(float, smem);  // carry [2][N][32]
    float *carry_in = smem, *carry_out = smem + N * 32;

    if (warp == 0)
      for (int n = 0; n < N; ++n)
        carry_in[n * 32 + lane] = (live && initial_state) ? initial_state[(span * (long long)Dm + d) * N + n] : 0.0f;
    __syncthreads();

    const float d_weight = (live && shape.has_d) ? D[d] : 0.0f;
    const float bias = (live && shape.has_bias) ? delta_bias[d] : 0.0f;
    for (long long t0 = bos; t0 < eos; t0 += CHUNK) {
      const long long chunk = first + (t0 - bos) / CHUNK, step0 = t0 + warp * ITEMS, r0 = step0 - offset;
      const int items = live ? steps_before<ITEMS>(step0, eos) : 0;
      // per step, once for all n: dt, dt u, where B and C are read (delta and u loaded together
      // first); steps past the end get dt = 0 (the identity step: e^0 x + 0) and read the
      // sequence's first row
      float dt[ITEMS], dtu[ITEMS], y[ITEMS], dt_sum = 0.0f;
      load_items(dt, delta, sdelta, batch, r0, d, items);
      load_items(dtu, u, su, batch, r0, d, items);
      if (warp == 0 && live && chunk_states)  // (null where no backward will run)
        for (int n = 0; n < N; ++n) chunk_states[(chunk * Dm + d) * N + n] = carry_in[n * 32 + lane];
      unsigned Boff[ITEMS], Coff[ITEMS];  // bytes from the chunk's first row
      const char *Bchunk = reinterpret_cast<const char*>(Brows.row(t0 - offset)),
                 *Cchunk = reinterpret_cast<const char*>(Crows.row(t0 - offset));
  #pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        // (i < items, spelled from step0: written so, nvcc keeps the offsets below in registers; from
        // items it recomputed them in the loop over n, 25.8 SASS instructions an exponential, not 23.6)
        const bool on = live && step0 + i < eos;
        const float uu = dtu[i];
        dt[i] = on ? discretise(dt[i] + bias, shape.softplus) : 0.0f;
        dtu[i] = dt[i] * uu;
        dt_sum += dt[i];
        y[i] = d_weight * uu;
        Boff[i] = on ? (warp * ITEMS + i) * Brows.step_bytes : 0u;
        Coff[i] = on ? (warp * ITEMS + i) * Crows.step_bytes : 0u;
      }
      for (int n = 0; n < N; ++n) {
        const float a2 = live ? A[d * N + n] * kLog2e : 0.0f;  // e^(dt A) = 2^(dt a2)
        float a[ITEMS], inject[ITEMS], Cv[ITEMS];
        read_items<ITEMS>(inject, Bchunk, Brows, Boff, n);
        float x = 0.0f;
  #pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          a[i] = exp2_approx(dt[i] * a2);
          inject[i] *= dtu[i];
          x = a[i] * x + inject[i];
        }
        SegmentSmem<WARPS>& seg = segment[n & 1];
        seg.p[warp][lane] = exp2_approx(dt_sum * a2);  // the segment's decay, prod_i a_i
        seg.x[warp][lane] = x;
        __syncthreads();
        x = carry_in[n * 32 + lane];
  #pragma unroll
        for (int w = 0; w < WARPS - 1; ++w)
          if (w < warp) x = seg.p[w][lane] * x + seg.x[w][lane];
        read_items<ITEMS>(Cv, Cchunk, Crows, Coff, n);
  #pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          x = a[i] * x + inject[i];
          y[i] += x * Cv[i];
        }
        if (warp == WARPS - 1) carry_out[n * 32 + lane] = x;
      }
      float zz[ITEMS];  // (z's loads together, before the stores)
      load_items(zz, z, sz, batch, r0, d, shape.has_z ? items : 0);
  #pragma unroll
      for (int i = 0; i < ITEMS; ++i)
        if (shape.has_z) y[i] *= zz[i] * rnnops::sigmoid(zz[i]);
      store_items(out, sout, batch, r0, d, items, y);
      __syncthreads();  // the last warp's carry before the next chunk (and every read of carry_in)
      float* const swap = carry_in;
      carry_in = carry_out;
      carry_out = swap;
    }
    if (final_state && warp == 0 && live)
      for (int n = 0; n < N; ++n) final_state[(span * (long long)Dm + d) * N + n] = carry_in[n * 32 + lane];
  }
}

// ---------------------------------------------------------------- backward

// du, d delta and dz of one step and channel
struct StepGradients {
  float du, d_delta, dz;
};

// What a step's gradients take after the walk besides its sums over the state elements, staged per
// step and lane in shared memory ([3][CHUNK][32]): u, softplus' derivative at the step (1 without)
// and dz's factor d_out sig(z) (1 + z (1 - sig(z))), so that the gradients' stores wait for no
// global load. The staged backward then keeps each step's gradients in its slots (read only by the
// thread that writes them) and stores a chunk's at its end, a lane its ITEMS consecutive steps
// (store_items: 16-byte words where the steps are contiguous).
struct StepTerms {
  float* at;
  int steps;  // CHUNK
  __device__ __forceinline__ void stage(int slot, float u, float draw_factor, float dz_factor) const {
    at[slot] = u;
    at[steps * 32 + slot] = draw_factor;
    at[2 * steps * 32 + slot] = dz_factor;
  }
  // du, d delta and dz of the step and lane of ``slot``, from dt, dy and the sums sB = sum_n dx B,
  // sA = sum_n dx a x_{t-1} A, yC = sum_n x C; adds d delta to dbias
  __device__ __forceinline__ StepGradients gradients(int slot, float dt, float dy, float sB, float sA, float yC,
                                                     float d_weight, float& dbias) const {
    const float uu = at[slot], draw = (uu * sB + sA) * at[steps * 32 + slot];
    dbias += draw;
    return {dy * d_weight + dt * sB, draw, (yC + d_weight * uu) * at[2 * steps * 32 + slot]};
  }
  // whether a block keeps its chunk's gradients to store them as words at the chunk's end (the
  // gradients' steps contiguous, T's ITEMS steps filling whole 16-byte words), or stores each step's
  // at once (element by element either way: keeping them costs shared stores and a barrier a chunk)
  template <int ITEMS, class T>
  static __device__ __forceinline__ bool keeps(Operand sg) {
    return kStepWords<ITEMS, T> > 0 && sg.t == 1;
  }
  __device__ __forceinline__ void keep(int slot, const StepGradients& g) const {
    at[slot] = g.du;
    at[steps * 32 + slot] = g.d_delta;
    at[2 * steps * 32 + slot] = g.dz;
  }
  // the kept gradients of this lane's ITEMS steps from step first (``items`` of them exist) to du,
  // d delta and dz, at rows r0, r0 + 1, ... of the gradients' layout sg
  template <int ITEMS, class T>
  __device__ __forceinline__ void store_kept(T* du, T* d_delta, T* dz, Operand sg, long long batch, long long r0,
                                             int d, int items, int first, int lane, int has_z) const {
    T* const to[3] = {du, d_delta, dz};
    for (int k = 0; k < (has_z ? 3 : 2); ++k) {
      float v[ITEMS];
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) v[i] = at[(k * steps + first + i) * 32 + lane];
      store_items(to[k], sg, batch, r0, d, items, v);
    }
  }
  // the gradients of one step at row ``row`` of the gradients' layout sg
  template <class T>
  static __device__ __forceinline__ void store_step(T* du, T* d_delta, T* dz, Operand sg, long long batch,
                                                    long long row, int d, const StepGradients& g, int has_z) {
    const long long at = batch * sg.b + row * sg.t + d * sg.d;
    du[at] = from_float<T>(g.du);
    d_delta[at] = from_float<T>(g.d_delta);
    if (has_z) dz[at] = from_float<T>(g.dz);
  }
};

// The backward's inputs of a warp's ITEMS steps from row r0, ``items`` of which exist: delta, u,
// d_out, z and delta at ``after_row`` (where ``has_after``), every load issued, nothing computed
// from them (the staged backward stages its chunk's state and rows while they are in flight).
template <int ITEMS>
struct StepLoads {
  float delta[ITEMS], u[ITEMS], d_out[ITEMS], z[ITEMS], delta_after[1];
};

template <int ITEMS, class T>
__device__ __forceinline__ StepLoads<ITEMS> load_step_inputs(const T* u, Operand su, const T* delta, Operand sdelta,
                                                             const T* z, Operand sz, const T* d_out, Operand sdo,
                                                             long long batch, long long r0, int d, int items,
                                                             long long after_row, bool has_after, int has_z) {
  StepLoads<ITEMS> in;
  load_items(in.delta, delta, sdelta, batch, r0, d, items);
  load_items(in.u, u, su, batch, r0, d, items);
  load_items(in.d_out, d_out, sdo, batch, r0, d, items);
  load_items(in.z, z, sz, batch, r0, d, has_z ? items : 0);
  load_items(in.delta_after, delta, sdelta, batch, after_row, d, has_after);
  return in;
}

// From a warp's loaded step inputs (the steps from ``items`` on get dt = u = dy = 0, the identity
// step): dt, dt u and dy = d_out silu(z) in registers, the step terms staged at slots (slot0 + i) *
// 32 + lane, and dD's part dy u added to dD. Returns dt at the row after (0 without ``has_after``).
template <int ITEMS>
__device__ __forceinline__ float backward_step_inputs(float (&dt)[ITEMS], float (&dtu)[ITEMS], float (&dy)[ITEMS],
                                                      const StepLoads<ITEMS>& in, const StepTerms& terms, int slot0,
                                                      float& dD, int items, bool has_after, float bias,
                                                      const ScanShape& shape) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const float raw = in.delta[i] + bias, gout = in.d_out[i], zz = in.z[i], uu = in.u[i];
    const float sig = shape.has_z ? rnnops::sigmoid(zz) : 0.0f;
    dt[i] = i < items ? discretise(raw, shape.softplus) : 0.0f;
    dtu[i] = dt[i] * uu;
    dy[i] = shape.has_z ? gout * zz * sig : gout;
    dD += dy[i] * uu;
    terms.stage((slot0 + i) * 32 + lane, uu, shape.softplus ? rnnops::sigmoid(raw) : 1.0f,
                gout * sig * (1.0f + zz * (1.0f - sig)));
  }
  return has_after ? discretise(in.delta_after[0] + bias, shape.softplus) : 0.0f;
}

// Sums v[0..V) over the 32 lanes of a warp by recursive halving (every lane must call): each of
// the log2(V) halving rounds trades half of a lane's values with its partner, so lane L ends
// with item L / (32 / V) summed over the lanes sharing its upper bits, and the remaining rounds
// complete that sum over the whole warp. Returns, in lane L, the warp's total of item
// L / (32 / V): V - 1 + log2(32 / V) shuffles per lane where one sum per item takes 5 V.
// One halving round of warp_reduce_scatter, then the rest (each round's width a template
// argument, so every loop unrolls and v stays in registers: with the round's width a loop
// variable nvcc kept v[32] in local memory).
template <int V, int WIDTH, int OFFSET>
__device__ __forceinline__ void halve(float (&v)[V], int lane) {
  if constexpr (WIDTH > 1) {
    const bool upper = lane & OFFSET;
#pragma unroll
    for (int j = 0; j < WIDTH / 2; ++j) {
      const float send = upper ? v[j] : v[j + WIDTH / 2];
      const float keep = upper ? v[j + WIDTH / 2] : v[j];
      v[j] = keep + __shfl_xor_sync(0xffffffffu, send, OFFSET);
    }
    halve<V, WIDTH / 2, OFFSET / 2>(v, lane);
  }
}

template <int V>
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[V]) {
  static_assert(V >= 1 && V <= 32 && (V & (V - 1)) == 0, "V: a power of two up to 32");
  const int lane = threadIdx.x % 32;
  halve<V, V, 16>(v, lane);
  float total = v[0];
#pragma unroll
  for (int offset = 16 / V; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
  return total;
}

// The gradient of a time-varying B or C: its per-step, per-channel terms (ITEMS steps of this
// warp, element n) added into the fp32 (rows, groups, N) buffer, summed over the warp first when its
// channels share the row (one atomic per step), else one atomic per live lane and step.
template <int ITEMS>
__device__ __forceinline__ void add_bc_gradient(float* grad, float (&terms)[ITEMS], bool per_warp, long long first_row,
                                                int steps, int items, BCGradRows to, int N, int n) {
  // steps: the warp's steps that exist; items: those this lane computed (0 for a dead lane)
  if (per_warp) {
    const int lane = threadIdx.x % 32, item = lane / (32 / ITEMS);
    const float total = warp_reduce_scatter(terms);
    if (lane % (32 / ITEMS) == 0 && item < steps) atomicAdd(to.at(grad, first_row + item, N, n), total);
    return;
  }
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
    if (i < items) atomicAdd(to.at(grad, first_row + i, N, n), terms[i]);
}

// The gradient of shared B or C rows from one warp's group of four state elements (n0 .. n0 + 3)
// over SUB steps (terms[4 i + j]: step i, element n0 + j), summed over the warp's lanes (its
// channels) by recursive halving: one atomic per step and state element.
template <int SUB>
__device__ __forceinline__ void add_group_gradient(float* grad, float (&terms)[4 * SUB], long long first_row, int steps,
                                                   BCGradRows to, int N, int n0) {
  constexpr int V = 4 * SUB;
  const int lane = threadIdx.x % 32, item = lane / (32 / V), i = item / 4, n = n0 + item % 4;
  const float total = warp_reduce_scatter(terms);
  if (lane % (32 / V) == 0 && i < steps && n < N) atomicAdd(to.at(grad, first_row + i, N, n), total);
}

// The backward where every channel of the block reads the same B and C rows (STAGED), the state
// elements split over the warps as in fwd_by_state_elements. Per chunk (last first) the warps
// stage dt, dt u and dy (their ITEMS steps, [CHUNK][32]) and the B and C rows ([CHUNK][N4]); each
// warp replays the forward over the chunk for its groups of four state elements from the stored
// chunk state, keeping the state entering each sub-block of SUB steps. Then the sub-blocks, last
// first, in step across the warps: each warp replays a sub-block for each of its groups (states
// and decays in registers) and runs the adjoint dx_t = dy_t C_t + a_{t+1} dx_{t+1} back through it,
// taking dA per lane, dB and dC summed over its lanes (add_group_gradient) and, per step, its
// elements' sums of dx B, dx a_t x_{t-1} A and x C; after a barrier the warps' sums give du, d dt
// and dz of the sub-block's steps, from dt, dy and the step terms (u, softplus' derivative, dz's
// factor) staged with the chunk. One barrier a sub-block and two a chunk (before the staging, which
// overwrites what the chunk after's last steps read, and after it), where splitting the steps took
// two per state element. Per group and lane in shared memory, touched by its owner only: the
// carried gradient, the decay of the step after the sub-block, dA and the sub-block
// states. A warp's per-step sums over its groups add up in registers and go to shared memory once a
// sub-block, alternating between two buffers by sub-block parity: added there step by step (a load
// and a store a step and sum), each step's shared loads waited behind the step before's stores, which
// nvcc does not move a load across (SASS, bf16 4 x 8, sm_90a: rounds of 5-8 loads a step; now the
// sub-block's loads issue in one round of 36, and the loop stores 12 values, not 36). dB and dC are
// halved over the lanes per half sub-block (HALF steps), so that 16 of their terms are live, not 32:
// the registers the sums take (246 backward, was 248).
template <class T, int WARPS, int ITEMS>
__device__ __forceinline__ void bwd_by_state_elements(
    const T* u, Operand su, const T* delta, Operand sdelta, const float* A, BCOperand Bm, BCOperand Cm, const float* D,
    const T* z, Operand sz, const float* delta_bias, const T* d_out, Operand sdo, const float* chunk_states,
    const float* d_final, float* d_initial, T* du, T* d_delta, T* dz, Operand sgrad, float* dA, float* dB, float* dC,
    float* dD, float* d_bias, const int* cu_seqlens, const int* chunk_offsets, ScanShape shape) {
  constexpr int CHUNK = WARPS * ITEMS, SUB = CHUNK < 8 ? CHUNK : 8, SUBS = CHUNK / SUB, HALF = SUB < 4 ? SUB : SUB / 2;
  const int Dm = shape.Dm, N = shape.N, N4 = (N + 3) / 4 * 4;
  const auto [lane, warp, d, live, channel, seq, span, bos, eos, batch, offset, first, rows] =
      block_span(shape, cu_seqlens, chunk_offsets, CHUNK);
  const BCRows Brows = bc_rows(Bm, batch, channel), Crows = bc_rows(Cm, batch, channel);
  const long long rows_per_batch = shape.packed ? 0 : rows;
  const BCGradRows gB = bc_grad_rows(Bm, Dm, channel), gC = bc_grad_rows(Cm, Dm, channel);
  RNNOPS_DYNAMIC_SHARED(float, smem);  // as rnnops.cuda_backend.selective_scan.dynamic_shared_bytes counts it
  float *dcarry = smem, *a_after = dcarry + N4 * 32, *dA_acc = a_after + N4 * 32;  // [N4][32] each
  float* starts = dA_acc + N4 * 32;  // [SUBS][N4][32]: the state entering each sub-block
  float *Bstage = starts + SUBS * N4 * 32, *Cstage = Bstage + CHUNK * N4;
  float *dt_stage = Cstage + CHUNK * N4, *dtu_stage = dt_stage + CHUNK * 32, *dy_stage = dtu_stage + CHUNK * 32;
  const StepTerms terms{dy_stage + CHUNK * 32, CHUNK};  // [3][CHUNK][32]
  float* sums = terms.at + 3 * CHUNK * 32;  // [2][3][WARPS][SUB][32]: dx B, dx a x_{t-1} A, x C

  for (int group = warp; 4 * group < N4; group += WARPS)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = 4 * group + j;
      dcarry[n * 32 + lane] = (live && d_final && n < N) ? d_final[(span * (long long)Dm + d) * N + n] : 0.0f;
      dA_acc[n * 32 + lane] = 0.0f;
    }
  const float d_weight = (live && shape.has_d) ? D[d] : 0.0f;
  const float bias = (live && shape.has_bias) ? delta_bias[d] : 0.0f;
  float dD_acc = 0.0f, dbias_acc = 0.0f;
  int parity = 0;
  const bool keep_steps = StepTerms::keeps<ITEMS, T>(sgrad);  // (the same for every thread of the block)
  const long long chunks = (eos - bos + CHUNK - 1) / CHUNK;
  for (long long c = chunks - 1; c >= 0; --c) {
    const long long t0 = bos + c * CHUNK, first_row = batch * rows_per_batch + (t0 - offset);
    const int steps = static_cast<int>(min(eos - t0, static_cast<long long>(CHUNK)));
    const long long step0 = t0 + warp * ITEMS, r0 = step0 - offset;
    const int items = live ? steps_before<ITEMS>(step0, eos) : 0;
    if (c < chunks - 1) __syncthreads();  // the chunk after's last steps read dt, dy and the step terms
    // this warp's ITEMS steps (load_step_inputs), the state entering the chunk (the first
    // sub-block's start) and the B and C rows: every load in flight together (one memory latency a
    // chunk); then dt, dt u and dy of the warp's steps staged for every warp
    const bool has_after = live && t0 + CHUNK < eos;
    const StepLoads<ITEMS> loaded = load_step_inputs<ITEMS>(u, su, delta, sdelta, z, sz, d_out, sdo, batch, r0, d,
                                                            items, t0 + CHUNK - offset, has_after, shape.has_z);
    stage_rows<CHUNK, true>(Bstage, Cstage, Brows, Crows, t0, eos, offset, N, N4,
                            chunk_states + ((first + c) * Dm + blockIdx.x * 32LL) * N, starts,
                            min(32, Dm - static_cast<int>(blockIdx.x) * 32));
    float dt[ITEMS], dtu[ITEMS], dy[ITEMS];
    const float dt_after =
        backward_step_inputs(dt, dtu, dy, loaded, terms, warp * ITEMS, dD_acc, items, has_after, bias, shape);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      dt_stage[(warp * ITEMS + i) * 32 + lane] = dt[i];
      dtu_stage[(warp * ITEMS + i) * 32 + lane] = dtu[i];
      dy_stage[(warp * ITEMS + i) * 32 + lane] = dy[i];
    }
    __syncthreads();  // the staged chunk (its previous readers passed the last sub-block's barrier)

    // the states entering the sub-blocks, from the chunk's stored state
    for (int group = warp; 4 * group < N4; group += WARPS) {
      float x[4], a2[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = 4 * group + j;
        a2[j] = (live && n < N) ? A[d * N + n] * kLog2e : 0.0f;
        x[j] = starts[n * 32 + lane];  // (sub-block 0's, staged)
        a_after[n * 32 + lane] = exp2_approx(dt_after * a2[j]);
      }
      for (int sb = 0; sb + 1 < SUBS; ++sb) {
#pragma unroll
        for (int i = 0; i < SUB; ++i) {
          const int s = sb * SUB + i;
          const float dt = dt_stage[s * 32 + lane], dtu = dtu_stage[s * 32 + lane];
          const Chunk16 b = load16(Bstage + s * N4 + 4 * group);
#pragma unroll
          for (int j = 0; j < 4; ++j) x[j] = exp2_approx(dt * a2[j]) * x[j] + dtu * b.f[j];
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) starts[((sb + 1) * N4 + 4 * group + j) * 32 + lane] = x[j];
      }
    }

    for (int sb = SUBS - 1; sb >= 0; --sb, parity ^= 1) {
      float* part = sums + parity * 3 * WARPS * SUB * 32;  // [3][WARPS][SUB][32]
      float step_sums[3][SUB] = {};  // this warp's groups' sums per step (dx B, dx a x_{t-1} A, x C)
      for (int group = warp; 4 * group < N4; group += WARPS) {
        float an[4], a2[4], xs[SUB][4], as[SUB][4], dx[4], next_a[4], dA_part[4], start[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int n = 4 * group + j;
          an[j] = (live && n < N) ? A[d * N + n] : 0.0f;
          a2[j] = an[j] * kLog2e;
          dx[j] = dcarry[n * 32 + lane];  // at the step after the sub-block
          next_a[j] = a_after[n * 32 + lane];
          start[j] = starts[(sb * N4 + n) * 32 + lane];
          dA_part[j] = 0.0f;
        }
#pragma unroll
        for (int i = 0; i < SUB; ++i) {  // replay: x_t and a_t = e^(dt_t A) of the sub-block
          const int s = sb * SUB + i;
          const float dt = dt_stage[s * 32 + lane], dtu = dtu_stage[s * 32 + lane];
          const Chunk16 b = load16(Bstage + s * N4 + 4 * group);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            as[i][j] = exp2_approx(dt * a2[j]);
            xs[i][j] = as[i][j] * (i > 0 ? xs[i - 1][j] : start[j]) + dtu * b.f[j];
          }
        }
        float dB_terms[4 * HALF], dC_terms[4 * HALF];  // of the half sub-block being walked
#pragma unroll
        for (int i = SUB - 1; i >= 0; --i) {  // the adjoint, backwards
          const int s = sb * SUB + i, h = i % HALF;
          const float dt = dt_stage[s * 32 + lane], dtu = dtu_stage[s * 32 + lane], dy = dy_stage[s * 32 + lane];
          const Chunk16 b = load16(Bstage + s * N4 + 4 * group);
          const Chunk16 cc = load16(Cstage + s * N4 + 4 * group);
          float sB = 0.0f, sA = 0.0f, yC = 0.0f;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            dx[j] = dy * cc.f[j] + next_a[j] * dx[j];
            next_a[j] = as[i][j];
            const float decayed = as[i][j] * (i > 0 ? xs[i - 1][j] : start[j]);  // a_t x_{t-1}
            dA_part[j] += dx[j] * decayed * dt;
            sB += dx[j] * b.f[j];
            sA += dx[j] * decayed * an[j];
            yC += xs[i][j] * cc.f[j];
            dB_terms[4 * h + j] = dx[j] * dtu;
            dC_terms[4 * h + j] = dy * xs[i][j];
          }
          step_sums[0][i] += sB;
          step_sums[1][i] += sA;
          step_sums[2][i] += yC;
          if (h == 0) {  // the half's first step: its dB and dC terms are complete
            add_group_gradient<HALF>(dB, dB_terms, first_row + s, steps - s, gB, N, 4 * group);
            add_group_gradient<HALF>(dC, dC_terms, first_row + s, steps - s, gC, N, 4 * group);
          }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int n = 4 * group + j;
          dcarry[n * 32 + lane] = dx[j];  // at the sub-block's first step
          a_after[n * 32 + lane] = next_a[j];  // its decay
          dA_acc[n * 32 + lane] += dA_part[j];
          if (c == 0 && sb == 0 && d_initial && live && n < N)  // x_{-1} = the initial state
            d_initial[(span * (long long)Dm + d) * N + n] = next_a[j] * dx[j];
        }
      }
#pragma unroll
      for (int k = 0; k < 3; ++k)
#pragma unroll
        for (int i = 0; i < SUB; ++i) part[((k * WARPS + warp) * SUB + i) * 32 + lane] = step_sums[k][i];
      __syncthreads();  // every warp's sums of the sub-block
      for (int i = warp; i < SUB; i += WARPS) {  // its steps: du, d dt, dz from the sums over n
        const int s = sb * SUB + i;
        const long long t = t0 + s;
        if (!(live && t < eos)) continue;
        float sB = 0.0f, sA = 0.0f, yC = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
          sB += part[((0 * WARPS + w) * SUB + i) * 32 + lane];
          sA += part[((1 * WARPS + w) * SUB + i) * 32 + lane];
          yC += part[((2 * WARPS + w) * SUB + i) * 32 + lane];
        }
        const StepGradients g = terms.gradients(s * 32 + lane, dt_stage[s * 32 + lane], dy_stage[s * 32 + lane], sB,
                                                sA, yC, d_weight, dbias_acc);
        if (keep_steps)
          terms.keep(s * 32 + lane, g);
        else
          StepTerms::store_step(du, d_delta, dz, sgrad, batch, t - offset, d, g, shape.has_z);
      }
    }
    if (keep_steps) {
      __syncthreads();  // every step's gradients kept
      terms.store_kept<ITEMS>(du, d_delta, dz, sgrad, batch, r0, d, items, warp * ITEMS, lane, shape.has_z);
    }
  }
  if (chunks == 0 && d_initial && live)  // an empty sequence: the initial state is the final one
    for (int n = warp; n < N; n += WARPS) {
      const long long at = (span * (long long)Dm + d) * N + n;
      d_initial[at] = d_final ? d_final[at] : 0.0f;
    }
  for (int group = warp; 4 * group < N4; group += WARPS)
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (live && 4 * group + j < N) atomicAdd(dA + d * N + 4 * group + j, dA_acc[(4 * group + j) * 32 + lane]);
  // dD and d_bias: over the warps (lanes are channels), then across sequences
  __syncthreads();  // every warp's last reads of the sums
  sums[warp * 32 + lane] = dD_acc;
  sums[(WARPS + warp) * 32 + lane] = dbias_acc;
  __syncthreads();
  if (warp == 0 && live) {
    float total_d = 0.0f, total_bias = 0.0f;
    for (int w = 0; w < WARPS; ++w) {
      total_d += sums[w * 32 + lane];
      total_bias += sums[(WARPS + w) * 32 + lane];
    }
    if (shape.has_d) atomicAdd(dD + d, total_d);
    if (shape.has_bias) atomicAdd(d_bias + d, total_bias);
  }
}

// (an explicit minimum of one block: without it ptxas held (4 warps, 4 items) at 168 registers
// and spilled 12 B)
template <class T, int WARPS, int ITEMS, bool STAGED>
__global__ void __launch_bounds__(WARPS * 32, 1)
    selective_scan_bwd(const T* u, Operand su, const T* delta, Operand sdelta, const float* A, BCOperand Bm,
                       BCOperand Cm, const float* D, const T* z, Operand sz, const float* delta_bias, const T* d_out,
                       Operand sdo, const float* chunk_states, const float* d_final, float* d_initial, T* du,
                       T* d_delta, T* dz, Operand sgrad, float* dA, float* dB, float* dC, float* dD, float* d_bias,
                       const int* cu_seqlens, const int* chunk_offsets, ScanShape shape) {
  if constexpr (STAGED) {
    bwd_by_state_elements<T, WARPS, ITEMS>(u, su, delta, sdelta, A, Bm, Cm, D, z, sz, delta_bias, d_out, sdo,
                                           chunk_states, d_final, d_initial, du, d_delta, dz, sgrad, dA, dB, dC, dD,
                                           d_bias, cu_seqlens, chunk_offsets, shape);
  } else {  // B and C read per lane from global memory: time split over the warps, as below
    // du, d_delta, dz: of type T, in the (b, t, d) layout sgrad (the op gives them u's dimension order); dA (Dm, N),
    // dD, d_bias (Dm): summed over sequences; dB, dC in B's / C's layout, contiguous, fp32.
    constexpr int CHUNK = WARPS * ITEMS;
    const int Dm = shape.Dm, N = shape.N;
    const auto [lane, warp, d, live, channel, seq, span, bos, eos, batch, offset, first, rows] =
        block_span(shape, cu_seqlens, chunk_offsets, CHUNK);
    const BCRows Brows = bc_rows(Bm, batch, channel), Crows = bc_rows(Cm, batch, channel);
    const long long rows_per_batch = shape.packed ? 0 : rows;
    const bool B_per_warp = block_shares_row(Bm, Dm), C_per_warp = block_shares_row(Cm, Dm);
    const BCGradRows gB = bc_grad_rows(Bm, Dm, channel), gC = bc_grad_rows(Cm, Dm, channel);

    // two barriers per state element, one per phase (replay, adjoint), each phase with buffers of
    // its own: a warp writes a phase's buffer for element n + 1 only after passing the barrier of
    // the other phase after it, which every warp reaches after reading it. The carried gradient
    // alternates between two halves by chunk parity (chunk c reads the half chunk c + 1 wrote and
    // writes the other, which no warp reads again until every warp has left chunk c + 1), and warp
    // 0 sums the warps' dA parts of an element after the next element's replay barrier (the
    // parts are written after the adjoint barrier), so no third barrier orders them (it had
    // been one of three a state element)
    RNNOPS_SHARED(SegmentSmem<WARPS>, replay, 1);
    RNNOPS_SHARED(SegmentSmem<WARPS>, adjoint, 1);
    RNNOPS_SHARED(float, head_a, WARPS * 32);    // e^(dt A) at each warp's first item (replay phase)
    RNNOPS_SHARED(float, dA_parts, WARPS * 32);  // each warp's dA part of the element last walked
    RNNOPS_DYNAMIC_SHARED(float, smem);
    float* dcarry = smem;                // [2][N][32]: dx at the first step of the chunk after this one
    float* dA_acc = smem + 2 * N * 32;   // [N][32]
    float* first_a = smem + 3 * N * 32;  // [N][32]: e^(dt A) of the sequence's first step
    const StepTerms terms{smem + 4 * N * 32, CHUNK};  // [3][CHUNK][32], each lane its own steps'
    const long long chunks = (eos - bos + CHUNK - 1) / CHUNK;

    if (warp == 0)
      for (int n = 0; n < N; ++n) {
        dcarry[(chunks & 1) * N * 32 + n * 32 + lane] =
            (live && d_final) ? d_final[(span * (long long)Dm + d) * N + n] : 0.0f;
        dA_acc[n * 32 + lane] = 0.0f;
        first_a[n * 32 + lane] = 1.0f;
      }
    __syncthreads();

    const float d_weight = (live && shape.has_d) ? D[d] : 0.0f;
    const float bias = (live && shape.has_bias) ? delta_bias[d] : 0.0f;
    float dD_acc = 0.0f, dbias_acc = 0.0f, dB_static = 0.0f, dC_static = 0.0f;
    int pending = -1;  // (warp 0) the element whose dA parts are in dA_parts, not yet added
    // lane and warp are passed: capturing structured bindings is C++20, which NVRTC (C++17) refuses
    const auto add_pending_dA = [&](int lane_index, int warp_index) {
      if (warp_index == 0 && pending >= 0) {
        float total = 0.0f;
        for (int w = 0; w < WARPS; ++w) total += dA_parts[w * 32 + lane_index];
        dA_acc[pending * 32 + lane_index] += total;
      }
    };
    for (long long c = chunks - 1; c >= 0; --c) {
      const float* dcarry_in = dcarry + ((c + 1) & 1) * N * 32;  // written by chunk c + 1 (or d_final)
      float* dcarry_out = dcarry + (c & 1) * N * 32;
      const long long t0 = bos + c * CHUNK, step0 = t0 + warp * ITEMS;
      // per step, once for all n (backward_step_inputs; steps past the end read the chunk's first
      // rows); over n, sB sums dx B, sA dx a_t x_{t-1} A and y x C, from which du, d dt and dz follow
      // after the loop; dt_after: dt of the step after this warp's last item
      float dt[ITEMS], dtu[ITEMS], dy[ITEMS], y[ITEMS], sB[ITEMS], sA[ITEMS], dt_sum = 0.0f;
      unsigned Boff[ITEMS], Coff[ITEMS];  // bytes from the chunk's first row
      const char *Bchunk = reinterpret_cast<const char*>(Brows.row(t0 - offset)),
                 *Cchunk = reinterpret_cast<const char*>(Crows.row(t0 - offset));
      const int steps = steps_before<ITEMS>(step0, eos), items = live ? steps : 0;
      const long long r0 = step0 - offset;
      const bool has_after = live && step0 + ITEMS < eos;
      const float dt_after = backward_step_inputs(
          dt, dtu, dy,
          load_step_inputs<ITEMS>(u, su, delta, sdelta, z, sz, d_out, sdo, batch, r0, d, items, r0 + ITEMS, has_after,
                                  shape.has_z),
          terms, warp * ITEMS, dD_acc, items, has_after, bias, shape);
  #pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        dt_sum += dt[i];
        y[i] = sB[i] = sA[i] = 0.0f;
        Boff[i] = i < items ? (warp * ITEMS + i) * Brows.step_bytes : 0u;
        Coff[i] = i < items ? (warp * ITEMS + i) * Crows.step_bytes : 0u;
      }
      for (int n = 0; n < N; ++n) {
        const float a_n = live ? A[d * N + n] : 0.0f, a2 = a_n * kLog2e;  // e^(dt A) = 2^(dt a2)
        // replay the forward inside the chunk: this warp's segment from a zero carry
        float a[ITEMS], Bv[ITEMS], Cv[ITEMS], x[ITEMS], dyC[ITEMS];
        read_items<ITEMS>(Bv, Bchunk, Brows, Boff, n);
        float acc = 0.0f;
  #pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          a[i] = exp2_approx(dt[i] * a2);
          acc = a[i] * acc + dtu[i] * Bv[i];
        }
        replay->p[warp][lane] = exp2_approx(dt_sum * a2);
        replay->x[warp][lane] = acc;
        head_a[warp * 32 + lane] = a[0];
        __syncthreads();
        add_pending_dA(lane, warp);  // the element before's, every warp's part written before this barrier
        float state = live ? chunk_states[((first + c) * Dm + d) * N + n] : 0.0f;
  #pragma unroll
        for (int w = 0; w < WARPS - 1; ++w)
          if (w < warp) state = replay->p[w][lane] * state + replay->x[w][lane];
        read_items<ITEMS>(Cv, Cchunk, Crows, Coff, n);
        const float x_in = state;  // entering the segment
  #pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          state = a[i] * state + dtu[i] * Bv[i];
          x[i] = state;
          y[i] += state * Cv[i];
          dyC[i] = dy[i] * Cv[i];
        }
        const float a_after = warp < WARPS - 1 ? head_a[(warp + 1) * 32 + lane] : exp2_approx(dt_after * a2);
        // the adjoint recurrence dx_t = dy_t C_t + a_{t+1} dx_{t+1}, this warp's segment from a zero carry
        float next_a = a_after, g = 0.0f;
  #pragma unroll
        for (int i = ITEMS - 1; i >= 0; --i) {
          g = dyC[i] + next_a * g;
          next_a = a[i];
        }
        adjoint->p[warp][lane] = exp2_approx((dt_sum - dt[0] + dt_after) * a2);  // a_after a_{ITEMS-1} ... a_1
        adjoint->x[warp][lane] = g;
        __syncthreads();
        float dx = dcarry_in[n * 32 + lane];  // dx at the step after this warp's segment
  #pragma unroll
        for (int w = WARPS - 1; w > 0; --w)
          if (w > warp) dx = adjoint->x[w][lane] + adjoint->p[w][lane] * dx;
        float dA_part = 0.0f, dB_terms[ITEMS], dC_terms[ITEMS];
        next_a = a_after;
  #pragma unroll
        for (int i = ITEMS - 1; i >= 0; --i) {
          dx = dyC[i] + next_a * dx;
          next_a = a[i];
          // a_t x_{t-1} as the product: as x_t - dt_t u_t B_t it cancelled to nothing where the decay
          // is strong (a_t x_{t-1} far below x_t), losing dA and d dt's A term (dA 0 where it was
          // 1e-13 .. 1e-33, relative error 1.5e-3 where 5e-7: A ~ -40, dt ~ 1)
          const float decayed = a[i] * (i > 0 ? x[i - 1] : x_in);
          const float dx_decayed = dx * decayed;
          sB[i] += dx * Bv[i];
          sA[i] += dx_decayed * a_n;
          dA_part += dx_decayed * dt[i];
          dB_terms[i] = dx * dtu[i];
          dC_terms[i] = dy[i] * x[i];
        }
        const long long first_row = batch * rows_per_batch + (step0 - offset);
        if (Bm.mode == kStatic) {
  #pragma unroll
          for (int i = 0; i < ITEMS; ++i) dB_static += dB_terms[i];
        } else {
          add_bc_gradient(dB, dB_terms, B_per_warp, first_row, steps, items, gB, N, n);
        }
        if (Cm.mode == kStatic) {
  #pragma unroll
          for (int i = 0; i < ITEMS; ++i) dC_static += dC_terms[i];
        } else {
          add_bc_gradient(dC, dC_terms, C_per_warp, first_row, steps, items, gC, N, n);
        }
        dA_parts[warp * 32 + lane] = dA_part;
        pending = n;
        if (warp == 0) {
          dcarry_out[n * 32 + lane] = dx;  // dx at the chunk's first step
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
      }
      float g_du[ITEMS], g_delta[ITEMS], g_z[ITEMS];
  #pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        StepGradients g{0.0f, 0.0f, 0.0f};
        if (i < items)
          g = terms.gradients((warp * ITEMS + i) * 32 + lane, dt[i], dy[i], sB[i], sA[i], y[i], d_weight, dbias_acc);
        g_du[i] = g.du;
        g_delta[i] = g.d_delta;
        g_z[i] = g.dz;
      }
      store_items(du, sgrad, batch, r0, d, items, g_du);
      store_items(d_delta, sgrad, batch, r0, d, items, g_delta);
      if (shape.has_z) store_items(dz, sgrad, batch, r0, d, items, g_z);
    }
    // block totals: dD and d_bias over warps (lanes are channels), then across sequences (in the
    // replay buffers, which every warp last read before the last element's adjoint barrier)
    replay->x[warp][lane] = dD_acc;
    replay->p[warp][lane] = dbias_acc;
    __syncthreads();
    add_pending_dA(lane, warp);
    if (warp == 0 && live) {
      float total_d = 0.0f, total_bias = 0.0f;
      for (int w = 0; w < WARPS; ++w) {
        total_d += replay->x[w][lane];
        total_bias += replay->p[w][lane];
      }
      if (shape.has_d) atomicAdd(dD + d, total_d);
      if (shape.has_bias) atomicAdd(d_bias + d, total_bias);
      for (int n = 0; n < N; ++n) {
        atomicAdd(dA + d * N + n, dA_acc[n * 32 + lane]);
        if (d_initial)  // chunk 0's carried gradient
          d_initial[(span * (long long)Dm + d) * N + n] = first_a[n * 32 + lane] * dcarry[n * 32 + lane];
      }
    }
  }
}

// ---------------------------------------------------------------- segments
//
// A sequence split into shape.segments runs of chunks (block_span), walked in parallel: for batches
// too small to fill the GPU (B x Dm / 32 blocks; Mamba at batch 1 and Dm 2048: 64 blocks, half an
// H100's SMs idle, each walking every step). The main kernels then walk each segment from the
// state entering it (forward) or the gradient entering its end (backward), which three launches
// before them provide: a LOCAL pass over each segment alone (selective_scan_fwd_local: its end
// state from a zero state; selective_scan_bwd_local: the gradient it passes to the state before it
// from a zero gradient at its end, the adjoint recurrence alone) with its sum of dt, then
// selective_scan_compose over each sequence's segments in order (backward last first): a segment
// maps v to e^(A sum dt) v + its local term (the product of its steps' decays is one exponential of
// the sum of their dt), which gives the value entering each segment and the one leaving the last
// (the final state; backward, the initial state's gradient).
//
// The LOCAL passes: one warp a block (lanes = channels), each lane carrying kLocalStates state
// elements (N in runs of them) in registers over blocks of kLocalItems steps, whose activations a
// lane loads together and stages in shared memory as their per-step terms (dt and dt u; backward dt
// and dy), so that the walk over the block's steps (two unrolled: ptxas issues every load it may
// at a loop's start, and 16 unrolled steps' rows took every register and spilled) reads them back, and
// where every lane reads the same B / C row a step (STAGED, as the main kernels') the rows of the
// block's kLocalStates elements, staged by the warp with every load in flight together, as 16-byte
// broadcasts; else each lane reads its rows from global memory step by step. One memory latency a
// block of kLocalItems steps (STAGED). Per (step, channel, state element): forward one exponential,
// an FMUL and an FFMA; backward one exponential, an FFMA and an FMUL. Bytes: delta and u per step
// and channel (backward delta, d_out and z), the B or C rows, and per segment Dm x N fp32 out.
// Dynamic shared memory: 2 x kLocalItems x 32 fp32, STAGED kLocalItems x kLocalStates more. (An
// explicit minimum of one block a launch bound: without it ptxas held the staged backward at 168
// registers on sm_80 and spilled 8 B, as it did the main backward.)

// (rnnops.cuda_backend.selective_scan.LOCAL_STATES, LOCAL_ITEMS: the launch's shared memory; at 32
// steps a block the staged backward's loads took 255 registers on sm_80 and spilled 16 B)
constexpr int kLocalStates = 16;  // state elements a lane carries at once
constexpr int kLocalItems = 16;   // steps a block

// A block's kLocalItems steps from t0 as a LOCAL pass reads them: per step and lane two terms at
// terms[(k kLocalItems + i) 32 + lane] (written and read by their lane alone), and STAGED the
// rows of elements [n0, n0 + kLocalStates) at rows[i kLocalStates + j] (zeros past eos and N).
template <bool STAGED>
struct LocalSteps {
  float* terms;
  float* rows;
  __device__ __forceinline__ void stage_rows(const BCRows& from, long long t0, long long eos, long long offset, int n0,
                                             int N) const {
    if constexpr (STAGED) {
      constexpr int kPerLane = kLocalItems * kLocalStates / 32;
      const int lane = threadIdx.x % 32;
      float values[kPerLane];  // (every load in flight before the first store)
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const int f = k * 32 + lane, row = f / kLocalStates, n = n0 + f % kLocalStates;
        values[k] = t0 + row < eos && n < N ? __ldg(from.row(t0 + row - offset) + n * from.n_stride) : 0.0f;
      }
      __syncwarp();  // every lane's reads of the block before
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) rows[k * 32 + lane] = values[k];
      __syncwarp();
    }
  }
  __device__ __forceinline__ float& term(int k, int i) const { return terms[(k * kLocalItems + i) * 32 + threadIdx.x % 32]; }
  // the four values of step i from element n0 + 4 q (``from``, a lane's own row, where not STAGED)
  __device__ __forceinline__ Chunk16 row(int i, int q, const BCRows& from, long long t0, long long eos,
                                         long long offset, int n0, int N) const {
    if constexpr (STAGED) {
      return load16(rows + i * kLocalStates + 4 * q);
    } else {
      Chunk16 v;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = n0 + 4 * q + j;
        v.f[j] = t0 + i < eos && n < N ? __ldg(from.row(t0 + i - offset) + n * from.n_stride) : 0.0f;
      }
      return v;
    }
  }
};

// e^(dt A) = 2^(dt a2): channel d's a2 of state elements [n0, n0 + kLocalStates) (0 past N or for a
// dead lane), a LOCAL pass's run of them
__device__ __forceinline__ void local_decays(float (&a2)[kLocalStates], const float* A, int d, int N, int n0,
                                             bool live) {
#pragma unroll
  for (int j = 0; j < kLocalStates; ++j) a2[j] = (live && n0 + j < N) ? A[d * N + n0 + j] * kLog2e : 0.0f;
}

// A lane's values of a run into row ``span`` of a (spans, Dm, N) fp32 buffer (a live lane's, and
// state elements below N only)
__device__ __forceinline__ void store_local_run(float* to, const float (&v)[kLocalStates], int span, int Dm, int d,
                                                int N, int n0, bool live) {
  if (live)
#pragma unroll
    for (int j = 0; j < kLocalStates; ++j)
      if (n0 + j < N) to[(span * (long long)Dm + d) * N + n0 + j] = v[j];
}

// Forward LOCAL pass: per segment (blockIdx.y, as block_span with the main kernels' chunk) and
// channel, its end state from a zero state into segment_states (spans, Dm, N) and its sum of dt
// into dt_sums (spans, Dm).
template <class T, bool STAGED>
__global__ void __launch_bounds__(32, 1)
    selective_scan_fwd_local(const T* u, Operand su, const T* delta, Operand sdelta, const float* A, BCOperand Bm,
                             const float* delta_bias, float* segment_states, float* dt_sums, const int* cu_seqlens,
                             const int* chunk_offsets, ScanShape shape, int chunk) {
  const int Dm = shape.Dm, N = shape.N;
  const auto [lane, warp, d, live, channel, seq, span, bos, eos, batch, offset, first, rows] =
      block_span(shape, cu_seqlens, chunk_offsets, chunk);
  RNNOPS_DYNAMIC_SHARED(float, smem);
  const LocalSteps<STAGED> steps{smem, smem + 2 * kLocalItems * 32};
  const BCRows Brows = bc_rows(Bm, batch, channel);
  const float bias = (live && shape.has_bias) ? delta_bias[d] : 0.0f;
  float dt_sum = 0.0f;
  for (int n0 = 0; n0 < N; n0 += kLocalStates) {
    float x[kLocalStates] = {}, a2[kLocalStates];
    local_decays(a2, A, d, N, n0, live);
    for (long long t0 = bos; t0 < eos; t0 += kLocalItems) {
      const int items = live ? steps_before<kLocalItems>(t0, eos) : 0;
      float raw[kLocalItems], uu[kLocalItems];
      load_items(raw, delta, sdelta, batch, t0 - offset, d, items);
      load_items(uu, u, su, batch, t0 - offset, d, items);
      steps.stage_rows(Brows, t0, eos, offset, n0, N);
#pragma unroll
      for (int i = 0; i < kLocalItems; ++i) {  // (steps from ``items`` on: dt = 0, the identity step)
        const float dt = i < items ? discretise(raw[i] + bias, shape.softplus) : 0.0f;
        dt_sum += n0 == 0 ? dt : 0.0f;
        steps.term(0, i) = dt;
        steps.term(1, i) = dt * uu[i];
      }
#pragma unroll 2
      for (int i = 0; i < kLocalItems; ++i) {
        const float dt = steps.term(0, i), dtu = steps.term(1, i);
#pragma unroll
        for (int q = 0; q < kLocalStates / 4; ++q) {
          const Chunk16 b = steps.row(i, q, Brows, t0, eos, offset, n0, N);
#pragma unroll
          for (int j = 0; j < 4; ++j) x[4 * q + j] = exp2_approx(dt * a2[4 * q + j]) * x[4 * q + j] + dtu * b.f[j];
        }
      }
    }
    store_local_run(segment_states, x, span, Dm, d, N, n0, live);
  }
  if (live) dt_sums[span * (long long)Dm + d] = dt_sum;
}

// Backward LOCAL pass: per segment and channel, the adjoint recurrence dx_t = dy_t C_t + e^(dt_{t+1}
// A) dx_{t+1} run back through the segment from a zero gradient at its end (dy = d_out silu(z), or
// d_out), the gradient it passes to the state before it, e^(dt A) dx at its first step, into
// segment_grads (spans, Dm, N), and its sum of dt into dt_sums (spans, Dm).
template <class T, bool STAGED>
__global__ void __launch_bounds__(32, 1)
    selective_scan_bwd_local(const T* delta, Operand sdelta, const T* z, Operand sz, const T* d_out, Operand sdo,
                             const float* A, BCOperand Cm, const float* delta_bias, float* segment_grads,
                             float* dt_sums, const int* cu_seqlens, const int* chunk_offsets, ScanShape shape,
                             int chunk) {
  const int Dm = shape.Dm, N = shape.N;
  const auto [lane, warp, d, live, channel, seq, span, bos, eos, batch, offset, first, rows] =
      block_span(shape, cu_seqlens, chunk_offsets, chunk);
  RNNOPS_DYNAMIC_SHARED(float, smem);
  const LocalSteps<STAGED> steps{smem, smem + 2 * kLocalItems * 32};
  const BCRows Crows = bc_rows(Cm, batch, channel);
  const float bias = (live && shape.has_bias) ? delta_bias[d] : 0.0f;
  const long long blocks = (eos - bos + kLocalItems - 1) / kLocalItems;
  float dt_sum = 0.0f;
  for (int n0 = 0; n0 < N; n0 += kLocalStates) {
    float g[kLocalStates] = {}, a2[kLocalStates];  // g: e^(dt_{t+1} A) dx_{t+1}, the gradient passed to x_t
    local_decays(a2, A, d, N, n0, live);
    for (long long k = blocks - 1; k >= 0; --k) {
      const long long t0 = bos + k * kLocalItems;
      const int items = live ? steps_before<kLocalItems>(t0, eos) : 0;
      float raw[kLocalItems], gout[kLocalItems], zz[kLocalItems];
      load_items(raw, delta, sdelta, batch, t0 - offset, d, items);
      load_items(gout, d_out, sdo, batch, t0 - offset, d, items);
      load_items(zz, z, sz, batch, t0 - offset, d, shape.has_z ? items : 0);
      steps.stage_rows(Crows, t0, eos, offset, n0, N);
#pragma unroll
      for (int i = 0; i < kLocalItems; ++i) {  // (steps from ``items`` on: dt = dy = 0)
        const float dt = i < items ? discretise(raw[i] + bias, shape.softplus) : 0.0f;
        dt_sum += n0 == 0 ? dt : 0.0f;
        steps.term(0, i) = dt;
        steps.term(1, i) = shape.has_z ? gout[i] * zz[i] * rnnops::sigmoid(zz[i]) : gout[i];
      }
#pragma unroll 2
      for (int i = kLocalItems - 1; i >= 0; --i) {
        const float dt = steps.term(0, i), dy = steps.term(1, i);
#pragma unroll
        for (int q = 0; q < kLocalStates / 4; ++q) {
          const Chunk16 c = steps.row(i, q, Crows, t0, eos, offset, n0, N);
#pragma unroll
          for (int j = 0; j < 4; ++j) g[4 * q + j] = exp2_approx(dt * a2[4 * q + j]) * (dy * c.f[j] + g[4 * q + j]);
        }
      }
    }
    store_local_run(segment_grads, g, span, Dm, d, N, n0, live);
  }
  if (live) dt_sums[span * (long long)Dm + d] = dt_sum;
}

// Per sequence (blockIdx.y) and (channel, state element) (a thread each, Dm x N of them), over
// its ``segments`` segments in order (REVERSE: last first): v starts as ``entering``'s (the
// initial state, or the final state's gradient; zero where null); each segment's slot of
// ``values`` (spans, Dm, N) holds its LOCAL term on entry and v entering it on exit, and v becomes
// e^(A sum dt) v + the term; ``leaving`` (where not null) gets v after the last (the final state,
// or the initial state's gradient).
template <bool REVERSE>
__global__ void selective_scan_compose(float* values, const float* dt_sums, const float* A, const float* entering,
                                       float* leaving, int Dm, int N, int segments) {
  const long long element = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x, per_state = Dm * (long long)N;
  if (element >= per_state) return;
  const int seq = blockIdx.y;
  const long long d = element / N;
  const float a2 = A[element] * kLog2e;
  float v = entering ? entering[seq * per_state + element] : 0.0f;
  for (int k = 0; k < segments; ++k) {
    const long long slot = seq * (long long)segments + (REVERSE ? segments - 1 - k : k);
    const float local = values[slot * per_state + element];
    values[slot * per_state + element] = v;
    v = exp2_approx(dt_sums[slot * Dm + d] * a2) * v + local;
  }
  if (leaving) leaving[seq * per_state + element] = v;
}

}  // namespace rnnops::scan
