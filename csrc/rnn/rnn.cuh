// Fused recurrent cells (LSTM, GRU, sLSTM, Elman) with heads in CUDA, forward and backward.
//
// One persistent launch runs the sequence. A block owns one head, a tile of 16 batch rows and a
// slice of U units of every gate; the slice of the head's recurrent weights R (G x U x D) stays
// in shared memory for the whole sequence. Each step loads h_{t-1} (16 x D; a block that holds
// every unit of its head keeps it in shared memory from the previous step), computes the
// slice's recurrent pre-activations h_{t-1} R_slice^T with tensor cores (wmma m16n16k16,
// half / bfloat16, each output tile's K steps split over the warps a narrow slice leaves without
// a tile of their own: warp_share; float32 stays on CUDA cores in IEEE arithmetic), applies the cell's
// pointwise update (equations in rnnops.reference.rnn) and writes the new states. The tiles the
// products read in shared memory (weights, h_{t-1}, gate-gradient chunks) have rows padded by 16
// bytes where they fit (s.pad_rows, padded()), so that fragment loads meet no bank conflicts.
// Heads too large for one block split their units over several blocks (grid.z; grid.x: the (head, batch
// tile) groups, block_group), which then meet at a grid barrier every step (a cooperative launch:
// the host launches the groups in as many launches as it takes for each launch's blocks to be
// resident at once) and read h_{t-1} back from h_seq in 16-byte asynchronous copies (cp.async),
// all in flight together (one memory latency a step, not one per element: at D = 768 the
// element-wise loop was most of the step); otherwise a block barrier suffices. The forward's
// pointwise phase reads only shared memory: the slice's x_t, copied asynchronously (cp.async)
// during step t - 1, the bias, and the carried float32 states (c; GRU's h; sLSTM's n, m), which
// each thread keeps there for the element it updates next step, so no global load waits on the
// recurrence's path (the product's h_{t-1} aside, for a split head). The
// backward's likewise: the carried gradients stay in shared memory (global only at its start and
// end: the final and initial states' gradients), and the saved states, pre-activations and
// d h_seq of step t - 1 are copied asynchronously during step t.
//
// The backward walks time in reverse: the pointwise gradients of the slice (into dx, and the
// carried gradients of c / n / m), a barrier, then dh_{t-1} for the slice's units as
// sum_g dx_g R_g[:, slice] from the transposed weight slice resident in shared memory (tensor
// cores for half types; float32 on CUDA cores), the gate gradients in chunks of 256 (float32) or 512
// (half types) a row: the pointwise phase writes them in T (dx, which the host returns and
// multiplies as the forward rounded h), and after the barrier each block copies up to
// s.gradient_chunks chunks at once into shared memory (cp.async, one memory latency a round; a
// head in one block whose G D gradients fit one chunk keeps them in shared memory as it computes
// them). dR and db are one batched matmul on the host. Where no
// backward will run (s.save_pre 0: no_grad) the forward writes no pre-activations (pre may be
// null); it still writes every step's states. Buffers and
// layouts are those of the Triton kernels
// (triton_kernels/rnn.py): states (B, T, S, H, D) and pre-activations (B, T, P, H, D) in fp32,
// carries (S, B, H, D) fp32, x_gates and the gate gradients dx (B, T, G, H, D), GRU's drec_n
// (B, T, H, D) and h_seq (B, T, H, D) of type T.
// Work per step, batch row and head: 2 G D^2 flops plus about 10 G D pointwise; R is read once.
// A head of up to 64 units in a half type can instead run in tensor-core fragments, a block a
// head (rnn_fwd_fragments, rnn_bwd_fragments below: their own header comments).
#pragma once
#include "../common/runtime.h"

namespace rnnops::rnn {

enum Cell : int { kLSTM = 0, kGRU = 1, kSLSTM = 2, kElman = 3 };

template <int CELL>
struct CellInfo {
  static constexpr int G = CELL == kGRU ? 3 : (CELL == kElman ? 1 : 4);  // gates
  static constexpr int S = CELL == kLSTM ? 2 : (CELL == kSLSTM ? 4 : 1);  // states
  static constexpr int P = CELL == kGRU ? 4 : G;                          // saved pre-activations
};

struct RNNShape {
  int B, T, H, D, splits;
  int has_bias, has_initial;
  int save_pre;  // the forward writes the pre-activations (0 where no backward will run)
  // the pointwise phases' inputs staged in shared memory (copied a step ahead, carried states
  // and gradients kept there); 0: read from global memory each step, in rounds of loads issued
  // together, where the staging buffers do not fit (rnnops.cuda_backend.rnn.shared_bytes)
  int stage;
  // backward: the gate-gradient chunks its product copies into shared memory at once (a head split
  // over blocks; >= 1): one memory latency per round of chunks, ceil(G D / chunk) chunks a step
  int gradient_chunks;
  // 1: the shared-memory tiles the tensor-core products read have padded rows (padded()); 0 where
  // the padded buffers do not fit (rnnops.cuda_backend.rnn.fitting_slice)
  int pad_rows;
  // the first (head, batch tile) group of this launch: block x takes group group_begin + x, its head
  // the group modulo H (a head split over blocks needs every block of the launch resident at once,
  // so the host launches the groups in as many launches as that takes)
  int group_begin;
};

constexpr int kRows = 16;  // batch rows per block (one wmma tile)

// The head and first batch row of the block's (head, batch tile) group.
__device__ __forceinline__ void block_group(const RNNShape& s, int& head, int& row0) {
  const int group = s.group_begin + (int)blockIdx.x;
  head = group % s.H;
  row0 = group / s.H * kRows;
}

// The row stride, in elements, of a shared-memory tile with n elements a row that tensor-core
// fragments read (and 16-byte copies write): with s.pad_rows, 16 bytes of padding. With n a
// multiple of 16 elements (D, G D, the gradient chunk) a row then spans an odd multiple of 16
// bytes, so the 8 rows that one fragment load (a 32-bit word per lane, 4 lanes a row) touches fall
// in 8 different groups of 4 banks. Unpadded, a row of a multiple of 128 bytes (bf16 D = 64, 768)
// puts all 8 rows in the same 4 banks: every fragment load an 8-way bank conflict.
template <class T>
__device__ __forceinline__ int padded(int n, const RNNShape& s) {
  return s.pad_rows ? n + 16 / (int)sizeof(T) : n;
}

__device__ __forceinline__ long long step_index(const RNNShape& s, int b, int t, int slot, int slots, int unit,
                                                int head) {
  return ((((long long)b * s.T + t) * slots + slot) * s.H + head) * s.D + unit;
}

__device__ __forceinline__ float previous_state(const RNNShape& s, const float* states, const float* initial, int slot,
                                                int b, int t, int unit, int head, int S) {
  if (t > 0) return states[step_index(s, b, t - 1, slot, S, unit, head)];
  return s.has_initial ? initial[(((long long)slot * s.B + b) * s.H + head) * s.D + unit] : 0.0f;
}

// The weights' staging before the time loop (a block's slice of R or R^T) takes kStagingInFlight
// elements a thread at a time, their loads in flight together (rnnops::in_flight): element by
// element, each waited for its global load, 192 memory latencies a thread for a 16-unit slice of
// a 768-wide LSTM head (up to a microsecond each from DRAM), at every launch. (h_{-1}'s staging,
// 48 elements a thread at D 768, stays element by element: batched, nvcc rescheduled the time
// loop of both forward kernels, 1123 -> 1463 instructions a step sliced, 548 -> 690 in fragments.)
constexpr int kStagingInFlight = 8;

__device__ __forceinline__ void block_barrier(const RNNShape& s) {
  if (s.splits > 1) {
    rnnops::grid_sync();
  } else {
    __syncthreads();
  }
}

// The block's slice of 16 rows x U units as a thread's elements, four at a time (an element maps to
// the same thread at every call), in three phases: load(b, unit) returns an element's inputs, all
// four elements' loads (shared memory, and the initial states' global ones) issued before the
// first is used; compute(inputs) returns its results, pure arithmetic; store(r, u, b, unit,
// results) writes them (r, u: its place in the slice; b, unit: in the batch and the head). The
// first kTogether slots, those a block of 256 threads (every shipped entry's) fills, compute
// without a branch between them, so that nvcc interleaves their cells' dependent chains of
// exponentials and reciprocals (a slot past the batch computes from zeros and is dropped); the
// rest only where they hold an element (fewer threads). Rows past the batch and units past the head
// are neither loaded nor stored. (Computed and stored element by element, each element's loads and
// math waited behind the previous element's stores and branch: its whole chain alone, four times a
// step at 64 units. Every slot computed unconditionally cost a 16-unit slice three cells of work
// a step; a run-time choice of the slots, 15-25 registers a kernel.)
template <int U, class Load, class Compute, class Store>
__device__ __forceinline__ void for_slice(const RNNShape& s, int row0, int unit0, Load load, Compute compute,
                                          Store store) {
  using Inputs = decltype(load(0, 0));
  using Results = decltype(compute(Inputs{}));
  constexpr int kInFlight = 4, kTogether = U / 16 < kInFlight ? U / 16 : kInFlight;
  const auto element = [&](int idx, int& b, int& unit) {
    b = row0 + idx / U;
    unit = unit0 + idx % U;
    return idx < kRows * U && b < s.B && unit < s.D;
  };
  for (int base = threadIdx.x; base < kRows * U; base += blockDim.x * kInFlight) {
    Inputs in[kInFlight];
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) {
      int b, unit;
      in[j] = element(base + j * blockDim.x, b, unit) ? load(b, unit) : Inputs{};
    }
    Results out[kTogether];
#pragma unroll
    for (int j = 0; j < kTogether; ++j) out[j] = compute(in[j]);
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) {
      const int idx = base + j * blockDim.x;
      int b, unit;
      if (element(idx, b, unit)) store(idx / U, idx % U, b, unit, j < kTogether ? out[j] : compute(in[j]));
    }
  }
}

