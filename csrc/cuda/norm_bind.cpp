// TORCH_LIBRARY_IMPL(fastdl, CUDA) for the norm family: input checks, allocation (shapes,
// dtypes and strides as the fake kernels in fastdl/ops/norm.py), device and stream, then the
// launchers of norm.cuh on raw pointers.
#include <array>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/norm.cuh"

namespace fastdl {
namespace {

using OptTensor = std::optional<at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

constexpr const char* kLayerNorm = "fastdl.layer_norm";
constexpr const char* kRmsNorm = "fastdl.rms_norm";
constexpr const char* kBatchNorm = "fastdl.batch_norm";

void check_dtype(const char* op, const char* arg, const at::Tensor& t) {
  checks::dtype(op, arg, t, {at::kFloat, at::kHalf, at::kBFloat16});
}

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      return cuda::DType::kFloat32;
  }
}

// A tensor that must match x: same device, shape and dtype.
void check_like(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& x) {
  checks::same_device(op, arg, t, x);
  checks::same_shape(op, arg, t, x);
  checks::dtype(op, arg, t, {x.scalar_type()});
}

// A saved statistic: `numel` float32 values on x's device.
void check_stat(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& x,
                int64_t numel) {
  checks::same_device(op, arg, t, x);
  TORCH_CHECK(t.numel() == numel, op, ": ", arg, " must have ", numel, " elements, got shape ",
              t.sizes());
  checks::dtype(op, arg, t, {at::kFloat});
}

// Kernels read parameters as flat contiguous float32 (a copy only when they are not already).
OptTensor as_float(const OptTensor& p) {
  if (!p.has_value()) return std::nullopt;
  return p->reshape({-1}).to(at::kFloat).contiguous();
}

const float* fptr(const OptTensor& p) {
  return p ? p->data_ptr<float>() : nullptr;
}
const void* ptr(const OptTensor& t) {
  return t ? t->data_ptr() : nullptr;
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({int64_t(bytes)}, like.options().dtype(at::kByte));
}

