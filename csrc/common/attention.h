// Argument validation and output shapes of the attention ops (schemas in csrc/ops.cpp), shared
// by the CPU (csrc/cpu/attention.cpp) and CUDA (csrc/cuda/attention_bind.cpp) bind layers so that
// both reject the same inputs with the same messages (fastdl/ops/attention.py mirrors them for
// Triton). Torch-facing; the kernel-side rules (band, dropout RNG) are in attention_math.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common/attention_math.h"
#include "common/checks.h"

namespace fastdl::attention {

// The largest head_dim every backend supports (the CPU and GPU kernels tile D up to it).
constexpr int64_t kMaxHeadDim = 256;

struct Dims {
  int64_t B, Hq, Hkv, Sq, Sk, D;
};

// Float32 statistics (lse), float64 for float64 inputs.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void head_dim(const char* op, int64_t d) {
  TORCH_CHECK(d >= 1 && d <= kMaxHeadDim, op, ": head_dim must be in [1, ", kMaxHeadDim,
              "] (the supported limit), got ", d);
}

// The score scale: the given one, or 1 / sqrt(D) when the schema's `float? scale` is None (the
// public functions pass None for torch's default, so a symbolic head_dim under
// torch.compile(dynamic=True) stays symbolic instead of being specialized into a float).
inline double scale_or_default(const std::optional<double>& scale, int64_t d) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d));
}

inline void heads(const char* op, int64_t hq, int64_t hkv) {
  TORCH_CHECK((hkv > 0 && hq % hkv == 0) || (hkv == 0 && hq == 0), op,
              ": the number of query heads must be a multiple of the number of key/value heads, "
              "got ",
              hq, " query heads and ", hkv, " key/value heads");
}

inline void dropout(const char* op, double p) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, op, ": dropout_p must be in [0, 1], got ", p);
}

// q/k/v of one rank (4 for sdpa, 3 for varlen), one dtype among `allowed`, one device, one
// head_dim, and k/v of one shape.
inline void qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                int64_t rank, std::initializer_list<c10::ScalarType> allowed) {
  const char* layout = rank == 4 ? "(B, H, S, D)" : "(T, H, D)";
  for (auto [name, t] : {std::pair{"q", &q}, std::pair{"k", &k}, std::pair{"v", &v}})
    TORCH_CHECK(t->dim() == rank, op, ": ", name, " must have rank ", rank, " ", layout,
                ", got shape ", t->sizes());
  checks::dtype(op, "q", q, allowed);
  for (auto [name, t] : {std::pair{"k", &k}, std::pair{"v", &v}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ",
                     t->scalar_type(), " but q has dtype ", q.scalar_type(),
                     "; q, k and v must have one dtype");
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, " is on ", t->device(), " but q is on ",
                q.device(), "; all tensors must be on the same device");
  }
  TORCH_CHECK(k.size(-1) == q.size(-1) && v.size(-1) == q.size(-1), op,
              ": q, k and v must have the same head_dim, got ", q.size(-1), ", ", k.size(-1),
              " and ", v.size(-1));
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(),
              " and ", v.sizes());
  head_dim(op, q.size(-1));
}

inline Dims sdpa_dims(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      std::initializer_list<c10::ScalarType> allowed) {
  qkv(op, q, k, v, 4, allowed);
  TORCH_CHECK(k.size(0) == q.size(0), op, ": q and k must have the same batch size, got ",
              q.size(0), " and ", k.size(0));
  heads(op, q.size(1), k.size(1));
  return {q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
}

// The attn_mask as an additive (B, Hq, Sq, Sk) view of dtype `acc` (an expand: broadcast
// dims have stride 0, nothing is materialized beyond the mask's own size): bool masks become
// 0 / -inf, float masks are converted. Undefined when there is no mask.
inline at::Tensor additive_mask(const char* op, const std::optional<at::Tensor>& mask,
                                const at::Tensor& q, const Dims& d) {
  if (!mask.has_value()) return {};
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.device() == q.device(), op, ": attn_mask is on ", m.device(), " but q is on ",
              q.device(), "; all tensors must be on the same device");
  const bool ok = m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type() ||
                  m.scalar_type() == at::kFloat;
  TORCH_CHECK_TYPE(ok, op, ": attn_mask has dtype ", m.scalar_type(),
                   "; supported: Bool, Float or q's dtype ", q.scalar_type());
  const std::vector<int64_t> full{d.B, d.Hq, d.Sq, d.Sk};
  bool fits = m.dim() <= 4;
  for (int64_t i = 1; fits && i <= m.dim(); ++i) {
    const int64_t s = m.size(-i);
    fits = s == 1 || s == full[4 - i];
  }
  TORCH_CHECK(fits, op, ": attn_mask of shape ", m.sizes(), " is not broadcastable to ",
              at::IntArrayRef(full), " (B, H, Sq, Sk)");
  const auto acc = acc_type(q.scalar_type());
  at::Tensor add =
      m.scalar_type() == at::kBool
          ? at::zeros(m.sizes(), m.options().dtype(acc)).masked_fill_(m.logical_not(), -INFINITY)
          : m.to(acc);
  return add.expand(full);
}

