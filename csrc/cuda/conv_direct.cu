// Direct (non-GEMM) kernels of the conv family; contract in conv.cuh.
//
// Depthwise convolution (C / G == 1, e.g. MobileNet's groups = C): each output value is a dot
// product of only R * S taps (times K / G for the input gradient), which a tensor-core GEMM tile
// would mostly pad, so these kernels compute it directly, one thread per output element in NHWC
// order: neighbouring threads take neighbouring channels, so activation loads coalesce and the
// R * S weights of a channel stay in L1. The weight gradient is a reduction over all N * P * Q
// output pixels: per (tap, 32 channels) block, 8 rows of threads walk one fixed chunk of pixels
// (the chunks of conv_common.cuh's wgrad_split), reduce in shared memory in a fixed order and
// write one float32 partial per chunk; wgrad_reduce sums the chunks in order. The bias gradient
// is the same column reduction without taps. No atomics anywhere: bit-identical reruns.
#include "conv_common.cuh"

namespace fastdl::cuda {
namespace {

using namespace conv_detail;

constexpr int kThreads = 256;
// Column-reduction blocks: kCols columns x kRows row walkers.
constexpr int kCols = kDepthwiseWgradCols, kRows = 8;

unsigned grid_for(int64_t work, int threads) {
  return unsigned(std::clamp<int64_t>((work + threads - 1) / threads, 1, kMaxGrid));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) depthwise_fprop_kernel(const ConvFpropParams p) {
  const ConvShape& g = p.g;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ wt = static_cast<const T*>(p.weight);
  const int64_t kg = g.K / g.groups, total = g.N * g.P * g.Q * g.K;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t k;
    const int64_t m = divmod(i, g.K, k);
    const Pixel px = pixel(m, g.P, g.Q);
    const T* xc = x + px.n * g.H * g.W * g.C + k / kg;
    const T* wk = wt + k * g.R * g.S;
    float acc = 0.f;
    for (int r = 0; r < g.R; ++r) {
      const int64_t h = px.y * g.stride_h - g.pad_h + r * g.dil_h;
      if (h < 0 || h >= g.H) continue;
      for (int s = 0; s < g.S; ++s) {
        const int64_t w = px.x * g.stride_w - g.pad_w + s * g.dil_w;
        if (w < 0 || w >= g.W) continue;
        acc = fmaf(to_float(xc[(h * g.W + w) * g.C]), to_float(wk[r * g.S + s]), acc);
      }
    }
    fprop_epilogue<T>(p, px, k, acc);
  }
}

// One thread per input element: the K / G output channels of its group, at every output pixel
// whose window covers it (those on the stride grid).
template <typename T>
__global__ void __launch_bounds__(kThreads) depthwise_dgrad_kernel(const ConvDgradParams p) {
  const ConvShape& g = p.g;
  const T* __restrict__ grad = static_cast<const T*>(p.grad);
  const T* __restrict__ wt = static_cast<const T*>(p.weight);
  const int64_t kg = g.K / g.groups, total = g.N * g.H * g.W * g.C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t c;
    const int64_t m = divmod(i, g.C, c);
    const Pixel px = pixel(m, g.H, g.W);
    const T* gn = grad + px.n * g.P * g.Q * g.K + c * kg;
    float acc = 0.f;
    for (int r = 0; r < g.R; ++r) {
      const int64_t ty = px.y + g.pad_h - r * g.dil_h;
      if (ty < 0 || ty % g.stride_h != 0 || ty / g.stride_h >= g.P) continue;
      for (int s = 0; s < g.S; ++s) {
        const int64_t tx = px.x + g.pad_w - s * g.dil_w;
        if (tx < 0 || tx % g.stride_w != 0 || tx / g.stride_w >= g.Q) continue;
        const T* gp = gn + (ty / g.stride_h * g.Q + tx / g.stride_w) * g.K;
        // weight (G, 1, R, S, K / G): the K / G channels of the group are contiguous
        const T* wp = wt + ((c * g.R + r) * g.S + s) * kg;
        for (int64_t k = 0; k < kg; ++k) acc = fmaf(to_float(gp[k]), to_float(wp[k]), acc);
      }
    }
    dgrad_epilogue<T>(p, px, c, acc);
  }
}

