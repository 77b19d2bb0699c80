// CUDA kernels of the graph family (declarations and contracts in graph.cuh).
//
// One warp per CSR row and tile of kTileF features: lane l owns features f0 + l + 32 k, so every
// gathered row is read in coalesced 128-byte segments while the row's entries are walked in order
// (the "row-split" SpMM of Yang, Buluc & Owens, "Design principles for sparse matrix
// multiplication on the GPU", 2018). Accumulation is fp32 in registers; each output element has
// exactly one writer, so results are deterministic without atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "graph.cuh"

namespace fastdl::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kPer = 4;  // features per lane per tile
constexpr int kTileF = kWarp * kPer;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float to_f(float v) {
  return v;
}
__device__ __forceinline__ float to_f(__half v) {
  return __half2float(v);
}
__device__ __forceinline__ float to_f(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// The warp's work item (blockIdx.x * kWarpsPerBlock + warp) and lane.
__device__ __forceinline__ int64_t warp_item() {
  return static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
}
__device__ __forceinline__ int lane_id() {
  return static_cast<int>(threadIdx.x % kWarp);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) spmm_sum_kernel(GraphSpmmParams p) {
  const int64_t row = warp_item();
  if (row >= p.g.rows) return;
  const int lane = lane_id();
  const int64_t f0 = static_cast<int64_t>(blockIdx.y) * kTileF + lane;
  const T* x = static_cast<const T*>(p.x);
  float acc[kPer] = {};
  const int64_t e1 = p.g.rowptr[row + 1];
  for (int64_t e = p.g.rowptr[row]; e < e1; ++e) {
    const int64_t j = p.g.col[e];
    float c = p.w != nullptr ? p.w[p.g.perm != nullptr ? p.g.perm[e] : e] : 1.f;
    if (p.cs != nullptr) c *= p.cs[j];
    const T* xr = x + j * p.F;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int64_t f = f0 + k * kWarp;
      if (f < p.F) acc[k] = fmaf(c, to_f(xr[f]), acc[k]);
    }
  }
  const float scale = p.rs != nullptr ? p.rs[row] : 1.f;
  const float d = p.ds != nullptr ? p.ds[row] : 0.f;
  const T* xd = static_cast<const T*>(p.xd) + row * p.F;
  T* out = static_cast<T*>(p.out) + row * p.F;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int64_t f = f0 + k * kWarp;
    if (f >= p.F) continue;
    float v = acc[k] * scale;
    if (p.ds != nullptr) v = fmaf(d, to_f(xd[f]), v);
    out[f] = from_f<T>(v);
  }
}

