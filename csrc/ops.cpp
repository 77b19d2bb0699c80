// The schema of every native fastdl op, in one place, and the Python module fastdl._C.
// Forward and backward are separate ops; a backward op takes what its forward saved.
#include <string>

#include <torch/extension.h>
#include <torch/library.h>

#include "common/isa.h"
#include "cpu/conv.h"
#include "cpu/gemm.h"
#include "cpu/int8_params.h"
#include "cpu/output.h"

TORCH_LIBRARY(fastdl, m) {
  // ---- norm: x is viewed as (rows, normalized_numel); mean/rstd have shape (rows,) and dtype
  // float32 (float64 for float64 x). `sum` is x + residual (an empty tensor when residual is
  // None); backward ops take it as `input` and add grad_sum to the input gradient.
  // Masked-off gradients (output_mask false) come back as empty tensors.
  m.def(
      "layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
      "SymInt normalized_numel, float eps) -> (Tensor out, Tensor sum, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor? grad_sum, Tensor input, Tensor mean, Tensor rstd, "
      "Tensor? weight, SymInt normalized_numel, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "rms_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, SymInt normalized_numel, float "
      "eps) "
      "-> (Tensor out, Tensor sum, Tensor rstd)");
  m.def(
      "rms_norm_bwd(Tensor grad_out, Tensor? grad_sum, Tensor input, Tensor rstd, Tensor? weight, "
      "SymInt normalized_numel, bool[2] output_mask) -> (Tensor grad_input, Tensor grad_weight)");
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

  // ---- graph: a graph is a CSR by destination node (rowptr (rows + 1), col = source index, both
  // int64); backward ops also take its transpose (t_rowptr, t_col = destination, t_perm = the
  // CSR entry of each transposed entry) so gathered gradients need no atomics. Per-edge tensors
  // (edge weights, alpha, dropout_mask, sddmm output) are in CSR entry order. x is (nodes, F).
  // Masked-off gradients come back as empty tensors. Forward ops carry the transpose as optional
  // inputs (unused by the forward: None when no gradient is needed) so autograd can save it.
  m.def(
      "spmm_fwd(Tensor rowptr, Tensor col, Tensor? weight, Tensor x, str reduce, "
      "Tensor? t_rowptr, Tensor? t_col, Tensor? t_perm) "
      "-> (Tensor out, Tensor arg)");
  m.def(
      "spmm_bwd(Tensor grad_out, Tensor rowptr, Tensor col, Tensor? weight, Tensor x, Tensor arg, "
      "Tensor t_rowptr, Tensor t_col, Tensor t_perm, str reduce, bool[2] output_mask) "
      "-> (Tensor grad_x, Tensor grad_weight)");
  // gcn: out = D^-1/2 (A + fill (1 + eps) I) D^-1/2 x with D the degrees of A + fill I; dinv is
  // D^-1/2 (rows,). eps is a one-element tensor or None.
  m.def(
      "gcn_fwd(Tensor rowptr, Tensor col, Tensor? weight, Tensor x, Tensor? eps, float fill, "
      "Tensor? t_rowptr, Tensor? t_col, Tensor? t_perm) "
      "-> (Tensor out, Tensor dinv)");
  m.def(
      "gcn_bwd(Tensor grad_out, Tensor? weight, Tensor x, Tensor dinv, Tensor? eps, "
      "Tensor t_rowptr, Tensor t_col, Tensor t_perm, float fill, bool[2] output_mask) "
      "-> (Tensor grad_x, Tensor grad_eps)");
  // sddmm: out[e] = <a[src e], b[dst e]>.
  m.def(
      "sddmm_fwd(Tensor rowptr, Tensor col, Tensor a, Tensor b, Tensor? t_rowptr, Tensor? t_col, "
      "Tensor? t_perm) -> Tensor");
  m.def(
      "sddmm_bwd(Tensor grad_out, Tensor rowptr, Tensor col, Tensor a, Tensor b, "
      "Tensor t_rowptr, Tensor t_col, Tensor t_perm, bool[2] output_mask) "
      "-> (Tensor grad_a, Tensor grad_b)");
  // gat: h (N, heads, F); alpha (nnz, heads) the softmax weights before dropout; a_src/a_dst
  // (N, heads) the per-node score halves.
  m.def(
      "gat_fwd(Tensor rowptr, Tensor col, Tensor h, Tensor att_src, Tensor att_dst, "
      "float negative_slope, Tensor? dropout_mask, Tensor? t_rowptr, Tensor? t_col, "
      "Tensor? t_perm) "
      "-> (Tensor out, Tensor alpha, Tensor a_src, Tensor a_dst)");
  m.def(
      "gat_bwd(Tensor grad_out, Tensor rowptr, Tensor col, Tensor h, Tensor att_src, "
      "Tensor att_dst, Tensor alpha, Tensor a_src, Tensor a_dst, Tensor? dropout_mask, "
      "Tensor t_rowptr, Tensor t_col, Tensor t_perm, float negative_slope) "
      "-> (Tensor grad_h, Tensor grad_att_src, Tensor grad_att_dst)");
  // ---- conv: x is (N, C_in, H, W), weight (C_out, C_in / groups, kH, kW) as in torch; any
  // strides (kernels copy to the layout they need). The output keeps x's memory format:
  // channels_last when x is channels_last (and not also contiguous, i.e. C > 1 and H*W > 1),
  // contiguous NCHW otherwise (csrc/common/conv.h: conv_channels_last). padding is symmetric
  // (the Python layer pads an uneven "same" beforehand). dtypes: x, weight, bias, residual share
  // one dtype; parameter gradients come back in weight/bias's own shape and dtype.
  // conv2d_fwd computes out = act(conv(x, weight) + bias + residual), activation one of
  // "none", "relu", "silu", "gelu" (exact erf GELU). `pre` is the pre-activation
  // conv + bias + residual, saved for the backward of silu/gelu; for "none" and "relu" it is an
  // empty (0,) tensor (relu's backward reads `out` instead: out > 0 <=> pre > 0).
  // inference: no gradient will flow through the output, so the CPU kernels may round more
  // (Winograd F(4x4, 3x3): csrc/cpu/conv.cpp, winograd_tile); the GPU kernels ignore it.
  m.def(
      "conv2d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, str activation, bool inference=False) "
      "-> (Tensor out, Tensor pre)");
  // Backward of conv2d_fwd. `out` and `pre` are what the forward returned (out is read for
  // relu, pre for silu/gelu; the other may be empty). output_mask = (input, weight, bias,
  // pre-activation): grad_pre = grad_out * act'(pre) is the residual's gradient, only asked
  // for when activation != "none" (then it is grad_out itself). Masked-off outputs are empty
  // (0,) tensors. grad_input has x's shape and memory format.
  m.def(
      "conv2d_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor out, Tensor pre, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, str activation, "
      "bool[4] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_pre)");
  // conv_transpose2d: x is (N, C_in, H, W), weight (C_in, C_out / groups, kH, kW) as in torch;
  // the forward is the adjoint of conv2d (conv2d's input gradient) plus bias. Output size per
  // dim: (in - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1, with
  // output_padding < max(stride, dilation). Memory format and masks as for conv2d.
  m.def(
      "conv_transpose2d_fwd(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] output_padding, int groups, int[2] dilation) -> Tensor");
  m.def(
      "conv_transpose2d_bwd(Tensor grad_out, Tensor x, Tensor weight, int[2] stride, "
      "int[2] padding, int[2] output_padding, int groups, int[2] dilation, bool[3] output_mask) "
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
  // w_ih None: x already holds the input projection x W_ih^T, (T, B, G) (e.g. an embedding's rows
  // through W_ih, gathered per token); the op still adds the biases, grad_x is the gradient of
  // that projection and grad_w_ih comes back empty.
  // index (w_ih None only): int64 (T, B) on x's device; x is then a table (R, G) of input
  // projections and position (t, b) reads row index[t, b] (0 <= index < R): an embedding and the
  // input GEMM as one lookup in the (vocab, G) table emb W_ih^T, without a (T, B, G) tensor from
  // the caller. grad_x is then the table's gradient (R, G), each row the sum over the positions
  // that read it, in a fixed order (deterministic).
  m.def(
      "lstm_layer_fwd(Tensor x, Tensor h0, Tensor c0, Tensor? w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, Tensor? index=None) "
      "-> (Tensor y, Tensor hn, Tensor cn, Tensor gates, Tensor cs)");
  m.def(
      "lstm_layer_bwd(Tensor? grad_y, Tensor? grad_hn, Tensor? grad_cn, Tensor x, Tensor h0, "
      "Tensor c0, Tensor? w_ih, Tensor w_hh, Tensor? w_hr, Tensor? lengths, bool reverse, "
      "Tensor y, Tensor gates, Tensor cs, bool[2] output_mask, Tensor? index=None) "
      "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_w_hr)");
  m.def(
      "gru_layer_fwd(Tensor x, Tensor h0, Tensor? w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? lengths, bool reverse, Tensor? index=None) -> (Tensor y, Tensor hn, Tensor gates)");
  m.def(
      "gru_layer_bwd(Tensor? grad_y, Tensor? grad_hn, Tensor x, Tensor h0, Tensor? w_ih, "
      "Tensor w_hh, Tensor? lengths, bool reverse, Tensor y, Tensor gates, bool[2] output_mask, "
      "Tensor? index=None) "
      "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, "
      "Tensor grad_b_hh)");
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
  // csrc/common/attention_math.h. seed is a SymInt: drawn by .item() (fastdl/ops/attention.py),
  // it is a data-dependent value under torch.compile, which an int argument would refuse.
  // scale None is 1 / sqrt(D) (computed in the op, so a symbolic D stays symbolic under compile).
  // grad_mask has attn_mask's shape and dtype (empty unless output_mask[3] and mask is float).
  // Gradients masked off in output_mask come back as empty tensors.
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p, SymInt "
      "seed, "
      "int offset, int window_left, int window_right, bool bottom_right, float? scale) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor out, "
      "Tensor lse, float dropout_p, SymInt seed, int offset, int window_left, int window_right, "
      "bool bottom_right, float? scale, bool[4] output_mask) "
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
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float dropout_p, SymInt seed, "
      "int offset, int window_left, int window_right, bool bottom_right, float? scale) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "varlen_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor out, Tensor lse, "
      "float dropout_p, SymInt seed, int offset, int window_left, int window_right, "
      "bool bottom_right, float? scale, bool[3] output_mask) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // ---- int8: symmetric int8 quantization and int8 x int8 -> int32 GEMMs with the per-row x
  // per-column dequantization and bias fused into the epilogue. int8_quantize quantizes the
  // rows of x (..., K): q (x's shape, int8) and scale (x.shape[:-1], float32).
  // int8_pack_weight packs w (N, K) into the CPU GEMM's layout (a uint8 buffer, CPU only);
  // int8_linear takes it as w_packed (other backends read w and accept an empty w_packed),
  // quantizes x per row on the fly and keeps input columns with any |x| >= outlier_threshold in
  // floating point (LLM.int8). Its gradient w.r.t. x is composed from torch ops in Python.
  m.def("int8_quantize(Tensor x) -> (Tensor q, Tensor scale)");
  m.def("int8_pack_weight(Tensor w) -> Tensor");
  m.def(
      "int8_matmul(Tensor a, Tensor b, Tensor? a_scale, Tensor? b_scale, Tensor? bias, "
      "ScalarType out_dtype) -> Tensor");
  m.def(
      "int8_linear(Tensor x, Tensor w, Tensor w_packed, Tensor w_scale, Tensor? bias, "
      "float? outlier_threshold) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_isa", [] { return std::string(fastdl::cpu_isa_level()); });
  m.def("best_cpu_isa", [] { return std::string(fastdl::best_cpu_isa_level()); });
  m.def("set_cpu_isa", [](const std::string& name) { fastdl::set_cpu_isa_level(name.c_str()); });
  // Bench hook (bench/machine.py), not an op: the int8 multiply-add peak in GOP/s, 0 if none.
  m.def("_int8_peak_gops", [] { return fastdl::cpu::int8_peak_gops(); });
  // Test hook (tests/test_gemm.py): whether gemm_bf16 runs on AVX512-BF16 under the current ISA.
  m.def("_gemm_bf16_native", [] { return fastdl::cpu::gemm_bf16_native(); });
  // Test hook (tests/test_conv_ops.py): how many convs have run on the AMX conv kernel.
  m.def("_conv_amx_runs", [] { return fastdl::cpu::conv_impl::conv_amx_runs(); });
  // Test hook (tests/test_output_cache.py): the sizes of the output cache's free blocks.
  m.def("_output_cache_blocks", [] { return fastdl::cpu::output_cache_blocks(); });
  // Test hook for the block GEMM of cpu/gemm.h (tests/test_gemm.py), not an op: c (m, n) =
  // alpha * op(a) op(b) + beta * c in place; bfloat16 a and b with a float32 c run gemm_bf16.
  m.def("_gemm", [](const at::Tensor& a, const at::Tensor& b, at::Tensor& c, bool ta, bool tb,
                    double alpha, double beta) {
    TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2, "_gemm: 2-D operands");
    TORCH_CHECK(a.stride(1) == 1 && b.stride(1) == 1 && c.stride(1) == 1, "_gemm: unit columns");
    const bool bf16 = a.scalar_type() == at::kBFloat16 && c.scalar_type() == at::kFloat;
    TORCH_CHECK(b.scalar_type() == a.scalar_type() && (bf16 || a.scalar_type() == c.scalar_type()),
                "_gemm: one dtype");
    const int64_t m = c.size(0), n = c.size(1), k = ta ? a.size(0) : a.size(1);
    TORCH_CHECK(a.size(ta ? 1 : 0) == m && b.size(tb ? 1 : 0) == k && b.size(tb ? 0 : 1) == n,
                "_gemm: shapes");
    if (bf16) {
      fastdl::cpu::gemm_bf16(ta, tb, m, n, k, static_cast<const uint16_t*>(a.const_data_ptr()),
                             a.stride(0), static_cast<const uint16_t*>(b.const_data_ptr()),
                             b.stride(0), beta, c.data_ptr<float>(), c.stride(0), alpha);
    } else if (c.scalar_type() == at::kDouble) {
      fastdl::cpu::gemm<double>(ta, tb, m, n, k, a.data_ptr<double>(), a.stride(0),
                                b.data_ptr<double>(), b.stride(0), beta, c.data_ptr<double>(),
                                c.stride(0), alpha);
    } else {
      fastdl::cpu::gemm<float>(ta, tb, m, n, k, a.data_ptr<float>(), a.stride(0),
                               b.data_ptr<float>(), b.stride(0), beta, c.data_ptr<float>(),
                               c.stride(0), alpha);
    }
  });
  m.def("has_cuda", [] {
#ifdef FASTDL_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
