// Stepwise path of the rnn layers (contract in rnn.cuh): per time step the bind layer runs the
// recurrent GEMM on cuBLAS and one of these fused pointwise kernels, which reads the gate
// pre-activations once and writes the new state, the output and what backpropagation through
// time needs (forward), or the gate gradients, dc_{t-1} and the addend of dh_{t-1} (backward).
// This is the recurrent-GEMM + fused-elementwise schedule of cuDNN's standard (non-persistent)
// RNN (Appleyard et al., "Optimizing Performance of Recurrent Neural Networks on GPUs", 2016),
// used when W_hh does not fit on chip. One thread per (row, hidden unit) handles all gates of
// that unit, so each kernel is a single coalesced pass over the step's rows; ended sequences
// (lengths) are skipped row by row, their state left as it is.
#include "rnn_common.cuh"

namespace fastdl::cuda {
namespace {

using namespace detail;
using namespace rnn;

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) {
  return unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxGrid));
}

__device__ __forceinline__ int64_t first_index() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t index_stride() {
  return int64_t(gridDim.x) * blockDim.x;
}

template <typename T, Cell C>
__global__ void __launch_bounds__(kThreads) step_fwd_kernel(const RnnStepParams p) {
  constexpr int64_t kGates = C == Cell::kLstm ? 4 : 3;
  const int64_t B = p.sch.B, H = p.H, G = kGates * H, S = 4 * H;
  for (int64_t idx = first_index(); idx < B * H; idx += index_stride()) {
    const int64_t b = idx / H, j = idx - b * H;
    const int64_t pos = position(p.sch, p.step, b);
    if (pos < 0) continue;
    const int64_t row = pos * B + b;
    float px[4] = {}, ph[4] = {}, sv[4];
#pragma unroll
    for (int g = 0; g < kGates; ++g) {
      px[g] = p.gx[row * G + g * H + j] + (p.bias_x != nullptr ? p.bias_x[g * H + j] : 0.f);
      ph[g] = p.gh[b * G + g * H + j] + (p.bias_h != nullptr ? p.bias_h[g * H + j] : 0.f);
    }
    float c = C == Cell::kLstm ? p.c[idx] : 0.f;
    const float out = cell_fwd<C>(px, ph, c, C == Cell::kGru ? p.h[idx] : 0.f, sv);
    if constexpr (C == Cell::kLstm) {
      p.c[idx] = c;
      p.cs[row * H + j] = c;
      if (p.r != nullptr) p.r[idx] = out;
    }
    if (p.h != nullptr) p.h[idx] = out;
    if (p.h_lo != nullptr) static_cast<T*>(p.h_lo)[idx] = from_float<T>(out);
    if (p.y != nullptr) static_cast<T*>(p.y)[row * H + j] = from_float<T>(out);
    store_saved(p.gates + row * S, j, H, sv);
  }
}