// A parameter gradient: flat float32, empty when not wanted, zeros when nothing is summed.
at::Tensor param_grad(const at::Tensor& x, int64_t numel, bool wanted, bool empty_input) {
  const auto opts = x.options().dtype(at::kFloat);
  if (!wanted) return at::empty({0}, opts);
  return empty_input ? at::zeros({numel}, opts) : at::empty({numel}, opts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd(
    const char* op, bool rms, const at::Tensor& x_, const OptTensor& residual_,
    const OptTensor& weight_, const OptTensor& bias_, int64_t n, double eps) {
  check_dtype(op, "x", x_);
  checks::normalized_numel(op, x_, n);
  checks::positive_eps(op, eps);
  if (residual_) check_like(op, "residual", *residual_, x_);
  checks::param(op, "weight", weight_, x_, n);
  checks::param(op, "bias", bias_, x_, n);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const OptTensor residual = residual_ ? OptTensor(residual_->contiguous()) : std::nullopt;
  const OptTensor weight = as_float(weight_), bias = as_float(bias_);
  const int64_t rows = x.numel() / n;
  const auto stat = x.options().dtype(at::kFloat);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor sum = residual ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({rms ? 0 : rows}, stat), rstd = at::empty({rows}, stat);

  cuda::NormFwdParams p;
  p.x = x.data_ptr();
  p.residual = ptr(residual);
  p.weight = fptr(weight);
  p.bias = fptr(bias);
  p.out = out.data_ptr();
  p.sum = residual ? sum.data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = rows;
  p.cols = n;
  p.eps = float(eps);
  p.dtype = dtype_of(x);
  p.rms = rms;
  C10_CUDA_CHECK(cuda::norm_fwd(p, c10::cuda::getCurrentCUDAStream()));
  return {out, sum, mean, rstd};
}

// grad_input always has input's shape (the fake's contract); when not wanted it is zeros.
Tensor3 norm_bwd(const char* op, bool rms, const at::Tensor& grad_out_, const OptTensor& grad_sum_,
                 const at::Tensor& input_, const OptTensor& mean_, const at::Tensor& rstd_,
                 const OptTensor& weight_, int64_t n, std::array<bool, 3> mask) {
  check_dtype(op, "input", input_);
  checks::normalized_numel(op, input_, n);
  check_like(op, "grad_out", grad_out_, input_);
  if (grad_sum_) check_like(op, "grad_sum", *grad_sum_, input_);
  const int64_t rows = input_.numel() / n;
  if (mean_) check_stat(op, "mean", *mean_, input_, rows);
  check_stat(op, "rstd", rstd_, input_, rows);
  checks::param(op, "weight", weight_, input_, n);
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous(), grad_out = grad_out_.contiguous();
  const OptTensor grad_sum = grad_sum_ ? OptTensor(grad_sum_->contiguous()) : std::nullopt;
  const OptTensor mean = mean_ ? OptTensor(mean_->contiguous()) : std::nullopt;
  const at::Tensor rstd = rstd_.contiguous();
  const OptTensor weight = as_float(weight_);
  at::Tensor gi = mask[0] ? at::empty(input.sizes(), input.options())
                          : at::zeros(input.sizes(), input.options());
  at::Tensor gw = param_grad(input, n, mask[1], rows == 0);
  at::Tensor gb = param_grad(input, n, mask[2], rows == 0);

  cuda::NormBwdParams p;
  p.grad_out = grad_out.data_ptr();
  p.grad_sum = ptr(grad_sum);
  p.input = input.data_ptr();
  p.mean = fptr(mean);
  p.rstd = rstd.data_ptr<float>();
  p.weight = fptr(weight);
  p.grad_input = mask[0] ? gi.data_ptr() : nullptr;
  p.grad_weight = mask[1] ? gw.data_ptr<float>() : nullptr;
  p.grad_bias = mask[2] ? gb.data_ptr<float>() : nullptr;
  p.rows = rows;
  p.cols = n;
  p.dtype = dtype_of(input);
  p.rms = rms;
  if (!mask[0] && !mask[1] && !mask[2]) return {gi, gw, gb};
  const at::Tensor ws = workspace(cuda::norm_bwd_workspace_bytes(p), input);
  p.workspace = ws.data_ptr();
  C10_CUDA_CHECK(cuda::norm_bwd(p, c10::cuda::getCurrentCUDAStream()));
  return {gi, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    int64_t normalized_numel, double eps) {
  return norm_fwd(kLayerNorm, false, x, residual, weight, bias, normalized_numel, eps);
}

Tensor3 layer_norm_bwd(const at::Tensor& grad_out, const OptTensor& grad_sum,
                       const at::Tensor& input, const at::Tensor& mean, const at::Tensor& rstd,
                       const OptTensor& weight, int64_t normalized_numel,
                       std::array<bool, 3> output_mask) {
  return norm_bwd(kLayerNorm, false, grad_out, grad_sum, input, mean, rstd, weight,
                  normalized_numel, output_mask);
}

Tensor3 rms_norm_fwd(const at::Tensor& x, const OptTensor& residual, const OptTensor& weight,
                     int64_t normalized_numel, double eps) {
  auto [out, sum, mean, rstd] =
      norm_fwd(kRmsNorm, true, x, residual, weight, std::nullopt, normalized_numel, eps);
  return {out, sum, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_out,
                                                const OptTensor& grad_sum, const at::Tensor& input,
                                                const at::Tensor& rstd, const OptTensor& weight,
                                                int64_t normalized_numel,
                                                std::array<bool, 2> output_mask) {
  auto [gi, gw, gb] = norm_bwd(kRmsNorm, true, grad_out, grad_sum, input, std::nullopt, rstd,
                               weight, normalized_numel, {output_mask[0], output_mask[1], false});
  return {gi, gw};
}

// x viewed as (n, c, hw); channels_last as the fake kernels decide it (4-D only).
struct BnGeometry {
  int64_t n, c, hw;
  bool cl;
  at::MemoryFormat format;
};

BnGeometry bn_geometry(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, op, ": x must be (N, C, *), got shape ", x.sizes());
  const bool cl =
      x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  int64_t hw = 1;
  for (int64_t d = 2; d < x.dim(); ++d) hw *= x.size(d);
  return {x.size(0), x.size(1), hw, cl,
          cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous};
}

Tensor3 batch_norm_fwd(const at::Tensor& x_, const OptTensor& weight_, const OptTensor& bias_,
                       const OptTensor& running_mean_, const OptTensor& running_var_, bool training,
                       double eps, bool relu) {
  const char* op = kBatchNorm;
  check_dtype(op, "x", x_);
  const BnGeometry g = bn_geometry(op, x_);
  checks::positive_eps(op, eps);
  checks::param(op, "weight", weight_, x_, g.c);
  checks::param(op, "bias", bias_, x_, g.c);
  checks::param(op, "running_mean", running_mean_, x_, g.c);
  checks::param(op, "running_var", running_var_, x_, g.c);
  TORCH_CHECK(training || (running_mean_ && running_var_), op,
              ": running_mean and running_var are required in eval mode");
  TORCH_CHECK_VALUE(!training || g.c == 0 || g.n * g.hw != 1, op,
                    ": expected more than 1 value per channel when training, got x of shape ",
                    x_.sizes());
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(g.format);
  const OptTensor weight = as_float(weight_), bias = as_float(bias_);
  const OptTensor running_mean = training ? std::nullopt : as_float(running_mean_);
  const OptTensor running_var = training ? std::nullopt : as_float(running_var_);
  const auto stat = x.options().dtype(at::kFloat);
  at::Tensor out = at::empty_like(x, g.format);
  if (x.numel() == 0) {  // nothing to normalize; the statistics are the running ones, if any
    if (training) return {out, at::zeros({g.c}, stat), at::zeros({g.c}, stat)};
    return {out, running_mean->clone(), (*running_var + eps).rsqrt()};
  }
  at::Tensor save_mean = at::empty({g.c}, stat), save_invstd = at::empty({g.c}, stat);

  cuda::BatchNormFwdParams p;
  p.x = x.data_ptr();
  p.weight = fptr(weight);
  p.bias = fptr(bias);
  p.running_mean = fptr(running_mean);
  p.running_var = fptr(running_var);
  p.out = out.data_ptr();
  p.save_mean = save_mean.data_ptr<float>();
  p.save_invstd = save_invstd.data_ptr<float>();
  p.n = g.n;
  p.c = g.c;
  p.hw = g.hw;
  p.eps = float(eps);
  p.dtype = dtype_of(x);
  p.channels_last = g.cl;
  p.training = training;
  p.relu = relu;
  const at::Tensor ws = workspace(cuda::batch_norm_fwd_workspace_bytes(p), x);
  p.workspace = ws.data_ptr();
  C10_CUDA_CHECK(cuda::batch_norm_fwd(p, c10::cuda::getCurrentCUDAStream()));
  return {out, save_mean, save_invstd};
}

Tensor3 batch_norm_bwd(const at::Tensor& grad_out_, const at::Tensor& x_, const OptTensor& weight_,
                       const OptTensor& bias_, const at::Tensor& save_mean_,
                       const at::Tensor& save_invstd_, bool training, bool relu,
                       std::array<bool, 3> mask) {
  const char* op = kBatchNorm;
  check_dtype(op, "x", x_);
  const BnGeometry g = bn_geometry(op, x_);
  check_like(op, "grad_out", grad_out_, x_);
  checks::param(op, "weight", weight_, x_, g.c);
  checks::param(op, "bias", bias_, x_, g.c);
  check_stat(op, "save_mean", save_mean_, x_, g.c);
  check_stat(op, "save_invstd", save_invstd_, x_, g.c);
  const c10::cuda::CUDAGuard guard(x_.device());
  // The kernels walk grad_out in x's layout, whatever layout autograd handed over.
  const at::Tensor x = x_.contiguous(g.format), grad_out = grad_out_.contiguous(g.format);
  const OptTensor weight = as_float(weight_), bias = as_float(bias_);
  const at::Tensor save_mean = save_mean_.contiguous(), save_invstd = save_invstd_.contiguous();
  const bool empty = x.numel() == 0;
  at::Tensor gi = mask[0] ? at::empty_like(x, g.format) : at::zeros_like(x, g.format);
  at::Tensor gw = param_grad(x, g.c, mask[1], empty);
  at::Tensor gb = param_grad(x, g.c, mask[2], empty);
  if (empty || (!mask[0] && !mask[1] && !mask[2])) return {gi, gw, gb};

  cuda::BatchNormBwdParams p;
  p.grad_out = grad_out.data_ptr();
  p.x = x.data_ptr();
  p.weight = fptr(weight);
  p.bias = fptr(bias);
  p.save_mean = save_mean.data_ptr<float>();
  p.save_invstd = save_invstd.data_ptr<float>();
  p.grad_input = mask[0] ? gi.data_ptr() : nullptr;
  p.grad_weight = mask[1] ? gw.data_ptr<float>() : nullptr;
  p.grad_bias = mask[2] ? gb.data_ptr<float>() : nullptr;
  p.n = g.n;
  p.c = g.c;
  p.hw = g.hw;
  p.dtype = dtype_of(x);
  p.channels_last = g.cl;
  p.training = training;
  p.relu = relu;
  const at::Tensor ws = workspace(cuda::batch_norm_bwd_workspace_bytes(p), x);
  p.workspace = ws.data_ptr();
  C10_CUDA_CHECK(cuda::batch_norm_bwd(p, c10::cuda::getCurrentCUDAStream()));
  return {gi, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("batch_norm_fwd", &batch_norm_fwd);
  m.impl("batch_norm_bwd", &batch_norm_bwd);
}

}  // namespace fastdl
