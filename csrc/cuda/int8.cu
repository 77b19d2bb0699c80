// int8 quantization and the int8 tensor-core GEMM with its fused dequantization epilogue.
//
// GEMM: the classic shared-memory tiling (one 128 x 128 tile of C per block of 8 warps, each warp
// 64 x 32, K in steps of 64 bytes) on mma.sync.m16n8k32.s8 (int8 x int8 -> int32, sm_80+),
// double-buffered: the next tiles are loaded into registers while the current ones feed the
// tensor cores. Shared-memory rows are padded from 64 to 80 bytes so that the fragment reads of
// a warp (8 rows x 4 words) fall into 32 distinct banks. The output type is a template
// parameter of the kernel rather than a switch in the epilogue: 64 inlined copies of a
// four-way switch made nvcc's optimizer run for over ten minutes per kernel. A float A
// (int8_linear) is quantized by int8_quantize first, for the same reason.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "int8.cuh"

namespace fastdl::cuda {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 64;
constexpr int kThreads = 256;
constexpr int kRow = kBK + 16;  // padded shared-memory row, bytes
constexpr int kQuantThreads = 256;

__device__ __forceinline__ float to_float(float v) {
  return v;
}
__device__ __forceinline__ float to_float(__half v) {
  return __half2float(v);
}
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// Round half to even (cvt.rni), clamp to [-127, 127]; NaN converts to 0.
__device__ __forceinline__ int quantize(float x, float scale) {
  const int q = __float2int_rn(__fdiv_rn(x, scale));
  return max(-127, min(127, q));
}

// ---------------------------------------------------------------- per-row quantization

template <typename T>
__global__ void __launch_bounds__(kQuantThreads) quantize_kernel(Int8QuantParams p) {
  __shared__ float red_max[kQuantThreads / 32];
  __shared__ int red_nan[kQuantThreads / 32];
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.ldx;
  float amax = 0.f;
  int nan = 0;
  for (int64_t c = threadIdx.x; c < p.cols; c += kQuantThreads) {
    if (p.skip != nullptr && p.skip[c]) continue;
    const float a = fabsf(to_float(x[c]));
    nan |= a != a;
    amax = fmaxf(amax, a);  // fmaxf drops NaN: tracked in `nan`
  }
  for (int o = 16; o > 0; o >>= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    nan |= __shfl_xor_sync(0xffffffffu, nan, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    red_max[warp] = amax;
    red_nan[warp] = nan;
  }
  __syncthreads();
  amax = 0.f;
  nan = 0;
  for (int w = 0; w < kQuantThreads / 32; ++w) {
    amax = fmaxf(amax, red_max[w]);
    nan |= red_nan[w];
  }
  const float scale = nan ? __int_as_float(0x7fc00000) : (amax == 0.f ? 1.f : amax / 127.f);
  if (threadIdx.x == 0) p.scale[row] = scale;
  if (p.q == nullptr) return;
  int8_t* q = p.q + row * p.cols;
  for (int64_t c = threadIdx.x; c < p.cols; c += kQuantThreads) {
    const bool skipped = p.skip != nullptr && p.skip[c];
    q[c] = static_cast<int8_t>(skipped ? 0 : quantize(to_float(x[c]), scale));
  }
}

// ---------------------------------------------------------------- GEMM

union Chunk {
  uint4 v;
  int8_t b[16];
};

// 16 consecutive k of row `row` of an int8 matrix (A, or B given as bt), zeros past the edges.
// VEC: 16-byte aligned rows and K % 16 == 0.
template <bool VEC>
__device__ __forceinline__ uint4 load_row(const int8_t* m, int64_t ld, int64_t rows, int64_t K,
                                          int64_t row, int64_t k) {
  Chunk ch;
  ch.v = make_uint4(0, 0, 0, 0);
  if (row >= rows) return ch.v;
  const int8_t* src = m + row * ld + k;
  if constexpr (VEC) {
    if (k < K) ch.v = *reinterpret_cast<const uint4*>(src);
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i)
      if (k + i < K) ch.b[i] = src[i];
  }
  return ch.v;
}

__device__ __forceinline__ void mma_s8(int (&c)[4], const unsigned (&a)[4], unsigned b0,
                                       unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned lds32(const int8_t* p) {
  return *reinterpret_cast<const unsigned*>(p);
}

// One element of C: the int32 sum as is (O = int), or dequantized, biased and rounded to O.
template <typename O>
__device__ __forceinline__ void store_out(const Int8GemmParams& p, int64_t r, int64_t c, int acc) {
  if (r >= p.M || c >= p.N) return;
  O* out = static_cast<O*>(p.c) + r * p.ldc + c;
  if constexpr (std::is_same_v<O, int>) {
    *out = acc;
  } else {
    float v = static_cast<float>(acc);
    if (p.a_scale != nullptr) v *= p.a_scale[r];
    if (p.b_scale != nullptr) v *= p.b_scale[c];
    if (p.bias != nullptr) v += p.bias[c];
    if constexpr (std::is_same_v<O, float>)
      *out = v;
    else if constexpr (std::is_same_v<O, __half>)
      *out = __float2half_rn(v);
    else
      *out = __float2bfloat16_rn(v);
  }
}

template <bool VEC, typename O>
__global__ void __launch_bounds__(kThreads) gemm_kernel(Int8GemmParams p) {
  __shared__ __align__(16) int8_t As[2][kBM][kRow];
  __shared__ __align__(16) int8_t Bs[2][kBN][kRow];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int wm = warp / 4, wn = warp % 4;  // warp tile: rows wm * 64, columns wn * 32
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;

  // This thread loads chunks tid and tid + 256 of each 128 x 64-byte tile: row chunk / 4,
  // bytes (chunk % 4) * 16.
  int lrow[2], lcol[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int chunk = tid + i * kThreads;
    lrow[i] = chunk / 4;
    lcol[i] = chunk % 4 * 16;
  }
  uint4 ra[2], rb[2];
  auto load = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      ra[i] = load_row<VEC>(p.a, p.lda, p.M, p.K, m0 + lrow[i], k0 + lcol[i]);
      rb[i] = load_row<VEC>(p.bt, p.ldb, p.N, p.K, n0 + lrow[i], k0 + lcol[i]);
    }
  };
  auto store = [&](int buf) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      *reinterpret_cast<uint4*>(&As[buf][lrow[i]][lcol[i]]) = ra[i];
      *reinterpret_cast<uint4*>(&Bs[buf][lrow[i]][lcol[i]]) = rb[i];
    }
  };

  int acc[4][4][4] = {};
  const int64_t tiles = (p.K + kBK - 1) / kBK;
  load(0);
  store(0);
  __syncthreads();
  for (int64_t kt = 0; kt < tiles; ++kt) {
    const int buf = static_cast<int>(kt & 1);
    if (kt + 1 < tiles) load((kt + 1) * kBK);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 32) {
      unsigned a[4][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int r = wm * 64 + mi * 16 + g;
        a[mi][0] = lds32(&As[buf][r][kk + 4 * t]);
        a[mi][1] = lds32(&As[buf][r + 8][kk + 4 * t]);
        a[mi][2] = lds32(&As[buf][r][kk + 16 + 4 * t]);
        a[mi][3] = lds32(&As[buf][r + 8][kk + 16 + 4 * t]);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int n = wn * 32 + ni * 8 + g;
        b[ni][0] = lds32(&Bs[buf][n][kk + 4 * t]);
        b[ni][1] = lds32(&Bs[buf][n][kk + 16 + 4 * t]);
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_s8(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
    }
    if (kt + 1 < tiles) store(buf ^ 1);
    __syncthreads();
  }

#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      const int64_t r = m0 + wm * 64 + mi * 16 + g;
      const int64_t c = n0 + wn * 32 + ni * 8 + 2 * t;
      store_out<O>(p, r, c, acc[mi][ni][0]);
      store_out<O>(p, r, c + 1, acc[mi][ni][1]);
      store_out<O>(p, r + 8, c, acc[mi][ni][2]);
      store_out<O>(p, r + 8, c + 1, acc[mi][ni][3]);
    }
}

