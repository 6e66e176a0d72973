// The one header every kernel includes: real CUDA under nvcc / NVRTC, the CPU simulator
// (sim/sim.h) under a host compiler. Kernels use only what both sides provide:
//   RNNOPS_SHARED(T, name, count)   a block's static shared array
//   RNNOPS_DYNAMIC_SHARED(T, name)   the launch's dynamic shared memory as T*
//   rnnops::grid_sync()              grid-wide barrier (cooperative launches only)
//   rnnops::to_float / from_float    float <-> float, __half, __nv_bfloat16
//   rnnops::is_same_v                std::is_same_v (libcu++'s under NVRTC)
//   rnnops::exp2_approx              2^x, one MUFU.EX2 on the GPU (ex2.approx.ftz: relative error
//                                    about 2^-22, results below 2^-126 flushed to 0)
//   rnnops::Chunk16, load16, in_flight
//                                    16-byte copies (load16: one load, 16-byte aligned); a thread's
//                                    loads of several indices issued together
//   rnnops::copy_async16 / copy_async_commit / copy_async_wait<N>
//                                    16 bytes from global to shared memory without registers
//                                    (cp.async, sm_80+; both addresses 16-byte aligned), in groups
//                                    the thread commits; wait<N> returns once all but the N most
//                                    recent of its groups have landed (a block barrier after it
//                                    shows them to the other threads)
//   rnnops::mma_16x8x16<T>           c += a b on one 16 x 8 x 16 tensor-core tile (mma.sync, sm_80+,
//                                    T __half or __nv_bfloat16, float accumulators) in PTX's
//                                    fragment layout: lane = 4 group + quad; a's 32-bit registers
//                                    hold a[row][k, k + 1] at rows group (+8 in a[1], a[3]) and k =
//                                    2 quad (+8 in a[2], a[3]); b's b[k, k + 1][group] at k = 2 quad
//                                    (+8 in b[1]); c holds rows group (c[0], c[1]) and group + 8
//                                    (c[2], c[3]), columns 2 quad and 2 quad + 1. A register's
//                                    first element is the one at the lower address.
//   rnnops::mma_a_fragment / mma_b_fragment
//                                    the calling lane's registers of mma_16x8x16's a (a row-major
//                                    16 x 16 tile) and b (a 16 x 8 tile stored column by column)
//   rnnops::load_word, Pair<E>       a 32-bit word of two adjacent half-type elements (a fragment
//                                    register) loaded from memory; two adjacent elements as one
//                                    access (aligned to their size)
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#include <cooperative_groups.h>
#include <cuda/std/type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#define RNNOPS_SHARED(T, name, count) __shared__ T name[count]
#define RNNOPS_DYNAMIC_SHARED(T, name)                                 \
  extern __shared__ __align__(16) unsigned char rnnops_dynamic_smem[]; \
  T* name = reinterpret_cast<T*>(rnnops_dynamic_smem)
namespace rnnops {
__device__ __forceinline__ void grid_sync() { cooperative_groups::this_grid().sync(); }
template <class A, class B>
inline constexpr bool is_same_v = cuda::std::is_same_v<A, B>;
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ void copy_async16(void* shared_dst, const void* global_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(global_src) : "memory");
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ unsigned load_word(const void* p) { return *reinterpret_cast<const unsigned*>(p); }
template <class T>
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  if constexpr (cuda::std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(cuda::std::is_same_v<T, __half>, "mma_16x8x16 takes __half or __nv_bfloat16");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}
template <int kPendingGroups>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPendingGroups) : "memory");
}
}  // namespace rnnops
#else
#include "../sim/sim.h"
#define RNNOPS_SHARED(T, name, count) T* name = ::rnnops::sim::shared_array<T>(count)
#define RNNOPS_DYNAMIC_SHARED(T, name) T* name = ::rnnops::sim::dynamic_shared<T>()
namespace rnnops {
inline void grid_sync() { sim::sync_grid(); }
template <class A, class B>
inline constexpr bool is_same_v = std::is_same_v<A, B>;
inline float exp2_approx(float x) { return std::exp2(x); }
inline void copy_async16(void* shared_dst, const void* global_src) { sim::copy_async16(shared_dst, global_src); }
inline void copy_async_commit() { sim::copy_async_commit(); }
template <int kPendingGroups>
inline void copy_async_wait() {
  sim::copy_async_wait(kPendingGroups);
}
inline unsigned load_word(const void* p) {
  unsigned word;
  std::memcpy(&word, p, sizeof(word));
  return word;
}
template <class T>
inline void mma_16x8x16(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  sim::mma_16x8x16<T>(c, a, b);
}
}  // namespace rnnops
#endif

