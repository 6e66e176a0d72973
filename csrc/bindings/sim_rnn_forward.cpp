// The fused recurrent cells' forward kernels run through the simulator (sim_ext.h).
#include "sim_rnn.h"

namespace rnnops::bindings {

void rnn_forward(at::Tensor x, at::Tensor R, at::Tensor bias, at::Tensor initial, at::Tensor states,
                 at::Tensor pre, at::Tensor h_seq, std::vector<int64_t> shape, int64_t cell, int64_t units,
                 std::vector<int64_t> launch_shape) {
  // shape: B, T, H, D, splits, has_bias, has_initial, save_pre, stage, gradient_chunks, pad_rows,
  // group_begin; launch: grid x, y, z, threads, dynamic shared bytes
  const auto s = rnn_shape(shape);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_cell(cell, units, [&](auto c, auto u) {
      launch_cells(rnnops::rnn::rnn_fwd<T, decltype(c)::value, decltype(u)::value>, launch_shape, ptr<T>(x),
                   ptr<T>(R), ptr<float>(bias), ptr<float>(initial), mut<float>(states), mut<float>(pre),
                   mut<T>(h_seq), s);
    });
  });
}

void rnn_forward_fragments(at::Tensor x, at::Tensor R, at::Tensor bias, at::Tensor initial, at::Tensor states,
                           at::Tensor pre, at::Tensor h_seq, std::vector<int64_t> shape, int64_t cell,
                           int64_t k_steps, std::vector<int64_t> launch_shape) {
  // as rnn_forward, for a head of up to 16 k_steps units
  const auto s = rnn_shape(shape);
  dispatch_fragments(x.scalar_type(), cell, k_steps, [&](auto tag, auto c, auto ks) {
    using T = decltype(tag);
    launch_cells(rnnops::rnn::rnn_fwd_fragments<T, decltype(c)::value, decltype(ks)::value>, launch_shape,
                 ptr<T>(x), ptr<T>(R), ptr<float>(bias), ptr<float>(initial), mut<float>(states), mut<float>(pre),
                 mut<T>(h_seq), s);
  });
}

}  // namespace rnnops::bindings
