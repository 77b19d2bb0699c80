// BatchNorm kernels (Ioffe & Szegedy 2015); contract in norm.cuh.
//
// Per-channel reductions (forward statistics, backward sums) run in two stages so that the
// result does not depend on scheduling: a fixed grid of (channel, split) blocks writes partials,
// then one thread per channel merges its splits in order. Statistics are Welford/Chan merges of
// exact local moments (stable when |mean| >> std). Layouts: NCHW, where a channel is a set of
// contiguous hw-planes that warps take in chunks, and channels_last, where a thread owns
// kClChannels adjacent channels and walks rows. The elementwise passes read per-channel
// coefficients prepared by the finalize kernels:
//   forward   y  = (x - mean) * scale + bias, scale = weight * invstd, then ReLU;
//   backward  dx = scale * g + B * (x - mean) + C, g = dy masked where y <= 0 under ReLU,
//             training B = -scale * invstd * sum(g * xhat) / M, C = -scale * sum(g) / M,
//             eval B = C = 0 (M: values per channel).
#include "norm_common.cuh"

namespace fastdl::cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256, kWarps = kThreads / kWarp;
constexpr int kItems = 4;     // vectors per lane in an NCHW chunk
constexpr int kRowBatch = 4;  // rows a channels_last thread loads before using them
// Channels per channels_last thread: 4 whatever the dtype (8-byte loads for 16-bit types), so
// that per-channel constants and states fit in registers.
constexpr int kClChannels = 4;
constexpr int kCoefs = 5;  // per channel: mean, scale, bias, B, C (see above)

struct BnShape {
  int64_t n, c, hw;
  bool aligned;  // every vector access to x (and dy, out) is aligned
};

// The pre-activation output. The forward and the backward's ReLU mask both call it on the same
// floats, so the mask matches the forward bit for bit.
__device__ __forceinline__ float bn_affine(float d, float scale, float bias) {
  return __fmaf_rn(d, scale, bias);
}

__device__ __forceinline__ float bn_scale(const float* weight, int64_t c, float invstd) {
  return (weight != nullptr ? weight[c] : 1.f) * invstd;
}

// Reducers for the two-stage reductions: per-channel constants (hoisted out of the loops), a
// State per channel, add() of k values of one channel, and an order-fixed combine().
struct MomentsOp {  // forward statistics
  using State = Moments;
  struct Channel {};
  static constexpr bool kGrad = false;
  __device__ Channel channel(int64_t) const { return {}; }
  template <int K>
  __device__ void add(State& s, const Channel&, const float (&x)[K], const float (&)[K],
                      int k) const {
    s = merge(s, moments(x, k));
  }
  __device__ static State combine(const State& a, const State& b) { return merge(a, b); }
  __device__ static State shfl_down(const State& s, int o) {
    return {__shfl_down_sync(0xffffffffu, s.n, o), __shfl_down_sync(0xffffffffu, s.mean, o),
            __shfl_down_sync(0xffffffffu, s.m2, o)};
  }
};

struct GradSums {
  float g, gx;
};

struct GradOp {  // backward: sum(g) and sum(g * xhat), g = dy masked by the ReLU
  using State = GradSums;
  struct Channel {
    float mean, invstd, scale, bias;
  };
  static constexpr bool kGrad = true;
  const float* mean;
  const float* invstd;
  const float* weight;
  const float* bias;
  bool relu;
  __device__ Channel channel(int64_t c) const {
    const float is = invstd[c];
    return {mean[c], is, bn_scale(weight, c, is), bias != nullptr ? bias[c] : 0.f};
  }
  template <int K>
  __device__ void add(State& s, const Channel& ch, const float (&x)[K], const float (&dy)[K],
                      int k) const {
#pragma unroll
    for (int j = 0; j < K; ++j) {
      if (j >= k) break;
      const float d = x[j] - ch.mean;
      const float g = relu && !(bn_affine(d, ch.scale, ch.bias) > 0.f) ? 0.f : dy[j];
      s.g += g;
      s.gx = fmaf(g, d * ch.invstd, s.gx);
    }
  }
  __device__ static State combine(const State& a, const State& b) {
    return {a.g + b.g, a.gx + b.gx};
  }
  __device__ static State shfl_down(const State& s, int o) {
    return {__shfl_down_sync(0xffffffffu, s.g, o), __shfl_down_sync(0xffffffffu, s.gx, o)};
  }
};

