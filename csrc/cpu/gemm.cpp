// The block GEMM of cpu/gemm.h: float32 on the per-ISA kernels (cpu/gemm_kernels.h), which this
// file drives over blocks of k x columns of B packed into cache-line-aligned workspace (packed per
// call: packing conv's weight once per op for all its row blocks measured no faster); float64
// through the Fortran BLAS torch links, or at::addmm_out where it has none.
#include "cpu/gemm.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>

#include "common/isa.h"
#include "cpu/gemm_params.h"

// The Fortran BLAS torch links (MKL on x86 wheels, OpenBLAS elsewhere) exports dgemm_;
// at::native::cpublas::gemm wraps the same call but is not exported from libtorch_cpu. Weak, so
// that a torch without it still loads this extension (and takes the at::addmm_out path).
extern "C" void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
                       const double*, const int*, const double*, const int*, const double*, double*,
                       const int*) __attribute__((weak));

namespace fastdl::cpu {
namespace {

const GemmKernels& kernels() {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::kAvx512:
      return gemm_kernels_avx512();
    case Isa::kAvx2:
      return gemm_kernels_avx2();
#endif
    default:
      return gemm_kernels_scalar();
  }
}

// Full-width vector loads of the packed panels must not straddle cache lines.
constexpr int64_t kAlignFloats = 16;

float* aligned(float* p) {
  constexpr uintptr_t bytes = kAlignFloats * sizeof(float);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + bytes - 1) / bytes * bytes);
}

// This thread's workspace: `floats` for packed B, then kGemmMc x kGemmKc for a transposed A.
// Grown once: callers run many blocks per task.
float* workspace(int64_t floats) {
  thread_local std::vector<float> work;
  const size_t need = floats + kGemmMc * kGemmKc + kAlignFloats;
  if (work.size() < need) work.resize(need);
  return aligned(work.data());
}

// Visits the chunks of kGemmNc columns of C (their panels stay in L2 while every row tile
// passes) and in each the k blocks of kc rows, as fn(n0, n1, k0, k1). k = 0 still visits one
// (empty) block, which sets C = beta * C.
template <typename Fn>
void for_blocks(int64_t n, int64_t k, int64_t kc, Fn&& fn) {
  for (int64_t n0 = 0; n0 < n; n0 += kGemmNc)
    for (int64_t k0 = 0; k0 == 0 || k0 < k; k0 += kc) {
      fn(n0, std::min(n, n0 + kGemmNc), k0, std::min(k, k0 + kc));
      if (kc == 0) break;
    }
}

// C = alpha * op(A) op(B) + beta * C, a chunk's block of B packed just before use (it is then
// in L2).
void sgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
           const float* B, int64_t ldb, float beta, float* C, int64_t ldc, float alpha) {
  const GemmKernels& t = kernels();
  const int64_t kc = gemm_kc(k);
  float* packed = workspace(kc * kGemmNc);
  const GemmF32 g{ta, m, alpha, A, lda, C, ldc, packed + kc * kGemmNc};
  for_blocks(n, k, kc, [&](int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
    t.pack(PackBF32{tb, B, ldb}, k0, k1, n0, n1, packed);
    t.block(g, packed, k0, k1, n0, n1, k0 == 0 ? beta : 1.f, k1 - k0);
  });
}

// As sgemm, on the bfloat16 kernels (k blocks of whole pairs).
void bgemm(const GemmKernels& t, bool ta, bool tb, int64_t m, int64_t n, int64_t k,
           const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float beta, float* C,
           int64_t ldc, float alpha) {
  const int64_t kc = gemm_kc_bf16(k), kq = kc / 2;
  thread_local std::vector<uint32_t> work;
  const size_t need = kq * kGemmNc + kGemmMc * kq + kAlignFloats;
  if (work.size() < need) work.resize(need);
  uint32_t* packed = reinterpret_cast<uint32_t*>(aligned(reinterpret_cast<float*>(work.data())));
  const GemmBf16 g{ta, m, alpha, A, lda, C, ldc, packed + kq * kGemmNc};
  for_blocks(n, k, kc, [&](int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
    t.pack_bf16(PackBBf16{tb, B, ldb}, k0, k1, n0, n1, packed);
    t.block_bf16(g, packed, k0, k1, n0, n1, k0 == 0 ? beta : 1.f, (k1 - k0 + 1) / 2);
  });
}