// Asynchronous 16-byte copies (rnnops::copy_async16) of ``planes`` planes of the block's 16 batch
// rows, n elements a row, into shared memory laid out [planes][16][ld]: source(plane, b, k) is the
// global address of that plane's elements k .. k + 16 bytes for batch row b (16-byte aligned), or
// null for a piece not to copy; rows past the batch are not copied.
template <class E, class Source>
__device__ __forceinline__ void copy_rows_async(E* dst, int planes, int n, int ld, const RNNShape& s, int row0,
                                                Source source) {
  constexpr int kPer = 16 / (int)sizeof(E);
  const int pieces = n / kPer;
  for (int idx = threadIdx.x; idx < planes * kRows * pieces; idx += blockDim.x) {
    const int plane = idx / (kRows * pieces), r = idx / pieces % kRows, k = idx % pieces * kPer;
    if (row0 + r >= s.B) continue;
    if (const E* from = source(plane, row0 + r, k)) rnnops::copy_async16(dst + (plane * kRows + r) * ld + k, from);
  }
}

// copy_rows_async of the block's slice of ``planes`` planes into [planes][16][U]: address(plane, b)
// points at unit unit0 of that plane and batch row (D % 16 == 0, so a piece of U's units is all
// inside the head or all outside; units past the head are not copied).
template <int U, class E, class Address>
__device__ __forceinline__ void copy_slice_async(E* dst, int planes, const RNNShape& s, int row0, int unit0,
                                                 Address address) {
  copy_rows_async(dst, planes, U, U, s, row0, [&](int plane, int b, int u) -> const E* {
    return unit0 + u < s.D ? address(plane, b) + u : nullptr;
  });
}

// How a block's warps share the 16 x 16 output tiles of a tensor-core product: with at least as
// many warps as tiles, each tile's K steps are dealt to ``parts`` = warps / tiles warps (warp
// p * tiles + t takes tile t's steps p, p + parts, ...; warps past parts * tiles idle), whose
// partial tiles the block then sums; with fewer, warp w takes tiles w, w + warps, ... whole.
// (A 768-wide LSTM head in 16-unit slices has 4 forward tiles and 1 backward tile a block: one
// warp walked all 48 K steps of a tile, or all 192 of the backward's, while the others waited.)
// rnnops.cuda_backend.rnn.k_parts sizes the partial buffers the same way.
struct WarpShare {
  int first_tile, tile_stride, part, parts;
  __device__ __forceinline__ bool idle() const { return part >= parts; }
};

__device__ __forceinline__ WarpShare warp_share(int tiles) {
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (warps < tiles) return WarpShare{warp, warps, 0, 1};
  return WarpShare{warp % tiles, tiles, warp / tiles, warps / tiles};
}

// c += the sum over K steps k = first, first + stride, ... below end of a[:, k:k+16] b[k:k+16, :]
// in wmma 16 x 16 x 16 tiles (a row-major at a + k, rows lda apart; b column-major at b + k,
// columns ldb apart), kUnroll K steps at a time with all their fragment loads issued before their
// products: a loop that loaded one step and multiplied waited a shared-memory latency a step (the
// K bounds are run-time: head dims and slices), 24 a step for a 768-wide LSTM head's forward
// slices, 16 for its backward's gradient chunks. A round's products alternate between two
// accumulators, added at the end: into one, each product waited for the one before, a tensor-core
// latency a K step (a warp's 24 steps of the 768-wide head's forward tile in one chain). Two, not
// kUnroll: four held the 16-unit forward at 162 registers, one block an SM of 256 threads (two
// chains: 128, two blocks).
template <class T, int kUnroll = 4>
__device__ __forceinline__ void wmma_k_steps(nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>& c,
                                             const T* a, int lda, const T* b, int ldb, int first, int end,
                                             int stride) {
  using namespace nvcuda;
  constexpr int kChains = kUnroll > 1 ? 2 : 1;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> chains[kChains];
  chains[0] = c;
  if constexpr (kChains > 1) wmma::fill_fragment(chains[1], 0.0f);
  int k = first;
  for (; k + (kUnroll - 1) * stride < end; k += kUnroll * stride) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[kUnroll];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      wmma::load_matrix_sync(fa[u], a + k + u * stride, lda);
      wmma::load_matrix_sync(fb[u], b + k + u * stride, ldb);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) wmma::mma_sync(chains[u % kChains], fa[u], fb[u], chains[u % kChains]);
  }
  if constexpr (kChains > 1)
#pragma unroll
    for (int e = 0; e < c.num_elements; ++e) chains[0].x[e] += chains[1].x[e];  // (one element layout a fragment type)
  c = chains[0];
  if constexpr (kUnroll > 1) wmma_k_steps<T, 1>(c, a, lda, b, ldb, k, end, stride);  // the last steps
}

// The partial [16][outputs] fp32 tiles recurrent_matmul leaves for T (warp_share's parts; one on
// CUDA cores for float32): rnnops.cuda_backend.rnn.k_parts.
template <class T>
__device__ __forceinline__ int product_parts(int outputs) {
  if constexpr (rnnops::is_same_v<T, float>) {
    return 1;
  } else {
    return warp_share(outputs / 16).parts;
  }
}

// The block's sum of ``parts`` partial [16][n] tiles stored one after another from ``partial``,
// left in the first (each element summed by one thread).
__device__ __forceinline__ void sum_parts(float* partial, int n, int parts) {
  for (int idx = threadIdx.x; idx < kRows * n; idx += blockDim.x)
    for (int p = 1; p < parts; ++p) partial[idx] += partial[p * kRows * n + idx];
}

