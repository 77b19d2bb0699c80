// TORCH_LIBRARY_IMPL(fastdl, CUDA) for the conv family: the checks of csrc/common/conv.h (same
// messages as the CPU layer), layouts (activations to NHWC, the weight to the layout each
// launcher of conv.cuh names), allocation in x's memory format, device and stream, then the
// launchers on raw pointers. Outputs are written in place through their strides, so an NCHW
// result costs no transpose.
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/conv.h"
#include "cuda/conv.cuh"

namespace fastdl {
namespace {

using OptTensor = std::optional<at::Tensor>;

constexpr const char* kConv = "fastdl.conv2d";
constexpr const char* kConvT = "fastdl.conv_transpose2d";
constexpr std::initializer_list<c10::ScalarType> kDtypes = {at::kFloat, at::kHalf, at::kBFloat16};

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

// The kernels index sizes and channels in int32 (every product of them in int64).
cuda::ConvShape shape(const char* op, const conv::ConvGeom& g) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  const int64_t dims[] = {g.C, g.H,        g.W,        g.K,     g.R,     g.S,     g.P,
                          g.Q, g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.dil_h, g.dil_w};
  for (int64_t d : dims)
    TORCH_CHECK(d <= kMax, op, ": CUDA kernels support sizes, channels, strides, padding and ",
                "dilation up to 2^31 - 1, got ", d);
  TORCH_CHECK(g.K * g.c_per_group() * g.R * g.S <= kMax, op,
              ": CUDA kernels support weights of up to 2^31 - 1 elements");
  // Kernel coordinates (p * stride - pad + r * dilation and its inverse) stay within the padded
  // input.
  TORCH_CHECK(g.H + 2 * g.pad_h <= kMax && g.W + 2 * g.pad_w <= kMax, op,
              ": CUDA kernels support padded inputs of up to 2^31 - 1 rows and columns");
  return {g.N, g.C,        g.H,        g.W,     g.K,     g.R,     g.S,     g.P,
          g.Q, g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.dil_h, g.dil_w, g.groups};
}

// (N, C, H, W) in any layout -> the same tensor in NHWC memory (a no-op when it already is).
at::Tensor nhwc(const at::Tensor& t) {
  return t.contiguous(at::MemoryFormat::ChannelsLast);
}

// (K, C/G, R, S) -> (K, R, S, C/G): fprop's B rows, one per output channel.
at::Tensor weight_fprop(const at::Tensor& w) {
  return w.permute({0, 2, 3, 1}).contiguous();
}

// (K, C/G, R, S) -> (G, C/G, R, S, K/G): dgrad's B rows, one per input channel.
at::Tensor weight_dgrad(const at::Tensor& w, int64_t groups) {
  return w.reshape({groups, w.size(0) / groups, w.size(1), w.size(2), w.size(3)})
      .permute({0, 2, 3, 4, 1})
      .contiguous();
}

void strides(const at::Tensor& t, int64_t (&s)[4]) {
  for (int d = 0; d < 4; ++d) s[d] = t.stride(d);
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({int64_t(bytes)}, like.options().dtype(at::kByte));
}

at::Tensor empty0(const at::Tensor& x) {
  return at::empty({0}, x.options());
}

cudaStream_t stream() {
  return c10::cuda::getCurrentCUDAStream();
}

// out (N, K, P, Q), allocated by the caller = act(conv(x, w) + bias + residual); pre optional.
void fprop(const cuda::ConvShape& s, const at::Tensor& x, const at::Tensor& weight,
           const OptTensor& bias, const OptTensor& residual, at::Tensor& out, at::Tensor* pre,
           cuda::Act act) {
  if (out.numel() == 0) return;
  const at::Tensor xn = nhwc(x), wt = weight_fprop(weight);
  const OptTensor b = bias ? OptTensor(bias->contiguous()) : std::nullopt;
  cuda::ConvFpropParams p;
  p.g = s;
  p.x = xn.data_ptr();
  p.weight = wt.data_ptr();
  p.bias = b ? b->data_ptr() : nullptr;
  if (residual) {
    p.residual = residual->data_ptr();
    strides(*residual, p.res_stride);
  }
  p.out = out.data_ptr();
  p.pre = pre != nullptr ? pre->data_ptr() : nullptr;
  strides(out, p.out_stride);
  p.dtype = dtype_of(x);
  p.act = act;
  C10_CUDA_CHECK(cuda::conv_fprop(p, stream()));
}

// grad_input (N, C, H, W), allocated by the caller = conv2d input gradient of grad (+ bias).
void dgrad(const cuda::ConvShape& s, const at::Tensor& grad, const at::Tensor& weight,
           const OptTensor& bias, at::Tensor& gi) {
  if (gi.numel() == 0) return;
  const at::Tensor gn = nhwc(grad), wd = weight_dgrad(weight, s.groups);
  const OptTensor b = bias ? OptTensor(bias->contiguous()) : std::nullopt;
  cuda::ConvDgradParams p;
  p.g = s;
  p.grad = gn.data_ptr();
  p.weight = wd.data_ptr();
  p.bias = b ? b->data_ptr() : nullptr;
  p.grad_input = gi.data_ptr();
  strides(gi, p.gi_stride);
  p.dtype = dtype_of(gi);
  C10_CUDA_CHECK(cuda::conv_dgrad(p, stream()));
}

// grad_weight of weight's shape (K, C/G, R, S), contiguous, in the activations' dtype (which the
// checks made weight's).
at::Tensor wgrad(const cuda::ConvShape& s, const at::Tensor& grad, const at::Tensor& x,
                 const at::Tensor& weight) {
  at::Tensor gw = at::empty(weight.sizes(), x.options());
  if (gw.numel() == 0) return gw;
  const at::Tensor gn = nhwc(grad), xn = nhwc(x);
  cuda::ConvWgradParams p;
  p.g = s;
  p.grad = gn.data_ptr();
  p.x = xn.data_ptr();
  p.grad_weight = gw.data_ptr();
  p.dtype = dtype_of(x);
  const at::Tensor ws = workspace(cuda::conv_wgrad_workspace_bytes(p), x);
  p.workspace = ws.data_ptr();
  C10_CUDA_CHECK(cuda::conv_wgrad(p, stream()));
  return gw;
}

// Sum of grad (N, C, H, W) over N, H, W.
at::Tensor bias_grad(const at::Tensor& grad) {
  const at::Tensor gn = nhwc(grad);
  at::Tensor gb = at::empty({grad.size(1)}, grad.options());
  cuda::ConvBiasGradParams p;
  p.grad = gn.data_ptr();
  p.rows = grad.size(0) * grad.size(2) * grad.size(3);
  p.cols = grad.size(1);
  p.grad_bias = gb.data_ptr();
  p.dtype = dtype_of(grad);
  const at::Tensor ws = workspace(cuda::conv_bias_grad_workspace_bytes(p), grad);
  p.workspace = ws.data_ptr();
  C10_CUDA_CHECK(cuda::conv_bias_grad(p, stream()));
  return gb;
}

std::tuple<at::Tensor, at::Tensor> conv2d_fwd(const at::Tensor& x, const at::Tensor& weight,
                                              const OptTensor& bias, const OptTensor& residual,
                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation, int64_t groups,
                                              std::string_view activation, bool /*inference*/) {
  const auto g = conv::conv2d_geom(kConv, x, weight, stride, padding, dilation, groups, kDtypes);
  const auto act = conv::parse_activation(kConv, activation);
  conv::check_bias(kConv, bias, x, g.K);
  conv::check_residual(kConv, residual, x, g);
  const cuda::ConvShape s = shape(kConv, g);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options().memory_format(conv::memory_format(x));
  at::Tensor out = at::empty({g.N, g.K, g.P, g.Q}, opts);
  at::Tensor pre = conv::saves_pre(act) ? at::empty_like(out) : empty0(x);
  fprop(s, x, weight, bias, residual, out, conv::saves_pre(act) ? &pre : nullptr,
        static_cast<cuda::Act>(act));
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv2d_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& out, const at::Tensor& pre, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, std::string_view activation,
    std::array<bool, 4> mask) {
  const auto g = conv::conv2d_geom(kConv, x, weight, stride, padding, dilation, groups, kDtypes);
  const auto act = conv::parse_activation(kConv, activation);
  const std::vector<int64_t> osizes{g.N, g.K, g.P, g.Q};
  conv::check_saved(kConv, "grad_out", grad_out, x, osizes);
  if (act == conv::Activation::kRelu) conv::check_saved(kConv, "out", out, x, osizes);
  if (conv::saves_pre(act)) conv::check_saved(kConv, "pre", pre, x, osizes);
  const cuda::ConvShape s = shape(kConv, g);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = conv::memory_format(x);
  // The pre-activation gradient, NHWC: the operand of all three reductions below.
  at::Tensor gpre = nhwc(grad_out);
  if (act != conv::Activation::kNone) {
    const at::Tensor saved = nhwc(act == conv::Activation::kRelu ? out : pre);
    at::Tensor gp = at::empty_like(gpre, at::MemoryFormat::ChannelsLast);
    cuda::ConvActBwdParams p;
    p.grad_out = gpre.data_ptr();
    p.saved = saved.data_ptr();
    p.grad_pre = gp.data_ptr();
    p.numel = gp.numel();
    p.act = static_cast<cuda::Act>(act);
    p.dtype = dtype_of(x);
    C10_CUDA_CHECK(cuda::conv_act_bwd(p, stream()));
    gpre = gp;
  }
  at::Tensor gi = empty0(x), gw = empty0(x), gb = empty0(x), gp = empty0(x);
  if (mask[0]) {
    gi = at::empty({g.N, g.C, g.H, g.W}, x.options().memory_format(fmt));
    dgrad(s, gpre, weight, std::nullopt, gi);
  }
  if (mask[1]) gw = wgrad(s, gpre, x, weight);
  if (mask[2]) gb = bias_grad(gpre);
  if (mask[3]) {
    gp = gpre.contiguous(fmt);
    if (gp.is_alias_of(grad_out)) gp = gp.clone(fmt);  // an op's outputs never alias its inputs
  }
  return {gi, gw, gb, gp};
}

at::Tensor conv_transpose2d_fwd(const at::Tensor& x, const at::Tensor& weight,
                                const OptTensor& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef output_padding,
                                int64_t groups, at::IntArrayRef dilation) {
  const auto g = conv::conv_transpose2d_geom(kConvT, x, weight, stride, padding, output_padding,
                                             groups, dilation, kDtypes);
  conv::check_bias(kConvT, bias, x, g.C);
  const cuda::ConvShape s = shape(kConvT, g);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out =
      at::empty({g.N, g.C, g.H, g.W}, x.options().memory_format(conv::memory_format(x)));
  dgrad(s, x, weight, bias, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_transpose2d_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
    at::IntArrayRef dilation, std::array<bool, 3> mask) {
  const auto g = conv::conv_transpose2d_geom(kConvT, x, weight, stride, padding, output_padding,
                                             groups, dilation, kDtypes);
  conv::check_saved(kConvT, "grad_out", grad_out, x, {g.N, g.C, g.H, g.W});
  const cuda::ConvShape s = shape(kConvT, g);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor gi = empty0(x), gw = empty0(x), gb = empty0(x);
  if (mask[0]) {  // the adjoint conv2d's forward of grad_out, no epilogue
    gi = at::empty({g.N, g.K, g.P, g.Q}, x.options().memory_format(conv::memory_format(x)));
    fprop(s, grad_out, weight, std::nullopt, std::nullopt, gi, nullptr, cuda::Act::kNone);
  }
  // the adjoint conv2d's weight gradient: its output gradient is x, its input grad_out
  if (mask[1]) gw = wgrad(s, x, grad_out, weight);
  if (mask[2]) gb = bias_grad(grad_out);
  return {gi, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("conv2d_fwd", &conv2d_fwd);
  m.impl("conv2d_bwd", &conv2d_bwd);
  m.impl("conv_transpose2d_fwd", &conv_transpose2d_fwd);
  m.impl("conv_transpose2d_bwd", &conv_transpose2d_bwd);
}

}  // namespace fastdl
