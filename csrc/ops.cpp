// The schema of every native fastdl op, in one place, and the Python module fastdl._C.
// Forward and backward are separate ops; a backward op takes what its forward saved.
#include <string>

#include <torch/extension.h>
#include <torch/library.h>

#include "common/isa.h"

TORCH_LIBRARY(fastdl, m) {
  // ---- norm: x is viewed as (rows, normalized_numel); mean/rstd have shape (rows,) and dtype
  // float32 (float64 for float64 x). `sum` is x + residual (an empty tensor when residual is
  // None); backward ops take it as `input` and add grad_sum to the input gradient.
  // Masked-off gradients (output_mask false) come back as empty tensors.
  m.def(
      "layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
      "int normalized_numel, float eps) -> (Tensor out, Tensor sum, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor? grad_sum, Tensor input, Tensor mean, Tensor rstd, "
      "Tensor? weight, int normalized_numel, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "rms_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, int normalized_numel, float eps) "
      "-> (Tensor out, Tensor sum, Tensor rstd)");
  m.def(
      "rms_norm_bwd(Tensor grad_out, Tensor? grad_sum, Tensor input, Tensor rstd, Tensor? weight, "
      "int normalized_numel, bool[2] output_mask) -> (Tensor grad_input, Tensor grad_weight)");
  // batch_norm: x is (N, C, *); save_mean/save_invstd have shape (C,), dtype as above. Training
  // uses batch statistics (running stats are updated by the caller from save_*), eval uses the
  // running statistics. relu=True fuses max(0, .) and its backward (recomputed from x).
  m.def(
      "batch_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps, bool relu) "
      "-> (Tensor out, Tensor save_mean, Tensor save_invstd)");
  m.def(
      "batch_norm_bwd(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor save_mean, "
      "Tensor save_invstd, bool training, bool relu, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // ---- rnn: one layer in one direction over a whole sequence per op; Python loops over layers
  // and directions (fastdl/ops/rnn.py), and a cell is a layer over T = 1. x is time-major
  // (T, B, I); H = hidden_size, P = proj_size or H (LSTM only; GRU has P = H); G = 4H (LSTM
  // gates i, f, g, o) or 3H (GRU gates r, z, n), the rows of w_ih (G, I) and w_hh (G, P);
  // w_hr is (P, H) and only with proj_size. h0 (B, P), c0 (B, H). Weights, biases and states
  // have x's dtype; every output too, except the saved tensors (gates, cs), which are in the
  // accumulation dtype (float64 for float64, float32 otherwise).
  // lengths: None (every sequence has T steps) or int64 (B,) on x's device, 1 <= lengths[b] <= T,
  // any order. Sequence b then runs over positions [0, lengths[b]) (reverse: from lengths[b] - 1
  // down to 0), hn/cn are its state after its own last step, and y and the saved tensors are
  // zero at positions >= lengths[b].
  // Saved for BPTT, per position (T, B, .), accumulation dtype:
  //   LSTM gates (T, B, 4H): the activated gates i, f, g, o; cs (T, B, H): the cell state c_t.
  //   GRU gates (T, B, 4H): the activated r, z, n and W_hn h_{t-1} + b_hn (what n scales by r).
  // Backward: grads for outputs that got none may be None. output_mask = [grad_x, grad of the
  // weights and biases]; grad_h0/grad_c0 always come back; masked-off gradients (and grad_w_hr
  // without w_hr) come back as empty (0,) tensors. grad_b_ih/grad_b_hh are computed whether
  // the biases exist or not (the caller drops them); for the LSTM they are equal.
  m.def(
      "lstm_layer_fwd(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse) "
      "-> (Tensor y, Tensor hn, Tensor cn, Tensor gates, Tensor cs)");
  m.def(
      "lstm_layer_bwd(Tensor? grad_y, Tensor? grad_hn, Tensor? grad_cn, Tensor x, Tensor h0, "
      "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? lengths, bool reverse, "
      "Tensor y, Tensor gates, Tensor cs, bool[2] output_mask) "
      "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_w_hr)");
  m.def(
      "gru_layer_fwd(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? lengths, bool reverse) -> (Tensor y, Tensor hn, Tensor gates)");
  m.def(
      "gru_layer_bwd(Tensor? grad_y, Tensor? grad_hn, Tensor x, Tensor h0, Tensor w_ih, "
      "Tensor w_hh, Tensor? lengths, bool reverse, Tensor y, Tensor gates, bool[2] output_mask) "
      "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, "
      "Tensor grad_b_hh)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_isa", [] { return std::string(fastdl::isa_name(fastdl::cpu_isa())); });
  m.def("best_cpu_isa", [] { return std::string(fastdl::isa_name(fastdl::detect_cpu_isa())); });
  m.def("set_cpu_isa",
        [](const std::string& name) { fastdl::set_cpu_isa(fastdl::parse_isa(name.c_str())); });
  m.def("has_cuda", [] {
#ifdef FASTDL_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