// acc[r][n] = sum_k h[r][k] w[n][k] for the block's 16 rows and GU = G * U output columns, h and
// w with rows of ld >= D (acc holds warp_share's parts partial [16][GU] tiles for half types).
template <class T>
__device__ void recurrent_matmul(const T* h, const T* w, float* acc, int D, int ld, int GU) {
  if constexpr (rnnops::is_same_v<T, float>) {
    for (int idx = threadIdx.x; idx < kRows * GU; idx += blockDim.x) {
      const int r = idx / GU, n = idx % GU;
      float sum = 0.0f;
      for (int k = 0; k < D; ++k) sum += h[r * ld + k] * w[n * ld + k];
      acc[idx] = sum;
    }
  } else {
    using namespace nvcuda;
    const WarpShare share = warp_share(GU / 16);
    for (int tile = share.first_tile; !share.idle() && tile < GU / 16; tile += share.tile_stride) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      wmma::fill_fragment(c, 0.0f);
      wmma_k_steps(c, h, ld, w + tile * 16 * ld, ld, 16 * share.part, D, 16 * share.parts);
      wmma::store_matrix_sync(acc + share.part * kRows * GU + tile * 16, c, GU, wmma::mem_row_major);
    }
    if (share.parts > 1) {  // (the same for every thread)
      __syncthreads();
      sum_parts(acc, GU, share.parts);
    }
  }
}

// The backward's gate gradients of step t in chunks of KC a row, into shared memory [rounds'
// buffers][16][KC] (rows of padded(KC)): product(gradients, k0) runs once per chunk, k0 its first
// (g D + i) index. A block holding the whole head (resident) computed its one chunk into buffer 0;
// others copy each round of up to s.gradient_chunks chunks with cp.async (16 bytes of one gate
// each) from dx, GRU's third gate from drec_n, and wait for it once: one memory latency a round.
// Rows past the batch are not copied: their buffer rows are left as they were and only meet their
// own product rows, which no one reads.
template <int CELL, int KC, class T, class Product>
__device__ __forceinline__ void for_gradient_chunks(const RNNShape& s, bool resident, T* chunk, const T* dx,
                                                    const T* drec_n, int row0, int t, int head, Product product) {
  constexpr int G = CellInfo<CELL>::G;
  const int LC = padded<T>(KC, s);
  const int chunks = (G * s.D + KC - 1) / KC;
  for (int c0 = 0; c0 < chunks; c0 += s.gradient_chunks) {
    const int count = chunks - c0 < s.gradient_chunks ? chunks - c0 : s.gradient_chunks;
    if (!resident) {
      copy_rows_async(chunk, count, KC, LC, s, row0, [&](int c, int b, int k) -> const T* {
        const int gi = (c0 + c) * KC + k, g = gi / s.D, i = gi % s.D;  // (a piece is all of one gate)
        if (gi >= G * s.D) return nullptr;
        return (CELL == kGRU && g == 2) ? drec_n + step_index(s, b, t, 0, 1, i, head)
                                        : dx + step_index(s, b, t, g, G, i, head);
      });
      rnnops::copy_async_commit();
      rnnops::copy_async_wait<0>();
      __syncthreads();
    }
    for (int c = 0; c < count; ++c) product(chunk + c * kRows * LC, (c0 + c) * KC);
    __syncthreads();  // the round's buffers read before the next round refills them
  }
}

__device__ __forceinline__ float tanh_fast(float x) { return 2.0f * rnnops::sigmoid(2.0f * x) - 1.0f; }
__device__ __forceinline__ float log_sigmoid(float x) { return fminf(x, 0.0f) - logf(1.0f + __expf(-fabsf(x))); }

// One element's forward step of the cell (equations in rnnops.reference.rnn): from its gates' x_g
// (``x``), recurrent products plus biases (R_g h)_unit + b_g (``rec``) and its previous states
// (``prev``, indexed by slot; only the carried ones are read: GRU h; LSTM / sLSTM c, n, m), the new
// states (state[0] = h_t) and the pre-activations the backward reads.
template <int CELL>
struct CellStep {
  float state[CellInfo<CELL>::S], pre[CellInfo<CELL>::P];
};

template <int CELL>
__device__ __forceinline__ CellStep<CELL> cell_step(const float* x, const float* rec, const float* prev) {
  CellStep<CELL> out;
  if constexpr (CELL == kGRU) {
    const float p_r = x[0] + rec[0], p_z = x[1] + rec[1], rec_n = rec[2];
    const float reset = rnnops::sigmoid(p_r), update = rnnops::sigmoid(p_z);
    const float p_n = x[2] + reset * rec_n;
    out.state[0] = (1.0f - update) * tanh_fast(p_n) + update * prev[0];
    out.pre[0] = p_r;
    out.pre[1] = p_z;
    out.pre[2] = p_n;
    out.pre[3] = rec_n;
  } else if constexpr (CELL == kElman) {
    out.pre[0] = x[0] + rec[0];
    out.state[0] = tanh_fast(out.pre[0]);
  } else {
#pragma unroll
    for (int g = 0; g < 4; ++g) out.pre[g] = x[g] + rec[g];  // i, f, z, o
    const float p_i = out.pre[0], p_f = out.pre[1], p_o = out.pre[3];
    const float z_act = tanh_fast(out.pre[2]);
    if constexpr (CELL == kLSTM) {
      out.state[1] = rnnops::sigmoid(p_f) * prev[1] + rnnops::sigmoid(p_i) * z_act;
      out.state[0] = rnnops::sigmoid(p_o) * tanh_fast(out.state[1]);
    } else {
      const float log_f = log_sigmoid(p_f);
      const float m = fmaxf(log_f + prev[3], p_i);
      const float input_gate = __expf(p_i - m), forget_gate = __expf(log_f + prev[3] - m);
      out.state[1] = forget_gate * prev[1] + input_gate * z_act;
      out.state[2] = forget_gate * prev[2] + input_gate;
      out.state[3] = m;
      out.state[0] = rnnops::sigmoid(p_o) * out.state[1] / out.state[2];
    }
  }
  return out;
}

// One element's backward step of the cell: from dh (the carried gradient plus d h_seq's), the
// pre-activations, the states at t (``now``) and t - 1 (``prev``) and the carried gradients of c
// (n, m), both indexed by slot (only the slots the cell reads are read: GRU h_{t-1}; Elman h_t;
// LSTM / sLSTM c (n, m) at t and t - 1), the gate gradients dx (GRU's third: d p_n), GRU's
// drec_n = d p_n r (what the dh_{t-1} product takes for that gate), and what goes to step t - 1:
// carried[0] the direct part of dh_{t-1} (GRU's dh z; 0 otherwise: the product adds the rest),
// carried[1 ..] the gradients of c (n, m).
template <int CELL>
struct CellGradient {
  float dx[CellInfo<CELL>::G], drec_n, carried[CellInfo<CELL>::S];
};

