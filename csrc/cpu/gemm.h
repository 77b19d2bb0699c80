// The GEMM the CPU kernels call on their blocks (conv's implicit GEMM, attention's tiles):
// single-threaded, for callers already inside at::parallel_for. float32 runs fastdl's own
// kernels (cpu/gemm_kernels.h): the sgemm of the MKL torch links takes a slow path on AMD CPUs
// (~85 GFLOP/s on conv-shaped blocks where the FMAs allow ~115 per core). float64 exists to be
// exact (gradcheck), not fast: it calls the BLAS torch links.
#pragma once

#include <cstdint>
#include <vector>

namespace fastdl::cpu {

// Row-major C (m x n, ldc) = alpha * op(A) * op(B) + beta * C. op(A) is m x k (A stored k x m
// when ta), op(B) k x n (B stored n x k when tb); rows of every matrix are contiguous, any
// leading dimension. beta 0 does not read C (it may hold garbage). Defined for float and double.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc, T alpha = T(1));

// bfloat16 A and B (their bits), float32 C: the same product, each product of two bfloat16
// values exact and the sums in float32. On a CPU with AVX512-BF16 (gemm_bf16_native()) it runs
// vdpbf16ps at twice the float32 rate (subnormal inputs read as zero); elsewhere A and B are
// widened to float32 for the float kernels.
void gemm_bf16(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const uint16_t* A, int64_t lda,
               const uint16_t* B, int64_t ldb, float beta, float* C, int64_t ldc,
               float alpha = 1.f);
bool gemm_bf16_native();

// op(B) (k x n, B stored n x k when tb) prepared once for several products that share it, each
// using its first n' <= n columns and its first k' <= k rows (k' = k, or k' within the first k
// block of gemm_kc(k) rows): attention packs a key block once per task rather than once per
// query block, the RNNs their recurrent weights once per sequence. float32 packs it into the
// kernels' panels, k block after k block; float64 keeps the pointer (its BLAS packs for itself).
template <typename T>
class PackedB {
 public:
  void pack(bool tb, int64_t k, int64_t n, const T* B, int64_t ldb);
  // C (m x n', ldc) = alpha * op(A) (m x k') * op(B)[:k', :n'] + beta * C.
  void gemm(bool ta, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, T beta, T* C,
            int64_t ldc, T alpha = T(1)) const;

 private:
  bool tb_ = false;
  const T* b_ = nullptr;
  int64_t ldb_ = 0, k_ = 0, kc_ = 0, npad_ = 0;
  std::vector<float> buf_;  // float32's panels (from its first 64-byte boundary)
  const float* panels_ = nullptr;
};

// PackedB for gemm_bf16 (the recurrent weights of a bfloat16 RNN), on its AVX512-BF16 kernels:
// only where gemm_bf16_native().
class PackedBBf16 {
 public:
  void pack(bool tb, int64_t k, int64_t n, const uint16_t* B, int64_t ldb);
  // C (m x n', ldc) = alpha * A (m x k', bfloat16) * op(B)[:k', :n'] + beta * C.
  void gemm(int64_t m, int64_t n, int64_t k, const uint16_t* A, int64_t lda, float beta, float* C,
            int64_t ldc, float alpha = 1.f) const;

 private:
  int64_t k_ = 0, kc_ = 0, npad_ = 0;
  std::vector<uint32_t> buf_;
  const uint32_t* panels_ = nullptr;
};

}  // namespace fastdl::cpu
