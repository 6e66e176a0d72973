// pybind11 extension that runs the project's CUDA kernels on CPU tensors through the simulator
// (built by rnnops.cuda_backend.simulator with torch.utils.cpp_extension; also with
// -fsanitize=address and -fsanitize=thread for the sanitizer tests). The sanitized builds
// (RNNOPS_SIM_SANITIZED) instantiate only what their test runs (tests/test_cuda_sim.py: each kernel
// once or twice, float32 and bfloat16): every instantiation took AddressSanitizer's 116 s to compile
// on two cores, a fifth of the CPU test suite's time; another tile there fails with "no simulator
// build for ...".
// ATen's tensor, its factories and torch's pybind11 casters, not torch/extension.h (all of
// libtorch's C++ API: 21 of the 65 seconds -O2 took on a CI core, twice: the sanitized build too)
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include "../rnn/rnn.cuh"
#include "../scan/selective_scan.cuh"
#include "../sim/selftest.h"

namespace {

using rnnops::sim::launch;

void check_cpu(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype, name,
              " must be a contiguous CPU tensor of ", dtype);
}

at::Tensor block_sum(at::Tensor x, bool missing_barrier) {
  check_cpu(x, "x", at::kFloat);
  constexpr int threads = 64;
  const int n = static_cast<int>(x.numel()), blocks = (n + threads - 1) / threads;
  auto out = at::full({blocks}, NAN, x.options());
  auto kernel = missing_barrier ? rnnops::selftest::block_sum_missing_barrier<threads>
                                : rnnops::selftest::block_sum<threads>;
  launch(kernel, dim3(blocks), dim3(threads), 0, false, x.data_ptr<float>(), out.data_ptr<float>(), n);
  return out;
}

std::vector<at::Tensor> warp_scan(at::Tensor x) {
  check_cpu(x, "x", at::kFloat);
  TORCH_CHECK(x.numel() % 64 == 0, "x must hold a multiple of 64 values");
  const int n = static_cast<int>(x.numel());
  auto out = at::full_like(x, NAN);
  auto mask = at::zeros({n / 32}, x.options().dtype(at::kLong));
  auto all = at::zeros({n / 32}, x.options().dtype(at::kInt));
  auto mask32 = at::zeros({n / 32}, x.options().dtype(at::kInt));
  launch(rnnops::selftest::warp_scan, dim3(n / 64), dim3(64), 0, false, x.data_ptr<float>(), out.data_ptr<float>(),
         reinterpret_cast<unsigned*>(mask32.data_ptr<int>()), all.data_ptr<int>());
  mask.copy_(mask32.to(at::kLong).bitwise_and(0xffffffffLL));
  return {out, mask, all};
}

at::Tensor wmma_matmul(at::Tensor a, at::Tensor b, double alpha) {
  check_cpu(a, "a", at::kHalf);
  check_cpu(b, "b", at::kHalf);
  const int M = static_cast<int>(a.size(0)), K = static_cast<int>(a.size(1)), N = static_cast<int>(b.size(1));
  TORCH_CHECK(M % 16 == 0 && N % 16 == 0 && K % 16 == 0, "M, N, K must be multiples of 16");
  auto c = at::full({M, N}, NAN, a.options().dtype(at::kFloat));
  const int warps = (M / 16) * (N / 16);
  launch(rnnops::selftest::wmma_matmul, dim3((warps + 1) / 2), dim3(64), 0, false,
         reinterpret_cast<const __half*>(a.data_ptr<at::Half>()), reinterpret_cast<const __half*>(b.data_ptr<at::Half>()),
         c.data_ptr<float>(), M, N, K, static_cast<float>(alpha));
  return c;
}

at::Tensor grid_barrier(int64_t blocks) {
  auto counter = at::zeros({1}, at::kInt);
  auto seen = at::full({blocks}, -1, at::kInt);
  launch(rnnops::selftest::grid_barrier, dim3(static_cast<unsigned>(blocks)), dim3(32), 0, true,
         counter.data_ptr<int>(), seen.data_ptr<int>());
  return seen;
}

std::vector<at::Tensor> async_copy(at::Tensor x, int64_t offset) {
  check_cpu(x, "x", at::kFloat);
  TORCH_CHECK(offset >= 0 && x.numel() >= offset + 128, "x must hold offset + 128 values");
  auto before = at::full({128}, 0.0, x.options()), after = at::full({128}, NAN, x.options());
  launch(rnnops::selftest::async_copy, dim3(1), dim3(32), 0, false, x.data_ptr<float>(), before.data_ptr<float>(),
         after.data_ptr<float>(), static_cast<int>(offset));
  return {before, after};
}