// Stage 1, NCHW: block (c, split) reduces tasks [t0, t1) of channel c, a task being a chunk of
// kWarp * kItems vectors of one hw-plane; warps take tasks round-robin. part[split * C + c].
template <typename T, class Op>
__global__ void __launch_bounds__(kThreads)
    bn_reduce_nchw_kernel(const BnShape sh, const T* __restrict__ x, const T* __restrict__ dy,
                          const Op op, typename Op::State* __restrict__ part, int64_t chunks) {
  using State = typename Op::State;
  constexpr int N = Vec<T>::N, kChunk = kWarp * kItems * N;
  __shared__ State warp_state[kWarps];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t c = blockIdx.x, tasks = sh.n * chunks;
  const int64_t t0 = tasks * blockIdx.y / gridDim.y, t1 = tasks * (blockIdx.y + 1) / gridDim.y;
  const auto ch = op.channel(c);
  State st{};
  for (int64_t t = t0 + warp; t < t1; t += kWarps) {
    const int64_t n = t / chunks, e0 = (t - n * chunks) * kChunk;
    const int64_t off = (n * sh.c + c) * sh.hw + e0;
    const int len = int(std::min<int64_t>(sh.hw - e0, kChunk));
    Vec<T> xv[kItems], gv[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int col = (i * kWarp + lane) * N;
      xv[i] = load_vec(x + off, col, len, sh.aligned);
      if constexpr (Op::kGrad) gv[i] = load_vec(dy + off, col, len, sh.aligned);
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      float xf[N], gf[N] = {};
      unpack(xv[i], xf);
      if constexpr (Op::kGrad) unpack(gv[i], gf);
      op.add(st, ch, xf, gf, std::clamp(len - (i * kWarp + lane) * N, 0, N));
    }
  }
  for (int o = kWarp / 2; o > 0; o /= 2) st = Op::combine(st, Op::shfl_down(st, o));
  if (lane == 0) warp_state[warp] = st;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kWarps; ++w) st = Op::combine(st, warp_state[w]);
  part[blockIdx.y * sh.c + c] = st;
}

// Channels of thread x in a channels_last kernel: [c0, c0 + clen).
struct ChannelSpan {
  int64_t c0;
  int clen;
};

template <int N>
__device__ __forceinline__ ChannelSpan channel_span(int64_t channels) {
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * N;
  return {c0, int(std::clamp<int64_t>(channels - c0, 0, N))};
}

