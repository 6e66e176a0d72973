// The fused recurrent cells' backward kernels run through the simulator (sim_ext.h).
#include "sim_rnn.h"

namespace rnnops::bindings {

void rnn_backward(at::Tensor R, at::Tensor initial, at::Tensor states, at::Tensor pre,
                  at::Tensor d_h_seq, at::Tensor carry, at::Tensor dx, at::Tensor drec_n,
                  std::vector<int64_t> shape, int64_t cell, int64_t units, std::vector<int64_t> launch_shape) {
  const auto s = rnn_shape(shape);
  dispatch_dtype(R.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_cell(cell, units, [&](auto c, auto u) {
      launch_cells(rnnops::rnn::rnn_bwd<T, decltype(c)::value, decltype(u)::value>, launch_shape, ptr<T>(R),
                   ptr<float>(initial), ptr<float>(states), ptr<float>(pre), ptr<T>(d_h_seq), mut<float>(carry),
                   mut<T>(dx), mut<T>(drec_n), s);
    });
  });
}

void rnn_backward_fragments(at::Tensor R, at::Tensor initial, at::Tensor states, at::Tensor pre,
                            at::Tensor d_h_seq, at::Tensor carry, at::Tensor dx, at::Tensor drec_n,
                            std::vector<int64_t> shape, int64_t cell, int64_t k_steps,
                            std::vector<int64_t> launch_shape) {
  // as rnn_backward, for a head of up to 16 k_steps units
  const auto s = rnn_shape(shape);
  dispatch_fragments(R.scalar_type(), cell, k_steps, [&](auto tag, auto c, auto ks) {
    using T = decltype(tag);
    launch_cells(rnnops::rnn::rnn_bwd_fragments<T, decltype(c)::value, decltype(ks)::value>, launch_shape,
                 ptr<T>(R), ptr<float>(initial), ptr<float>(states), ptr<float>(pre), ptr<T>(d_h_seq),
                 mut<float>(carry), mut<T>(dx), mut<T>(drec_n), s);
  });
}

}  // namespace rnnops::bindings
