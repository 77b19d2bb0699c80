// CUDA kernels of the conv family: launch parameters and host launchers.
// Plain CUDA on raw pointers (no torch headers), so conv_gemm.cu / conv_direct.cu compile
// standalone with nvcc; the bind layer (conv_bind.cpp) checks and allocates the tensors, puts the
// activations in NHWC and the weight in the layout each launcher names, and fills these structs.
//
// Every op is described in conv2d terms (csrc/common/conv.h, ConvGeom): input (N, C, H, W),
// weight (K, C / G, R, S), output (N, K, P, Q). conv_transpose2d's forward is conv_dgrad and its
// backward conv_fprop + conv_wgrad of that geometry. Dense activation operands are NHWC
// ((N, H, W, C) row-major); outputs are written through 4 strides in (n, channel, y, x) order,
// so NCHW and channels_last outputs need no extra copy. Every launcher returns the first CUDA
// error it met (cudaSuccess otherwise) and launches nothing for empty outputs.
//
// Spatial sizes, channel counts and the weight's element count must each fit in int32 (the
// bind layer checks); every product of them (pixels, offsets) is computed in 64 bits.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "norm.cuh"  // DType

namespace fastdl::cuda {

// Values of fastdl::conv::Activation (csrc/common/conv.h); gelu is the exact erf form.
enum class Act : int { kNone = 0, kRelu = 1, kSilu = 2, kGelu = 3 };

struct ConvShape {
  int64_t N = 0, C = 0, H = 0, W = 0;  // input
  int64_t K = 0, R = 0, S = 0;         // weight (K, C / G, R, S)
  int64_t P = 0, Q = 0;                // output
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1, groups = 1;
};

// out = act(conv(x, weight) + bias + residual); pre (nullable) receives the pre-activation.
struct ConvFpropParams {
  ConvShape g;
  const void* x = nullptr;         // (N, H, W, C) dense
  const void* weight = nullptr;    // (K, R, S, C / G) dense
  const void* bias = nullptr;      // (K,), nullable
  const void* residual = nullptr;  // (N, K, P, Q) through res_stride, nullable
  int64_t res_stride[4] = {0, 0, 0, 0};
  void* out = nullptr;  // (N, K, P, Q) through out_stride
  void* pre = nullptr;  // nullable; same strides as out
  int64_t out_stride[4] = {0, 0, 0, 0};
  DType dtype = DType::kFloat32;
  Act act = Act::kNone;
};

cudaError_t conv_fprop(const ConvFpropParams& p, cudaStream_t stream);

// grad_input = conv2d input gradient of grad (+ bias[c], conv_transpose2d's forward).
struct ConvDgradParams {
  ConvShape g;
  const void* grad = nullptr;    // (N, P, Q, K) dense
  const void* weight = nullptr;  // (G, C / G, R, S, K / G) dense
  const void* bias = nullptr;    // (C,), nullable
  void* grad_input = nullptr;    // (N, C, H, W) through gi_stride
  int64_t gi_stride[4] = {0, 0, 0, 0};
  DType dtype = DType::kFloat32;
};

cudaError_t conv_dgrad(const ConvDgradParams& p, cudaStream_t stream);

// grad_weight (K, C / G, R, S) dense = sum over output pixels of grad (x) input patches. The
// reduction over N * P * Q is split in chunks fixed by the shapes alone, summed in float32 in a
// fixed order: deterministic, no atomics.
struct ConvWgradParams {
  ConvShape g;
  const void* grad = nullptr;  // (N, P, Q, K) dense
  const void* x = nullptr;     // (N, H, W, C) dense
  void* grad_weight = nullptr;
  void* workspace = nullptr;  // conv_wgrad_workspace_bytes(p) bytes
  DType dtype = DType::kFloat32;
};

size_t conv_wgrad_workspace_bytes(const ConvWgradParams& p);
cudaError_t conv_wgrad(const ConvWgradParams& p, cudaStream_t stream);

// grad_bias[c] = sum over rows of grad (rows, cols) dense; deterministic like conv_wgrad.
struct ConvBiasGradParams {
  const void* grad = nullptr;
  int64_t rows = 0, cols = 0;
  void* grad_bias = nullptr;
  void* workspace = nullptr;  // conv_bias_grad_workspace_bytes(p) bytes
  DType dtype = DType::kFloat32;
};

size_t conv_bias_grad_workspace_bytes(const ConvBiasGradParams& p);
cudaError_t conv_bias_grad(const ConvBiasGradParams& p, cudaStream_t stream);

// grad_pre = grad_out * act'(saved), elementwise over dense tensors of one layout; saved is the
// forward's out for relu, its pre-activation for silu/gelu.
struct ConvActBwdParams {
  const void* grad_out = nullptr;
  const void* saved = nullptr;
  void* grad_pre = nullptr;
  int64_t numel = 0;
  Act act = Act::kNone;
  DType dtype = DType::kFloat32;
};

cudaError_t conv_act_bwd(const ConvActBwdParams& p, cudaStream_t stream);

}  // namespace fastdl::cuda