// Stage 1, channels_last: x is (rows, C). Block (blockDim.x channel vectors, blockDim.y row
// lanes) reduces rows [r0, r1) of its channels; the row lanes are merged by a fixed tree.
template <typename T, class Op>
__global__ void __launch_bounds__(kThreads)
    bn_reduce_cl_kernel(const BnShape sh, const T* __restrict__ x, const T* __restrict__ dy,
                        const Op op, typename Op::State* __restrict__ part) {
  using State = typename Op::State;
  constexpr int N = kClChannels;
  __shared__ State stage[kThreads / 2][N];
  const auto [c0, clen] = channel_span<N>(sh.c);
  const int64_t rows = sh.n * sh.hw;
  const int64_t r0 = rows * blockIdx.y / gridDim.y, r1 = rows * (blockIdx.y + 1) / gridDim.y;
  typename Op::Channel ch[N];
#pragma unroll
  for (int j = 0; j < N; ++j) ch[j] = j < clen ? op.channel(c0 + j) : typename Op::Channel{};
  State st[N] = {};
  for (int64_t r = r0 + threadIdx.y; r < r1; r += int64_t(blockDim.y) * kRowBatch) {
    Vec<T, N> xv[kRowBatch], gv[kRowBatch];
    int kr = 0;  // rows of the batch in range: a prefix
#pragma unroll
    for (int q = 0; q < kRowBatch; ++q) {
      const int64_t row = r + int64_t(q) * blockDim.y;
      const int len = row < r1 ? clen : 0;
      kr += row < r1;
      const int64_t off = len ? row * sh.c + c0 : 0;
      xv[q] = load_vec<T, N>(x + off, 0, len, sh.aligned);
      if constexpr (Op::kGrad) gv[q] = load_vec<T, N>(dy + off, 0, len, sh.aligned);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (j >= clen) break;
      float xc[kRowBatch], gc[kRowBatch] = {};
#pragma unroll
      for (int q = 0; q < kRowBatch; ++q) {
        xc[q] = to_float(xv[q].v[j]);
        if constexpr (Op::kGrad) gc[q] = to_float(gv[q].v[j]);
      }
      op.add(st[j], ch[j], xc, gc, kr);
    }
  }
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int half = blockDim.y / 2; half > 0; half /= 2) {
    __syncthreads();
    if (threadIdx.y >= half && threadIdx.y < 2 * half) {
#pragma unroll
      for (int j = 0; j < N; ++j) stage[tid - half * blockDim.x][j] = st[j];
    }
    __syncthreads();
    if (threadIdx.y < half) {
#pragma unroll
      for (int j = 0; j < N; ++j) st[j] = Op::combine(st[j], stage[tid][j]);
    }
  }
  if (threadIdx.y != 0) return;
#pragma unroll
  for (int j = 0; j < N; ++j)
    if (j < clen) part[blockIdx.y * sh.c + c0 + j] = st[j];
}

// Stage 2 of the forward: statistics (merged splits, or the running ones) and coefficients.
__global__ void __launch_bounds__(kThreads)
    bn_finalize_fwd_kernel(const BatchNormFwdParams p, const Moments* __restrict__ part, int splits,
                           float* __restrict__ coef) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.c) return;
  float mean, invstd;
  if (p.training) {
    Moments m{};
    for (int s = 0; s < splits; ++s) m = merge(m, part[s * p.c + c]);
    mean = m.mean;
    invstd = 1.f / sqrtf(m.m2 / m.n + p.eps);
  } else {
    mean = p.running_mean[c];
    invstd = 1.f / sqrtf(p.running_var[c] + p.eps);
  }
  p.save_mean[c] = mean;
  p.save_invstd[c] = invstd;
  coef[c] = mean;
  coef[p.c + c] = bn_scale(p.weight, c, invstd);
  coef[2 * p.c + c] = p.bias != nullptr ? p.bias[c] : 0.f;
}

// Stage 2 of the backward: grad_weight, grad_bias and the dx coefficients.
__global__ void __launch_bounds__(kThreads)
    bn_finalize_bwd_kernel(const BatchNormBwdParams p, const GradSums* __restrict__ part,
                           int splits, float* __restrict__ coef) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.c) return;
  GradSums s{};
  for (int k = 0; k < splits; ++k) s = GradOp::combine(s, part[k * p.c + c]);
  if (p.grad_weight != nullptr) p.grad_weight[c] = s.gx;
  if (p.grad_bias != nullptr) p.grad_bias[c] = s.g;
  const float mean = p.save_mean[c], is = p.save_invstd[c], scale = bn_scale(p.weight, c, is);
  const float inv_m = 1.f / float(p.n * p.hw);
  const float k[kCoefs] = {mean, scale, p.bias != nullptr ? p.bias[c] : 0.f,
                           p.training ? -scale * is * s.gx * inv_m : 0.f,
                           p.training ? -scale * s.g * inv_m : 0.f};
