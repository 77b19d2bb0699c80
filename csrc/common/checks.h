// Input checks shared by every native op (CPU and CUDA bind layers). Each message names the op,
// the argument, what was expected and what was given; fastdl/_checks.py mirrors them for Triton.
#pragma once

#include <cfloat>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastdl::checks {

inline std::string dtype_list(std::initializer_list<c10::ScalarType> allowed) {
  std::ostringstream s;
  const char* sep = "";
  for (auto t : allowed) {
    s << sep << c10::toString(t);
    sep = ", ";
  }
  return s.str();
}

inline void dtype(const char* op, const char* arg, const at::Tensor& t,
                  std::initializer_list<c10::ScalarType> allowed) {
  for (auto a : allowed)
    if (t.scalar_type() == a) return;
  TORCH_CHECK_TYPE(false, op, ": ", arg, " has dtype ", t.scalar_type(),
                   "; supported dtypes: ", dtype_list(allowed));
}

inline void same_device(const char* op, const char* arg, const at::Tensor& t,
                        const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, " is on ", t.device(), " but x is on ",
              ref.device(), "; all tensors must be on the same device");
}

inline void same_shape(const char* op, const char* arg, const at::Tensor& t,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", arg, " must have the shape of x ", ref.sizes(),
              ", got ", t.sizes());
}

inline void positive_eps(const char* op, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be a positive finite number, got ",
              eps);
}

inline bool reduced_precision(c10::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf;
}

// A per-feature parameter (weight, bias, running statistic): `numel` elements on x's device,
// dtype x.dtype or float32 when x is bfloat16/float16 (the mixed precision torch also accepts).
inline void param(const char* op, const char* arg, const std::optional<at::Tensor>& p,
                  const at::Tensor& x, int64_t numel) {
  if (!p.has_value()) return;
  same_device(op, arg, *p, x);
  TORCH_CHECK(p->numel() == numel, op, ": ", arg, " must have ", numel, " elements, got shape ",
              p->sizes());
  bool ok = p->scalar_type() == x.scalar_type() ||
            (reduced_precision(x.scalar_type()) && p->scalar_type() == at::kFloat);
  TORCH_CHECK_TYPE(ok, op, ": ", arg, " has dtype ", p->scalar_type(), " but x has dtype ",
                   x.scalar_type(), "; expected ", x.scalar_type(),
                   reduced_precision(x.scalar_type()) ? " or Float" : "");
}

// x viewed as (rows, normalized_numel).
inline void normalized_numel(const char* op, const at::Tensor& x, int64_t n) {
  TORCH_CHECK(n >= 1, op, ": normalized_numel must be >= 1, got ", n);
  TORCH_CHECK(x.dim() >= 1 && x.numel() % n == 0, op, ": x of shape ", x.sizes(),
              " cannot be viewed as rows of normalized_numel=", n);
}

// An int8 dequantization scale: `n` values as (n,) or as `alt` ((n, 1) for a per-row scale,
// (1, n) per column), a floating dtype, every value positive and finite (a zero, negative or NaN
// scale is an error, not a silent garbage output). Reads the values: a device sync on CUDA.
inline void int8_scale(const char* op, const char* arg, const at::Tensor& s, const at::Tensor& ref,
                       int64_t n, c10::IntArrayRef alt) {
  same_device(op, arg, s, ref);
  dtype(op, arg, s, {at::kFloat, at::kBFloat16, at::kHalf});
  TORCH_CHECK((s.dim() == 1 && s.size(0) == n) || s.sizes() == alt, op, ": ", arg,
              " must have shape (", n, ",) or ", alt, ", got ", s.sizes());
  if (n == 0) return;
  const at::Tensor f = s.to(at::kFloat);
  bool ok = true;
  if (f.is_cpu()) {
    // A loop, not five tensor ops: on a small layer those cost more than the product itself.
    const at::Tensor c = f.contiguous();
    const float* v = c.const_data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) ok &= v[i] > 0.f && v[i] <= FLT_MAX;  // NaN fails both
  } else {
    ok = f.gt(0).logical_and(f.isfinite()).all().item<bool>();
  }
  TORCH_CHECK(ok, op, ": ", arg, " must be positive and finite, got min ", f.min().item<float>(),
              ", max ", f.max().item<float>(), (f.isnan().any().item<bool>() ? " and NaN" : ""));
}

}  // namespace fastdl::checks