// rows x cols of bfloat16 bits (ld) as float32, packed rows.
const float* widened(std::vector<float>& buf, const uint16_t* p, int64_t rows, int64_t cols,
                     int64_t ld) {
  buf.resize(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const uint32_t bits = static_cast<uint32_t>(p[r * ld + c]) << 16;
      std::memcpy(&buf[r * cols + c], &bits, sizeof(float));
    }
  return buf.data();
}

void dgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* A, int64_t lda,
           const double* B, int64_t ldb, double beta, double* C, int64_t ldc, double alpha) {
  if (k == 0) {  // C = beta C: no operand read (the BLAS would refuse their 0 leading dimensions)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) C[i * ldc + j] = beta == 0 ? 0 : beta * C[i * ldc + j];
    return;
  }
  if (dgemm_ != nullptr) {
    // Column-major BLAS sees every row-major matrix transposed: C^T = op(B)^T op(A)^T.
    // Block dimensions and leading dimensions fit in int (callers cut blocks to cache sizes).
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    dgemm_(tb ? "T" : "N", ta ? "T" : "N", &mi, &ni, &ki, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const auto view = [&](const double* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    at::Tensor v =
        at::from_blob(const_cast<double*>(p), {t ? cols : rows, t ? rows : cols}, {ld, 1}, opts);
    return t ? v.t() : v;
  };
  at::Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  // beta 0 must not read C: addmm_out with beta 0 ignores its input, NaN included.
  at::addmm_out(c, c, view(A, m, k, lda, ta), view(B, k, n, ldb, tb), beta, alpha);
}

}  // namespace

template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc, T alpha) {
  if (m == 0 || n == 0) return;
  if constexpr (std::is_same_v<T, float>)
    sgemm(ta, tb, m, n, k, A, lda, B, ldb, beta, C, ldc, alpha);
  else
    dgemm(ta, tb, m, n, k, A, lda, B, ldb, beta, C, ldc, alpha);
}

bool gemm_bf16_native() {
  return kernels().block_bf16 != nullptr && cpu_has_avx512_bf16();
}

namespace {
// The table of gemm_bf16's native kernels: AVX-512's, with AMX tiles where cpu_amx().
const GemmKernels& native_bf16_kernels() {
#if defined(__x86_64__)
  if (cpu_amx()) return gemm_kernels_amx();
#endif
  return kernels();
}
}  // namespace

void gemm_bf16(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const uint16_t* A, int64_t lda,
               const uint16_t* B, int64_t ldb, float beta, float* C, int64_t ldc, float alpha) {
  if (m == 0 || n == 0) return;
  if (gemm_bf16_native())
    return bgemm(native_bf16_kernels(), ta, tb, m, n, k, A, lda, B, ldb, beta, C, ldc, alpha);
  thread_local std::vector<float> a, b;
  const float* fa = widened(a, A, ta ? k : m, ta ? m : k, lda);
  const float* fb = widened(b, B, tb ? n : k, tb ? k : n, ldb);
  sgemm(ta, tb, m, n, k, fa, ta ? m : k, fb, tb ? k : n, beta, C, ldc, alpha);
}

template <typename T>
void PackedB<T>::pack(bool tb, int64_t k, int64_t n, const T* B, int64_t ldb) {
  tb_ = tb;
  b_ = B;
  ldb_ = ldb;
  k_ = k;
  if constexpr (std::is_same_v<T, float>) {
    const GemmKernels& t = kernels();
    kc_ = gemm_kc(k);
    npad_ = (n + t.nr - 1) / t.nr * t.nr;
    // One panel's width of row-major rows, aligned: B is its own packed panel (attention's V
    // blocks for head dim 64 with AVX-512), read in place.
    if (!tb && n == t.nr && ldb == t.nr && reinterpret_cast<uintptr_t>(B) % 64 == 0) {
      panels_ = B;
      return;
    }
    const size_t need = k * npad_ + kAlignFloats;
    if (buf_.size() < need) buf_.resize(need);
    float* dst = aligned(buf_.data());
    for (int64_t k0 = 0; k0 < k; k0 += kc_)
      t.pack(PackBF32{tb, B, ldb}, k0, std::min(k, k0 + kc_), 0, n, dst + k0 * npad_);
    panels_ = dst;
  }
}