#pragma unroll
  for (int i = 0; i < kCoefs; ++i) coef[i * p.c + c] = k[i];
}

template <bool BWD>
__device__ __forceinline__ float bn_apply(float x, float dy, const float* k, bool relu) {
  const float d = x - k[0], y = bn_affine(d, k[1], k[2]);
  if constexpr (!BWD) return relu && y <= 0.f ? 0.f : y;
  const float g = relu && !(y > 0.f) ? 0.f : dy;
  return fmaf(k[1], g, fmaf(k[3], d, k[4]));
}

// Elementwise pass, NCHW: warps take (plane, chunk) tasks; out = forward y or backward dx.
template <typename T, bool BWD>
__global__ void __launch_bounds__(kThreads)
    bn_apply_nchw_kernel(const BnShape sh, const T* __restrict__ x, const T* __restrict__ dy,
                         T* __restrict__ out, const float* __restrict__ coef, bool relu,
                         int64_t chunks) {
  constexpr int N = Vec<T>::N, kChunk = kWarp * kItems * N, kK = BWD ? kCoefs : 3;
  const int lane = threadIdx.x % kWarp;
  const int64_t tasks = sh.n * sh.c * chunks;
  for (int64_t t = int64_t(blockIdx.x) * kWarps + threadIdx.x / kWarp; t < tasks;
       t += int64_t(gridDim.x) * kWarps) {
    const int64_t plane = t / chunks, e0 = (t - plane * chunks) * kChunk, c = plane % sh.c;
    const int64_t off = plane * sh.hw + e0;
    const int len = int(std::min<int64_t>(sh.hw - e0, kChunk));
    float k[kK];
#pragma unroll
    for (int i = 0; i < kK; ++i) k[i] = coef[i * sh.c + c];
    Vec<T> xv[kItems], gv[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int col = (i * kWarp + lane) * N;
      xv[i] = load_vec(x + off, col, len, sh.aligned);
      if constexpr (BWD) gv[i] = load_vec(dy + off, col, len, sh.aligned);
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int col = (i * kWarp + lane) * N;
      if (col >= len) break;
      float xf[N], gf[N] = {};
      unpack(xv[i], xf);
      if constexpr (BWD) unpack(gv[i], gf);
      Vec<T> o;
#pragma unroll
      for (int j = 0; j < N; ++j) o.v[j] = from_float<T>(bn_apply<BWD>(xf[j], gf[j], k, relu));
      store_vec(out + off, col, len, sh.aligned, o);
    }
  }
}

// Elementwise pass, channels_last: a thread keeps its channels' coefficients and walks rows.
template <typename T, bool BWD>
__global__ void __launch_bounds__(kThreads)
    bn_apply_cl_kernel(const BnShape sh, const T* __restrict__ x, const T* __restrict__ dy,
                       T* __restrict__ out, const float* __restrict__ coef, bool relu) {
  constexpr int N = kClChannels, kK = BWD ? kCoefs : 3;
  const auto [c0, clen] = channel_span<N>(sh.c);
  if (clen == 0) return;
  float k[N][kK];
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int i = 0; i < kK; ++i) k[j][i] = j < clen ? coef[i * sh.c + c0 + j] : 0.f;
  const int64_t rows = sh.n * sh.hw, stride = int64_t(gridDim.y) * blockDim.y;
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
       r += stride * kRowBatch) {
    Vec<T, N> xv[kRowBatch], gv[kRowBatch];
#pragma unroll
    for (int q = 0; q < kRowBatch; ++q) {
      const int64_t row = r + q * stride;
      const int64_t off = row < rows ? row * sh.c + c0 : 0;
      xv[q] = load_vec<T, N>(x + off, 0, row < rows ? clen : 0, sh.aligned);
      if constexpr (BWD) gv[q] = load_vec<T, N>(dy + off, 0, row < rows ? clen : 0, sh.aligned);
    }
#pragma unroll
    for (int q = 0; q < kRowBatch; ++q) {
      const int64_t row = r + q * stride;
      if (row >= rows) break;
      float xf[N], gf[N] = {};
      unpack(xv[q], xf);
      if constexpr (BWD) unpack(gv[q], gf);
      Vec<T, N> o;
#pragma unroll
      for (int j = 0; j < N; ++j) o.v[j] = from_float<T>(bn_apply<BWD>(xf[j], gf[j], k[j], relu));
      store_vec(out + row * sh.c + c0, 0, clen, sh.aligned, o);
    }
  }
}

