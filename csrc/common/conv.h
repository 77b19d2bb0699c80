// Validation and output-shape logic of the conv ops (schemas in csrc/ops.cpp), shared by the CPU
// and CUDA bind layers so both answer bad input with the same messages (fastdl/ops/conv.py
// mirrors them for Triton). Torch-facing: include only from bind layers, never from kernels.
//
// Every op is described by one ConvGeom in conv2d terms: input (N, C, H, W), weight (K, C / G,
// R, S), output (N, K, P, Q). conv_transpose2d is the adjoint of a conv2d, and its weight
// (C_in, C_out / G, kH, kW) is exactly that conv2d's weight, so its geometry is the conv2d whose
// *output* is the transposed conv's input: C = C_out of the transposed conv, K = its C_in,
// (H, W) = its output size, (P, Q) = its input size.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"

namespace fastdl::conv {

enum class Activation : int { kNone = 0, kRelu = 1, kSilu = 2, kGelu = 3 };

inline Activation parse_activation(const char* op, std::string_view name) {
  if (name == "none") return Activation::kNone;
  if (name == "relu") return Activation::kRelu;
  if (name == "silu") return Activation::kSilu;
  if (name == "gelu") return Activation::kGelu;
  TORCH_CHECK(false, op, ": activation must be one of none, relu, silu, gelu; got '", name, "'");
}

// Which saved tensor the activation's backward reads: relu reads out, silu/gelu read pre.
inline bool saves_pre(Activation a) {
  return a == Activation::kSilu || a == Activation::kGelu;
}

struct ConvGeom {
  int64_t N, C, H, W;  // conv input
  int64_t K, R, S;     // weight (K, C / G, R, S)
  int64_t P, Q;        // conv output
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;
  int64_t out_pad_h = 0, out_pad_w = 0;  // conv_transpose2d only

  int64_t c_per_group() const { return C / groups; }
  int64_t k_per_group() const { return K / groups; }
  // MACs of the forward (both directions of a transposed conv do the same work).
  int64_t macs() const { return N * K * P * Q * c_per_group() * R * S; }
};

// The output keeps x's memory format: channels_last when x is channels_last but not also
// plain contiguous (tensors with C == 1 or H * W == 1 are both; they count as NCHW).
inline bool channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat memory_format(const at::Tensor& x) {
  return channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

namespace detail {

inline void pair(const char* op, const char* arg, at::IntArrayRef v, int64_t min) {
  TORCH_CHECK(v.size() == 2, op, ": ", arg, " must have 2 values, got ", v);
  TORCH_CHECK(v[0] >= min && v[1] >= min, op, ": ", arg, " must be ", min == 0 ? ">= 0" : "> 0",
              ", got ", v);
}

// Shared checks of x and weight; `c_w` is weight's input-channel dim (1 for conv2d, 0 for
// conv_transpose2d).
inline void tensors(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t groups,
                    std::initializer_list<c10::ScalarType> dtypes, int c_w) {
  checks::dtype(op, "x", x, dtypes);
  checks::same_device(op, "weight", weight, x);
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight has dtype ",
                   weight.scalar_type(), " but x has dtype ", x.scalar_type(), "; they must match");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) >= 1 && weight.size(3) >= 1, op,
              ": weight must be 4-D with a kernel of at least 1x1, got shape ", weight.sizes());
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  const int64_t c = x.size(1);
  TORCH_CHECK(c % groups == 0, op, ": input channels ", c, " are not divisible by groups=", groups);
  // conv2d weight (K, C / groups, R, S); conv_transpose2d weight (C, C_out / groups, R, S).
  const int64_t expected = c_w == 1 ? weight.size(1) * groups : weight.size(0);
  TORCH_CHECK(expected == c, op, ": x has ", c, " channels but weight of shape ", weight.sizes(),
              " with groups=", groups, " expects ", expected);
  if (c_w == 1)
    TORCH_CHECK(weight.size(0) % groups == 0, op, ": output channels ", weight.size(0),
                " (weight.size(0)) are not divisible by groups=", groups);
}

}  // namespace detail