// grad of the additive mask: the full (B, Hq, Sq, Sk) gradient summed over the dims the mask
// was broadcast along, in the mask's shape and dtype.
inline at::Tensor reduce_grad_mask(const at::Tensor& full, const at::Tensor& mask) {
  const int64_t lead = 4 - mask.dim();
  std::vector<int64_t> dims;
  for (int64_t i = 0; i < 4; ++i)
    if (i < lead || (mask.size(i - lead) == 1 && full.size(i) != 1)) dims.push_back(i);
  at::Tensor g = dims.empty() ? full : full.sum(dims, /*keepdim=*/true);
  return g.reshape(mask.sizes()).to(mask.scalar_type());
}

// out (B, Hq, Sq, D) contiguous in q's dtype, lse (B, Hq, Sq) in the accumulation dtype.
inline std::tuple<at::Tensor, at::Tensor> sdpa_outputs(const at::Tensor& q, const Dims& d) {
  return {at::empty({d.B, d.Hq, d.Sq, d.D}, q.options()),
          at::empty({d.B, d.Hq, d.Sq}, q.options().dtype(acc_type(q.scalar_type())))};
}

// The backward's saved tensors: grad_out and out of shape `out_shape` in q's dtype, lse of
// shape `lse_shape` in the accumulation dtype, all on q's device.
inline void saved_outputs(const char* op, const at::Tensor& grad_out, const at::Tensor& out,
                          const at::Tensor& lse, const at::Tensor& q, at::IntArrayRef out_shape,
                          at::IntArrayRef lse_shape) {
  for (auto [name, t] : {std::pair{"grad_out", &grad_out}, std::pair{"out", &out}}) {
    TORCH_CHECK(t->sizes() == out_shape, op, ": ", name, " must have shape ", out_shape, ", got ",
                t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ",
                     t->scalar_type(), " but q has dtype ", q.scalar_type());
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, " is on ", t->device(), " but q is on ",
                q.device(), "; all tensors must be on the same device");
  }
  TORCH_CHECK(lse.sizes() == lse_shape, op, ": lse must have shape ", lse_shape, ", got ",
              lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == acc_type(q.scalar_type()), op, ": lse has dtype ",
                   lse.scalar_type(), "; expected ", acc_type(q.scalar_type()));
  TORCH_CHECK(lse.device() == q.device(), op, ": lse is on ", lse.device(), " but q is on ",
              q.device(), "; all tensors must be on the same device");
}

struct VarlenDims {
  int64_t N, Tq, Tk, Hq, Hkv, D;
};

inline VarlenDims varlen_dims(const char* op, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
                              int64_t max_q, int64_t max_k,
                              std::initializer_list<c10::ScalarType> allowed) {
  qkv(op, q, k, v, 3, allowed);
  heads(op, q.size(1), k.size(1));
  for (auto [name, t] : {std::pair{"cu_seqlens_q", &cu_q}, std::pair{"cu_seqlens_k", &cu_k}}) {
    checks::dtype(op, name, *t, {at::kInt, at::kLong});
    TORCH_CHECK(t->dim() == 1 && t->numel() >= 1, op, ": ", name,
                " must be 1-D with N + 1 >= 1 entries, got shape ", t->sizes());
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, " is on ", t->device(), " but q is on ",
                q.device(), "; all tensors must be on the same device");
  }
  TORCH_CHECK(cu_q.numel() == cu_k.numel(), op,
              ": cu_seqlens_q and cu_seqlens_k must have the same length, got ", cu_q.numel(),
              " and ", cu_k.numel());
  TORCH_CHECK(max_q >= 0 && max_k >= 0, op, ": max_seqlen_q/k must be >= 0, got ", max_q, " and ",
              max_k);
  return {cu_q.numel() - 1, q.size(0), k.size(0), q.size(1), k.size(1), q.size(2)};
}

// The values of a cu_seqlens (a CPU int64 copy): start at 0, non-decreasing, end at `total`,
// no sequence longer than max_len. Reading them costs a device sync on CUDA.
inline void cu_seqlens_values(const char* op, const char* name, const at::Tensor& cu_cpu,
                              int64_t total, int64_t max_len) {
  const int64_t* c = cu_cpu.data_ptr<int64_t>();
  const int64_t n = cu_cpu.numel();
  TORCH_CHECK(c[0] == 0, op, ": ", name, " must start at 0, got ", c[0]);
  for (int64_t i = 0; i + 1 < n; ++i) {
    TORCH_CHECK(c[i + 1] >= c[i], op, ": ", name, " must be non-decreasing, got ", c[i], " then ",
                c[i + 1], " at index ", i + 1);
    TORCH_CHECK(c[i + 1] - c[i] <= max_len, op, ": sequence ", i, " has length ", c[i + 1] - c[i],
                " (", name, ") above max_seqlen ", max_len);
  }
  TORCH_CHECK(c[n - 1] == total, op, ": ", name, " must end at the number of tokens ", total,
              ", got ", c[n - 1]);
}

}  // namespace fastdl::attention