// Sums kRows partial values per column in a fixed order; row 0 of the block returns the total.
__device__ __forceinline__ float column_sum(float v, float (*red)[kCols + 1]) {
  red[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  float s = 0.f;
  if (threadIdx.y == 0)
    for (int r = 0; r < kRows; ++r) s += red[r][threadIdx.x];
  __syncthreads();
  return s;
}

// grid (K / 32, R * S, splits): partial[split][k][tap] = sum over the split's pixels of
// grad[m][k] * x at tap of m, channel k / (K / G).
template <typename T>
__global__ void __launch_bounds__(kCols* kRows)
    depthwise_wgrad_kernel(const ConvWgradParams p, const WgradSplit sp, float* partial) {
  __shared__ float red[kRows][kCols + 1];
  const ConvShape& g = p.g;
  const T* __restrict__ grad = static_cast<const T*>(p.grad);
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int64_t k = blockIdx.x * int64_t(kCols) + threadIdx.x;
  const int r = int(blockIdx.y / g.S), s = int(blockIdx.y % g.S);
  const int64_t pixels = g.N * g.P * g.Q, m1 = std::min(pixels, (blockIdx.z + 1) * sp.chunk);
  float acc = 0.f;
  if (k < g.K) {
    const int64_t c = k / (g.K / g.groups);
    for (int64_t m = blockIdx.z * sp.chunk + threadIdx.y; m < m1; m += kRows) {
      const Pixel px = pixel(m, g.P, g.Q);
      const int64_t h = px.y * g.stride_h - g.pad_h + r * g.dil_h;
      const int64_t w = px.x * g.stride_w - g.pad_w + s * g.dil_w;
      if (h < 0 || h >= g.H || w < 0 || w >= g.W) continue;
      acc = fmaf(to_float(grad[m * g.K + k]), to_float(x[((px.n * g.H + h) * g.W + w) * g.C + c]),
                 acc);
    }
  }
  const float total = column_sum(acc, red);
  if (threadIdx.y == 0 && k < g.K) partial[(blockIdx.z * g.K + k) * g.R * g.S + blockIdx.y] = total;
}

// grad_weight (K, C / G, R, S) from partial[split][k][(r * S + s) * C / G + c].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    wgrad_reduce_kernel(const ConvWgradParams p, const WgradSplit sp, const float* partial) {
  const ConvShape& g = p.g;
  const int64_t cg = g.C / g.groups, rs = g.R * g.S, row = cg * rs, total = g.K * row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t rem, tap;
    const int64_t k = divmod(i, row, rem);
    const int64_t c = divmod(rem, rs, tap);
    const float* src = partial + k * row + tap * cg + c;
    float s = 0.f;
    for (int64_t split = 0; split < sp.splits; ++split) s += src[split * total];
    static_cast<T*>(p.grad_weight)[i] = from_float<T>(s);
  }
}

// Bias gradient: chunks of kBiasChunk rows (at most kMaxBiasSplits chunks).
constexpr int64_t kBiasChunk = 2048, kMaxBiasSplits = 256;

int64_t bias_splits(const ConvBiasGradParams& p) {
  return std::clamp<int64_t>((p.rows + kBiasChunk - 1) / kBiasChunk, 1, kMaxBiasSplits);
}

