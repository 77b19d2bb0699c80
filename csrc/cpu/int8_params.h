// The interface between csrc/cpu/int8.cpp (torch-facing: checks, allocation, threading) and the
// int8 kernels compiled once per ISA (csrc/cpu/isa/*.cpp): plain structs on raw pointers and a
// table of function pointers, as in norm_params.h.
//
// The GEMM C = A (M, K) x B (K, N) works on two prepared operands:
//  - A: M rows `lda` bytes apart, the int8 values as they are, K of them then zeros up to a
//    multiple of 4 (the caller's own rows when K is one already).
//  - the packed B: panels of kPanel = 64 columns; panel p holds, for each group of 4 k, the 4
//    signed bytes of each of its 64 columns ([p][k/4][64][4]), 0 in the padding past K and N;
//    then, after the last panel, the int32 sum of each column over k (0 past N). VNNI's vpdpbusd
//    multiplies unsigned by signed bytes: A is its unsigned operand, each byte XOR 0x80 (a +
//    kAOffset) as it is broadcast, B the signed one, and the kernels subtract kAOffset times the
//    column's sum from each product. Every ISA's kernels compute the same sums from this one
//    layout, so a weight packed once stays valid whatever set_cpu_isa picks later, and the A
//    operand needs no pass of its own (no row sums).
#pragma once

#include <cstdint>

namespace fastdl::cpu {

constexpr int64_t kPanel = 64;
constexpr int32_t kAOffset = 128;

inline int64_t int8_k4(int64_t K) {
  return (K + 3) / 4;
}
inline int64_t int8_panels(int64_t N) {
  return (N + kPanel - 1) / kPanel;
}
// Where the column sums start: after the panels.
inline int64_t int8_colsum_offset(int64_t K, int64_t N) {
  return int8_panels(N) * kPanel * int8_k4(K) * 4;
}
inline int64_t int8_packed_bytes(int64_t K, int64_t N) {
  return int8_colsum_offset(K, N) + int8_panels(N) * kPanel * 4;
}

enum Int8In : int { kInF32 = 0, kInBF16 = 1, kInF16 = 2, kInI8 = 3, kNumInt8In = 4 };
enum Int8Out : int { kOutI32 = 0, kOutF32 = 1, kOutBF16 = 2, kOutF16 = 3, kNumInt8Out = 4 };

// Rows [r0, r1) of x (unit column stride) to int8 rows of q: per row, scale = max|x| / 127
// (1 for an all-zero row), q = clamp(round_half_even(x / scale), -127, 127), zeros up to `kpad`
// bytes. int8 input (kInI8) is copied and gets no scale. `skip` (K bytes, nullable) marks
// columns left out (LLM.int8 outliers): they count neither in the scale nor in q.
struct QuantRows {
  const void* x;
  int64_t ldx;  // elements
  int8_t* q;
  int64_t ldq;   // bytes
  float* scale;  // (rows); null for int8 input
  const uint8_t* skip;
  int64_t K, kpad;
};

struct PackB {
  const int8_t* b;
  int64_t ld;  // elements between rows of b
  bool nk;     // b is (N, K) (a transposed view of B) rather than (K, N)
  int64_t K, N;
  uint8_t* dst;  // int8_packed_bytes(K, N): panels, then column sums
};

struct Gemm {
  const int8_t* a;  // A (see above)
  int64_t lda;
  const uint8_t* b;         // packed B
  const int32_t* b_colsum;  // B's column sums (N): where int8_colsum_offset puts them
  int64_t M, N, K4;
  const float* a_scale;  // (M) or null (1)
  const float* b_scale;  // (N) or null (1)
  const float* bias;     // (N) or null (0)
  void* out;
  int64_t ldo;  // elements
  bool stream;  // a large output, not read again soon: non-temporal stores where they apply
};

using QuantFn = void (*)(const QuantRows&, int64_t r0, int64_t r1);
using PackBFn = void (*)(const PackB&, int64_t p0, int64_t p1);
// Rows [m0, m1) x panels [p0, p1) of C.
using GemmFn = void (*)(const Gemm&, int64_t m0, int64_t m1, int64_t p0, int64_t p1);

// A register-only loop of the GEMM's multiply-add instruction (bench/ reports int8 rates against
// its rate): `ops` integer operations a round.
struct PeakLoop {
  int64_t (*run)(int64_t rounds);  // returns rounds
  int64_t ops;
};

struct Int8Kernels {
  QuantFn quantize[kNumInt8In];
  PackBFn pack_b;
  GemmFn gemm[kNumInt8Out];
  int mr;         // rows per micro-tile: row blocks should be multiples of it
  PeakLoop peak;  // run is null where no peak is measured (AVX2, scalar)
};

// GOP/s of Int8Kernels::peak on every thread, for the current ISA's table (the sum of each
// thread's best of a few tries of ~7 ms); 0 where it has none. Defined in csrc/cpu/int8.cpp.
double int8_peak_gops();

// One table per ISA, defined in csrc/cpu/isa/{avx512,avx2,scalar}.cpp. The AVX-512 one needs
// AVX512-VNNI on top of what Isa::kAvx512 guarantees.
const Int8Kernels& int8_kernels_scalar();
#if defined(__x86_64__)
const Int8Kernels& int8_kernels_avx2();
const Int8Kernels& int8_kernels_avx512();
#endif

}  // namespace fastdl::cpu