// Launch geometry of one BatchNorm call, shared by the workspace size and the launches.
struct BnPlan {
  BnShape sh;
  bool cl;
  int64_t chunks;    // NCHW: chunks per hw-plane
  dim3 block, grid;  // of the stage-1 reduction
  int splits;
  size_t coef_bytes;  // the partials follow the coefficients
};

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

template <typename T>
BnPlan bn_plan(int64_t n, int64_t c, int64_t hw, bool cl, std::initializer_list<const void*> ptrs) {
  constexpr int N = Vec<T>::N;
  BnPlan b{};
  b.sh = {n, c, hw, (cl ? c % kClChannels : hw % N) == 0 && all_aligned(ptrs)};
  b.cl = cl;
  b.chunks = ceil_div(hw, kWarp * kItems * N);
  b.coef_bytes = size_t(kCoefs) * size_t(c) * sizeof(float);
  const int64_t target = 4 * int64_t(sm_count());
  if (cl) {
    int tx = 1;
    while (tx < kWarp && tx * kClChannels < c) tx *= 2;
    b.block = dim3(tx, kThreads / tx);
    const int64_t gx = ceil_div(c, int64_t(tx) * kClChannels);
    const int64_t s = std::min(ceil_div(target, gx), ceil_div(n * hw, b.block.y * kRowBatch));
    b.splits = int(std::clamp<int64_t>(s, 1, 65535));
    b.grid = dim3(unsigned(gx), unsigned(b.splits));
  } else {
    const int64_t s = std::min(ceil_div(target, c), ceil_div(n * b.chunks, kWarps));
    b.splits = int(std::clamp<int64_t>(s, 1, 65535));
    b.block = dim3(kThreads);
    b.grid = dim3(unsigned(c), unsigned(b.splits));
  }
  return b;
}

template <typename T, class Op>
void launch_reduce(const BnPlan& b, const T* x, const T* dy, const Op& op, typename Op::State* part,
                   cudaStream_t stream) {
  if (b.cl)
    bn_reduce_cl_kernel<T, Op><<<b.grid, b.block, 0, stream>>>(b.sh, x, dy, op, part);
  else
    bn_reduce_nchw_kernel<T, Op><<<b.grid, b.block, 0, stream>>>(b.sh, x, dy, op, part, b.chunks);
}

template <typename T, bool BWD>
void launch_apply(const BnPlan& b, const T* x, const T* dy, T* out, const float* coef, bool relu,
                  cudaStream_t stream) {
  if (b.cl) {
    const int64_t gy = ceil_div(b.sh.n * b.sh.hw, b.block.y * kRowBatch);
    const dim3 grid(b.grid.x, unsigned(std::min<int64_t>(gy, 65535)));
    bn_apply_cl_kernel<T, BWD><<<grid, b.block, 0, stream>>>(b.sh, x, dy, out, coef, relu);
  } else {
    const int64_t blocks = ceil_div(b.sh.n * b.sh.c * b.chunks, kWarps);
    bn_apply_nchw_kernel<T, BWD><<<unsigned(std::min(blocks, kMaxGrid)), kThreads, 0, stream>>>(
        b.sh, x, dy, out, coef, relu, b.chunks);
  }
}