template <typename T>
__global__ void __launch_bounds__(kCols* kRows)
    column_partial_kernel(const ConvBiasGradParams p, int64_t chunk, float* partial) {
  __shared__ float red[kRows][kCols + 1];
  const T* __restrict__ src = static_cast<const T*>(p.grad);
  const int64_t col = blockIdx.x * int64_t(kCols) + threadIdx.x;
  const int64_t r1 = std::min(p.rows, (blockIdx.y + 1) * chunk);
  float acc = 0.f;
  if (col < p.cols)
    for (int64_t r = blockIdx.y * chunk + threadIdx.y; r < r1; r += kRows)
      acc += to_float(src[r * p.cols + col]);
  const float total = column_sum(acc, red);
  if (threadIdx.y == 0 && col < p.cols) partial[blockIdx.y * p.cols + col] = total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    column_reduce_kernel(const ConvBiasGradParams p, int64_t splits, const float* partial) {
  for (int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; col < p.cols;
       col += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int64_t i = 0; i < splits; ++i) s += partial[i * p.cols + col];
    static_cast<T*>(p.grad_bias)[col] = from_float<T>(s);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) act_bwd_kernel(const ConvActBwdParams p) {
  const T* __restrict__ go = static_cast<const T*>(p.grad_out);
  const T* __restrict__ saved = static_cast<const T*>(p.saved);
  T* __restrict__ gp = static_cast<T*>(p.grad_pre);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < p.numel;
       i += int64_t(gridDim.x) * blockDim.x)
    gp[i] = from_float<T>(act_bwd(p.act, to_float(go[i]), to_float(saved[i])));
}

}  // namespace

namespace conv_detail {

cudaError_t depthwise_fprop(const ConvFpropParams& p, cudaStream_t stream) {
  const int64_t total = p.g.N * p.g.P * p.g.Q * p.g.K;
  detail::dispatch(p.dtype, [&](auto t) {
    depthwise_fprop_kernel<decltype(t)><<<grid_for(total, kThreads), kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

cudaError_t depthwise_dgrad(const ConvDgradParams& p, cudaStream_t stream) {
  const int64_t total = p.g.N * p.g.H * p.g.W * p.g.C;
  detail::dispatch(p.dtype, [&](auto t) {
    depthwise_dgrad_kernel<decltype(t)><<<grid_for(total, kThreads), kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

cudaError_t depthwise_wgrad(const ConvWgradParams& p, const WgradSplit& sp, float* partial,
                            cudaStream_t stream) {
  if (p.g.R * p.g.S > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(unsigned((p.g.K + kCols - 1) / kCols), unsigned(p.g.R * p.g.S),
                  unsigned(sp.splits));
  detail::dispatch(p.dtype, [&](auto t) {
    depthwise_wgrad_kernel<decltype(t)><<<grid, dim3(kCols, kRows), 0, stream>>>(p, sp, partial);
  });
  return cudaGetLastError();
}

cudaError_t wgrad_reduce(const ConvWgradParams& p, const WgradSplit& sp, const float* partial,
                         cudaStream_t stream) {
  const int64_t total = p.g.K * (p.g.C / p.g.groups) * p.g.R * p.g.S;
  detail::dispatch(p.dtype, [&](auto t) {
    wgrad_reduce_kernel<decltype(t)>
        <<<grid_for(total, kThreads), kThreads, 0, stream>>>(p, sp, partial);
  });
  return cudaGetLastError();
}

}  // namespace conv_detail

size_t conv_bias_grad_workspace_bytes(const ConvBiasGradParams& p) {
  return p.rows == 0 ? 0 : size_t(bias_splits(p) * p.cols) * sizeof(float);
}

cudaError_t conv_bias_grad(const ConvBiasGradParams& p, cudaStream_t stream) {
  if (p.cols == 0) return cudaSuccess;
  if (p.rows == 0) {
    const size_t elem = p.dtype == DType::kFloat32 ? 4 : 2;
    return cudaMemsetAsync(p.grad_bias, 0, size_t(p.cols) * elem, stream);
  }
  const int64_t splits = bias_splits(p), chunk = (p.rows + splits - 1) / splits;
  float* partial = static_cast<float*>(p.workspace);
  const dim3 grid(unsigned((p.cols + kCols - 1) / kCols), unsigned(splits));
  detail::dispatch(p.dtype, [&](auto t) {
    using T = decltype(t);
    column_partial_kernel<T><<<grid, dim3(kCols, kRows), 0, stream>>>(p, chunk, partial);
    column_reduce_kernel<T>
        <<<grid_for(p.cols, kThreads), kThreads, 0, stream>>>(p, splits, partial);
  });
  return cudaGetLastError();
}

cudaError_t conv_act_bwd(const ConvActBwdParams& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  detail::dispatch(p.dtype, [&](auto t) {
    act_bwd_kernel<decltype(t)><<<grid_for(p.numel, kThreads), kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

}  // namespace fastdl::cuda
