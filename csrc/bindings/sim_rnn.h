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

inline rnnops::rnn::RNNShape rnn_shape(const std::vector<int64_t>& v) {
  return rnnops::rnn::RNNShape{static_cast<int>(v[0]), static_cast<int>(v[1]), static_cast<int>(v[2]),
                               static_cast<int>(v[3]), static_cast<int>(v[4]), static_cast<int>(v[5]),
                               static_cast<int>(v[6]), static_cast<int>(v[7]), static_cast<int>(v[8]),
                               static_cast<int>(v[9]), static_cast<int>(v[10]), static_cast<int>(v[11])};
}

}  // namespace rnnops::bindings
