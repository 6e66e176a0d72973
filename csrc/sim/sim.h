// The CPU simulator: runs ordinary CUDA C++ kernels on CPU threads, so that their logic is
// tested on machines without a GPU (and under AddressSanitizer).
//
// What it provides, as the CUDA names kernels use:
//   threadIdx / blockIdx / blockDim / gridDim, __global__ / __device__ / __forceinline__,
//   __syncthreads, __syncwarp, warp shuffles (__shfl_sync, _xor, _up, _down) and votes
//   (__ballot_sync, __any_sync, __all_sync), atomicAdd / atomicMax / atomicCAS, __half and
//   __nv_bfloat16 with their conversions, __ldg, the fast-math intrinsics, nvcuda::wmma fragments
//   (m16n16k16, half / bfloat16 inputs, float accumulators), mma.sync's m16n8k16 tile in its
//   documented register layout (rnnops::mma_16x8x16), a grid-wide barrier for
//   cooperative launches, and asynchronous 16-byte copies from global to shared memory (a
//   thread's copies land when it waits for their group, not before, and a misaligned address
//   fails the launch once its threads are done, as it faults on a GPU).
// How it runs a launch: every thread of a block is a std::thread (blocks one after another;
// all blocks at once for cooperative launches), so barriers are real barriers and a missing
// one is a real race. Shared memory (RNNOPS_SHARED / RNNOPS_DYNAMIC_SHARED, see
// common/runtime.h) is allocated per block and filled with 0xFF bytes (NaN for floats), so an
// element read before it is written shows.
// Limits: warps are 32 threads and every lane of a warp takes part in each warp-level call
// (masks are not honoured); wmma fragments exchange their elements through the warp at each
// collective call, and the element order of frag.x[] is unspecified (as on a GPU).
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

namespace rnnops::sim {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr Dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr unsigned count() const { return x * y * z; }
};

constexpr int kWarpSize = 32;
constexpr int kFragmentElements = 256;  // the largest wmma tile: 16 x 16

struct Warp {
  explicit Warp(std::ptrdiff_t lanes) : lanes(lanes), barrier(lanes) {}
  std::ptrdiff_t lanes;
  std::barrier<> barrier;
  alignas(8) unsigned char exchange[kWarpSize][8];
  float fragment[kFragmentElements];
  unsigned mma_a[kWarpSize][4], mma_b[kWarpSize][2];  // mma_16x8x16's operands, gathered from the lanes
};

struct Block {
  Block(Dim3 dim, std::size_t dynamic_bytes)
      : dim(dim), threads(dim.count()), barrier(static_cast<std::ptrdiff_t>(dim.count())),
        dynamic_shared(dynamic_bytes ? new std::byte[dynamic_bytes] : nullptr) {
    std::memset(dynamic_shared.get(), 0xFF, dynamic_bytes);
    for (unsigned first = 0; first < threads; first += kWarpSize)
      warps.emplace_back(std::make_unique<Warp>(std::min<unsigned>(kWarpSize, threads - first)));
  }
  Dim3 dim;
  unsigned threads;
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::mutex shared_mutex;
  std::vector<std::unique_ptr<std::byte[]>> shared;
  std::unique_ptr<std::byte[]> dynamic_shared;
};

struct Grid {
  Dim3 dim;
  std::barrier<>* barrier = nullptr;  // cooperative launches only
  // what a GPU would have faulted on (the launch raises it when every thread is done; a thread
  // that threw instead would leave the others waiting at the next barrier)
  std::mutex fault_mutex;
  const char* fault = nullptr;
};

struct AsyncCopy {
  void* dst;
  const void* src;
};

struct Thread {
  Dim3 thread, block;
  Block* blk = nullptr;
  Grid* grid = nullptr;
  unsigned linear = 0, lane = 0;
  std::size_t shared_count = 0;
  std::vector<AsyncCopy> uncommitted;               // copies issued since the last commit
  std::vector<std::vector<AsyncCopy>> copy_groups;  // committed groups not yet waited for, oldest first
  Warp& warp() const { return *blk->warps[linear / kWarpSize]; }
};