template <int CELL>
__device__ __forceinline__ CellGradient<CELL> cell_gradient(float dh, const float* pre, const float* now,
                                                            const float* prev, const float* carried) {
  CellGradient<CELL> out;
  out.drec_n = 0.0f;
  out.carried[0] = 0.0f;
  if constexpr (CELL == kGRU) {
    const float p_r = pre[0], p_z = pre[1], p_n = pre[2], rec_n = pre[3];
    const float reset = rnnops::sigmoid(p_r), update = rnnops::sigmoid(p_z), cand = tanh_fast(p_n);
    const float d_pn = dh * (1.0f - update) * (1.0f - cand * cand);
    out.dx[0] = d_pn * rec_n * reset * (1.0f - reset);
    out.dx[1] = dh * (prev[0] - cand) * update * (1.0f - update);
    out.dx[2] = d_pn;
    out.drec_n = d_pn * reset;
    out.carried[0] = dh * update;
  } else if constexpr (CELL == kElman) {
    out.dx[0] = dh * (1.0f - now[0] * now[0]);
  } else {
    const float p_i = pre[0], p_f = pre[1], p_z = pre[2], p_o = pre[3];
    const float c = now[1], c_prev = prev[1];
    const float z_act = tanh_fast(p_z), o_gate = rnnops::sigmoid(p_o);
    float dc = carried[1];
    if constexpr (CELL == kLSTM) {
      const float i_gate = rnnops::sigmoid(p_i), f_gate = rnnops::sigmoid(p_f), tanh_c = tanh_fast(c);
      dc += dh * o_gate * (1.0f - tanh_c * tanh_c);
      out.dx[0] = dc * z_act * i_gate * (1.0f - i_gate);
      out.dx[1] = dc * c_prev * f_gate * (1.0f - f_gate);
      out.dx[2] = dc * i_gate * (1.0f - z_act * z_act);
      out.dx[3] = dh * tanh_c * o_gate * (1.0f - o_gate);
      out.carried[1] = dc * f_gate;
    } else {
      const float n = now[2], m_new = now[3];
      const float n_prev = prev[2], m_prev = prev[3];
      float dn = carried[2], dm = carried[3];
      const float log_f = log_sigmoid(p_f);
      const float input_gate = __expf(p_i - m_new), forget_gate = __expf(log_f + m_prev - m_new);
      const float d_po = dh * c / n * o_gate * (1.0f - o_gate);
      dc += dh * o_gate / n;
      dn -= dh * o_gate * c / (n * n);
      const float d_forget = dc * c_prev + dn * n_prev, d_input = dc * z_act + dn;
      float d_pi = d_input * input_gate, d_logf = d_forget * forget_gate, dm_prev = d_forget * forget_gate;
      dm += -d_input * input_gate - d_forget * forget_gate;
      const float lhs = log_f + m_prev;  // m_new = max(lhs, p_i): the larger takes dm, ties split it
      const float to_lhs = lhs > p_i ? dm : (lhs == p_i ? 0.5f * dm : 0.0f);
      d_pi += dm - to_lhs;
      d_logf += to_lhs;
      dm_prev += to_lhs;
      out.dx[0] = d_pi;
      out.dx[1] = d_logf * (1.0f - rnnops::sigmoid(p_f));
      out.dx[2] = dc * input_gate * (1.0f - z_act * z_act);
      out.dx[3] = d_po;
      out.carried[1] = dc * forget_gate;
      out.carried[2] = dn * forget_gate;
      out.carried[3] = dm_prev;
    }
  }
  return out;
}

template <class T, int CELL, int U>
__global__ void rnn_fwd(const T* x, const T* R, const float* bias, const float* initial, float* states, float* pre,
                        T* h_seq, RNNShape s) {
  using Info = CellInfo<CELL>;
  constexpr int G = Info::G, S = Info::S, P = Info::P, GU = G * U;
  constexpr int kFirstCarried = CELL == kGRU ? 0 : 1;  // GRU carries h; LSTM / sLSTM c (n, m); Elman none
  constexpr int SC = S - kFirstCarried;
  int head, row0;
  block_group(s, head, row0);
  const int unit0 = blockIdx.z * U;
  const int D = s.D;
  RNNOPS_DYNAMIC_SHARED(unsigned char, smem);
  const int LD = padded<T>(D, s);                          // the row stride of w and h
  T* w = reinterpret_cast<T*>(smem);                       // [G * U][D] (rows of LD)
  T* h = w + GU * LD;                                      // [16][D] (rows of LD)
  float* acc = reinterpret_cast<float*>(h + kRows * LD);  // [16][G * U], times warp_share's parts (half types)
  // staged (s.stage) only:
  T* x_steps = reinterpret_cast<T*>(acc + kRows * GU * product_parts<T>(GU));  // [2][G][16][U]: x_t, x_{t+1}
  float* carried = reinterpret_cast<float*>(x_steps + 2 * kRows * GU);       // [SC][16][U], fp32
  float* bias_slice = carried + SC * kRows * U;                               // [G][U]
  auto carried_at = [&](int slot, int r, int u) -> float& {
    return carried[((slot - kFirstCarried) * kRows + r) * U + u];
  };
  rnnops::in_flight<kStagingInFlight>(
      GU * D,
      [&](int idx) {
        const int n = idx / D, k = idx % D, g = n / U, unit = unit0 + n % U;
        return unit < D ? R[(((long long)g * s.H + head) * D + unit) * D + k] : from_float<T>(0.0f);
      },
      [&](int idx, T value) { w[idx / D * LD + idx % D] = value; });
  for (int idx = threadIdx.x; s.stage && idx < GU; idx += blockDim.x) {
    const int g = idx / U, unit = unit0 + idx % U;
    bias_slice[idx] = s.has_bias && unit < D ? bias[(g * s.H + head) * D + unit] : 0.0f;
  }
  // the slice's x_t in shared memory, copied asynchronously a step ahead
  auto prefetch_x = [&](int t) {
    if (s.stage && t < s.T)
      copy_slice_async<U>(x_steps + (t & 1) * kRows * GU, G, s, row0, unit0, [&](int g, int b) {
        return x + ((((long long)b * s.T + t) * G + g) * s.H + head) * D + unit0;
      });
    rnnops::copy_async_commit();
  };
  prefetch_x(0);
  for (int t = 0; t < s.T; ++t) {
    // h_{t-1} of the whole head, in T: at t = 0 the initial state; for a head split over blocks,
    // h_seq's step t - 1 (rounded to T as this product takes it), which every block wrote before the
    // grid barrier, copied asynchronously 16 bytes at a time in a group of its own, committed before
    // x_{t+1}'s so that it can be waited for alone (rows past the batch keep the zeros of t = 0);
    // where this block computes every unit, its previous step left it in shared memory
    const bool copies_h = t > 0 && s.splits > 1;
    if (copies_h) {
      copy_rows_async(h, 1, D, LD, s, row0, [&](int, int b, int k) -> const T* {
        return h_seq + (((long long)b * s.T + t - 1) * s.H + head) * D + k;
      });
      rnnops::copy_async_commit();
    }
    // x_{t+1} into the other buffer, which step t - 1 last read before its closing barrier (at
    // the last step an empty group, so that waiting for all but the newest group waits for x_t)
    prefetch_x(t + 1);
    if (t == 0) {
      for (int idx = threadIdx.x; idx < kRows * D; idx += blockDim.x) {
        const int r = idx / D, k = idx % D, b = row0 + r;
        h[r * LD + k] = from_float<T>(b < s.B ? previous_state(s, states, initial, 0, b, t, k, head, S) : 0.0f);
      }
      for (int idx = threadIdx.x; s.stage && idx < SC * kRows * U; idx += blockDim.x) {
        const int slot = kFirstCarried + idx / (kRows * U), r = idx / U % kRows, b = row0 + r, unit = unit0 + idx % U;
        carried[idx] = b < s.B && unit < D ? previous_state(s, states, initial, slot, b, t, unit, head, S) : 0.0f;
      }
      __syncthreads();
    } else if (copies_h) {
      rnnops::copy_async_wait<1>();  // h_{t-1} (and x_t), not x_{t+1}
      __syncthreads();
    }
    recurrent_matmul(h, w, acc, D, LD, GU);
    rnnops::copy_async_wait<1>();  // this thread's pieces of x_t (not x_{t+1}'s)
    __syncthreads();
    // the slice's pointwise update (for_slice: four elements' loads, then their cells, then their
    // stores). Staged, its inputs are all in shared memory: x_t, the bias, the products and the
    // carried states, each element's written by the thread that reads it next step; else a thread's
    // global loads of them for four of its elements issue together
    struct StepInputs {
      // rec: the products (R_g h)_unit; prev: the carried states (GRU h; LSTM / sLSTM c, n, m)
      float x[G], bias[G], rec[G], prev[S];
    };
    const T* x_now = x_steps + (t & 1) * kRows * GU;
    for_slice<U>(
        s, row0, unit0,
        [&](int b, int unit) {
          const int r = b - row0, u = unit - unit0;
          StepInputs in;
#pragma unroll
          for (int g = 0; g < G; ++g) {
            in.rec[g] = acc[r * GU + g * U + u];
            if (s.stage) {
              in.x[g] = to_float(x_now[(g * kRows + r) * U + u]);
              in.bias[g] = bias_slice[g * U + u];
            } else {
              in.x[g] = to_float(x[((((long long)b * s.T + t) * G + g) * s.H + head) * D + unit]);
              in.bias[g] = s.has_bias ? bias[(g * s.H + head) * D + unit] : 0.0f;
            }
          }
#pragma unroll
          for (int slot = kFirstCarried; slot < S; ++slot)
            in.prev[slot] = s.stage ? carried_at(slot, r, u)
                                    : previous_state(s, states, initial, slot, b, t, unit, head, S);
          return in;
        },
        [&](const StepInputs& in) {
          float rec[G];  // (R_g h)_unit + b_g
#pragma unroll
          for (int g = 0; g < G; ++g) rec[g] = in.rec[g] + in.bias[g];
          return cell_step<CELL>(in.x, rec, in.prev);
        },
        [&](int r, int u, int b, int unit, const CellStep<CELL>& out) {
#pragma unroll
          for (int slot = 0; slot < S; ++slot) {  // for the backward, and the next step if carried
            states[step_index(s, b, t, slot, S, unit, head)] = out.state[slot];
            if (s.stage && slot >= kFirstCarried) carried_at(slot, r, u) = out.state[slot];
          }
#pragma unroll
          for (int slot = 0; s.save_pre && slot < P; ++slot)
            pre[step_index(s, b, t, slot, P, unit, head)] = out.pre[slot];
          const float h_new = out.state[0];
          h_seq[(((long long)b * s.T + t) * s.H + head) * D + unit] = from_float<T>(h_new);
          // (every reader of h_{t-1} is past the barrier above)
          if (s.splits == 1) h[r * LD + unit] = from_float<T>(h_new);
        });
    block_barrier(s);  // h_t before the next step's product reads it; x_t's buffer before it is refilled
  }
}

