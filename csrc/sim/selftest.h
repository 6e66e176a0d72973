// Kernels that test the simulator itself (and, compiled by nvcc, the shim's CUDA side).
#pragma once
#include "../common/runtime.h"

namespace rnnops::selftest {

// Sum of n floats into out[blockIdx.x], a shared-memory tree reduction per block.
template <int THREADS>
__global__ void block_sum(const float* in, float* out, int n) {
  RNNOPS_SHARED(float, partial, THREADS);
  const int i = blockIdx.x * THREADS + threadIdx.x;
  partial[threadIdx.x] = i < n ? in[i] : 0.0f;
  __syncthreads();
  for (int stride = THREADS / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.x) < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// The same reduction with the barrier after the first write left out: a race.
template <int THREADS>
__global__ void block_sum_missing_barrier(const float* in, float* out, int n) {
  RNNOPS_SHARED(float, partial, THREADS);
  const int i = blockIdx.x * THREADS + threadIdx.x;
  partial[threadIdx.x] = i < n ? in[i] : 0.0f;
  for (int stride = THREADS / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.x) < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// Inclusive prefix sum of each warp's 32 values with __shfl_up_sync; votes on the way.
__global__ void warp_scan(const float* in, float* out, unsigned* positive_mask, int* all_positive) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float value = in[i];
  const unsigned lane = threadIdx.x % 32;
  for (unsigned delta = 1; delta < 32; delta *= 2) {
    const float other = __shfl_up_sync(0xffffffffu, value, delta);
    if (lane >= delta) value += other;
  }
  out[i] = value;
  const unsigned mask = __ballot_sync(0xffffffffu, in[i] > 0.0f);
  const int all = __all_sync(0xffffffffu, in[i] > 0.0f);
  if (lane == 0) {
    positive_mask[i / 32] = mask;
    all_positive[i / 32] = all;
  }
  // the total of the warp through xor shuffles, checked against the scan's last lane
  float total = in[i];
  for (int offset = 16; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
  if (lane == 31 && fabsf(total - value) > 1e-3f * (1.0f + fabsf(total))) out[i] = NAN;
}

// C (M x N, fp32) = A (M x K, half, row-major) B (K x N, half, row-major), one warp per 16 x 16
// tile of C, K in 16-wide steps with wmma; the accumulator is scaled element-wise (x[]) by alpha.
__global__ void wmma_matmul(const __half* A, const __half* B, float* C, int M, int N, int K, float alpha) {
  using namespace nvcuda;
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int tiles_n = N / 16;
  const int tile_m = warp / tiles_n, tile_n = warp % tiles_n;
  if (tile_m * 16 >= M) return;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int k = 0; k < K; k += 16) {
    wmma::load_matrix_sync(a, A + tile_m * 16 * K + k, K);
    wmma::load_matrix_sync(b, B + k * N + tile_n * 16, N);
    wmma::mma_sync(acc, a, b, acc);
  }
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= alpha;
  wmma::store_matrix_sync(C + tile_m * 16 * N + tile_n * 16, acc, N, wmma::mem_row_major);
}

// Each block adds its index to a counter, all blocks meet at a grid barrier, then read it.
__global__ void grid_barrier(int* counter, int* seen) {
  if (threadIdx.x == 0) atomicAdd(counter, static_cast<int>(blockIdx.x) + 1);
  rnnops::grid_sync();
  if (threadIdx.x == 0) seen[blockIdx.x] = atomicAdd(counter, 0);
}

// Each of a block's threads copies 4 floats from in + offset + 4 * thread to shared memory with
// an asynchronous copy, reads them back before waiting (``before``: the simulator's poison, since
// a copy lands when its thread waits; undefined on a GPU), waits, and after a barrier reads the
// next thread's (``after``). An offset that is not a multiple of 4 floats is misaligned.
__global__ void async_copy(const float* in, float* before, float* after, int offset) {
  RNNOPS_SHARED(rnnops::Chunk16, buffer, 32);
  const int i = threadIdx.x, n = blockDim.x;
  rnnops::copy_async16(buffer + i, in + offset + 4 * i);
  rnnops::copy_async_commit();
  for (int j = 0; j < 4; ++j) before[4 * i + j] = buffer[i].f[j];
  rnnops::copy_async_wait<0>();
  __syncthreads();
  for (int j = 0; j < 4; ++j) after[4 * i + j] = buffer[(i + 1) % n].f[j];
}

// Reads one element past the end of ``in``: AddressSanitizer must report it.
__global__ void out_of_bounds(const float* in, float* out, int n) {
  if (threadIdx.x == 0) out[0] = in[n];
}

}  // namespace rnnops::selftest