inline thread_local Thread* current = nullptr;

inline void sync_block() { current->blk->barrier.arrive_and_wait(); }
inline void sync_warp() { current->warp().barrier.arrive_and_wait(); }

inline void sync_grid() {
  if (current->grid->barrier == nullptr) std::terminate();  // grid sync needs a cooperative launch
  current->grid->barrier->arrive_and_wait();
}

// Whether p is 16-byte aligned, as a 16-byte access needs; if not, records the fault (``fault``: the
// access and that a GPU raises a misaligned address error there)
inline bool aligned16(const void* p, const char* fault) {
  if (reinterpret_cast<std::uintptr_t>(p) % 16 == 0) return true;
  std::lock_guard<std::mutex> guard(current->grid->fault_mutex);
  current->grid->fault = fault;
  return false;
}

// cp.async: queued until the thread waits for the copy's group, when it lands (on a GPU it may land
// any time until then, so the kernel may not count on it before)
inline void copy_async16(void* dst, const void* src) {
  constexpr const char* fault = "copy_async16: an address is not 16-byte aligned (a misaligned address error on a GPU)";
  if (aligned16(dst, fault) && aligned16(src, fault)) current->uncommitted.push_back({dst, src});
}
inline void copy_async_commit() {
  current->copy_groups.push_back(std::move(current->uncommitted));
  current->uncommitted.clear();
}
inline void copy_async_wait(int pending_groups) {
  auto& groups = current->copy_groups;
  while (static_cast<int>(groups.size()) > pending_groups) {
    for (const AsyncCopy& copy : groups.front()) std::memcpy(copy.dst, copy.src, 16);
    groups.erase(groups.begin());
  }
}

// The k-th shared array a thread asks for is the block's k-th allocation.
template <class T>
T* shared_array(std::size_t count) {
  Thread& t = *current;
  const std::size_t k = t.shared_count++;
  Block& b = *t.blk;
  std::lock_guard<std::mutex> guard(b.shared_mutex);
  if (b.shared.size() <= k) b.shared.resize(k + 1);
  if (!b.shared[k]) {
    const std::size_t bytes = std::max<std::size_t>(count * sizeof(T), 1);
    b.shared[k].reset(new std::byte[bytes]);
    std::memset(b.shared[k].get(), 0xFF, bytes);
  }
  return reinterpret_cast<T*>(b.shared[k].get());
}

template <class T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(current->blk->dynamic_shared.get());
}

// ---------------------------------------------------------------- warp exchange

template <class T>
T exchange(T value, unsigned source) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move up to 8-byte values");
  Warp& w = current->warp();
  std::memcpy(w.exchange[current->lane], &value, sizeof(T));
  w.barrier.arrive_and_wait();
  T out;
  std::memcpy(&out, w.exchange[source % w.lanes], sizeof(T));
  w.barrier.arrive_and_wait();
  return out;
}

// c += a b for one 16 x 8 x 16 tile from the warp's registers in PTX's mma.m16n8k16 fragment
// layout (common/runtime.h): every lane's a and b gathered, each lane's own four outputs summed.
template <class T>
void mma_16x8x16(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  static_assert(sizeof(T) == 2, "two elements a 32-bit register");
  Warp& w = current->warp();
  const unsigned lane = current->lane;
  std::memcpy(w.mma_a[lane], a, sizeof(a));
  std::memcpy(w.mma_b[lane], b, sizeof(b));
  w.barrier.arrive_and_wait();
  auto element = [](unsigned word, int index) {
    T pair[2];
    std::memcpy(pair, &word, sizeof(pair));
    return float(pair[index]);
  };
  auto a_at = [&](int row, int k) { return element(w.mma_a[4 * (row % 8) + k % 8 / 2][row / 8 + 2 * (k / 8)], k % 2); };
  auto b_at = [&](int k, int n) { return element(w.mma_b[4 * n + k % 8 / 2][k / 8], k % 2); };
  const int group = static_cast<int>(lane) / 4, quad = static_cast<int>(lane) % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = group + 8 * (i / 2), column = 2 * quad + i % 2;
    float sum = c[i];
    for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(k, column);
    c[i] = sum;
  }
  w.barrier.arrive_and_wait();
}