namespace rnnops {
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// (__fdividef: MUFU.RCP and a multiply, within 2 ulp; an IEEE division added a range check and a
// call to its slow path each, 20 of them in a fused LSTM step's pointwise code. A denominator past
// 2^126, where x < -87, gives 0, the sigmoid's value there to float precision)
__device__ __forceinline__ float sigmoid(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }
__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : logf(1.0f + __expf(x)); }

// mma_16x8x16's a for the calling lane (lane = 4 group + quad; 1-D blocks) from the row-major
// 16 x 16 tile at ``tile`` whose rows are ``ld`` elements apart.
template <class T>
__device__ __forceinline__ void mma_a_fragment(unsigned (&a)[4], const T* tile, int ld) {
  const int lane = threadIdx.x % 32;
  const T* at = tile + lane / 4 * ld + lane % 4 * 2;
  a[0] = load_word(at);
  a[1] = load_word(at + 8 * ld);
  a[2] = load_word(at + 8);
  a[3] = load_word(at + 8 * ld + 8);
}

// mma_16x8x16's b for the calling lane from the 16 x 8 tile at ``tile`` stored column by column:
// a column's 16 k contiguous, columns ``ld`` elements apart (a row-major [n][k] matrix's slice).
template <class T>
__device__ __forceinline__ void mma_b_fragment(unsigned (&b)[2], const T* tile, int ld) {
  const int lane = threadIdx.x % 32;
  const T* at = tile + lane / 4 * ld + lane % 4 * 2;
  b[0] = load_word(at);
  b[1] = load_word(at + 8);
}

template <class E>
struct alignas(2 * sizeof(E)) Pair {
  E lo, hi;
};

// 16 bytes moved as one load / store (LDG.128, STS.128 where aligned): 4 floats, or the raw bits of
// 8 half-type values (a struct copy moves bits, no arithmetic)
struct alignas(16) Chunk16 {
  float f[4];
};

// The 16 bytes at p, which must be 16-byte aligned (a GPU raises a misaligned address error, the
// simulator fails the launch): load16 reads them, store16 writes them
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
__device__ __forceinline__ Chunk16 load16(const void* p) { return *reinterpret_cast<const Chunk16*>(p); }
__device__ __forceinline__ void store16(void* p, const Chunk16& value) { *reinterpret_cast<Chunk16*>(p) = value; }
#else
inline Chunk16 load16(const void* p) {
  sim::aligned16(p, "load16: an address is not 16-byte aligned (a misaligned address error on a GPU)");
  Chunk16 value;
  std::memcpy(&value, p, sizeof(value));  // (memcpy takes any address: the fault is only recorded)
  return value;
}
inline void store16(void* p, const Chunk16& value) {
  if (sim::aligned16(p, "store16: an address is not 16-byte aligned (a misaligned address error on a GPU)"))
    std::memcpy(p, &value, sizeof(value));
}
#endif

// use(idx, load(idx)) for every idx < total, the block's threads striding over idx, kInFlight
// indices a thread at a time: all of their loads before any use, so that a thread's global loads
// issue together and a round costs one memory latency, where a plain loop (load, then the use that
// needs it) pays one per index. load returns a value (the loaded inputs of one index).
template <int kInFlight, class Load, class Use>
__device__ __forceinline__ void in_flight(int total, Load load, Use use) {
  using Value = decltype(load(0));
  for (int base = threadIdx.x; base < total; base += blockDim.x * kInFlight) {
    Value values[kInFlight];
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) {
      const int idx = base + j * blockDim.x;
      if (idx < total) values[j] = load(idx);
    }
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) {
      const int idx = base + j * blockDim.x;
      if (idx < total) use(idx, values[j]);
    }
  }
}
}  // namespace rnnops
