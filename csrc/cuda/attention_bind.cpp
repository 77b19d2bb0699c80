// TORCH_LIBRARY_IMPL(fastdl, CUDA) for the attention family: the checks and output shapes of
// csrc/common/attention.h (the same messages as the CPU op), allocation, device and stream,
// then the launchers of attention.cuh on raw pointers and strides (any strides: the kernels read
// strided q/k/v; a head dim that is not unit-stride is copied once so the tile loads coalesce).
#include <array>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/attention.h"
#include "cuda/attention.cuh"

namespace fastdl {
namespace {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;
namespace cu = cuda::attn;

constexpr const char* kFwd = "fastdl::attention_fwd";
constexpr const char* kBwd = "fastdl::attention_bwd";
constexpr const char* kVarFwd = "fastdl::varlen_attention_fwd";
constexpr const char* kVarBwd = "fastdl::varlen_attention_bwd";
constexpr std::initializer_list<c10::ScalarType> kDtypes = {at::kFloat, at::kHalf, at::kBFloat16};

cu::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return cu::DType::kFloat16;
    case at::kBFloat16:
      return cu::DType::kBFloat16;
    default:
      return cu::DType::kFloat32;
  }
}

// t with a unit-stride last dim (the kernels' tile loads coalesce along it).
Tensor unit_last(const Tensor& t) {
  return t.stride(-1) == 1 || t.size(-1) == 1 ? t : t.contiguous();
}

// (batch, head, row, column) strides of a dense (B, H, S, D) or varlen (T, H, D) tensor.
cu::Strides strides_of(const Tensor& t) {
  if (t.dim() == 4) return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
  return {0, t.stride(1), t.stride(0), t.stride(2)};
}

void fill_common(cu::AttnParams& a, const Tensor& q, const Tensor& k, const Tensor& v, double p,
                 int64_t seed, int64_t offset, int64_t left, int64_t right, bool bottom_right,
                 std::optional<double> scale) {
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.sq = strides_of(q);
  a.sk = strides_of(k);
  a.sv = strides_of(v);
  a.scale = static_cast<float>(attention::scale_or_default(scale, q.size(-1)));
  a.dropout = p > 0.0;
  a.drop_all = p >= 1.0;
  a.threshold = p < 1.0 ? fastdl_dropout_threshold(p) : 0xffffffffu;
  a.keep_scale = p < 1.0 ? static_cast<float>(1.0 / (1.0 - p)) : 0.f;
  a.seed = static_cast<uint64_t>(seed);
  a.offset = static_cast<uint64_t>(offset);
  a.window_left = left;
  a.window_right = right;
  a.bottom_right = bottom_right;
  a.dtype = dtype_of(q);
}

void fill_mask(cu::AttnParams& a, const Tensor& mask) {
  if (!mask.defined()) return;
  a.mask = mask.data_ptr<float>();
  a.smask = {mask.stride(0), mask.stride(1), mask.stride(2), mask.stride(3)};
}

// cu_seqlens as int64 on the device, after checking their values (a sync, as on CPU).
Tensor cu_seqlens(const char* op, const char* name, const Tensor& cu, int64_t total,
                  int64_t max_len) {
  Tensor c = cu.to(at::kLong).contiguous();
  attention::cu_seqlens_values(op, name, c.cpu(), total, max_len);
  return c;
}

// dq, dk, dv: contiguous in q's/k's shape and q's dtype; the kernels write every element when
// they run, else the gradients are zeros.
std::tuple<Tensor, Tensor, Tensor> grads(const Tensor& q, const Tensor& k, bool run) {
  const auto alloc = [&](const Tensor& like) {
    return run ? at::empty(like.sizes(), q.options()) : at::zeros(like.sizes(), q.options());
  };
  return {alloc(q), alloc(k), alloc(k)};
}