inline unsigned ballot(bool predicate) {
  unsigned bits = 0;
  const unsigned lanes = static_cast<unsigned>(current->warp().lanes);
  for (unsigned l = 0; l < lanes; ++l) {  // every lane gathers every predicate
    const bool p = exchange<bool>(predicate, l);
    bits |= static_cast<unsigned>(p) << l;
  }
  return bits;
}

// ---------------------------------------------------------------- launch

template <class Kernel, class... Args>
void launch(Kernel kernel, Dim3 grid, Dim3 block, std::size_t dynamic_bytes, bool cooperative, Args... args) {
  const unsigned per_block = block.count(), blocks = grid.count();
  std::unique_ptr<std::barrier<>> grid_barrier;
  if (cooperative) grid_barrier = std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(per_block * blocks));
  Grid g;
  g.dim = grid;
  g.barrier = grid_barrier.get();
  std::exception_ptr failure;
  std::mutex failure_mutex;
  auto body = [&](Block* blk, Dim3 bidx, unsigned linear) {
    Thread t;
    t.thread = Dim3(linear % block.x, (linear / block.x) % block.y, linear / (block.x * block.y));
    t.block = bidx;
    t.blk = blk;
    t.grid = &g;
    t.linear = linear;
    t.lane = linear % kWarpSize;
    current = &t;
    try {
      kernel(args...);
    } catch (...) {
      std::lock_guard<std::mutex> guard(failure_mutex);
      if (!failure) failure = std::current_exception();
    }
    current = nullptr;
  };
  auto block_index = [&](unsigned b) { return Dim3(b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y)); };
  const unsigned together = cooperative ? blocks : 1;
  for (unsigned start = 0; start < blocks; start += together) {
    std::vector<std::unique_ptr<Block>> group;
    std::vector<std::thread> threads;
    for (unsigned b = start; b < start + together; ++b) {
      group.push_back(std::make_unique<Block>(block, dynamic_bytes));
      for (unsigned linear = 0; linear < per_block; ++linear)
        threads.emplace_back(body, group.back().get(), block_index(b), linear);
    }
    for (auto& th : threads) th.join();
  }
  if (failure) std::rethrow_exception(failure);
  if (g.fault) throw std::runtime_error(g.fault);
}

}  // namespace rnnops::sim

// ---------------------------------------------------------------- the CUDA names

using dim3 = rnnops::sim::Dim3;
#define threadIdx (::rnnops::sim::current->thread)
#define blockIdx (::rnnops::sim::current->block)
#define blockDim (::rnnops::sim::current->blk->dim)
#define gridDim (::rnnops::sim::current->grid->dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict

inline void __syncthreads() { rnnops::sim::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { rnnops::sim::sync_warp(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
T __shfl_sync(unsigned, T value, int source, int width = 32) {
  const unsigned lane = rnnops::sim::current->lane;
  return rnnops::sim::exchange(value, (lane & ~(width - 1)) + (static_cast<unsigned>(source) % width));
}
template <class T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int width = 32) {
  const unsigned lane = rnnops::sim::current->lane;
  return rnnops::sim::exchange(value, (lane & ~(width - 1)) + ((lane ^ lane_mask) & (width - 1)));
}
template <class T>
T __shfl_down_sync(unsigned, T value, unsigned delta, int width = 32) {
  const unsigned lane = rnnops::sim::current->lane, in_segment = lane & (width - 1);
  return rnnops::sim::exchange(value, in_segment + delta < static_cast<unsigned>(width) ? lane + delta : lane);
}
template <class T>
T __shfl_up_sync(unsigned, T value, unsigned delta, int width = 32) {
  const unsigned lane = rnnops::sim::current->lane, in_segment = lane & (width - 1);
  return rnnops::sim::exchange(value, in_segment >= delta ? lane - delta : lane);
}
inline unsigned __ballot_sync(unsigned, int predicate) { return rnnops::sim::ballot(predicate != 0); }
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned, int predicate) {
  const unsigned lanes = static_cast<unsigned>(rnnops::sim::current->warp().lanes);
  const unsigned all = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
  return rnnops::sim::ballot(predicate != 0) == all;
}

template <class T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
template <class T>
T atomicMax(T* address, T value) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old < value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <class T>
T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;
}

