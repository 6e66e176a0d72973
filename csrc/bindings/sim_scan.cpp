// The selective scan's kernels run through the simulator (sim_ext.h).
#include "../scan/selective_scan.cuh"
#include "sim_ext.h"

namespace rnnops::bindings {
namespace {

using rnnops::sim::launch;

// The host side (rnnops.cuda_backend.selective_scan) computes every stride, mode and size; these
// functions only package them into the kernels' structs and launch through the simulator.

using rnnops::scan::BCOperand;
using rnnops::scan::Operand;
using rnnops::scan::ScanShape;

Operand operand(const std::vector<int64_t>& strides, int k) {  // strides: (b, t, d) of operand k, in order
  return Operand{strides[3 * k], strides[3 * k + 1], strides[3 * k + 2]};
}

ScanShape scan_shape(const std::vector<int64_t>& v) {  // Dm, N, packed, has_d, has_z, has_bias, softplus, segments
  return ScanShape{static_cast<int>(v[0]), static_cast<int>(v[1]), static_cast<int>(v[2]), static_cast<int>(v[3]),
                   static_cast<int>(v[4]), static_cast<int>(v[5]), static_cast<int>(v[6]), static_cast<int>(v[7])};
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

// f(T{}) for the scan's element type T (the sanitized builds: float32 alone, what their test runs)
template <class F>
void dispatch_scan_dtype(at::ScalarType dtype, F&& f) {
#ifdef RNNOPS_SIM_SANITIZED
  TORCH_CHECK(dtype == at::kFloat, "the sanitized simulator builds the scan for float32 only, got ", dtype);
  return f(float{});
#else
  return dispatch_dtype(dtype, f);
#endif
}

}  // namespace

void scan_forward(at::Tensor u, at::Tensor delta, at::Tensor A, at::Tensor B, at::Tensor C,
                  at::Tensor D, at::Tensor z, at::Tensor delta_bias, at::Tensor out, at::Tensor chunk_states,
                  at::Tensor initial_state, at::Tensor final_state, at::Tensor cu_seqlens,
                  at::Tensor chunk_offsets, std::vector<int64_t> strides, std::vector<int64_t> b_layout,
                  std::vector<int64_t> c_layout, std::vector<int64_t> shape, std::vector<int64_t> launch_shape) {
  // strides: u, delta, z, out (b, t, d each); launch_shape: grid x, grid y, warps, items, dynamic shared bytes,
  // staged (B and C rows staged in shared memory)
  const auto s = scan_shape(shape);
  dispatch_scan_dtype(u.scalar_type(), [&](auto tag) {
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
  // strides: u, delta, z, d_out and the gradients du, d_delta, dz (b, t, d each); launch_shape as the forward's
  const auto s = scan_shape(shape);
  dispatch_scan_dtype(u.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_scan_tiles(launch_shape, [&](auto w, auto i, auto staged) {
      launch(rnnops::scan::selective_scan_bwd<T, decltype(w)::value, decltype(i)::value, decltype(staged)::value>,
             dim3(launch_shape[0], launch_shape[1]), dim3(32 * decltype(w)::value), launch_shape[4], false,
             ptr<T>(u), operand(strides, 0), ptr<T>(delta), operand(strides, 1), ptr<float>(A),
             bc_operand(B, b_layout), bc_operand(C, c_layout), ptr<float>(D), ptr<T>(z), operand(strides, 2),
             ptr<float>(delta_bias), ptr<T>(d_out), operand(strides, 3), ptr<float>(chunk_states),
             ptr<float>(d_final), mut<float>(d_initial), mut<T>(du), mut<T>(d_delta), mut<T>(dz),
             operand(strides, 4), mut<float>(dA), mut<float>(dB), mut<float>(dC), mut<float>(dD), mut<float>(d_bias), ptr<int>(cu_seqlens),
             ptr<int>(chunk_offsets), s);
    });
  });
}

void scan_forward_local(at::Tensor u, at::Tensor delta, at::Tensor A, at::Tensor B, at::Tensor delta_bias,
                        at::Tensor segment_states, at::Tensor dt_sums, at::Tensor cu_seqlens, at::Tensor chunk_offsets,
                        std::vector<int64_t> strides, std::vector<int64_t> b_layout, std::vector<int64_t> shape,
                        std::vector<int64_t> launch_shape) {
  // strides: u, delta (b, t, d each); launch_shape: grid x, grid y (segments of every sequence), the main kernels'
  // chunk, dynamic shared bytes, staged (the rows staged in shared memory)
  const auto s = scan_shape(shape);
  dispatch_scan_dtype(u.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto kernel =
        launch_shape[4] ? rnnops::scan::selective_scan_fwd_local<T, true> : rnnops::scan::selective_scan_fwd_local<T, false>;
    launch(kernel, dim3(launch_shape[0], launch_shape[1]), dim3(32), launch_shape[3], false,
           ptr<T>(u), operand(strides, 0), ptr<T>(delta), operand(strides, 1), ptr<float>(A), bc_operand(B, b_layout),
           ptr<float>(delta_bias), mut<float>(segment_states), mut<float>(dt_sums), ptr<int>(cu_seqlens),
           ptr<int>(chunk_offsets), s, static_cast<int>(launch_shape[2]));
  });
}

void scan_backward_local(at::Tensor delta, at::Tensor z, at::Tensor d_out, at::Tensor A, at::Tensor C,
                         at::Tensor delta_bias, at::Tensor segment_grads, at::Tensor dt_sums, at::Tensor cu_seqlens,
                         at::Tensor chunk_offsets, std::vector<int64_t> strides, std::vector<int64_t> c_layout,
                         std::vector<int64_t> shape, std::vector<int64_t> launch_shape) {
  // strides: delta, z, d_out (b, t, d each); launch_shape as scan_forward_local's
  const auto s = scan_shape(shape);
  dispatch_scan_dtype(delta.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto kernel =
        launch_shape[4] ? rnnops::scan::selective_scan_bwd_local<T, true> : rnnops::scan::selective_scan_bwd_local<T, false>;
    launch(kernel, dim3(launch_shape[0], launch_shape[1]), dim3(32), launch_shape[3], false,
           ptr<T>(delta), operand(strides, 0), ptr<T>(z), operand(strides, 1), ptr<T>(d_out), operand(strides, 2),
           ptr<float>(A), bc_operand(C, c_layout), ptr<float>(delta_bias), mut<float>(segment_grads),
           mut<float>(dt_sums), ptr<int>(cu_seqlens), ptr<int>(chunk_offsets), s, static_cast<int>(launch_shape[2]));
  });
}

void scan_compose(at::Tensor values, at::Tensor dt_sums, at::Tensor A, at::Tensor entering, at::Tensor leaving,
                  std::vector<int64_t> sizes) {
  // sizes: channels, N, segments, reverse, sequences
  const int64_t channels = sizes[0], N = sizes[1];
  const auto kernel = sizes[3] ? rnnops::scan::selective_scan_compose<true> : rnnops::scan::selective_scan_compose<false>;
  launch(kernel, dim3((channels * N + 127) / 128, sizes[4]), dim3(128), 0, false, mut<float>(values),
         ptr<float>(dt_sums), ptr<float>(A), ptr<float>(entering), mut<float>(leaving), static_cast<int>(channels),
         static_cast<int>(N), static_cast<int>(sizes[2]));
}

}  // namespace rnnops::bindings
