// Device helpers of the attention kernels (attention_fwd.cu, attention_bwd.cu): element types,
// the block-wide tile GEMM on shared memory (tensor cores for half precision), tile loads and
// the per-(sequence, head) geometry. CUDA only, no torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../common/attention_math.h"
#include "attention.cuh"

namespace fastdl::cuda::attn {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
// Dynamic shared memory a block may use: below sm_80's 163 KiB opt-in limit (sm_90: 227 KiB).
constexpr int kSmemBudget = 160 * 1024;

// float32 to the element type (round to nearest).
template <class T>
__device__ __forceinline__ T from_float(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float x) {
  return __float2bfloat16_rn(x);
}

// Leading dims (elements) of the shared tiles: padded so that the 8 rows of an mma fragment
// fall into distinct banks.
template <int kD>
constexpr int ld_t() {
  return kD + 8;
}
template <int kD>
constexpr int ld_f() {
  return kD + 4;
}

// Two 16-bit elements p[0], p[stride] packed as an mma operand register (low half first).
template <class T>
__device__ __forceinline__ uint32_t pack2(const T* p, int stride) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(p);
  if (stride == 1) return *reinterpret_cast<const uint32_t*>(u);
  return uint32_t(u[0]) | (uint32_t(u[stride]) << 16);
}

// D += A (16x16, row) * B (16x8, col), float accumulators: one warp-wide mma.sync.
template <class T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// How many 16x8 output tiles along N one warp computes at a time (reusing its A fragment):
// 4 or 2 when the block's warps still all get work, else 1.
template <int kM, int kN>
constexpr int strip_tiles() {
  for (int nt = 4; nt > 1; nt /= 2)
    if (kN % (8 * nt) == 0 && (kM / 16) * (kN / (8 * nt)) >= kWarps) return nt;
  return 1;
}

// C (kM x kN) = init + A (kM x kK) * B (kK x kN) for operands in shared memory, A(m, k) at
// a[m * am + k * ak], B(k, n) at b[k * bk + n * bn] (the strides express the transposes the
// attention GEMMs need). The block's warps take strips of 16 x (8 * NT) outputs round robin;
// each output starts from init(row, col), accumulates in float32 and ends in epi(row, col,
// value). Half precision runs mma.sync m16n8k16 (fragment layouts of the PTX ISA, "Matrix
// Fragments for mma.m16n8k16"), one A fragment per k step shared by the strip's NT tiles;
// float32 computes the same outputs with FMAs (exact float32, no TF32).
template <class T, int kM, int kN, int kK, class Init, class Epi>
__device__ __forceinline__ void block_gemm(const T* a, int am, int ak, const T* b, int bk, int bn,
                                           Init init, Epi epi) {
  static_assert(kM % 16 == 0 && kN % 8 == 0 && kK % 16 == 0, "tile shape");
  constexpr int NT = strip_tiles<kM, kN>();
  constexpr int kStripsN = kN / (8 * NT), kStrips = (kM / 16) * kStripsN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;
  for (int strip = warp; strip < kStrips; strip += kWarps) {
    const int m0 = (strip / kStripsN) * 16 + g, nb = (strip % kStripsN) * 8 * NT + 2 * t;
    float c[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      c[j][0] = init(m0, nb + 8 * j);
      c[j][1] = init(m0, nb + 8 * j + 1);
      c[j][2] = init(m0 + 8, nb + 8 * j);
      c[j][3] = init(m0 + 8, nb + 8 * j + 1);
    }
    if constexpr (sizeof(T) == 4) {
      const T* a0 = a + m0 * am;
      const T* a1 = a0 + 8 * am;
      const T* b0 = b + nb * bn;
#pragma unroll 4
      for (int k = 0; k < kK; ++k) {
        const float x0 = a0[k * ak], x1 = a1[k * ak];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const float y0 = b0[k * bk + 8 * j * bn], y1 = b0[k * bk + (8 * j + 1) * bn];
          c[j][0] = fmaf(x0, y0, c[j][0]);
          c[j][1] = fmaf(x0, y1, c[j][1]);
          c[j][2] = fmaf(x1, y0, c[j][2]);
          c[j][3] = fmaf(x1, y1, c[j][3]);
        }
      }
    } else {
      const T* pa = a + m0 * am + 2 * t * ak;
      const T* pb = b + 2 * t * bk + (nb - 2 * t + g) * bn;
#pragma unroll 2
      for (int k0 = 0; k0 < kK; k0 += 16) {
        const T* ak0 = pa + k0 * ak;
        const uint32_t fa[4] = {pack2(ak0, ak), pack2(ak0 + 8 * am, ak), pack2(ak0 + 8 * ak, ak),
                                pack2(ak0 + 8 * am + 8 * ak, ak)};
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const T* bk0 = pb + k0 * bk + 8 * j * bn;
          const uint32_t fb[2] = {pack2(bk0, bk), pack2(bk0 + 8 * bk, bk)};
          mma16816<T>(c[j], fa, fb);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      epi(m0, nb + 8 * j, c[j][0]);
      epi(m0, nb + 8 * j + 1, c[j][1]);
      epi(m0 + 8, nb + 8 * j, c[j][2]);
      epi(m0 + 8, nb + 8 * j + 1, c[j][3]);
    }
  }
}