// ---------------------------------------------------------------- half and bfloat16

struct __half {
  _Float16 value;
  __half() = default;
  __half(float f) : value(static_cast<_Float16>(f)) {}
  operator float() const { return static_cast<float>(value); }
};
struct __nv_bfloat16 {
  std::uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = static_cast<std::uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
    } else {
      bits = static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
    }
  }
  operator float() const {
    const std::uint32_t u = static_cast<std::uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
inline float __half2float(__half h) { return h; }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return h; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }

// ---------------------------------------------------------------- read-only loads, fast-math intrinsics

template <class T>
T __ldg(const T* p) {
  return *p;
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return std::min(1.0f, std::max(0.0f, x)); }

// CUDA's global min / max overloads
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// ---------------------------------------------------------------- wmma

namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K>
struct tile_shape;
template <int M, int N, int K>
struct tile_shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct tile_shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct tile_shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

// Each lane keeps the whole tile (``full``) and owns a slice of it (``x``); collective calls
// first gather every lane's slice through the warp, so element-wise edits of x[] count.
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = tile_shape<Use, M, N, K>::rows, cols = tile_shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols / rnnops::sim::kWarpSize;
  T x[num_elements];
  float full[rows * cols];
  void publish() {
    const int lane = static_cast<int>(rnnops::sim::current->lane);
    for (int i = 0; i < num_elements; ++i) x[i] = T(full[lane * num_elements + i]);
  }
  void gather() {
    rnnops::sim::Warp& w = rnnops::sim::current->warp();
    const int lane = static_cast<int>(rnnops::sim::current->lane);
    for (int i = 0; i < num_elements; ++i) w.fragment[lane * num_elements + i] = float(x[i]);
    w.barrier.arrive_and_wait();
    std::copy(w.fragment, w.fragment + rows * cols, full);
    w.barrier.arrive_and_wait();
  }
};

template <class Use, int M, int N, int K, class T, class L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, T value) {
  std::fill(f.full, f.full + f.rows * f.cols, float(value));
  f.publish();
}

template <class Use, int M, int N, int K, class T, class L, class P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* pointer, unsigned ldm) {
  constexpr bool column = std::is_same_v<L, col_major>;
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c) f.full[r * f.cols + c] = float(pointer[column ? c * ldm + r : r * ldm + c]);
  f.publish();
}

template <int M, int N, int K, class T, class P>
void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f, const P* pointer, unsigned ldm, layout_t layout) {
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      f.full[r * N + c] = float(pointer[layout == mem_col_major ? c * ldm + r : r * ldm + c]);
  f.publish();
}

template <int M, int N, int K, class T, class P>
void store_matrix_sync(P* pointer, fragment<accumulator, M, N, K, T, void>& f, unsigned ldm, layout_t layout) {
  f.gather();
  const int lane = static_cast<int>(rnnops::sim::current->lane);
  for (int i = 0; i < f.num_elements; ++i) {  // each lane writes the elements it owns
    const int flat = lane * f.num_elements + i, r = flat / N, c = flat % N;
    pointer[layout == mem_col_major ? c * ldm + r : r * ldm + c] = P(f.full[flat]);
  }
}

template <int M, int N, int K, class TA, class LA, class TB, class LB, class TC>
void mma_sync(fragment<accumulator, M, N, K, TC, void>& d, fragment<matrix_a, M, N, K, TA, LA>& a,
              fragment<matrix_b, M, N, K, TB, LB>& b, fragment<accumulator, M, N, K, TC, void>& c) {
  a.gather();
  b.gather();
  c.gather();
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c.full[i * N + j];
      for (int k = 0; k < K; ++k) acc += a.full[i * K + k] * b.full[k * N + j];
      out[i * N + j] = acc;
    }
  std::copy(out, out + M * N, d.full);
  d.publish();
}
}  // namespace nvcuda::wmma