at::Tensor out_of_bounds(at::Tensor x) {
  check_cpu(x, "x", at::kFloat);
  auto out = at::zeros({1}, x.options());
  launch(rnnops::selftest::out_of_bounds, dim3(1), dim3(32), 0, false, x.data_ptr<float>(), out.data_ptr<float>(),
         static_cast<int>(x.numel()));
  return out;
}

// ---------------------------------------------------------------- selective scan
// The host side (rnnops.cuda_backend.selective_scan) computes every stride, mode and size; these
// functions only package them into the kernels' structs and launch through the simulator.

using rnnops::scan::BCOperand;
using rnnops::scan::Operand;
using rnnops::scan::ScanShape;

Operand operand(const std::vector<int64_t>& strides, int k) {  // strides: (b, t, d) of operand k, in order
  return Operand{strides[3 * k], strides[3 * k + 1], strides[3 * k + 2]};
}

ScanShape scan_shape(const std::vector<int64_t>& v) {  // Dm, N, packed, has_d, has_z, has_bias, softplus
  return ScanShape{static_cast<int>(v[0]), static_cast<int>(v[1]), static_cast<int>(v[2]), static_cast<int>(v[3]),
                   static_cast<int>(v[4]), static_cast<int>(v[5]), static_cast<int>(v[6])};
}

BCOperand bc_operand(const at::Tensor& t, const std::vector<int64_t>& s) {
  // s: mode, stride b, t, g, n, channels per group
  return BCOperand{t.data_ptr<float>(), static_cast<int>(s[0]), s[1], s[2], s[3], s[4], static_cast<int>(s[5])};
}

// f(warps, items, staged) as compile-time constants from launch_shape[2], [3], [5]
template <class F>
void dispatch_scan_tiles(const std::vector<int64_t>& launch_shape, F&& f) {
  const int64_t warps = launch_shape[2], items = launch_shape[3];
  const bool staged = launch_shape[5] != 0;
#define RNNOPS_TILE(W, I)                                                                             \
  if (warps == W && items == I)                                                                     \
    return staged ? f(std::integral_constant<int, W>{}, std::integral_constant<int, I>{}, std::true_type{}) \
                  : f(std::integral_constant<int, W>{}, std::integral_constant<int, I>{}, std::false_type{});
#ifdef RNNOPS_SIM_SANITIZED
  RNNOPS_TILE(4, 8)  // the default configuration's
#else
  RNNOPS_TILE(1, 4) RNNOPS_TILE(2, 4) RNNOPS_TILE(4, 4) RNNOPS_TILE(4, 8) RNNOPS_TILE(8, 8)
#endif
#undef RNNOPS_TILE
  TORCH_CHECK(false, "no simulator build for warps=", warps, " items=", items);
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
                  std::vector<int64_t> c_layout, std::vector<int64_t> shape, std::vector<int64_t> launch_shape) {
  // strides: u, delta, z, out (b, t, d each); launch_shape: grid x, grid y, warps, items, dynamic shared bytes,
  // staged (B and C rows staged in shared memory)
  const auto s = scan_shape(shape);
  dispatch_dtype(u.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_scan_tiles(launch_shape, [&](auto w, auto i, auto staged) {
      launch(rnnops::scan::selective_scan_fwd<T, decltype(w)::value, decltype(i)::value, decltype(staged)::value>,
             dim3(launch_shape[0], launch_shape[1]), dim3(32 * decltype(w)::value), launch_shape[4], false,
             ptr<T>(u), operand(strides, 0), ptr<T>(delta), operand(strides, 1), ptr<float>(A),
             bc_operand(B, b_layout), bc_operand(C, c_layout), ptr<float>(D), ptr<T>(z), operand(strides, 2),
             ptr<float>(delta_bias), mut<T>(out), operand(strides, 3), mut<float>(chunk_states),
             ptr<float>(initial_state), mut<float>(final_state), ptr<int>(cu_seqlens), ptr<int>(chunk_offsets), s);
    });
  });
}

