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
  // ---- attention (semantics pinned in csrc/common/attention.h and attention_math.h).
  // q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, D), any strides; Hq % Hkv == 0 (query
  // head h reads kv head h / (Hq / Hkv)); 1 <= D <= 256. out (B, Hq, Sq, D) contiguous, q's dtype.
  // lse (B, Hq, Sq) contiguous, float32 (float64 for float64 q): the natural-log log-sum-exp over
  // the allowed keys of s = scale * q.k + mask, before dropout; -inf for a row with no allowed
  // key (its out row is 0 and its gradients are 0).
  // attn_mask: None, bool (true = attend) or q's dtype (added to s), any rank <= 4 broadcastable
  // to (B, Hq, Sq, Sk) by torch's right-aligned rules. Key j is allowed for query i when the
  // mask allows it and i + off - window_left <= j <= i + off + window_right, where a negative
  // window side is unbounded and off = 0 (top_left, torch's is_causal) or Sk - Sq (bottom_right);
  // is_causal is window_right = 0. Dropout (dropout_p in [0, 1]) keeps P[b, h, i, j] with
  // probability 1 - p and scales kept ones by 1 / (1 - p), the mask drawn by
  // fastdl_dropout_keep(seed, offset + ((b * Hq + h) * Sq + i) * Sk + j, threshold(p)) in
  // csrc/common/attention_math.h.
  // grad_mask has attn_mask's shape and dtype (empty unless output_mask[3] and mask is float).
  // Gradients masked off in output_mask come back as empty tensors.
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p, int seed, "
      "int offset, int window_left, int window_right, bool bottom_right, float scale) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor out, "
      "Tensor lse, float dropout_p, int seed, int offset, int window_left, int window_right, "
      "bool bottom_right, float scale, bool[4] output_mask) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_mask)");
  // varlen: sequences packed along the token axis. q (Tq, Hq, D), k/v (Tk, Hkv, D), any strides;
  // cu_seqlens_q/k int32 or int64 (N + 1,), starting at 0, non-decreasing, ending at Tq/Tk;
  // sequence n is tokens [cu[n], cu[n + 1]). max_seqlen_* bound every sequence length (a hint
  // for the launch grid; a sequence longer than it is an error). out (Tq, Hq, D) contiguous;
  // lse (Hq, Tq) float32/float64. Window/alignment/dropout as above per sequence, with Sq, Sk
  // the sequence's own lengths; dropout counter offset + (h * Tq + tq) * Tk + tk on packed
  // token indices tq, tk.
  m.def(
      "varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float dropout_p, int seed, "
      "int offset, int window_left, int window_right, bool bottom_right, float scale) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "varlen_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor out, Tensor lse, "
      "float dropout_p, int seed, int offset, int window_left, int window_right, "
      "bool bottom_right, float scale, bool[3] output_mask) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
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