// mma_a_fragment of K step k of the row-major tiles at ``tiles`` (16 columns a step, rows ld
// apart) where only ``steps`` K steps exist: a step past them reads the last one's tile (a valid
// address), which meets the zero weights the kernels hold for those steps (a row is only changed
// where it holds a value that is not finite, which its real steps already spread). The fragment
// kernels' K loops run to their compile-time bound with it, so that nvcc issues the steps' shared
// loads ahead of the products that wait for them, where a loop that left at the run-time step
// count issued each step's loads after the previous step's product (a branch between them): one
// shared-memory latency a K step (SASS, sm_90a, LSTM D64: 4 forward, 16 backward).
template <class T>
__device__ __forceinline__ void mma_a_fragment_clamped(unsigned (&a)[4], const T* tiles, int k, int steps, int ld) {
  rnnops::mma_a_fragment(a, tiles + 16 * min(k, steps - 1), ld);
}

// The forward of a head that one block holds whole, in tensor-core fragments (mma.sync m16n8k16,
// half types, D a multiple of 16 up to 16 KS): warp w owns units 8 w .. 8 w + 7 of every gate,
// and a lane two adjacent units of two batch rows (the accumulator layout: rows group and group +
// 8, units 2 quad and 2 quad + 1), so a step's products land in the registers of the thread that
// applies the cell to them. Registers hold the warp's slice of R for the whole sequence (G KS 2
// words: 32 for an LSTM at D 64), the lane's biases and carried float32 states, and x_{t+1},
// loaded during step t. Shared memory holds only h: two [16][D] buffers (rows padded as
// s.pad_rows says), step t reading one and writing the other, so a step ends at one block
// barrier and its products never go through shared memory (rnn_fwd stores them as float32 tiles,
// meets at a barrier, reads them back in the pointwise phase and meets at a second). Grid: one
// block per (head, batch tile), D / 8 warps (at most 64 KS threads, the bound the registers are
// budgeted for: KS 2 and 4, as instantiated, at most 122 registers and no spills for sm_80 and sm_90a;
// at KS 8 the LSTM's 512 threads spill at 128). Per step and block: 2 G D^2 16 flops on tensor
// cores, four 32-bit loads of h a lane and K step (conflict-free with padded rows), 2 G D 16
// bytes of x read, and the writes of rnn_fwd (h_seq, every step's states, the pre-activations
// where saved).
template <class T, int CELL, int KS>
__global__ void __launch_bounds__(64 * KS)
    rnn_fwd_fragments(const T* x, const T* R, const float* bias, const float* initial, float* states, float* pre,
                      T* h_seq, RNNShape s) {
  using Info = CellInfo<CELL>;
  constexpr int G = Info::G, S = Info::S, P = Info::P;
  constexpr int kFirstCarried = CELL == kGRU ? 0 : 1;
  int head, row0;
  block_group(s, head, row0);
  const int D = s.D, k_steps = D / 16, LD = padded<T>(D, s);
  const int lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
  const int unit = threadIdx.x / 32 * 8 + 2 * quad;  // the lane's units: unit and unit + 1
  const int rows[2] = {row0 + group, row0 + group + 8};
  RNNOPS_DYNAMIC_SHARED(unsigned char, smem);
  T* h_buffers = reinterpret_cast<T*>(smem);  // [2][16][D] (rows of LD): h_{t-1} at even t, then at odd t
  // the warp's slice of R as b fragments: weights[g][k] the tile of R_g's rows (the b operand's
  // columns) 8 w .. 8 w + 7, K step k
  unsigned weights[G][KS][2];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int k = 0; k < KS; ++k) {
      weights[g][k][0] = weights[g][k][1] = 0u;
      if (k < k_steps)
        rnnops::mma_b_fragment(weights[g][k], R + (((long long)g * s.H + head) * D + threadIdx.x / 32 * 8) * D + 16 * k,
                               D);
    }
  float bias_of[G][2], carried[S][2][2];  // [..][row i][unit j]; carried: the slots from kFirstCarried
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int j = 0; j < 2; ++j) bias_of[g][j] = s.has_bias ? bias[(g * s.H + head) * D + unit + j] : 0.0f;
#pragma unroll
  for (int slot = kFirstCarried; slot < S; ++slot)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        carried[slot][i][j] =
            rows[i] < s.B ? previous_state(s, states, initial, slot, rows[i], 0, unit + j, head, S) : 0.0f;
  for (int idx = threadIdx.x; idx < kRows * D; idx += blockDim.x) {  // h_{-1}, zeros past the batch
    const int r = idx / D, k = idx % D, b = row0 + r;
    h_buffers[r * LD + k] = from_float<T>(b < s.B ? previous_state(s, states, initial, 0, b, 0, k, head, S) : 0.0f);
  }
  // the lane's x_t (two units a load), loaded a step ahead
  using Pair = rnnops::Pair<T>;
  auto load_x = [&](int t, Pair (&into)[2][G]) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int g = 0; g < G; ++g)
        into[i][g] = rows[i] < s.B && t < s.T
                         ? *reinterpret_cast<const Pair*>(x + ((((long long)rows[i] * s.T + t) * G + g) * s.H + head) *
                                                                      D + unit)
                         : Pair{from_float<T>(0.0f), from_float<T>(0.0f)};
  };
  Pair x_next[2][G];
  load_x(0, x_next);
  __syncthreads();
  for (int t = 0; t < s.T; ++t) {
    Pair x_now[2][G];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int g = 0; g < G; ++g) x_now[i][g] = x_next[i][g];
    load_x(t + 1, x_next);
    const T* h = h_buffers + (t & 1) * kRows * LD;
    T* h_out = h_buffers + ((t + 1) & 1) * kRows * LD;
    float acc[G][4];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[g][e] = 0.0f;