// max/min: NaN wins, ties keep the first entry (as the CPU kernel).
template <typename T, bool kMin>
__global__ void __launch_bounds__(kThreads) spmm_max_kernel(GraphSpmmParams p) {
  const int64_t row = warp_item();
  if (row >= p.g.rows) return;
  const int64_t f0 = static_cast<int64_t>(blockIdx.y) * kTileF + lane_id();
  const T* x = static_cast<const T*>(p.x);
  float best[kPer];
  int64_t arg[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) best[k] = 0.f, arg[k] = -1;
  const int64_t e0 = p.g.rowptr[row], e1 = p.g.rowptr[row + 1];
  for (int64_t e = e0; e < e1; ++e) {
    const float c = p.w != nullptr ? p.w[e] : 1.f;
    const T* xr = x + p.g.col[e] * p.F;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int64_t f = f0 + k * kWarp;
      if (f >= p.F) continue;
      const float v = c * to_f(xr[f]);
      const bool better = kMin ? v < best[k] : v > best[k];
      if (e == e0 || better || (v != v && best[k] == best[k])) best[k] = v, arg[k] = e;
    }
  }
  T* out = static_cast<T*>(p.out) + row * p.F;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int64_t f = f0 + k * kWarp;
    if (f >= p.F) continue;
    out[f] = from_f<T>(best[k]);
    p.arg_out[row * p.F + f] = arg[k];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) spmm_max_bwd_kernel(GraphSpmmParams p) {
  const int64_t row = warp_item();
  if (row >= p.g.rows) return;
  const int64_t f0 = static_cast<int64_t>(blockIdx.y) * kTileF + lane_id();
  const T* x = static_cast<const T*>(p.x);
  float acc[kPer] = {};
  const int64_t t1 = p.g.rowptr[row + 1];
  for (int64_t t = p.g.rowptr[row]; t < t1; ++t) {
    const int64_t i = p.g.col[t], q = p.g.perm[t];
    const float c = p.w != nullptr ? p.w[q] : 1.f;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int64_t f = f0 + k * kWarp;
      if (f < p.F && p.arg[i * p.F + f] == q) acc[k] = fmaf(c, to_f(x[i * p.F + f]), acc[k]);
    }
  }
  T* out = static_cast<T*>(p.out) + row * p.F;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int64_t f = f0 + k * kWarp;
    if (f < p.F) out[f] = from_f<T>(acc[k]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) edge_dot_kernel(GraphEdgeDotParams p) {
  const int64_t row = warp_item();
  if (row >= p.g.rows) return;
  const int lane = lane_id();
  const T* a = static_cast<const T*>(p.a) + row * p.F;
  const T* b = static_cast<const T*>(p.b);
  const float scale = p.rs != nullptr ? p.rs[row] : 1.f;
  const int64_t e1 = p.g.rowptr[row + 1];
  for (int64_t e = p.g.rowptr[row]; e < e1; ++e) {
    const T* br = b + p.g.col[e] * p.F;
    float s = 0.f;
    for (int64_t f = lane; f < p.F; f += kWarp)
      if (p.arg == nullptr || p.arg[row * p.F + f] == e) s = fmaf(to_f(a[f]), to_f(br[f]), s);
    s = warp_sum(s);
    if (lane == 0) p.dots[e] = s * scale;
  }
}

// ---------------------------------------------------------------- graph attention

__device__ __forceinline__ float leaky(float z, float slope) {
  return z > 0.f ? z : z * slope;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gat_scores_kernel(GraphGatParams p) {
  const int64_t item = warp_item();  // node * H + head
  if (item >= p.N * p.H) return;
  const int lane = lane_id();
  const int64_t k = item % p.H;
  const T* h = static_cast<const T*>(p.h) + item * p.F;
  float s = 0.f, d = 0.f;
  for (int64_t f = lane; f < p.F; f += kWarp) {
    const float v = to_f(h[f]);
    s = fmaf(v, p.att_src[k * p.F + f], s);
    d = fmaf(v, p.att_dst[k * p.F + f], d);
  }
  s = warp_sum(s);
  d = warp_sum(d);
  if (lane == 0) p.a_src[item] = s, p.a_dst[item] = d;
}

// One warp per (row, head, feature tile): the row's softmax statistics (online, Milakov &
// Gimelshein 2018, lanes strided over the entries), then alpha and the weighted gather.
template <typename T>
__global__ void __launch_bounds__(kThreads) gat_fwd_kernel(GraphGatParams p) {
  const int64_t item = warp_item();
  if (item >= p.g.rows * p.H) return;
  const int lane = lane_id();
  const int64_t row = item / p.H, k = item % p.H;
  const int64_t e0 = p.g.rowptr[row], e1 = p.g.rowptr[row + 1];
  const float ad = p.a_dst[item];
  float m = -INFINITY, s = 0.f;
  for (int64_t e = e0 + lane; e < e1; e += kWarp) {
    const float z = leaky(p.a_src[p.g.col[e] * p.H + k] + ad, p.slope);
    const float mn = fmaxf(m, z);
    s = s * __expf(m - mn) + __expf(z - mn);
    m = mn;
  }
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const float mo = __shfl_xor_sync(kFull, m, o), so = __shfl_xor_sync(kFull, s, o);
    const float mn = fmaxf(m, mo);
    s = (m == -INFINITY ? 0.f : s * __expf(m - mn)) +
        (mo == -INFINITY ? 0.f : so * __expf(mo - mn));
    m = mn;
  }
  const float inv = 1.f / s;
  const int64_t f0 = static_cast<int64_t>(blockIdx.y) * kTileF + lane;
  const T* h = static_cast<const T*>(p.h);
  float acc[kPer] = {};
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t j = p.g.col[e];
    const float al = __expf(leaky(p.a_src[j * p.H + k] + ad, p.slope) - m) * inv;
    if (lane == 0 && blockIdx.y == 0) p.alpha[e * p.H + k] = al;
    const float c = p.drop != nullptr ? al * p.drop[e * p.H + k] : al;
    const T* hr = h + (j * p.H + k) * p.F;
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int64_t f = f0 + q * kWarp;
      if (f < p.F) acc[q] = fmaf(c, to_f(hr[f]), acc[q]);
    }
  }
  T* out = static_cast<T*>(p.out) + item * p.F;
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int64_t f = f0 + q * kWarp;
    if (f < p.F) out[f] = from_f<T>(acc[q]);
  }
}

