// pybind11 extension that runs the project's CUDA kernels on CPU tensors through the simulator
// (built by rnnops.cuda_backend.simulator with torch.utils.cpp_extension; also with
// -fsanitize=address for the AddressSanitizer tests).
#include <torch/extension.h>

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_sum", &block_sum);
  m.def("warp_scan", &warp_scan);
  m.def("wmma_matmul", &wmma_matmul);
  m.def("grid_barrier", &grid_barrier);
  m.def("out_of_bounds", &out_of_bounds);
}
