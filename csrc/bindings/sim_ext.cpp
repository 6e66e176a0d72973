// pybind11 extension that runs the project's CUDA kernels on CPU tensors through the simulator
// (built by rnnops.cuda_backend.simulator with torch.utils.cpp_extension; also with
// -fsanitize=address for the AddressSanitizer tests). The AddressSanitizer build (RNNOPS_SIM_ASAN)
// instantiates only what its test runs (tests/test_cuda_sim.py: each kernel once or twice, float32
// and bfloat16): every instantiation took it 116 s to compile on two cores, a fifth of the CPU
// test suite's time; another tile there fails with "no simulator build for ...".
#include <torch/extension.h>

#include "../rnn/rnn.cuh"
#include "../scan/selective_scan.cuh"
#include "../sim/selftest.h"

namespace {

using rnnops::sim::launch;

void check_cpu(const torch::Tensor& t, const char* name, torch::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype, name,
              " must be a contiguous CPU tensor of ", dtype);
}

torch::Tensor block_sum(torch::Tensor x, bool missing_barrier) {
  check_cpu(x, "x", torch::kFloat32);
  constexpr int threads = 64;
  const int n = static_cast<int>(x.numel()), blocks = (n + threads - 1) / threads;
  auto out = torch::full({blocks}, NAN, x.options());
  auto kernel = missing_barrier ? rnnops::selftest::block_sum_missing_barrier<threads>
                                : rnnops::selftest::block_sum<threads>;
  launch(kernel, dim3(blocks), dim3(threads), 0, false, x.data_ptr<float>(), out.data_ptr<float>(), n);
  return out;
}

std::vector<torch::Tensor> warp_scan(torch::Tensor x) {
  check_cpu(x, "x", torch::kFloat32);
  TORCH_CHECK(x.numel() % 64 == 0, "x must hold a multiple of 64 values");
  const int n = static_cast<int>(x.numel());
  auto out = torch::full_like(x, NAN);
  auto mask = torch::zeros({n / 32}, x.options().dtype(torch::kInt64));
  auto all = torch::zeros({n / 32}, x.options().dtype(torch::kInt32));
  auto mask32 = torch::zeros({n / 32}, x.options().dtype(torch::kInt32));
  launch(rnnops::selftest::warp_scan, dim3(n / 64), dim3(64), 0, false, x.data_ptr<float>(), out.data_ptr<float>(),
         reinterpret_cast<unsigned*>(mask32.data_ptr<int>()), all.data_ptr<int>());
  mask.copy_(mask32.to(torch::kInt64).bitwise_and(0xffffffffLL));
  return {out, mask, all};
}

torch::Tensor wmma_matmul(torch::Tensor a, torch::Tensor b, double alpha) {
  check_cpu(a, "a", torch::kFloat16);
  check_cpu(b, "b", torch::kFloat16);
  const int M = static_cast<int>(a.size(0)), K = static_cast<int>(a.size(1)), N = static_cast<int>(b.size(1));
  TORCH_CHECK(M % 16 == 0 && N % 16 == 0 && K % 16 == 0, "M, N, K must be multiples of 16");
  auto c = torch::full({M, N}, NAN, a.options().dtype(torch::kFloat32));
  const int warps = (M / 16) * (N / 16);
  launch(rnnops::selftest::wmma_matmul, dim3((warps + 1) / 2), dim3(64), 0, false,
         reinterpret_cast<const __half*>(a.data_ptr<at::Half>()), reinterpret_cast<const __half*>(b.data_ptr<at::Half>()),
         c.data_ptr<float>(), M, N, K, static_cast<float>(alpha));
  return c;
}

torch::Tensor grid_barrier(int64_t blocks) {
  auto counter = torch::zeros({1}, torch::kInt32);
  auto seen = torch::full({blocks}, -1, torch::kInt32);
  launch(rnnops::selftest::grid_barrier, dim3(static_cast<unsigned>(blocks)), dim3(32), 0, true,
         counter.data_ptr<int>(), seen.data_ptr<int>());
  return seen;
}