// conv2d: checks x, weight, stride/padding/dilation/groups and returns the geometry.
inline ConvGeom conv2d_geom(const char* op, const at::Tensor& x, const at::Tensor& weight,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups,
                            std::initializer_list<c10::ScalarType> dtypes) {
  detail::tensors(op, x, weight, groups, dtypes, 1);
  detail::pair(op, "stride", stride, 1);
  detail::pair(op, "padding", padding, 0);
  detail::pair(op, "dilation", dilation, 1);
  ConvGeom g{x.size(0),      x.size(1),   x.size(2),   x.size(3), weight.size(0), weight.size(2),
             weight.size(3), 0,           0,           stride[0], stride[1],      padding[0],
             padding[1],     dilation[0], dilation[1], groups};
  const int64_t eff_h = g.dil_h * (g.R - 1) + 1, eff_w = g.dil_w * (g.S - 1) + 1;
  TORCH_CHECK(g.H + 2 * g.pad_h >= eff_h && g.W + 2 * g.pad_w >= eff_w, op,
              ": kernel size (dilated) ", eff_h, "x", eff_w, " is larger than the padded input ",
              g.H + 2 * g.pad_h, "x", g.W + 2 * g.pad_w);
  g.P = (g.H + 2 * g.pad_h - eff_h) / g.stride_h + 1;
  g.Q = (g.W + 2 * g.pad_w - eff_w) / g.stride_w + 1;
  return g;
}

// conv_transpose2d: checks as above plus output_padding < max(stride, dilation) per dim; the
// geometry is that of the adjoint conv2d (see the top of this file).
inline ConvGeom conv_transpose2d_geom(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef output_padding, int64_t groups,
                                      at::IntArrayRef dilation,
                                      std::initializer_list<c10::ScalarType> dtypes) {
  detail::tensors(op, x, weight, groups, dtypes, 0);
  detail::pair(op, "stride", stride, 1);
  detail::pair(op, "padding", padding, 0);
  detail::pair(op, "output_padding", output_padding, 0);
  detail::pair(op, "dilation", dilation, 1);
  for (int d = 0; d < 2; ++d)
    TORCH_CHECK(output_padding[d] < stride[d] || output_padding[d] < dilation[d], op,
                ": output_padding must be smaller than stride or dilation, got output_padding=",
                output_padding, ", stride=", stride, ", dilation=", dilation);
  ConvGeom g{x.size(0),
             weight.size(1) * groups,
             0,
             0,
             x.size(1),
             weight.size(2),
             weight.size(3),
             x.size(2),
             x.size(3),
             stride[0],
             stride[1],
             padding[0],
             padding[1],
             dilation[0],
             dilation[1],
             groups,
             output_padding[0],
             output_padding[1]};
  g.H = (g.P - 1) * g.stride_h - 2 * g.pad_h + g.dil_h * (g.R - 1) + g.out_pad_h + 1;
  g.W = (g.Q - 1) * g.stride_w - 2 * g.pad_w + g.dil_w * (g.S - 1) + g.out_pad_w + 1;
  // An empty batch may have an empty output plane too (torch returns it).
  const bool empty_ok = x.size(0) == 0 && g.H >= 0 && g.W >= 0;
  TORCH_CHECK((g.H > 0 && g.W > 0) || empty_ok, op, ": output size ", g.H, "x", g.W,
              " is not positive (input ", g.P, "x", g.Q, ", padding ", padding, ")");
  return g;
}

// bias: (K,) elements of x's dtype on x's device.
inline void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x,
                       int64_t k) {
  if (!bias.has_value()) return;
  checks::same_device(op, "bias", *bias, x);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == k, op, ": bias must have shape (", k, ",), got ",
              bias->sizes());
  TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": bias has dtype ",
                   bias->scalar_type(), " but x has dtype ", x.scalar_type(), "; they must match");
}

// residual: the output's shape (N, K, P, Q) and x's dtype/device; any strides.
inline void check_residual(const char* op, const std::optional<at::Tensor>& residual,
                           const at::Tensor& x, const ConvGeom& g) {
  if (!residual.has_value()) return;
  checks::same_device(op, "residual", *residual, x);
  TORCH_CHECK(residual->sizes() == at::IntArrayRef({g.N, g.K, g.P, g.Q}), op,
              ": residual must have the output's shape [", g.N, ", ", g.K, ", ", g.P, ", ", g.Q,
              "], got ", residual->sizes());
  TORCH_CHECK_TYPE(residual->scalar_type() == x.scalar_type(), op, ": residual has dtype ",
                   residual->scalar_type(), " but x has dtype ", x.scalar_type(),
                   "; they must match");
}

// A tensor the backward takes in place of a forward input/output: `sizes`, x's dtype/device.
inline void check_saved(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& x,
                        at::IntArrayRef sizes) {
  checks::same_device(op, arg, t, x);
  TORCH_CHECK(t.sizes() == sizes, op, ": ", arg, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", arg, " has dtype ",
                   t.scalar_type(), " but x has dtype ", x.scalar_type(), "; they must match");
}

}  // namespace fastdl::conv