#pragma unroll
    for (int k = 0; k < KS; ++k) {  // (steps past D / 16: zero weights)
      unsigned a[4];
      mma_a_fragment_clamped(a, h, k, k_steps, LD);
#pragma unroll
      for (int g = 0; g < G; ++g) rnnops::mma_16x8x16<T>(acc[g], a, weights[g][k]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float new_states[S][2], new_pre[P][2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float x_in[G], rec[G], prev[S];
#pragma unroll
        for (int g = 0; g < G; ++g) {
          x_in[g] = to_float(j ? x_now[i][g].hi : x_now[i][g].lo);
          rec[g] = acc[g][2 * i + j] + bias_of[g][j];
        }
#pragma unroll
        for (int slot = kFirstCarried; slot < S; ++slot) prev[slot] = carried[slot][i][j];
        const CellStep<CELL> out = cell_step<CELL>(x_in, rec, prev);
#pragma unroll
        for (int slot = 0; slot < S; ++slot) {
          new_states[slot][j] = out.state[slot];
          if (slot >= kFirstCarried) carried[slot][i][j] = out.state[slot];
        }
#pragma unroll
        for (int p = 0; p < P; ++p) new_pre[p][j] = out.pre[p];
      }
      const Pair h_new{from_float<T>(new_states[0][0]), from_float<T>(new_states[0][1])};
      // (rows past the batch feed only their own rows of the next product)
      *reinterpret_cast<Pair*>(h_out + (group + 8 * i) * LD + unit) = h_new;
      if (rows[i] < s.B) {
        const int b = rows[i];
        *reinterpret_cast<Pair*>(h_seq + (((long long)b * s.T + t) * s.H + head) * D + unit) = h_new;
#pragma unroll
        for (int slot = 0; slot < S; ++slot)
          *reinterpret_cast<rnnops::Pair<float>*>(states + step_index(s, b, t, slot, S, unit, head)) =
              rnnops::Pair<float>{new_states[slot][0], new_states[slot][1]};
#pragma unroll
        for (int p = 0; s.save_pre && p < P; ++p)
          *reinterpret_cast<rnnops::Pair<float>*>(pre + step_index(s, b, t, p, P, unit, head)) =
              rnnops::Pair<float>{new_pre[p][0], new_pre[p][1]};
      }
    }
    __syncthreads();  // h_t before step t + 1 reads it (the buffer step t read is rewritten only at t + 1)
  }
}

// The backward of a head that one block holds whole, in tensor-core fragments (half types, D a
// multiple of 16 up to 16 KS; the forward's layout: warp w owns units 8 w .. 8 w + 7, a lane two
// adjacent units of two batch rows). A step, last first: each lane's pointwise gradients
// (cell_gradient) from inputs it loaded into registers during the step before (pre-activations,
// d h_seq, the states at t - 1; the states at t are the previous step's t - 1) and carried
// gradients it keeps in registers; the gate gradients go to dx (global, for dR) and to one of two
// shared [16][G D] buffers (GRU's third gate: drec_n); one block barrier; then dh_{t-1} for the
// warp's units = sum over (g, u) of dx_g[r][u] R_g[u][i] as mma.sync m16n8k16 tiles (K = G D,
// two accumulators taking alternate K steps), whose accumulators are the lane's own elements, so
// the product is the next step's carried dh with no further barrier (the next step writes the
// other buffer). R_g^T's slice of the warp stays in registers (G KS 2 words), staged once through
// shared memory. Grid and threads as rnn_fwd_fragments. Per step and block: 2 G D^2 16 flops,
// four 32-bit loads of the gate gradients a lane and K step (G D / 16 K steps), and the global
// traffic of rnn_bwd (the saved states and pre-activations read, dx written).
template <class T, int CELL, int KS>
__global__ void __launch_bounds__(64 * KS, 1)
    rnn_bwd_fragments(const T* R, const float* initial, const float* states, const float* pre, const T* d_h_seq,
                      float* carry, T* dx, T* drec_n, RNNShape s) {
  using Info = CellInfo<CELL>;
  constexpr int G = Info::G, S = Info::S, P = Info::P;
  constexpr int PS = CELL == kElman ? 0 : P;  // Elman's gradient reads h_t, not its pre-activation
  // the state slots the gradient reads, at t and t - 1: c (n, m) for the LSTM / sLSTM, else h
  constexpr int kFirstRead = CELL == kLSTM || CELL == kSLSTM ? 1 : 0;
  constexpr int kLastRead = CELL == kLSTM || CELL == kSLSTM ? S : 1;
  int head, row0;
  block_group(s, head, row0);
  const int D = s.D, k_steps = G * D / 16, LG = padded<T>(G * D, s);
  const int lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
  const int unit = threadIdx.x / 32 * 8 + 2 * quad;  // the lane's units: unit and unit + 1
  const int rows[2] = {row0 + group, row0 + group + 8};
  RNNOPS_DYNAMIC_SHARED(unsigned char, smem);
  T* gradients = reinterpret_cast<T*>(smem);  // [2][16][G D] (rows of LG); first R^T, [D][G D]
  // the warp's slice of R^T as b fragments: weights[k] the tile of B[g D + u][i] = R_g[u][i] at K
  // step k and the warp's columns i = 8 w .. 8 w + 7, staged through shared memory as rows i (LG apart)
  rnnops::in_flight<kStagingInFlight>(
      D * G * D,
      [&](int idx) {
        const int i = idx / (G * D), k = idx % (G * D), g = k / D, u = k % D;
        return R[(((long long)g * s.H + head) * D + u) * D + i];
      },
      [&](int idx, T value) { gradients[idx / (G * D) * LG + idx % (G * D)] = value; });
  __syncthreads();
  unsigned weights[G * KS][2];
#pragma unroll
  for (int k = 0; k < G * KS; ++k) {
    weights[k][0] = weights[k][1] = 0u;
    if (k < k_steps) rnnops::mma_b_fragment(weights[k], gradients + threadIdx.x / 32 * 8 * LG + 16 * k, LG);
  }
  __syncthreads();  // every lane's weights read before the buffers take gate gradients
  using Pair = rnnops::Pair<T>;
  using Pair32 = rnnops::Pair<float>;
  auto pair_at = [&](const float* buffer, int slot, int slots, int b, int t) {
    return *reinterpret_cast<const Pair32*>(buffer + step_index(s, b, t, slot, slots, unit, head));
  };
  // the carried gradients ([slot][row i][unit j]; slot 0: dh), from the final states' gradients
  float carried[S][2][2];
#pragma unroll
  for (int slot = 0; slot < S; ++slot)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        carried[slot][i][j] = rows[i] < s.B ? carry[(((long long)slot * s.B + rows[i]) * s.H + head) * D + unit + j]
                                            : 0.0f;
  // a step's inputs, loaded a step ahead: d h_seq, the pre-activations and the states at t - 1
  struct Inputs {
    Pair dh[2];
    Pair32 pre[PS > 0 ? PS : 1][2], prev[S][2];
  };
  auto load_inputs = [&](int t, Inputs& in) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int b = rows[i];
      if (b >= s.B) continue;  // (never read)
      in.dh[i] = *reinterpret_cast<const Pair*>(d_h_seq + (((long long)b * s.T + t) * s.H + head) * D + unit);
#pragma unroll
      for (int p = 0; p < PS; ++p) in.pre[p][i] = pair_at(pre, p, P, b, t);
#pragma unroll
      for (int slot = kFirstRead; slot < kLastRead; ++slot)
        in.prev[slot][i] = t > 0 ? pair_at(states, slot, S, b, t - 1)
                                 : Pair32{previous_state(s, states, initial, slot, b, 0, unit, head, S),
                                          previous_state(s, states, initial, slot, b, 0, unit + 1, head, S)};
    }
  };
  Pair32 now[S][2] = {};  // the states at t (the step before's t - 1); zeros past the batch
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int slot = kFirstRead; slot < kLastRead; ++slot)
      if (rows[i] < s.B) now[slot][i] = pair_at(states, slot, S, rows[i], s.T - 1);
  Inputs next = {};
  load_inputs(s.T - 1, next);
  for (int t = s.T - 1; t >= 0; --t) {
    const Inputs in = next;
    if (t > 0) load_inputs(t - 1, next);
    T* buffer = gradients + (t & 1) * kRows * LG;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float dx_of[G][2], drec_of[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        auto half = [&](const Pair32& v) { return j ? v.hi : v.lo; };
        float pre_in[P], now_in[S], prev_in[S], carried_in[S];
#pragma unroll
        for (int p = 0; p < PS; ++p) pre_in[p] = half(in.pre[p][i]);
#pragma unroll
        for (int slot = kFirstRead; slot < kLastRead; ++slot) {
          now_in[slot] = half(now[slot][i]);
          prev_in[slot] = half(in.prev[slot][i]);
        }
#pragma unroll
        for (int slot = 0; slot < S; ++slot) carried_in[slot] = carried[slot][i][j];
        const float dh = carried[0][i][j] + to_float(j ? in.dh[i].hi : in.dh[i].lo);
        const CellGradient<CELL> grad = cell_gradient<CELL>(dh, pre_in, now_in, prev_in, carried_in);
#pragma unroll
        for (int g = 0; g < G; ++g) dx_of[g][j] = grad.dx[g];
        drec_of[j] = grad.drec_n;
#pragma unroll
        for (int slot = 0; slot < S; ++slot) carried[slot][i][j] = grad.carried[slot];  // (slot 0: the direct part)
      }
      T* row = buffer + (group + 8 * i) * LG + unit;  // (rows past the batch: their own product rows only)
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const bool rec_n = CELL == kGRU && g == 2;
        *reinterpret_cast<Pair*>(row + g * D) =
            Pair{from_float<T>(rec_n ? drec_of[0] : dx_of[g][0]), from_float<T>(rec_n ? drec_of[1] : dx_of[g][1])};
      }
      if (rows[i] < s.B) {
        const int b = rows[i];
#pragma unroll
        for (int g = 0; g < G; ++g)
          *reinterpret_cast<Pair*>(dx + step_index(s, b, t, g, G, unit, head)) =
              Pair{from_float<T>(dx_of[g][0]), from_float<T>(dx_of[g][1])};
        if constexpr (CELL == kGRU)
          *reinterpret_cast<Pair*>(drec_n + step_index(s, b, t, 0, 1, unit, head)) =
              Pair{from_float<T>(drec_of[0]), from_float<T>(drec_of[1])};
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int slot = kFirstRead; slot < kLastRead; ++slot) now[slot][i] = in.prev[slot][i];
    __syncthreads();  // every lane's gate gradients before the product (the next step writes the other buffer)
    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int k = 0; k < G * KS; ++k) {  // (steps past G D / 16: zero weights)
      unsigned a[4];
      mma_a_fragment_clamped(a, buffer, k, k_steps, LG);
      rnnops::mma_16x8x16<T>(acc[k & 1], a, weights[k]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) carried[0][i][j] += acc[0][2 * i + j] + acc[1][2 * i + j];
  }