template <typename T, Cell C>
__global__ void __launch_bounds__(kThreads) step_bwd_kernel(const RnnStepParams p) {
  constexpr int64_t kGates = C == Cell::kLstm ? 4 : 3;
  const int64_t B = p.sch.B, H = p.H, P = p.P, G = kGates * H, S = 4 * H;
  const T* gy = static_cast<const T*>(p.gy);
  for (int64_t idx = first_index(); idx < B * H; idx += index_stride()) {
    const int64_t b = idx / H, j = idx - b * H;
    const int64_t pos = position(p.sch, p.step, b);
    float* dgs = p.dg_step + b * G + j;
    if (pos < 0) {  // ended: no gate gradient, dh passes through unchanged
#pragma unroll
      for (int g = 0; g < kGates; ++g) dgs[g * H] = 0.f;
      if (j < P) p.dh_base[b * P + j] = p.dh_keep[b * P + j];
      continue;
    }
    const int64_t row = pos * B + b;
    const float d = p.dh[idx] + (gy != nullptr ? to_float(gy[row * H + j]) : 0.f);
    float sv[4], dg[4];
    load_saved(p.gates + row * S, j, H, sv);
    float dc = C == Cell::kLstm ? p.dc[idx] : 0.f;
    const float direct =
        cell_bwd<C>(d, dc, sv, C == Cell::kLstm ? p.cs[row * H + j] : 0.f, p.prev[row * H + j], dg);
    if constexpr (C == Cell::kLstm) p.dc[idx] = dc;
    store_saved(p.dgates + row * S, j, H, dg);
    // The first G columns of dgates are the ones W_hh multiplies (GRU: r, z, ghn).
#pragma unroll
    for (int g = 0; g < kGates; ++g) dgs[g * H] = dg[g];
    if (j < P) p.dh_base[b * P + j] = direct;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) proj_fwd_kernel(const RnnProjParams p) {
  const int64_t B = p.sch.B, P = p.P;
  for (int64_t idx = first_index(); idx < B * P; idx += index_stride()) {
    const int64_t b = idx / P, j = idx - b * P;
    const int64_t pos = position(p.sch, p.step, b);
    if (pos < 0) continue;
    const float v = p.hp[idx];
    p.h[idx] = v;
    if (p.h_lo != nullptr) static_cast<T*>(p.h_lo)[idx] = from_float<T>(v);
    static_cast<T*>(p.y)[(pos * B + b) * P + j] = from_float<T>(v);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) proj_bwd_kernel(const RnnProjParams p) {
  const int64_t B = p.sch.B, P = p.P;
  const T* gy = static_cast<const T*>(p.gy);
  for (int64_t idx = first_index(); idx < B * P; idx += index_stride()) {
    const int64_t b = idx / P, j = idx - b * P;
    const int64_t pos = position(p.sch, p.step, b);
    if (pos < 0) {
      p.dhp_step[idx] = 0.f;
      continue;
    }
    const int64_t at = (pos * B + b) * P + j;
    const float v = p.dh[idx] + (gy != nullptr ? to_float(gy[at]) : 0.f);
    p.dhp_step[idx] = v;
    p.dhp_seq[at] = v;
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads) prev_kernel(const RnnPrevParams p) {
  const int64_t T = p.sch.T, B = p.sch.B, D = p.D;
  const S* seq = static_cast<const S*>(p.seq);
  for (int64_t idx = first_index(); idx < T * B * D; idx += index_stride()) {
    const int64_t k = idx % D, tb = idx / D, b = tb % B, pos = tb / B;
    const int64_t len = p.sch.lengths != nullptr ? p.sch.lengths[b] : T;
    float v = 0.f;
    if (pos < len) {
      const bool first = p.sch.reverse ? pos == len - 1 : pos == 0;
      const int64_t prev = p.sch.reverse ? pos + 1 : pos - 1;
      v = first ? p.init[b * D + k] : to_float(seq[(prev * B + b) * D + k]);
    }
    p.out[idx] = v;
  }
}

template <class F>
cudaError_t typed(DType dtype, F&& f) {
  dispatch(dtype, f);
  return cudaGetLastError();
}

}  // namespace

cudaError_t rnn_step_fwd(const RnnStepParams& p, cudaStream_t stream) {
  if (p.sch.B == 0 || p.H == 0) return cudaSuccess;
  return typed(p.dtype, [&](auto t) {
    using T = decltype(t);
    const unsigned grid = blocks_for(p.sch.B * p.H);
    if (p.cell == Cell::kLstm)
      step_fwd_kernel<T, Cell::kLstm><<<grid, kThreads, 0, stream>>>(p);
    else
      step_fwd_kernel<T, Cell::kGru><<<grid, kThreads, 0, stream>>>(p);
  });
}

cudaError_t rnn_step_bwd(const RnnStepParams& p, cudaStream_t stream) {
  if (p.sch.B == 0 || p.H == 0) return cudaSuccess;
  return typed(p.dtype, [&](auto t) {
    using T = decltype(t);
    const unsigned grid = blocks_for(p.sch.B * p.H);
    if (p.cell == Cell::kLstm)
      step_bwd_kernel<T, Cell::kLstm><<<grid, kThreads, 0, stream>>>(p);
    else
      step_bwd_kernel<T, Cell::kGru><<<grid, kThreads, 0, stream>>>(p);
  });
}

cudaError_t rnn_proj_fwd(const RnnProjParams& p, cudaStream_t stream) {
  if (p.sch.B == 0 || p.P == 0) return cudaSuccess;
  return typed(p.dtype, [&](auto t) {
    proj_fwd_kernel<decltype(t)><<<blocks_for(p.sch.B * p.P), kThreads, 0, stream>>>(p);
  });
}

cudaError_t rnn_proj_bwd(const RnnProjParams& p, cudaStream_t stream) {
  if (p.sch.B == 0 || p.P == 0) return cudaSuccess;
  return typed(p.dtype, [&](auto t) {
    proj_bwd_kernel<decltype(t)><<<blocks_for(p.sch.B * p.P), kThreads, 0, stream>>>(p);
  });
}

cudaError_t rnn_prev_states(const RnnPrevParams& p, cudaStream_t stream) {
  const int64_t n = p.sch.T * p.sch.B * p.D;
  if (n == 0) return cudaSuccess;
  if (p.seq_float) {
    prev_kernel<float><<<blocks_for(n), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  return typed(p.dtype, [&](auto t) {
    prev_kernel<decltype(t)><<<blocks_for(n), kThreads, 0, stream>>>(p);
  });
}

}  // namespace fastdl::cuda
