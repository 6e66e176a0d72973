// What the simulator extension's translation units share: the argument checks and casts and the
// dtype dispatch, and the kernels' entry points, which sim_ext.cpp binds (pybind11) beside the
// shim's self-tests. The kernels' instantiations are split over sim_scan.cpp, sim_rnn_forward.cpp
// and sim_rnn_backward.cpp so that ninja compiles them side by side: 28 s on two cores where the
// one file took 42 (2026-11-27; the pybind11 module and the scan take the longest).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "../common/runtime.h"

namespace rnnops::bindings {

inline void check_cpu(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype, name,
              " must be a contiguous CPU tensor of ", dtype);
}

template <class F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  if (dtype == at::kFloat) return f(float{});
#ifndef RNNOPS_SIM_SANITIZED
  if (dtype == at::kHalf) return f(__half{});
#endif
  if (dtype == at::kBFloat16) return f(__nv_bfloat16{});
  TORCH_CHECK(false, "no simulator build for ", dtype, " (float32, float16 or bfloat16; the sanitized builds "
              "float32 and bfloat16)");
}

template <class T>
const T* ptr(const at::Tensor& t) {  // an empty tensor stands for "absent"
  return t.defined() && t.numel() ? reinterpret_cast<const T*>(t.data_ptr()) : nullptr;
}
template <class T>
T* mut(const at::Tensor& t) {
  return t.defined() && t.numel() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

void scan_forward(at::Tensor u, at::Tensor delta, at::Tensor A, at::Tensor B, at::Tensor C,
                  at::Tensor D, at::Tensor z, at::Tensor delta_bias, at::Tensor out, at::Tensor chunk_states,
                  at::Tensor initial_state, at::Tensor final_state, at::Tensor cu_seqlens,
                  at::Tensor chunk_offsets, std::vector<int64_t> strides, std::vector<int64_t> b_layout,
                  std::vector<int64_t> c_layout, std::vector<int64_t> shape, std::vector<int64_t> launch_shape);
void scan_backward(at::Tensor u, at::Tensor delta, at::Tensor A, at::Tensor B, at::Tensor C,
                   at::Tensor D, at::Tensor z, at::Tensor delta_bias, at::Tensor d_out,
                   at::Tensor chunk_states, at::Tensor d_final, at::Tensor d_initial, at::Tensor du,
                   at::Tensor d_delta, at::Tensor dz, at::Tensor dA, at::Tensor dB, at::Tensor dC,
                   at::Tensor dD, at::Tensor d_bias, at::Tensor cu_seqlens, at::Tensor chunk_offsets,
                   std::vector<int64_t> strides, std::vector<int64_t> b_layout, std::vector<int64_t> c_layout,
                   std::vector<int64_t> shape, std::vector<int64_t> launch_shape);
void scan_forward_local(at::Tensor u, at::Tensor delta, at::Tensor A, at::Tensor B, at::Tensor delta_bias,
                        at::Tensor segment_states, at::Tensor dt_sums, at::Tensor cu_seqlens, at::Tensor chunk_offsets,
                        std::vector<int64_t> strides, std::vector<int64_t> b_layout, std::vector<int64_t> shape,
                        std::vector<int64_t> launch_shape);
void scan_backward_local(at::Tensor delta, at::Tensor z, at::Tensor d_out, at::Tensor A, at::Tensor C,
                         at::Tensor delta_bias, at::Tensor segment_grads, at::Tensor dt_sums, at::Tensor cu_seqlens,
                         at::Tensor chunk_offsets, std::vector<int64_t> strides, std::vector<int64_t> c_layout,
                         std::vector<int64_t> shape, std::vector<int64_t> launch_shape);
void scan_compose(at::Tensor values, at::Tensor dt_sums, at::Tensor A, at::Tensor entering, at::Tensor leaving,
                  std::vector<int64_t> sizes);
void rnn_forward(at::Tensor x, at::Tensor R, at::Tensor bias, at::Tensor initial, at::Tensor states,
                 at::Tensor pre, at::Tensor h_seq, std::vector<int64_t> shape, int64_t cell, int64_t units,
                 std::vector<int64_t> launch_shape);
void rnn_forward_fragments(at::Tensor x, at::Tensor R, at::Tensor bias, at::Tensor initial, at::Tensor states,
                           at::Tensor pre, at::Tensor h_seq, std::vector<int64_t> shape, int64_t cell,
                           int64_t k_steps, std::vector<int64_t> launch_shape);
void rnn_backward(at::Tensor R, at::Tensor initial, at::Tensor states, at::Tensor pre,
                  at::Tensor d_h_seq, at::Tensor carry, at::Tensor dx, at::Tensor drec_n,
                  std::vector<int64_t> shape, int64_t cell, int64_t units, std::vector<int64_t> launch_shape);
void rnn_backward_fragments(at::Tensor R, at::Tensor initial, at::Tensor states, at::Tensor pre,
                            at::Tensor d_h_seq, at::Tensor carry, at::Tensor dx, at::Tensor drec_n,
                            std::vector<int64_t> shape, int64_t cell, int64_t k_steps,
                            std::vector<int64_t> launch_shape);

}  // namespace rnnops::bindings