// rows x kD tile of a strided (row, column) global tensor into shared memory (leading dim ld),
// zero beyond `valid_rows` and beyond D (padding must be zero: it enters the dot products).
// 16-byte loads when the rows allow them (unit column stride, D and the row stride multiples of
// 16 bytes, aligned base), else element by element.
template <class T, int kRows, int kD>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* src, int64_t sr, int64_t sd,
                                          int64_t valid_rows, int64_t D) {
  constexpr int kVec = 16 / sizeof(T);
  static_assert(kD % kVec == 0 && ld_t<kD>() % kVec == 0, "16-byte rows");
  const bool vec =
      sd == 1 && D % kVec == 0 && sr % kVec == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
  if (vec) {
    constexpr int kChunks = kD / kVec;
    for (int e = threadIdx.x; e < kRows * kChunks; e += kThreads) {
      const int r = e / kChunks, c = (e % kChunks) * kVec;
      uint4 x = make_uint4(0, 0, 0, 0);
      if (r < valid_rows && c < D) x = *reinterpret_cast<const uint4*>(src + r * sr + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = x;
    }
    return;
  }
  for (int e = threadIdx.x; e < kRows * kD; e += kThreads) {
    const int r = e / kD, c = e % kD;
    dst[r * ld + c] = r < valid_rows && c < D ? src[r * sr + c * sd] : from_float<T>(0.f);
  }
}

// One (sequence, head) of the launch: where its rows start and how long it is.
struct Seq {
  int64_t q0, k0;    // first row in the packed (varlen) or per-batch (dense) layout
  int64_t sq, sk;    // lengths
  int64_t row_base;  // row id of query 0
  int64_t col_base;  // dropout column id of key 0
  uint64_t ctr_ld;   // dropout counter stride between rows
};

__device__ __forceinline__ Seq make_seq(const AttnParams& p, int64_t b, int64_t h) {
  Seq s;
  if (p.cu_q != nullptr) {
    s.q0 = p.cu_q[b];
    s.sq = p.cu_q[b + 1] - s.q0;
    s.k0 = p.cu_k[b];
    s.sk = p.cu_k[b + 1] - s.k0;
    s.row_base = h * p.Tq + s.q0;
    s.col_base = s.k0;
    s.ctr_ld = static_cast<uint64_t>(p.Tk);
  } else {
    s.q0 = s.k0 = 0;
    s.sq = p.Sq;
    s.sk = p.Sk;
    s.row_base = (b * p.Hq + h) * p.Sq;
    s.col_base = 0;
    s.ctr_ld = static_cast<uint64_t>(p.Sk);
  }
  return s;
}

// Whether key j of query i is kept by dropout (the schema's counter).
__device__ __forceinline__ bool dropout_keep(const AttnParams& p, const Seq& s, int64_t i,
                                             int64_t j) {
  const uint64_t ctr = p.offset + static_cast<uint64_t>(s.row_base + i) * s.ctr_ld +
                       static_cast<uint64_t>(s.col_base + j);
  return fastdl_dropout_keep(p.seed, ctr, p.threshold);
}

// The additive score term of (i, j): the mask (dense only) or -inf outside the band / the keys.
__device__ __forceinline__ float score_bias(const AttnParams& p, const Seq& s, int64_t b, int64_t h,
                                            int64_t i, int64_t j) {
  if (i >= s.sq || j >= s.sk) return -INFINITY;
  if (j < fastdl_band_lo(i, s.sq, s.sk, p.window_left, p.bottom_right) ||
      j >= fastdl_band_hi(i, s.sq, s.sk, p.window_right, p.bottom_right))
    return -INFINITY;
  if (p.mask == nullptr) return 0.f;
  return p.mask[b * p.smask.b + h * p.smask.h + i * p.smask.r + j * p.smask.d];
}

}  // namespace fastdl::cuda::attn
