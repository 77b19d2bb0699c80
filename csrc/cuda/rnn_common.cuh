// Device helpers shared by the rnn kernels (rnn_step.cu, rnn_persist.cu): the schedule of
// positions, the LSTM/GRU cell math forward and backward (one place for the formulas), and
// float4 reads of float32 / packed 16-bit operands.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "norm_common.cuh"
#include "rnn.cuh"

namespace fastdl::cuda::rnn {

using detail::from_float;
using detail::to_float;

// Position of row b in processing step s, or -1 once its sequence has ended (csrc/ops.cpp).
__device__ __forceinline__ int64_t position(const RnnSchedule& sch, int64_t s, int64_t b) {
  const int64_t len = sch.lengths != nullptr ? sch.lengths[b] : sch.T;
  if (s >= len) return -1;
  return sch.reverse ? len - 1 - s : s;
}

// Accurate expf/tanhf (not the __expf intrinsics): the float32 path must stay within ~1e-5 of
// the float64 reference, and the pointwise work is memory bound anyway.
__device__ __forceinline__ float sigmoid(float x) {
  return 1.f / (1.f + expf(-x));
}

// LSTM (Hochreiter & Schmidhuber 1997, forget gate of Gers et al. 2000), torch's gate order.
// pre: the four pre-activations with every bias; c: c_{t-1}.
struct LstmAct {
  float i, f, g, o, c, r;  // activated gates, c_t, r_t = o tanh(c_t)
};

__device__ __forceinline__ LstmAct lstm_fwd(const float (&pre)[4], float c) {
  LstmAct a;
  a.i = sigmoid(pre[0]);
  a.f = sigmoid(pre[1]);
  a.g = tanhf(pre[2]);
  a.o = sigmoid(pre[3]);
  a.c = fmaf(a.f, c, a.i * a.g);
  a.r = a.o * tanhf(a.c);
  return a;
}

// dr: dL/dr_t; dc: dL/dc_t from later steps (updated to dL/dc_{t-1}); sv: saved [i, f, g, o];
// ct, cp: c_t and c_{t-1}. dg: gradients of the four pre-activations.
__device__ __forceinline__ void lstm_bwd(float dr, float& dc, const float (&sv)[4], float ct,
                                         float cp, float (&dg)[4]) {
  const float i = sv[0], f = sv[1], g = sv[2], o = sv[3];
  const float tc = tanhf(ct);
  const float dct = dc + dr * o * (1.f - tc * tc);
  dg[0] = dct * g * i * (1.f - i);
  dg[1] = dct * cp * f * (1.f - f);
  dg[2] = dct * i * (1.f - g * g);
  dg[3] = dr * tc * o * (1.f - o);
  dc = dct * f;
}

// GRU (Cho et al. 2014) as torch: r, z from both sides, n = tanh(x_n + r (W_hn h + b_hn)).
// px: input-side pre-activations (with b_ih), ph: hidden-side ones (with b_hh).
struct GruAct {
  float r, z, n, ghn, h;
};

__device__ __forceinline__ GruAct gru_fwd(const float (&px)[3], const float (&ph)[3], float h) {
  GruAct a;
  a.r = sigmoid(px[0] + ph[0]);
  a.z = sigmoid(px[1] + ph[1]);
  a.ghn = ph[2];
  a.n = tanhf(fmaf(a.r, a.ghn, px[2]));
  a.h = fmaf(a.z, h - a.n, a.n);  // (1 - z) n + z h, rounded as torch's kernels do
  return a;
}

// d: dL/dh_t; sv: saved [r, z, n, ghn]; hp: h_{t-1}. dg: d[r_pre, z_pre, ghn, n_pre]; returns
// the direct part of dL/dh_{t-1}, z d (the rest flows through W_hh).
__device__ __forceinline__ float gru_bwd(float d, const float (&sv)[4], float hp, float (&dg)[4]) {
  const float r = sv[0], z = sv[1], n = sv[2], ghn = sv[3];
  const float dn = d * (1.f - z) * (1.f - n * n);
  dg[0] = dn * ghn * r * (1.f - r);
  dg[1] = d * (hp - n) * z * (1.f - z);
  dg[2] = dn * r;
  dg[3] = dn;
  return d * z;
}

// One (row, unit) of a forward step. px, ph: input- and hidden-side pre-activations with their
// biases (the GRU reads 3 of each). LSTM: c is c_{t-1} in and c_t out; GRU: hp is h_{t-1}.
// Returns what the step outputs (LSTM r_t, GRU h_t); sv gets what BPTT needs.
template <Cell C>
__device__ __forceinline__ float cell_fwd(const float (&px)[4], const float (&ph)[4], float& c,
                                          float hp, float (&sv)[4]) {
  if constexpr (C == Cell::kLstm) {
    const float pre[4] = {px[0] + ph[0], px[1] + ph[1], px[2] + ph[2], px[3] + ph[3]};
    const LstmAct a = lstm_fwd(pre, c);
    c = a.c;
    sv[0] = a.i, sv[1] = a.f, sv[2] = a.g, sv[3] = a.o;
    return a.r;
  } else {
    const GruAct a = gru_fwd({px[0], px[1], px[2]}, {ph[0], ph[1], ph[2]}, hp);
    sv[0] = a.r, sv[1] = a.z, sv[2] = a.n, sv[3] = a.ghn;
    return a.h;
  }
}

// One (row, unit) of a backward step. d: dL/d(output of the step); LSTM: dc in/out, ct = c_t,
// prev = c_{t-1}; GRU: prev = h_{t-1}. dg gets the gate gradients in the layout of
// RnnStepParams::dgates; returns the part of dL/dh_{t-1} that bypasses W_hh (GRU z d, LSTM 0).
template <Cell C>
__device__ __forceinline__ float cell_bwd(float d, float& dc, const float (&sv)[4], float ct,
                                          float prev, float (&dg)[4]) {
  if constexpr (C == Cell::kLstm) {
    lstm_bwd(d, dc, sv, ct, prev, dg);
    return 0.f;
  } else {
    return gru_bwd(d, sv, prev, dg);
  }
}

// Four consecutive elements as float4; p is 4-element aligned.
template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  using type = __half2;
  static __device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) {
    return __bfloat1622float2(v);
  }
};

template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  typename Pair<T>::type lo, hi;
};

template <typename T>
__device__ __forceinline__ float4 load4(const T* p) {
  if constexpr (sizeof(T) == 4) {
    return *reinterpret_cast<const float4*>(p);
  } else {
    const Quad<T> q = *reinterpret_cast<const Quad<T>*>(p);
    const float2 a = Pair<T>::to_float2(q.lo), b = Pair<T>::to_float2(q.hi);
    return make_float4(a.x, a.y, b.x, b.y);
  }
}

// Elements of the saved gates' block `k` (each H wide) of a (.., S) row.
__device__ __forceinline__ void load_saved(const float* row, int64_t j, int64_t H, float (&v)[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] = row[k * H + j];
}

__device__ __forceinline__ void store_saved(float* row, int64_t j, int64_t H, const float (&v)[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) row[k * H + j] = v[k];
}

}  // namespace fastdl::cuda::rnn