template <typename T>
BnPlan fwd_plan(const BatchNormFwdParams& p) {
  return bn_plan<T>(p.n, p.c, p.hw, p.channels_last, {p.x, p.out});
}

template <typename T>
BnPlan bwd_plan(const BatchNormBwdParams& p) {
  return bn_plan<T>(p.n, p.c, p.hw, p.channels_last, {p.x, p.grad_out, p.grad_input});
}

template <typename T>
void bn_fwd(const BatchNormFwdParams& p, cudaStream_t stream) {
  const BnPlan b = fwd_plan<T>(p);
  auto* coef = static_cast<float*>(p.workspace);
  auto* part = reinterpret_cast<Moments*>(static_cast<char*>(p.workspace) + b.coef_bytes);
  const T* x = static_cast<const T*>(p.x);
  if (p.training) launch_reduce<T>(b, x, nullptr, MomentsOp{}, part, stream);
  bn_finalize_fwd_kernel<<<unsigned(ceil_div(p.c, kThreads)), kThreads, 0, stream>>>(
      p, part, p.training ? b.splits : 0, coef);
  launch_apply<T, false>(b, x, nullptr, static_cast<T*>(p.out), coef, p.relu, stream);
}

template <typename T>
void bn_bwd(const BatchNormBwdParams& p, cudaStream_t stream) {
  const BnPlan b = bwd_plan<T>(p);
  auto* coef = static_cast<float*>(p.workspace);
  auto* part = reinterpret_cast<GradSums*>(static_cast<char*>(p.workspace) + b.coef_bytes);
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.grad_out);
  const bool reduce =
      p.grad_weight != nullptr || p.grad_bias != nullptr || (p.training && p.grad_input != nullptr);
  if (reduce) {
    const GradOp op{p.save_mean, p.save_invstd, p.weight, p.bias, p.relu};
    launch_reduce<T>(b, x, dy, op, part, stream);
  }
  bn_finalize_bwd_kernel<<<unsigned(ceil_div(p.c, kThreads)), kThreads, 0, stream>>>(
      p, part, reduce ? b.splits : 0, coef);
  if (p.grad_input != nullptr)
    launch_apply<T, true>(b, x, dy, static_cast<T*>(p.grad_input), coef, p.relu, stream);
}

bool empty(int64_t n, int64_t c, int64_t hw) {
  return n == 0 || c == 0 || hw == 0;
}

}  // namespace

size_t batch_norm_fwd_workspace_bytes(const BatchNormFwdParams& p) {
  if (empty(p.n, p.c, p.hw)) return 0;
  size_t bytes = 0;
  dispatch(p.dtype, [&](auto t) {
    const BnPlan b = fwd_plan<decltype(t)>(p);
    bytes = b.coef_bytes + size_t(b.splits) * size_t(p.c) * sizeof(Moments);
  });
  return bytes;
}

cudaError_t batch_norm_fwd(const BatchNormFwdParams& p, cudaStream_t stream) {
  if (empty(p.n, p.c, p.hw)) return cudaSuccess;
  dispatch(p.dtype, [&](auto t) { bn_fwd<decltype(t)>(p, stream); });
  return cudaGetLastError();
}

size_t batch_norm_bwd_workspace_bytes(const BatchNormBwdParams& p) {
  if (empty(p.n, p.c, p.hw)) return 0;
  size_t bytes = 0;
  dispatch(p.dtype, [&](auto t) {
    const BnPlan b = bwd_plan<decltype(t)>(p);
    bytes = b.coef_bytes + size_t(b.splits) * size_t(p.c) * sizeof(GradSums);
  });
  return bytes;
}

cudaError_t batch_norm_bwd(const BatchNormBwdParams& p, cudaStream_t stream) {
  if (empty(p.n, p.c, p.hw)) return cudaSuccess;
  dispatch(p.dtype, [&](auto t) { bn_bwd<decltype(t)>(p, stream); });
  return cudaGetLastError();
}

}  // namespace fastdl::cuda
