// The interface between csrc/cpu/gemm.cpp (the API of cpu/gemm.h: workspace, packing once, the
// float64 BLAS path) and the float32 GEMM kernels compiled once per ISA (csrc/cpu/gemm_kernels.h):
// plain structs on raw pointers and a table of function pointers, as in int8_params.h.
//
// Packed B: op(B) (k x n) cut into k blocks (gemm_kc: balanced, at most kGemmKc rows), each
// block into panels of `nr` columns (the ISA's micro-tile width), the last one zero-padded. A
// block is stored panel after panel, each panel its rows of nr floats: any run of panels of one
// block is one contiguous operand of the block kernel.
#pragma once

#include <cstdint>

namespace fastdl::cpu {

// Rows of a k block: one panel of it (kGemmKc x 64 floats, 128 KiB) streams from L2 while the
// micro-tile's rows of A (6 x kGemmKc floats, 12 KiB) stay in L1. Longer blocks mean fewer passes
// over C (each block after the first reads and rewrites it): on Zen 4, 512 against 256 ran a
// 2048 x 1024 x 512 product at 97 against 88 GFLOP/s a core, the LSTM's recurrent steps at 109
// against 104 and a conv-shaped 3136 x 64 x 576 at 97 against 81.
constexpr int64_t kGemmKc = 512;
// Columns of B packed at a time by an unpacked call: kGemmKc x kGemmNc floats (512 KiB) stay in
// the 1 MiB L2, beside the rows of C they update, while every row tile of A passes over them.
// A multiple of every ISA's nr.
constexpr int64_t kGemmNc = 256;
// Rows of a transposed A packed at a time ([row tile][k][MR], kGemmMc x kGemmKc floats, 192 KiB):
// whole rows of the stored A are read per k, rather than 6 floats a page apart.
constexpr int64_t kGemmMc = 96;

// The k block size for a depth k: as even as possible, so no block is a sliver.
inline int64_t gemm_kc(int64_t k) {
  const int64_t blocks = (k + kGemmKc - 1) / kGemmKc;
  return blocks == 0 ? 0 : (k + blocks - 1) / blocks;
}

// Row-major C (m x n, ldc) = alpha * op(A) * op(B) + beta * C, op(A) = A (m x k) or, with ta,
// A^T (A stored k x m). beta 0 does not read C.
struct GemmF32 {
  bool ta;
  int64_t m;
  float alpha;
  const float* a;
  int64_t lda;
  float* c;
  int64_t ldc;
  float* apack;  // workspace for a transposed A: kGemmMc * kGemmKc floats
};

// op(B) = B (k x n) or, with tb, B^T (B stored n x k).
struct PackBF32 {
  bool tb;
  const float* b;
  int64_t ldb;
};

// Rows [k0, k1) x columns [n0, n1) of op(B) as panels (n0 a multiple of nr) into dst.
using GemmPackFn = void (*)(const PackBF32&, int64_t k0, int64_t k1, int64_t n0, int64_t n1,
                            float* dst);
// Columns [n0, n1) of C = alpha * op(A)[:, k0:k1] * bp + beta * C, bp the packed rows [k0, k1)
// x columns [n0, n1) of op(B), its panels `kp` >= k1 - k0 rows each (the first k1 - k0 used).
using GemmBlockFn = void (*)(const GemmF32&, const float* bp, int64_t k0, int64_t k1, int64_t n0,
                             int64_t n1, float beta, int64_t kp);

// bfloat16 operands (their bits), float32 C: the same roles, k taken in pairs. A packed panel
// holds per pair of rows (k, k + 1) of op(B) one 32-bit word per column, row k in its low half
// (the high half zero past an odd k); a packed transposed A the same words per row of its tile.
// k blocks start at even k.
struct GemmBf16 {
  bool ta;
  int64_t m;
  float alpha;
  const uint16_t* a;
  int64_t lda;
  float* c;
  int64_t ldc;
  uint32_t* apack;  // workspace for a transposed A: kGemmMc * kGemmKcBf16 / 2 words
};

struct PackBBf16 {
  bool tb;
  const uint16_t* b;
  int64_t ldb;
};

// Rows of a bfloat16 k block: its panels (kGemmKcBf16 / 2 words x 64 columns, 128 KiB) take the
// L2 room of float32's.
constexpr int64_t kGemmKcBf16 = 2 * kGemmKc;

// The bfloat16 k block size: as gemm_kc, rounded up to a whole pair.
inline int64_t gemm_kc_bf16(int64_t k) {
  const int64_t blocks = (k + kGemmKcBf16 - 1) / kGemmKcBf16;
  return blocks == 0 ? 0 : ((k + blocks - 1) / blocks + 1) / 2 * 2;
}

// As GemmPackFn and GemmBlockFn; kp counts the pairs of rows of each panel.
using GemmPackBf16Fn = void (*)(const PackBBf16&, int64_t k0, int64_t k1, int64_t n0, int64_t n1,
                                uint32_t* dst);
using GemmBlockBf16Fn = void (*)(const GemmBf16&, const uint32_t* bp, int64_t k0, int64_t k1,
                                 int64_t n0, int64_t n1, float beta, int64_t kp);

struct GemmKernels {
  GemmPackFn pack;
  GemmBlockFn block;
  int64_t nr;  // columns per panel
  // AVX512-BF16 kernels (vdpbf16ps) where the ISA's table has them, else null; usable only on a
  // CPU with AVX512-BF16 on top of what Isa::kAvx512 guarantees.
  GemmPackBf16Fn pack_bf16;
  GemmBlockBf16Fn block_bf16;
};

// One table per ISA, defined in csrc/cpu/isa/{avx512,avx2,scalar}.cpp, and AVX-512's with the
// bfloat16 block kernel on AMX tiles (csrc/cpu/isa/amx.cpp; only where cpu_amx()).
const GemmKernels& gemm_kernels_scalar();
#if defined(__x86_64__)
const GemmKernels& gemm_kernels_avx2();
const GemmKernels& gemm_kernels_avx512();
const GemmKernels& gemm_kernels_amx();
#endif

}  // namespace fastdl::cpu