bool aligned16(const void* ptr, int64_t ld) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && ld % 16 == 0;
}

template <typename O>
cudaError_t launch_gemm(const Int8GemmParams& p, dim3 grid, bool vec, cudaStream_t stream) {
  if (vec)
    gemm_kernel<true, O><<<grid, kThreads, 0, stream>>>(p);
  else
    gemm_kernel<false, O><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t int8_quantize(const Int8QuantParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(p.rows));
  switch (p.in) {
    case Int8In::kFloat16:
      quantize_kernel<__half><<<grid, kQuantThreads, 0, stream>>>(p);
      break;
    case Int8In::kBFloat16:
      quantize_kernel<__nv_bfloat16><<<grid, kQuantThreads, 0, stream>>>(p);
      break;
    default:
      quantize_kernel<float><<<grid, kQuantThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t int8_gemm(const Int8GemmParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((p.N + kBN - 1) / kBN),
                  static_cast<unsigned>((p.M + kBM - 1) / kBM));
  const bool vec = aligned16(p.a, p.lda) && aligned16(p.bt, p.ldb) && p.K % 16 == 0;
  switch (p.out) {
    case Int8Out::kFloat32:
      return launch_gemm<float>(p, grid, vec, stream);
    case Int8Out::kFloat16:
      return launch_gemm<__half>(p, grid, vec, stream);
    case Int8Out::kBFloat16:
      return launch_gemm<__nv_bfloat16>(p, grid, vec, stream);
    default:
      return launch_gemm<int>(p, grid, vec, stream);
  }
}

}  // namespace fastdl::cuda