// Backward rows pass, one warp per (row, head): dalpha_e = drop_e <g_i, h_j>, then
// dz_e = alpha_e (dalpha_e - sum alpha dalpha) LeakyReLU'(z_e) and g_dst[i] = sum_e dz_e.
template <typename T>
__global__ void __launch_bounds__(kThreads) gat_bwd_rows_kernel(GraphGatParams p) {
  const int64_t item = warp_item();
  if (item >= p.g.rows * p.H) return;
  const int lane = lane_id();
  const int64_t row = item / p.H, k = item % p.H;
  const int64_t e0 = p.g.rowptr[row], e1 = p.g.rowptr[row + 1];
  const T* g = static_cast<const T*>(p.grad) + item * p.F;
  const T* h = static_cast<const T*>(p.h);
  float t = 0.f;
  for (int64_t e = e0; e < e1; ++e) {
    const T* hr = h + (p.g.col[e] * p.H + k) * p.F;
    float da = 0.f;
    for (int64_t f = lane; f < p.F; f += kWarp) da = fmaf(to_f(g[f]), to_f(hr[f]), da);
    da = warp_sum(da);
    if (p.drop != nullptr) da *= p.drop[e * p.H + k];
    if (lane == 0) p.dz[e * p.H + k] = da;
    t = fmaf(p.alpha[e * p.H + k], da, t);
  }
  __syncwarp();
  const float ad = p.a_dst[item];
  float gd = 0.f;
  for (int64_t e = e0 + lane; e < e1; e += kWarp) {
    const float z = p.a_src[p.g.col[e] * p.H + k] + ad;
    const float v = p.alpha[e * p.H + k] * (p.dz[e * p.H + k] - t) * (z > 0.f ? 1.f : p.slope);
    p.dz[e * p.H + k] = v;
    gd += v;
  }
  gd = warp_sum(gd);
  if (lane == 0) p.g_dst[item] = gd;
}

// Backward nodes pass over the transpose (col = destination, perm = CSR entry), one warp per
// (node, head, feature tile): g_src[j] = sum dz, grad_h[j] = sum beta g_i + g_src att_src +
// g_dst att_dst.
template <typename T>
__global__ void __launch_bounds__(kThreads) gat_bwd_nodes_kernel(GraphGatParams p) {
  const int64_t item = warp_item();
  if (item >= p.g.rows * p.H) return;
  const int lane = lane_id();
  const int64_t row = item / p.H, k = item % p.H;
  const int64_t t0 = p.g.rowptr[row], t1 = p.g.rowptr[row + 1];
  float gs = 0.f;
  for (int64_t t = t0 + lane; t < t1; t += kWarp) gs += p.dz[p.g.perm[t] * p.H + k];
  gs = warp_sum(gs);
  if (lane == 0 && blockIdx.y == 0) p.g_src[item] = gs;
  const int64_t f0 = static_cast<int64_t>(blockIdx.y) * kTileF + lane;
  const T* g = static_cast<const T*>(p.grad);
  float acc[kPer] = {};
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t q = p.g.perm[t] * p.H + k;
    const float beta = p.drop != nullptr ? p.alpha[q] * p.drop[q] : p.alpha[q];
    const T* gr = g + (p.g.col[t] * p.H + k) * p.F;
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      const int64_t f = f0 + c * kWarp;
      if (f < p.F) acc[c] = fmaf(beta, to_f(gr[f]), acc[c]);
    }
  }
  const float gd = p.g_dst[item];
  T* out = static_cast<T*>(p.out) + item * p.F;