template <typename T>
void PackedB<T>::gemm(bool ta, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, T beta,
                      T* C, int64_t ldc, T alpha) const {
  if (m == 0 || n == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    const GemmKernels& t = kernels();
    const GemmF32 g{ta, m, alpha, A, lda, C, ldc, workspace(0)};
    TORCH_CHECK(k == k_ || k <= kc_, "fastdl: PackedB of ", k_, " rows used for ", k);
    for_blocks(n, k, kc_, [&](int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
      const int64_t kp = std::min(k_, k0 + kc_) - k0;  // rows of this block's panels
      t.block(g, panels_ + k0 * npad_ + n0 * kp, k0, k1, n0, n1, k0 == 0 ? beta : 1.f, kp);
    });
  } else {
    dgemm(ta, tb_, m, n, k, A, lda, b_, ldb_, beta, C, ldc, alpha);
  }
}

// PackedBBf16 runs the AVX-512 table (or its AMX twin, whose panels are the same) whatever the
// current ISA (set_cpu_isa from another thread may lower it between a caller's
// gemm_bf16_native() and its packing inside a parallel region).
const GemmKernels& bf16_kernels() {
  TORCH_CHECK(cpu_has_avx512_bf16(), "fastdl: PackedBBf16 needs AVX512-BF16");
#if defined(__x86_64__)
  return cpu_amx() ? gemm_kernels_amx() : gemm_kernels_avx512();
#else
  return kernels();  // not reached: no AVX512-BF16 off x86
#endif
}

void PackedBBf16::pack(bool tb, int64_t k, int64_t n, const uint16_t* B, int64_t ldb) {
  const GemmKernels& t = bf16_kernels();
  k_ = k;
  kc_ = gemm_kc_bf16(k);
  npad_ = (n + t.nr - 1) / t.nr * t.nr;
  // Block k0's panels hold (its rows + 1) / 2 words per column (only the last block's rows odd).
  const size_t need = (k + 1) / 2 * npad_ + kAlignFloats;
  if (buf_.size() < need) buf_.resize(need);
  uint32_t* dst = reinterpret_cast<uint32_t*>(aligned(reinterpret_cast<float*>(buf_.data())));
  for (int64_t k0 = 0; k0 < k; k0 += kc_)
    t.pack_bf16(PackBBf16{tb, B, ldb}, k0, std::min(k, k0 + kc_), 0, n, dst + k0 / 2 * npad_);
  panels_ = dst;
}

void PackedBBf16::gemm(int64_t m, int64_t n, int64_t k, const uint16_t* A, int64_t lda, float beta,
                       float* C, int64_t ldc, float alpha) const {
  if (m == 0 || n == 0) return;
  const GemmKernels& t = bf16_kernels();
  TORCH_CHECK(k == k_ || k <= std::min(kc_, k_), "fastdl: PackedBBf16 of ", k_, " rows used for ",
              k);
  const GemmBf16 g{false, m, alpha, A, lda, C, ldc, nullptr};
  for_blocks(n, k, kc_, [&](int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
    const int64_t kp = (std::min(k_, k0 + kc_) - k0 + 1) / 2;  // pairs of this block's panels
    t.block_bf16(g, panels_ + k0 / 2 * npad_ + n0 * kp, k0, k1, n0, n1, k0 == 0 ? beta : 1.f, kp);
  });
}

template class PackedB<float>;
template class PackedB<double>;

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, const float*, int64_t,
                          const float*, int64_t, float, float*, int64_t, float);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, const double*, int64_t,
                           const double*, int64_t, double, double*, int64_t, double);

}  // namespace fastdl::cpu
