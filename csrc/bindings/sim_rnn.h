// The fused recurrent cells' dispatch, shared by sim_rnn_forward.cpp and sim_rnn_backward.cpp.
#pragma once
#include "../rnn/rnn.cuh"
#include "sim_ext.h"

namespace rnnops::bindings {

template <class F>
void dispatch_cell(int64_t cell, int64_t units, F&& f) {
#define RNNOPS_CELL(C, U) \
  if (cell == C && units == U) return f(std::integral_constant<int, C>{}, std::integral_constant<int, U>{});
#ifdef RNNOPS_SIM_SANITIZED
  RNNOPS_CELL(0, 16) RNNOPS_CELL(0, 64)  // LSTM, a head in one block / split over blocks
#else
  RNNOPS_CELL(0, 16) RNNOPS_CELL(0, 32) RNNOPS_CELL(0, 64) RNNOPS_CELL(1, 16) RNNOPS_CELL(1, 32) RNNOPS_CELL(1, 64)
  RNNOPS_CELL(2, 16) RNNOPS_CELL(2, 32) RNNOPS_CELL(2, 64) RNNOPS_CELL(3, 16) RNNOPS_CELL(3, 32) RNNOPS_CELL(3, 64)
#endif
#undef RNNOPS_CELL
  TORCH_CHECK(false, "no simulator build for cell=", cell, " units=", units);
}

// f(T{}, cell, k_steps) for the fragment kernels (rnn_fwd_fragments / rnn_bwd_fragments): half types,
// a head of up to 16 k_steps units; the sanitized builds only the LSTM's two-step bfloat16 kernels
template <class F>
void dispatch_fragments(at::ScalarType dtype, int64_t cell, int64_t k_steps, F&& f) {
  auto for_type = [&](auto tag) {
#define RNNOPS_FRAGMENTS(C, KS)  \
  if (cell == C && k_steps == KS) \
    return f(tag, std::integral_constant<int, C>{}, std::integral_constant<int, KS>{});
#ifdef RNNOPS_SIM_SANITIZED
    RNNOPS_FRAGMENTS(0, 2)
#else
    RNNOPS_FRAGMENTS(0, 2) RNNOPS_FRAGMENTS(0, 4) RNNOPS_FRAGMENTS(1, 2) RNNOPS_FRAGMENTS(1, 4)
    RNNOPS_FRAGMENTS(2, 2) RNNOPS_FRAGMENTS(2, 4) RNNOPS_FRAGMENTS(3, 2) RNNOPS_FRAGMENTS(3, 4)
#endif
#undef RNNOPS_FRAGMENTS
    TORCH_CHECK(false, "no simulator build of the fragment kernels for cell=", cell, " k_steps=", k_steps);
  };
#ifndef RNNOPS_SIM_SANITIZED
  if (dtype == at::kHalf) return for_type(__half{});
#endif
  if (dtype == at::kBFloat16) return for_type(__nv_bfloat16{});
  TORCH_CHECK(false, "no simulator build of the fragment kernels for ", dtype,
              " (float16 or bfloat16; the sanitized builds bfloat16)");
}

// Runs a cell kernel at launch_shape (grid x, y, z, threads, dynamic shared bytes), cooperatively
// where the grid has several blocks a head (z > 1: they meet at grid barriers), as nvrtc.py does
template <class Kernel, class... Args>
void launch_cells(Kernel kernel, const std::vector<int64_t>& launch_shape, Args... args) {
  rnnops::sim::launch(kernel, dim3(launch_shape[0], launch_shape[1], launch_shape[2]), dim3(launch_shape[3]),
                      launch_shape[4], launch_shape[2] > 1, args...);
}

inline rnnops::rnn::RNNShape rnn_shape(const std::vector<int64_t>& v) {
  return rnnops::rnn::RNNShape{static_cast<int>(v[0]), static_cast<int>(v[1]), static_cast<int>(v[2]),
                               static_cast<int>(v[3]), static_cast<int>(v[4]), static_cast<int>(v[5]),
                               static_cast<int>(v[6]), static_cast<int>(v[7]), static_cast<int>(v[8]),
                               static_cast<int>(v[9]), static_cast<int>(v[10]), static_cast<int>(v[11])};
}

}  // namespace rnnops::bindings