// Runs the forward on filled params (allocates the decode path's workspace).
void run_fwd(cu::AttnFwdParams& prm, const Tensor& q) {
  const int splits = cu::attention_fwd_splits(prm, q.device().index());
  const size_t bytes = cu::attention_fwd_workspace_bytes(prm, splits);
  Tensor ws;
  if (bytes > 0) {
    ws = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
    prm.workspace = ws.data_ptr();
  }
  C10_CUDA_CHECK(cu::attention_fwd(prm, splits, c10::cuda::getCurrentCUDAStream()));
}

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                         const OptTensor& attn_mask, double p, int64_t seed,
                                         int64_t offset, int64_t left, int64_t right,
                                         bool bottom_right, std::optional<double> scale) {
  const auto d = attention::sdpa_dims(kFwd, q_, k_, v_, kDtypes);
  attention::dropout(kFwd, p);
  const Tensor mask = attention::additive_mask(kFwd, attn_mask, q_, d);
  const c10::cuda::CUDAGuard guard(q_.device());  // after the device checks
  auto [out, lse] = attention::sdpa_outputs(q_, d);
  if (out.numel() == 0) return {out, lse};
  const Tensor q = unit_last(q_), k = unit_last(k_), v = unit_last(v_);
  cu::AttnFwdParams prm;
  fill_common(prm, q, k, v, p, seed, offset, left, right, bottom_right, scale);
  fill_mask(prm, mask);
  prm.B = d.B, prm.Hq = d.Hq, prm.Hkv = d.Hkv, prm.Sq = d.Sq, prm.Sk = d.Sk, prm.D = d.D;
  prm.out = out.data_ptr();
  prm.so = strides_of(out);
  prm.lse = lse.data_ptr<float>();
  run_fwd(prm, q);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_bwd(
    const Tensor& grad_out_, const Tensor& q_, const Tensor& k_, const Tensor& v_,
    const OptTensor& attn_mask, const Tensor& out_, const Tensor& lse_, double p, int64_t seed,
    int64_t offset, int64_t left, int64_t right, bool bottom_right, std::optional<double> scale,
    std::array<bool, 4> output_mask) {
  const auto d = attention::sdpa_dims(kBwd, q_, k_, v_, kDtypes);
  attention::dropout(kBwd, p);
  const Tensor mask = attention::additive_mask(kBwd, attn_mask, q_, d);
  attention::saved_outputs(kBwd, grad_out_, out_, lse_, q_, {d.B, d.Hq, d.Sq, d.D},
                           {d.B, d.Hq, d.Sq});
  const c10::cuda::CUDAGuard guard(q_.device());  // after the device checks
  const bool want_mask =
      output_mask[3] && attn_mask.has_value() && attn_mask->scalar_type() != at::kBool;
  const bool run = q_.numel() > 0 && k_.numel() > 0;
  auto [dq, dk, dv] = grads(q_, k_, run);
  Tensor gm_full =
      want_mask ? at::zeros({d.B, d.Hq, d.Sq, d.Sk}, q_.options().dtype(at::kFloat)) : Tensor();
  if (run) {
    const Tensor q = unit_last(q_), k = unit_last(k_), v = unit_last(v_);
    const Tensor go = unit_last(grad_out_);
    const Tensor delta = (go.to(at::kFloat) * out_.to(at::kFloat)).sum(-1).contiguous();
    const Tensor lse = lse_.contiguous();
    cu::AttnBwdParams prm;
    fill_common(prm, q, k, v, p, seed, offset, left, right, bottom_right, scale);
    fill_mask(prm, mask);
    prm.B = d.B, prm.Hq = d.Hq, prm.Hkv = d.Hkv, prm.Sq = d.Sq, prm.Sk = d.Sk, prm.D = d.D;
    prm.grad_out = go.data_ptr();
    prm.sdo = strides_of(go);
    prm.lse = lse.data_ptr<float>();
    prm.delta = delta.data_ptr<float>();
    prm.dq = dq.data_ptr();
    prm.so = strides_of(dq);
    prm.dk = dk.data_ptr();
    prm.dv = dv.data_ptr();
    prm.sdk = strides_of(dk);
    prm.dmask = want_mask ? gm_full.data_ptr<float>() : nullptr;
    C10_CUDA_CHECK(cu::attention_bwd(prm, c10::cuda::getCurrentCUDAStream()));
  }
  const auto ret = [&](bool wanted, const Tensor& g) {
    return wanted ? g : at::empty({0}, q_.options());
  };
  return {
      ret(output_mask[0], dq), ret(output_mask[1], dk), ret(output_mask[2], dv),
      want_mask ? attention::reduce_grad_mask(gm_full, *attn_mask) : at::empty({0}, q_.options())};
}

std::tuple<Tensor, Tensor> varlen_attention_fwd(const Tensor& q_, const Tensor& k_,
                                                const Tensor& v_, const Tensor& cu_q_,
                                                const Tensor& cu_k_, int64_t max_q, int64_t max_k,
                                                double p, int64_t seed, int64_t offset,
                                                int64_t left, int64_t right, bool bottom_right,
                                                std::optional<double> scale) {
  const auto d = attention::varlen_dims(kVarFwd, q_, k_, v_, cu_q_, cu_k_, max_q, max_k, kDtypes);
  attention::dropout(kVarFwd, p);
  const c10::cuda::CUDAGuard guard(q_.device());  // after the device checks
  const Tensor cu_q = cu_seqlens(kVarFwd, "cu_seqlens_q", cu_q_, d.Tq, max_q);
  const Tensor cu_k = cu_seqlens(kVarFwd, "cu_seqlens_k", cu_k_, d.Tk, max_k);
  Tensor out = at::empty({d.Tq, d.Hq, d.D}, q_.options());
  Tensor lse = at::empty({d.Hq, d.Tq}, q_.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const Tensor q = unit_last(q_), k = unit_last(k_), v = unit_last(v_);
  cu::AttnFwdParams prm;
  fill_common(prm, q, k, v, p, seed, offset, left, right, bottom_right, scale);
  prm.cu_q = cu_q.data_ptr<int64_t>();
  prm.cu_k = cu_k.data_ptr<int64_t>();
  prm.B = d.N, prm.Hq = d.Hq, prm.Hkv = d.Hkv, prm.Sq = max_q, prm.Sk = max_k, prm.D = d.D;
  prm.Tq = d.Tq, prm.Tk = d.Tk;
  prm.out = out.data_ptr();
  prm.so = strides_of(out);
  prm.lse = lse.data_ptr<float>();
  run_fwd(prm, q);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> varlen_attention_bwd(
    const Tensor& grad_out_, const Tensor& q_, const Tensor& k_, const Tensor& v_,
    const Tensor& cu_q_, const Tensor& cu_k_, int64_t max_q, int64_t max_k, const Tensor& out_,
    const Tensor& lse_, double p, int64_t seed, int64_t offset, int64_t left, int64_t right,
    bool bottom_right, std::optional<double> scale, std::array<bool, 3> output_mask) {
  const auto d = attention::varlen_dims(kVarBwd, q_, k_, v_, cu_q_, cu_k_, max_q, max_k, kDtypes);
  attention::dropout(kVarBwd, p);
  attention::saved_outputs(kVarBwd, grad_out_, out_, lse_, q_, {d.Tq, d.Hq, d.D}, {d.Hq, d.Tq});
  const c10::cuda::CUDAGuard guard(q_.device());  // after the device checks
  const Tensor cu_q = cu_seqlens(kVarBwd, "cu_seqlens_q", cu_q_, d.Tq, max_q);
  const Tensor cu_k = cu_seqlens(kVarBwd, "cu_seqlens_k", cu_k_, d.Tk, max_k);
  const bool run = q_.numel() > 0 && k_.numel() > 0 && d.N > 0;
  auto [dq, dk, dv] = grads(q_, k_, run);
  if (run) {
    const Tensor q = unit_last(q_), k = unit_last(k_), v = unit_last(v_);
    const Tensor go = unit_last(grad_out_);
    // delta by row id h * Tq + t: (Tq, Hq) summed, transposed to (Hq, Tq).
    const Tensor delta =
        (go.to(at::kFloat) * out_.to(at::kFloat)).sum(-1).transpose(0, 1).contiguous();
    const Tensor lse = lse_.contiguous();
    cu::AttnBwdParams prm;
    fill_common(prm, q, k, v, p, seed, offset, left, right, bottom_right, scale);
    prm.cu_q = cu_q.data_ptr<int64_t>();
    prm.cu_k = cu_k.data_ptr<int64_t>();
    prm.B = d.N, prm.Hq = d.Hq, prm.Hkv = d.Hkv, prm.Sq = max_q, prm.Sk = max_k, prm.D = d.D;
    prm.Tq = d.Tq, prm.Tk = d.Tk;
    prm.grad_out = go.data_ptr();
    prm.sdo = strides_of(go);
    prm.lse = lse.data_ptr<float>();
    prm.delta = delta.data_ptr<float>();
    prm.dq = dq.data_ptr();
    prm.so = strides_of(dq);
    prm.dk = dk.data_ptr();
    prm.dv = dv.data_ptr();
    prm.sdk = strides_of(dk);
    C10_CUDA_CHECK(cu::attention_bwd(prm, c10::cuda::getCurrentCUDAStream()));
  }
  const auto ret = [&](bool wanted, const Tensor& g) {
    return wanted ? g : at::empty({0}, q_.options());
  };
  return {ret(output_mask[0], dq), ret(output_mask[1], dk), ret(output_mask[2], dv)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("varlen_attention_fwd", &varlen_attention_fwd);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd);
}

}  // namespace fastdl