torch::Tensor out_of_bounds(torch::Tensor x) {
  check_cpu(x, "x", torch::kFloat32);
  auto out = torch::zeros({1}, x.options());
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

BCOperand bc_operand(const torch::Tensor& t, const std::vector<int64_t>& s) {
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
#ifdef RNNOPS_SIM_ASAN
  RNNOPS_TILE(4, 8)  // the default configuration's
#else
  RNNOPS_TILE(1, 4) RNNOPS_TILE(2, 4) RNNOPS_TILE(4, 4) RNNOPS_TILE(4, 8) RNNOPS_TILE(8, 8)
#endif
#undef RNNOPS_TILE
  TORCH_CHECK(false, "no simulator build for warps=", warps, " items=", items);
}

template <class F>
void dispatch_dtype(torch::ScalarType dtype, F&& f) {
  if (dtype == torch::kFloat32) return f(float{});
#ifndef RNNOPS_SIM_ASAN
  if (dtype == torch::kFloat16) return f(__half{});
#endif
  if (dtype == torch::kBFloat16) return f(__nv_bfloat16{});
  TORCH_CHECK(false, "no simulator build for ", dtype, " (float32, float16 or bfloat16; the AddressSanitizer build "
              "float32 and bfloat16)");
}

template <class T>
const T* ptr(const torch::Tensor& t) {  // an empty tensor stands for "absent"
  return t.defined() && t.numel() ? reinterpret_cast<const T*>(t.data_ptr()) : nullptr;
}
template <class T>
T* mut(const torch::Tensor& t) {
  return t.defined() && t.numel() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

void scan_forward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B, torch::Tensor C,
                  torch::Tensor D, torch::Tensor z, torch::Tensor delta_bias, torch::Tensor out, torch::Tensor chunk_states,
                  torch::Tensor initial_state, torch::Tensor final_state, torch::Tensor cu_seqlens,
                  torch::Tensor chunk_offsets, std::vector<int64_t> strides, std::vector<int64_t> b_layout,
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

void scan_backward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B, torch::Tensor C,
                   torch::Tensor D, torch::Tensor z, torch::Tensor delta_bias, torch::Tensor d_out,
                   torch::Tensor chunk_states, torch::Tensor d_final, torch::Tensor d_initial, torch::Tensor du,
                   torch::Tensor d_delta, torch::Tensor dz, torch::Tensor dA, torch::Tensor dB, torch::Tensor dC,
                   torch::Tensor dD, torch::Tensor d_bias, torch::Tensor cu_seqlens, torch::Tensor chunk_offsets,
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
#ifdef RNNOPS_SIM_ASAN
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
                               static_cast<int>(v[6]), static_cast<int>(v[7])};
}

void rnn_forward(torch::Tensor x, torch::Tensor R, torch::Tensor bias, torch::Tensor initial, torch::Tensor states,
                 torch::Tensor pre, torch::Tensor h_seq, std::vector<int64_t> shape, int64_t cell, int64_t units,
                 std::vector<int64_t> launch_shape) {
  // shape: B, T, H, D, splits, has_bias, has_initial; launch: grid x, y, z, threads, dynamic shared bytes
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

void rnn_backward(torch::Tensor R, torch::Tensor initial, torch::Tensor states, torch::Tensor pre,
                  torch::Tensor d_h_seq, torch::Tensor carry, torch::Tensor dx, torch::Tensor drec_n,
                  std::vector<int64_t> shape, int64_t cell, int64_t units, std::vector<int64_t> launch_shape) {
  const auto s = rnn_shape(shape);
  dispatch_dtype(R.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_cell(cell, units, [&](auto c, auto u) {
      launch(rnnops::rnn::rnn_bwd<T, decltype(c)::value, decltype(u)::value>,
             dim3(launch_shape[0], launch_shape[1], launch_shape[2]), dim3(launch_shape[3]), launch_shape[4],
             s.splits > 1, ptr<T>(R), ptr<float>(initial), ptr<float>(states), ptr<float>(pre), ptr<T>(d_h_seq),
             mut<float>(carry), mut<float>(dx), mut<float>(drec_n), s);
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_sum", &block_sum);
  m.def("warp_scan", &warp_scan);
  m.def("wmma_matmul", &wmma_matmul);
  m.def("grid_barrier", &grid_barrier);
  m.def("out_of_bounds", &out_of_bounds);
  m.def("scan_forward", &scan_forward);
  m.def("scan_backward", &scan_backward);
  m.def("rnn_forward", &rnn_forward);
  m.def("rnn_backward", &rnn_backward);
}
