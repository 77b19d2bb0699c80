// CUDA kernels of the int8 family: launch parameters and host launchers.
// Plain CUDA on raw pointers (no torch headers), so int8.cu compiles standalone with nvcc; the
// bind layer (int8_bind.cpp) checks and allocates the tensors and fills these structs.
// Every launcher returns the first CUDA error it met (cudaSuccess otherwise) and launches
// nothing for empty inputs.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastdl::cuda {

// Element types of the activations (In) and of the output (Out).
enum class Int8In : int { kInt8, kFloat32, kFloat16, kBFloat16 };
enum class Int8Out : int { kInt32, kFloat32, kFloat16, kBFloat16 };

// Rows of x (rows, cols), unit column stride: scale = max|x| / 127 per row (1 for a zero row,
// NaN for a row holding NaN); q (rows, cols) contiguous int8, round half to even, clamped to
// [-127, 127], unless q is null (scales only). Columns with skip[c] != 0 are left out.
struct Int8QuantParams {
  const void* x = nullptr;
  int64_t ldx = 0;
  int8_t* q = nullptr;  // nullable
  float* scale = nullptr;
  const uint8_t* skip = nullptr;  // (cols,), nullable
  int64_t rows = 0, cols = 0;
  Int8In in = Int8In::kFloat32;
};

cudaError_t int8_quantize(const Int8QuantParams& p, cudaStream_t stream);

// C (M, N) = A (M, K) x B, B given as its transpose bt (N, K) (k contiguous), int32
// accumulation on int8 tensor cores (mma.sync m16n8k32), then the epilogue:
// int32 out, or float(acc) * a_scale[m] * b_scale[n] + bias[n] (null: 1, 1, 0) in Out. A is
// int8: int8_linear quantizes a floating input with int8_quantize first.
struct Int8GemmParams {
  const int8_t* a = nullptr;
  int64_t lda = 0;  // elements; unit column stride
  const int8_t* bt = nullptr;
  int64_t ldb = 0;
  void* c = nullptr;
  int64_t ldc = 0;
  const float* a_scale = nullptr;
  const float* b_scale = nullptr;
  const float* bias = nullptr;
  int64_t M = 0, N = 0, K = 0;
  Int8Out out = Int8Out::kInt32;
};

cudaError_t int8_gemm(const Int8GemmParams& p, cudaStream_t stream);

}  // namespace fastdl::cuda