#pragma unroll
  for (int c = 0; c < kPer; ++c) {
    const int64_t f = f0 + c * kWarp;
    if (f >= p.F) continue;
    const float v = fmaf(gs, p.att_src[k * p.F + f], fmaf(gd, p.att_dst[k * p.F + f], acc[c]));
    out[f] = from_f<T>(v);
  }
}

dim3 grid(int64_t items, int64_t F, bool tiled) {
  const int64_t tiles = tiled ? (F + kTileF - 1) / kTileF : 1;
  return dim3(static_cast<unsigned>((items + kWarpsPerBlock - 1) / kWarpsPerBlock),
              static_cast<unsigned>(tiles > 0 ? tiles : 1));
}

// Calls f(T{}) with T the element type of dtype.
template <typename F>
void dispatch(GraphDType dtype, F&& f) {
  switch (dtype) {
    case GraphDType::kFloat16:
      return f(__half{});
    case GraphDType::kBFloat16:
      return f(__nv_bfloat16{});
    default:
      return f(0.f);
  }
}

}  // namespace

cudaError_t graph_spmm_sum(const GraphSpmmParams& p, cudaStream_t stream) {
  if (p.g.rows == 0 || p.F == 0) return cudaSuccess;
  dispatch(p.dtype, [&](auto t) {
    spmm_sum_kernel<decltype(t)><<<grid(p.g.rows, p.F, true), kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

cudaError_t graph_spmm_max(const GraphSpmmParams& p, bool is_min, cudaStream_t stream) {
  if (p.g.rows == 0 || p.F == 0) return cudaSuccess;
  dispatch(p.dtype, [&](auto t) {
    using T = decltype(t);
    if (is_min)
      spmm_max_kernel<T, true><<<grid(p.g.rows, p.F, true), kThreads, 0, stream>>>(p);
    else
      spmm_max_kernel<T, false><<<grid(p.g.rows, p.F, true), kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

cudaError_t graph_spmm_max_bwd(const GraphSpmmParams& p, cudaStream_t stream) {
  if (p.g.rows == 0 || p.F == 0) return cudaSuccess;
  dispatch(p.dtype, [&](auto t) {
    spmm_max_bwd_kernel<decltype(t)><<<grid(p.g.rows, p.F, true), kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

cudaError_t graph_edge_dot(const GraphEdgeDotParams& p, cudaStream_t stream) {
  if (p.g.rows == 0) return cudaSuccess;
  dispatch(p.dtype, [&](auto t) {
    edge_dot_kernel<decltype(t)><<<grid(p.g.rows, p.F, false), kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

cudaError_t graph_gat_fwd(const GraphGatParams& p, cudaStream_t stream) {
  if (p.N == 0 || p.H == 0 || p.F == 0) return cudaSuccess;
  dispatch(p.dtype, [&](auto t) {
    using T = decltype(t);
    gat_scores_kernel<T><<<grid(p.N * p.H, p.F, false), kThreads, 0, stream>>>(p);
    gat_fwd_kernel<T><<<grid(p.g.rows * p.H, p.F, true), kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

cudaError_t graph_gat_bwd(const GraphGatParams& p, const GraphCsr& transpose, cudaStream_t stream) {
  if (p.N == 0 || p.H == 0 || p.F == 0) return cudaSuccess;
  GraphGatParams nodes = p;
  nodes.g = transpose;
  dispatch(p.dtype, [&](auto t) {
    using T = decltype(t);
    gat_bwd_rows_kernel<T><<<grid(p.g.rows * p.H, p.F, false), kThreads, 0, stream>>>(p);
    gat_bwd_nodes_kernel<T><<<grid(nodes.g.rows * p.H, p.F, true), kThreads, 0, stream>>>(nodes);
  });
  return cudaGetLastError();
}

}  // namespace fastdl::cuda
