// Device and host helpers shared by the conv family's kernels (conv_gemm.cu: the implicit GEMM;
// conv_direct.cu: depthwise kernels, reductions, activation backward): the fused epilogue, the
// activations and their derivatives, the deterministic split of weight-gradient reductions.
#pragma once

#include <algorithm>
#include <cstdint>

#include "conv.cuh"
#include "norm_common.cuh"  // to_float, from_float, Vec, dispatch, all_aligned, kMaxGrid

namespace fastdl::cuda::conv_detail {

using detail::from_float;
using detail::kMaxGrid;
using detail::to_float;

__device__ __forceinline__ float act_fwd(Act a, float v) {
  switch (a) {
    case Act::kRelu:
      return v < 0.f ? 0.f : v;  // NaN stays NaN, as torch.relu
    case Act::kSilu:
      return v / (1.f + expf(-v));
    case Act::kGelu:
      return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    default:
      return v;
  }
}

// d act / d pre at `saved` (out for relu, pre for silu/gelu), times g.
__device__ __forceinline__ float act_bwd(Act a, float g, float saved) {
  switch (a) {
    case Act::kRelu:
      return saved > 0.f ? g : 0.f;
    case Act::kSilu: {
      const float s = 1.f / (1.f + expf(-saved));
      return g * s * (1.f + saved * (1.f - s));
    }
    case Act::kGelu: {
      const float cdf = 0.5f * (1.f + erff(saved * 0.70710678118654752f));
      const float pdf = 0.39894228040143268f * expf(-0.5f * saved * saved);
      return g * (cdf + saved * pdf);
    }
    default:
      return g;
  }
}

// q = a / b and r = a % b for non-negative a, b; 32-bit division when both fit (the common case),
// which is several times cheaper than the 64-bit one.
__device__ __forceinline__ int64_t divmod(int64_t a, int64_t b, int64_t& r) {
  if (((a | b) >> 31) == 0) {
    const uint32_t q = uint32_t(a) / uint32_t(b);
    r = int64_t(uint32_t(a) - q * uint32_t(b));
    return q;
  }
  const int64_t q = a / b;
  r = a - q * b;
  return q;
}

// An output pixel (n, y, x) of a row index m over (N, Y, X).
struct Pixel {
  int64_t n;
  int y, x;
};

__device__ __forceinline__ Pixel pixel(int64_t m, int64_t Y, int64_t X) {
  int64_t yx, x;
  const int64_t n = divmod(m, Y * X, yx);
  const int64_t y = divmod(yx, X, x);
  return {n, int(y), int(x)};
}

__device__ __forceinline__ int64_t offset4(const int64_t (&s)[4], int64_t n, int64_t c, int64_t y,
                                           int64_t x) {
  return n * s[0] + c * s[1] + y * s[2] + x * s[3];
}

// The fused forward epilogue of output element (n, k, p, q) whose accumulated conv value is v:
// pre = v + bias + residual (float32, rounded once), out = act(pre).
template <typename T>
__device__ __forceinline__ void fprop_epilogue(const ConvFpropParams& p, const Pixel& px, int64_t k,
                                               float v) {
  if (p.bias != nullptr) v += to_float(static_cast<const T*>(p.bias)[k]);
  if (p.residual != nullptr)
    v += to_float(static_cast<const T*>(p.residual)[offset4(p.res_stride, px.n, k, px.y, px.x)]);
  const int64_t o = offset4(p.out_stride, px.n, k, px.y, px.x);
  if (p.pre != nullptr) static_cast<T*>(p.pre)[o] = from_float<T>(v);
  static_cast<T*>(p.out)[o] = from_float<T>(act_fwd(p.act, v));
}

template <typename T>
__device__ __forceinline__ void dgrad_epilogue(const ConvDgradParams& p, const Pixel& px, int64_t c,
                                               float v) {
  if (p.bias != nullptr) v += to_float(static_cast<const T*>(p.bias)[c]);
  static_cast<T*>(p.grad_input)[offset4(p.gi_stride, px.n, c, px.y, px.x)] = from_float<T>(v);
}

// Depthwise-style convs (C / G == 1) go to direct kernels: their GEMM would have a reduction of
// only R * S (or K / G * R * S) elements, mostly padding on a tensor-core tile.
inline bool use_direct(const ConvShape& g) {
  return g.C == g.groups;
}

// The weight gradient's reduction over the N * P * Q output pixels is cut into `splits` chunks
// (a multiple of kSplitAlign pixels each), fixed by the shapes alone so that results do not depend
// on the GPU: with `blocks` blocks per chunk, enough chunks for kTargetBlocks blocks (two per SM
// of a 132-SM H100/H200), none shorter than kMinChunk pixels, and at most kMaxWorkspace bytes of
// float32 partial sums (whose write and re-read must stay small next to the GEMM itself).
constexpr int64_t kSplitAlign = 32;
constexpr int64_t kMinChunk = 512;
constexpr int64_t kTargetBlocks = 264;
constexpr int64_t kMaxWorkspace = int64_t(256) << 20;
constexpr int kDepthwiseWgradCols = 32;  // channels per depthwise weight-gradient block

struct WgradSplit {
  int64_t splits, chunk;  // chunk: pixels per split
};

inline WgradSplit wgrad_split(const ConvShape& g, int64_t blocks) {
  const int64_t pixels = g.N * g.P * g.Q;
  const int64_t wnumel = std::max<int64_t>(1, g.K * (g.C / g.groups) * g.R * g.S);
  blocks = std::max<int64_t>(1, blocks);
  int64_t s = std::min((kTargetBlocks + blocks - 1) / blocks, (pixels + kMinChunk - 1) / kMinChunk);
  s = std::clamp<int64_t>(s, 1, std::max<int64_t>(1, kMaxWorkspace / (4 * wnumel)));
  int64_t chunk = (pixels + s - 1) / s;
  chunk = (chunk + kSplitAlign - 1) / kSplitAlign * kSplitAlign;
  return {std::max<int64_t>(1, (pixels + chunk - 1) / chunk), chunk};
}

// Implemented in conv_direct.cu.
cudaError_t depthwise_fprop(const ConvFpropParams& p, cudaStream_t stream);
cudaError_t depthwise_dgrad(const ConvDgradParams& p, cudaStream_t stream);
// Partial sums partial[split][k][r * S + s] of a depthwise weight gradient.
cudaError_t depthwise_wgrad(const ConvWgradParams& p, const WgradSplit& sp, float* partial,
                            cudaStream_t stream);
// grad_weight (K, C / G, R, S) = sum over splits of partial[split][k][(r * S + s) * C / G + c].
cudaError_t wgrad_reduce(const ConvWgradParams& p, const WgradSplit& sp, const float* partial,
                         cudaStream_t stream);

}  // namespace fastdl::cuda::conv_detail