#pragma unroll
  for (int slot = 0; slot < S; ++slot)  // the initial states' gradients
#pragma unroll
    for (int i = 0; i < 2; ++i)
      if (rows[i] < s.B)
        *reinterpret_cast<Pair32*>(carry + (((long long)slot * s.B + rows[i]) * s.H + head) * D + unit) =
            Pair32{carried[slot][i][0], carried[slot][i][1]};
}

template <class T, int CELL, int U>
__global__ void rnn_bwd(const T* R, const float* initial, const float* states, const float* pre, const T* d_h_seq,
                        float* carry, T* dx, T* drec_n, RNNShape s) {
  using Info = CellInfo<CELL>;
  constexpr int G = Info::G, S = Info::S, P = Info::P;
  // reduction chunk of the dh_{t-1} product, 16 rows x 1 KB of gate gradients in shared memory
  // (rnnops.cuda_backend.rnn.CHUNK_ROW_BYTES a row): 256 gradients in float32, 512 in a half type (a
  // whole LSTM head of D <= 64 in one; at D = 768 an LSTM step takes 6)
  constexpr int KC = 1024 / (int)sizeof(T);
  const int LC = padded<T>(KC, s);  // a chunk row's stride
  int head, row0;
  block_group(s, head, row0);
  const int unit0 = blockIdx.z * U;
  const int D = s.D;
  RNNOPS_DYNAMIC_SHARED(unsigned char, smem);
  const int LW = padded<T>(G * D, s);                    // the row stride of wt
  T* wt = reinterpret_cast<T*>(smem);                    // [U][G * D] (rows of LW): wt[u][g D + i] = R_g[i][unit]
  T* chunk = wt + U * LW;                                // [s.gradient_chunks][16][KC] gate gradients (rows of LC)
  float* products = reinterpret_cast<float*>(chunk + s.gradient_chunks * kRows * LC);
  // products: [16][U] dh_{t-1} of the slice, times warp_share's parts (half types)
  // staged (s.stage), the step's pointwise inputs are all in shared memory: the carried gradients
  // (dh, and c's, n's, m's), kept there by the thread that updates each element; and copied
  // asynchronously a step ahead, the saved states at t and t - 1 (of the slots the gradients
  // read: c (n, m) for the LSTM / sLSTM, h for GRU and Elman; three buffers, as step t reads t and
  // t - 1 while t - 2 arrives), the pre-activations and d h_seq at t (two buffers). Else they are
  // read from global memory, the carried gradients from carry.
  constexpr int kFirstSaved = CELL == kLSTM || CELL == kSLSTM ? 1 : 0, NS = S - kFirstSaved;
  constexpr int PS = CELL == kElman ? 0 : P;  // Elman's gradient reads h_t, not its pre-activation
  float* carried = products + kRows * U * product_parts<T>(U);  // [S][16][U]
  float* saved_states = carried + S * kRows * U;                // [3][NS][16][U]
  float* saved_pre = saved_states + 3 * NS * kRows * U;         // [2][PS][16][U]
  T* dh_steps = reinterpret_cast<T*>(saved_pre + 2 * PS * kRows * U);  // [2][16][U]
  rnnops::in_flight<kStagingInFlight>(
      G * D * U,
      [&](int idx) {
        const int gi = idx / U, u = idx % U, g = gi / D, i = gi % D, unit = unit0 + u;  // (coalesced reads of R)
        return unit < D ? R[(((long long)g * s.H + head) * D + i) * D + unit] : from_float<T>(0.0f);
      },
      [&](int idx, T value) { wt[idx % U * LW + idx / U] = value; });
  auto carry_index = [&](int slot, int b, int unit) {
    return (((long long)slot * s.B + b) * s.H + head) * D + unit;
  };
  // the carried gradient of a state slot at batch row b and unit: staged in shared memory, else in carry
  auto carried_at = [&](int slot, int b, int unit) -> float& {
    return s.stage ? carried[(slot * kRows + b - row0) * U + unit - unit0] : carry[carry_index(slot, b, unit)];
  };
  auto carry_product = [&](int idx, float value) {  // dh_{t-1} of slice element idx (r U + u) += value
    const int b = row0 + idx / U, unit = unit0 + idx % U;
    if (b < s.B && unit < D) carried_at(0, b, unit) += value;
  };
  for (int idx = threadIdx.x; s.stage && idx < S * kRows * U; idx += blockDim.x) {  // the final states' gradients
    const int b = row0 + idx / U % kRows, unit = unit0 + idx % U;
    carried[idx] = b < s.B && unit < D ? carry[carry_index(idx / (kRows * U), b, unit)] : 0.0f;
  }
  auto prefetch_states = [&](int t) {
    if (s.stage && t >= 0)
      copy_slice_async<U>(saved_states + t % 3 * NS * kRows * U, NS, s, row0, unit0, [&](int plane, int b) {
        return states + step_index(s, b, t, kFirstSaved + plane, S, unit0, head);
      });
  };
  auto prefetch_step = [&](int t) {  // pre-activations and d h_seq
    if (!s.stage || t < 0) return;
    if constexpr (PS > 0)
      copy_slice_async<U>(saved_pre + (t & 1) * PS * kRows * U, PS, s, row0, unit0, [&](int slot, int b) {
        return pre + step_index(s, b, t, slot, P, unit0, head);
      });
    copy_slice_async<U>(dh_steps + (t & 1) * kRows * U, 1, s, row0, unit0, [&](int, int b) {
      return d_h_seq + (((long long)b * s.T + t) * s.H + head) * D + unit0;
    });
  };
  prefetch_states(s.T - 1);
  prefetch_states(s.T - 2);
  prefetch_step(s.T - 1);
  rnnops::copy_async_commit();
  // a block holding every unit of a head whose G D gate gradients fit one chunk stages them in
  // shared memory as it computes them, so its product reads no global memory (rows past the batch
  // stay 0); other blocks copy in the chunks every block of the head wrote
  const bool resident = s.splits == 1 && G * D <= KC;
  auto stage = [&](int r, int gi, float value) { chunk[r * LC + gi] = from_float<T>(value); };
  if (resident)
    for (int idx = threadIdx.x; idx < kRows * KC; idx += blockDim.x) stage(idx / KC, idx % KC, 0.0f);
  rnnops::copy_async_wait<0>();
  __syncthreads();  // the staging zeros, the carried gradients and the last step's inputs
  for (int t = s.T - 1; t >= 0; --t) {
    // step t - 1's inputs (and the states at t - 2), into the buffers step t + 1 last read, which
    // every thread left at the barrier after that step's pointwise phase; they land while this
    // step runs and are waited for at its end
    prefetch_states(t - 2);
    prefetch_step(t - 1);
    rnnops::copy_async_commit();
    // the slice's pointwise gradients
    struct StepInputs {
      float dh, pre[P], now[S], prev[S], carried[S];  // states at t and t - 1, carried gradients
    };
    const float* states_now = saved_states + t % 3 * NS * kRows * U;
    const float* states_prev = saved_states + (t + 2) % 3 * NS * kRows * U;  // (t - 1's, for t > 0)
    const float* pre_now = saved_pre + (t & 1) * PS * kRows * U;
    const T* dh_now = dh_steps + (t & 1) * kRows * U;
    for_slice<U>(
        s, row0, unit0,
        [&](int b, int unit) {
          const int r = b - row0, u = unit - unit0;
          auto saved = [&](const float* buffer, int slot) {
            return buffer[((slot - kFirstSaved) * kRows + r) * U + u];
          };
          auto now = [&](int slot) {
            return s.stage ? saved(states_now, slot) : states[step_index(s, b, t, slot, S, unit, head)];
          };
          auto previous = [&](int slot) {
            return s.stage && t > 0 ? saved(states_prev, slot)
                                    : previous_state(s, states, initial, slot, b, t, unit, head, S);
          };
          StepInputs in;
          in.dh = carried_at(0, b, unit) + to_float(s.stage ? dh_now[r * U + u]
                                                   : d_h_seq[(((long long)b * s.T + t) * s.H + head) * D + unit]);
#pragma unroll
          for (int slot = 0; slot < PS; ++slot)
            in.pre[slot] = s.stage ? pre_now[(slot * kRows + r) * U + u]
                                   : pre[step_index(s, b, t, slot, P, unit, head)];
          if constexpr (CELL == kGRU) {
            in.prev[0] = previous(0);
          } else if constexpr (CELL == kElman) {
            in.now[0] = now(0);
          } else {
#pragma unroll
            for (int slot = 1; slot < S; ++slot) {  // c (and sLSTM's n, m)
              in.now[slot] = now(slot);
              in.prev[slot] = previous(slot);
              in.carried[slot] = carried_at(slot, b, unit);
            }
          }
          return in;
        },
        [&](const StepInputs& in) { return cell_gradient<CELL>(in.dh, in.pre, in.now, in.prev, in.carried); },
        [&](int r, int u, int b, int unit, const CellGradient<CELL>& grad) {
#pragma unroll
          for (int g = 0; g < G; ++g) {
            dx[step_index(s, b, t, g, G, unit, head)] = from_float<T>(grad.dx[g]);
            if (resident) stage(r, g * D + unit, CELL == kGRU && g == 2 ? grad.drec_n : grad.dx[g]);
          }
          if constexpr (CELL == kGRU) drec_n[step_index(s, b, t, 0, 1, unit, head)] = from_float<T>(grad.drec_n);
#pragma unroll
          for (int slot = 0; slot < S; ++slot) carried_at(slot, b, unit) = grad.carried[slot];
        });
    block_barrier(s);  // every slice's gate gradients before the products read them
    // dh_{t-1}[r][slice] = sum over (g, i) of dx_g[r][i] R_g[i][slice], chunk by chunk
    if constexpr (rnnops::is_same_v<T, float>) {  // IEEE float32 on CUDA cores
      constexpr int kMaxOutputs = (kRows * U + 31) / 32;
      float sum[kMaxOutputs];
      for (int j = 0; j < kMaxOutputs; ++j) sum[j] = 0.0f;
      for_gradient_chunks<CELL, KC>(s, resident, chunk, dx, drec_n, row0, t, head,
                                    [&](const float* gradients, int k0) {
        for (int j = 0, idx = threadIdx.x; idx < kRows * U; ++j, idx += blockDim.x) {
          const int r = idx / U, u = idx % U;
          float acc = 0.0f;
          for (int kk = 0; kk < KC && k0 + kk < G * D; ++kk) acc += gradients[r * LC + kk] * wt[u * LW + k0 + kk];
          sum[j] += acc;
        }
      });
      for (int j = 0, idx = threadIdx.x; idx < kRows * U; ++j, idx += blockDim.x) carry_product(idx, sum[j]);
    } else {  // tensor cores: the gate gradients in T (as the forward rounded h), fp32 accumulation
      using namespace nvcuda;
      const WarpShare share = warp_share(U / 16);
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[U / 16];  // this warp's tiles (warp_share)
#pragma unroll
      for (int j = 0; j < U / 16; ++j) wmma::fill_fragment(acc[j], 0.0f);
      for_gradient_chunks<CELL, KC>(s, resident, chunk, dx, drec_n, row0, t, head,
                                    [&](const T* gradients, int k0) {
#pragma unroll
        for (int j = 0; j < U / 16; ++j) {
          const int tile = share.first_tile + j * share.tile_stride;
          if (share.idle() || tile >= U / 16) break;
          wmma_k_steps(acc[j], gradients, LC, wt + tile * 16 * LW + k0, LW, 16 * share.part,
                       KC < G * D - k0 ? KC : G * D - k0, 16 * share.parts);
        }
      });
#pragma unroll
      for (int j = 0; j < U / 16; ++j) {
        const int tile = share.first_tile + j * share.tile_stride;
        if (share.idle() || tile >= U / 16) break;
        wmma::store_matrix_sync(products + share.part * kRows * U + tile * 16, acc[j], U, wmma::mem_row_major);
      }
      __syncthreads();
      // (each thread sums, then reads, the same elements: no barrier between)
      if (share.parts > 1) sum_parts(products, U, share.parts);
      for (int idx = threadIdx.x; idx < kRows * U; idx += blockDim.x) carry_product(idx, products[idx]);
    }
    // the next step's pointwise phase reads the carried gradients each thread accumulated itself
    // just above (for_slice and the loops above map an element to the same thread) and writes the
    // gate gradients (global, and staged where resident), which no thread reads before the
    // barrier after that phase, and the chunk buffer, whose last reads passed a barrier above: no
    // barrier needed (a head split over blocks meets at one grid barrier a step). Staged, it also
    // reads the inputs copied during this step, every thread's once each has waited for its own
    if (s.stage) {
      rnnops::copy_async_wait<0>();
      __syncthreads();
    }
  }
  for (int idx = threadIdx.x; s.stage && idx < S * kRows * U; idx += blockDim.x) {  // the initial states' gradients
    const int b = row0 + idx / U % kRows, unit = unit0 + idx % U;
    if (b < s.B && unit < D) carry[carry_index(idx / (kRows * U), b, unit)] = carried[idx];
  }
}

}  // namespace rnnops::rnn
