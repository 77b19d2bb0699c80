// Device helpers shared by the norm family's kernels (norm.cu, norm_batch.cu): dtype
// conversion, 16-byte vector access with ragged tails, Welford/Chan moments, dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>

#include "norm.cuh"

namespace fastdl::cuda::detail {

constexpr int kWarp = 32;
// Grids larger than this loop (every kernel strides over its work), so sizes past 2^31 work.
constexpr int64_t kMaxGrid = int64_t(1) << 20;

__device__ __forceinline__ float to_float(float v) {
  return v;
}
__device__ __forceinline__ float to_float(__half v) {
  return __half2float(v);
}
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// L elements of T loaded or stored at once; by default 16 bytes, the widest access a thread
// issues. 16-bit types stay packed in registers.
template <typename T, int L = 16 / int(sizeof(T))>
struct alignas(sizeof(T) * L) Vec {
  static constexpr int N = L;
  T v[L];
};

// Elements p[i], ..., p[i + L - 1]; those at or past `end` read as 0. `aligned`: p + i is
// aligned to the vector whenever the whole vector lies before `end`. Indices are 32-bit:
// callers offset p to the tile or row at hand with 64-bit arithmetic.
template <typename T, int L = Vec<T>::N>
__device__ __forceinline__ Vec<T, L> load_vec(const T* __restrict__ p, int i, int end,
                                              bool aligned) {
  if (aligned && i + L <= end) return *reinterpret_cast<const Vec<T, L>*>(p + i);
  Vec<T, L> v;
#pragma unroll
  for (int j = 0; j < L; ++j) v.v[j] = i + j < end ? p[i + j] : from_float<T>(0.f);
  return v;
}

template <typename T, int L>
__device__ __forceinline__ void store_vec(T* __restrict__ p, int i, int end, bool aligned,
                                          const Vec<T, L>& v) {
  if (aligned && i + L <= end) {
    *reinterpret_cast<Vec<T, L>*>(p + i) = v;
    return;
  }
#pragma unroll
  for (int j = 0; j < L; ++j)
    if (i + j < end) p[i + j] = v.v[j];
}

template <typename T, int L>
__device__ __forceinline__ void unpack(const Vec<T, L>& v, float (&f)[L]) {
#pragma unroll
  for (int j = 0; j < L; ++j) f[j] = to_float(v.v[j]);
}

// N float32 parameters p[i..i+N) (`fill` when p is null or past `end`), N a multiple of 4.
template <int N>
__device__ __forceinline__ void load_param(const float* __restrict__ p, int i, int end,
                                           bool aligned, float fill, float (&f)[N]) {
  static_assert(N % 4 == 0, "parameters are read in float4 pieces");
  if (p != nullptr && aligned && i + N <= end) {
#pragma unroll
    for (int k = 0; k < N; k += 4) {
      const float4 q = *reinterpret_cast<const float4*>(p + i + k);
      f[k] = q.x, f[k + 1] = q.y, f[k + 2] = q.z, f[k + 3] = q.w;
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < N; ++j) f[j] = p != nullptr && i + j < end ? p[i + j] : fill;
}

// Count, mean and sum of squared deviations of a set of values. merge() is the parallel update
// of Chan, Golub & LeVeque (1979): stable, unlike sum(x^2) - n * mean^2.
// Trivial (no member initializers) so that it can live in __shared__ memory: value-initialize.
struct Moments {
  float n, mean, m2;
};

__host__ __device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float d = b.mean - a.mean, f = b.n / n;
  return {n, fmaf(d, f, a.mean), a.m2 + b.m2 + d * d * a.n * f};
}

// Exact two-pass moments of v[0..k).
template <int K>
__device__ __forceinline__ Moments moments(const float (&v)[K], int k) {
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < K; ++j) s += j < k ? v[j] : 0.f;
  const float mean = k > 0 ? s / float(k) : 0.f;
  float m2 = 0.f;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const float d = j < k ? v[j] - mean : 0.f;
    m2 = fmaf(d, d, m2);
  }
  return {float(k), mean, m2};
}

inline bool all_aligned(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

constexpr int kMaxDevices = 64;

// The current device (the bind layer sets it); 0 if the runtime cannot say.
inline int current_device() {
  int dev = 0;
  return cudaGetDevice(&dev) == cudaSuccess && dev >= 0 && dev < kMaxDevices ? dev : 0;
}

// Streaming multiprocessors of the current device, queried once per device.
inline int sm_count() {
  static std::atomic<int> cache[kMaxDevices] = {};
  const int dev = current_device();
  int sms = cache[dev].load(std::memory_order_relaxed);
  if (sms > 0) return sms;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 1;
  sms = std::max(sms, 1);
  cache[dev].store(sms, std::memory_order_relaxed);
  return sms;
}

// Resident blocks per SM of `Kernel` at `threads` (a multiple of 32, at most 1024) threads per
// block and no dynamic shared memory, queried once per device and block size: the occupancy
// query costs microseconds, paid on every launch otherwise.
template <auto Kernel>
int blocks_per_sm(int threads) {
  static std::atomic<int> cache[kMaxDevices][33] = {};
  const int dev = current_device(), slot = std::clamp(threads / 32, 0, 32);
  int n = cache[dev][slot].load(std::memory_order_relaxed);
  if (n > 0) return n;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, threads, 0) != cudaSuccess) n = 1;
  n = std::max(n, 1);
  cache[dev][slot].store(n, std::memory_order_relaxed);
  return n;
}

// Calls f(T{}) with T the element type of `dtype`.
template <class F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
}

}  // namespace fastdl::cuda::detail
