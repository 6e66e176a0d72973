// pybind11 extension that runs the project's CUDA kernels on CPU tensors through the simulator
// (built by rnnops.cuda_backend.simulator with torch.utils.cpp_extension; also with
// -fsanitize=address and -fsanitize=thread for the sanitizer tests). The sanitized builds
// (RNNOPS_SIM_SANITIZED) instantiate only what their test runs (tests/test_cuda_sim.py: each kernel
// once or twice, float32 and bfloat16): every instantiation took AddressSanitizer's 116 s to compile
// on two cores, a fifth of the CPU test suite's time; another tile there fails with "no simulator
// build for ...".
// ATen's tensor, its factories and torch's pybind11 casters, not torch/extension.h (all of
// libtorch's C++ API: 21 of the 65 seconds -O2 took on a CI core, twice: the sanitized build too)
#include <ATen/ops/full.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include "../sim/selftest.h"
#include "sim_ext.h"

namespace {

using rnnops::bindings::check_cpu;
using rnnops::sim::launch;

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_sum", &block_sum);
  m.def("warp_scan", &warp_scan);
  m.def("wmma_matmul", &wmma_matmul);
  m.def("grid_barrier", &grid_barrier);
  m.def("async_copy", &async_copy);
  m.def("out_of_bounds", &out_of_bounds);
  m.def("scan_forward", &rnnops::bindings::scan_forward);
  m.def("scan_backward", &rnnops::bindings::scan_backward);
  m.def("scan_forward_local", &rnnops::bindings::scan_forward_local);
  m.def("scan_backward_local", &rnnops::bindings::scan_backward_local);
  m.def("scan_compose", &rnnops::bindings::scan_compose);
  m.def("rnn_forward", &rnnops::bindings::rnn_forward);
  m.def("rnn_forward_fragments", &rnnops::bindings::rnn_forward_fragments);
  m.def("rnn_backward", &rnnops::bindings::rnn_backward);
  m.def("rnn_backward_fragments", &rnnops::bindings::rnn_backward_fragments);
}