void scan_backward(at::Tensor u, at::Tensor delta, at::Tensor A, at::Tensor B, at::Tensor C,
                   at::Tensor D, at::Tensor z, at::Tensor delta_bias, at::Tensor d_out,
                   at::Tensor chunk_states, at::Tensor d_final, at::Tensor d_initial, at::Tensor du,
                   at::Tensor d_delta, at::Tensor dz, at::Tensor dA, at::Tensor dB, at::Tensor dC,
                   at::Tensor dD, at::Tensor d_bias, at::Tensor cu_seqlens, at::Tensor chunk_offsets,
                   std::vector<int64_t> strides, std::vector<int64_t> b_layout, std::vector<int64_t> c_layout,
                   std::vector<int64_t> shape, std::vector<int64_t> launch_shape) {
  // strides: u, delta, z, d_out (b, t, d each); launch_shape as the forward's
  const auto s = scan_shape(shape);
  dispatch_dtype(u.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_scan_tiles(launch_shape, [&](auto w, auto i, auto staged) {
      launch(rnnops::scan::selective_scan_bwd<T, decltype(w)::value, decltype(i)::value, decltype(staged)::value>,
             dim3(launch_shape[0], launch_shape[1]), dim3(32 * decltype(w)::value), launch_shape[4], false,
             ptr<T>(u), operand(strides, 0), ptr<T>(delta), operand(strides, 1), ptr<float>(A),
             bc_operand(B, b_layout), bc_operand(C, c_layout), ptr<float>(D), ptr<T>(z), operand(strides, 2),
             ptr<float>(delta_bias), ptr<T>(d_out), operand(strides, 3), ptr<float>(chunk_states),
             ptr<float>(d_final), mut<float>(d_initial), mut<float>(du), mut<float>(d_delta), mut<float>(dz),
             mut<float>(dA), mut<float>(dB), mut<float>(dC), mut<float>(dD), mut<float>(d_bias), ptr<int>(cu_seqlens),
             ptr<int>(chunk_offsets), s);
    });
  });
}

// ---------------------------------------------------------------- fused recurrent cells

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

rnnops::rnn::RNNShape rnn_shape(const std::vector<int64_t>& v) {
  return rnnops::rnn::RNNShape{static_cast<int>(v[0]), static_cast<int>(v[1]), static_cast<int>(v[2]),
                               static_cast<int>(v[3]), static_cast<int>(v[4]), static_cast<int>(v[5]),
                               static_cast<int>(v[6]), static_cast<int>(v[7]), static_cast<int>(v[8]),
                               static_cast<int>(v[9]), static_cast<int>(v[10]), static_cast<int>(v[11])};
}

void rnn_forward(at::Tensor x, at::Tensor R, at::Tensor bias, at::Tensor initial, at::Tensor states,
                 at::Tensor pre, at::Tensor h_seq, std::vector<int64_t> shape, int64_t cell, int64_t units,
                 std::vector<int64_t> launch_shape) {
  // shape: B, T, H, D, splits, has_bias, has_initial, save_pre, stage, gradient_chunks, pad_rows,
  // group_begin; launch: grid x, y, z, threads, dynamic shared bytes
  const auto s = rnn_shape(shape);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_cell(cell, units, [&](auto c, auto u) {
      launch(rnnops::rnn::rnn_fwd<T, decltype(c)::value, decltype(u)::value>,
             dim3(launch_shape[0], launch_shape[1], launch_shape[2]), dim3(launch_shape[3]), launch_shape[4],
             s.splits > 1, ptr<T>(x), ptr<T>(R), ptr<float>(bias), ptr<float>(initial), mut<float>(states),
             mut<float>(pre), mut<T>(h_seq), s);
    });
  });
}

void rnn_backward(at::Tensor R, at::Tensor initial, at::Tensor states, at::Tensor pre,
                  at::Tensor d_h_seq, at::Tensor carry, at::Tensor dx, at::Tensor drec_n,
                  std::vector<int64_t> shape, int64_t cell, int64_t units, std::vector<int64_t> launch_shape) {
  const auto s = rnn_shape(shape);
  dispatch_dtype(R.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_cell(cell, units, [&](auto c, auto u) {
      launch(rnnops::rnn::rnn_bwd<T, decltype(c)::value, decltype(u)::value>,
             dim3(launch_shape[0], launch_shape[1], launch_shape[2]), dim3(launch_shape[3]), launch_shape[4],
             s.splits > 1, ptr<T>(R), ptr<float>(initial), ptr<float>(states), ptr<float>(pre), ptr<T>(d_h_seq),
             mut<float>(carry), mut<T>(dx), mut<T>(drec_n), s);
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_sum", &block_sum);
  m.def("warp_scan", &warp_scan);
  m.def("wmma_matmul", &wmma_matmul);
  m.def("grid_barrier", &grid_barrier);
  m.def("async_copy", &async_copy);
  m.def("out_of_bounds", &out_of_bounds);
  m.def("scan_forward", &scan_forward);
  m.def("scan_backward", &scan_backward);
  m.def("rnn_forward", &rnn_forward);
  m.def("rnn_backward", &rnn_backward);
}
