// CUDA kernels of the normalization family: launch parameters and host launchers.
// Plain CUDA on raw pointers (no torch headers), so norm.cu compiles standalone with nvcc; the
// bind layer (norm_bind.cpp) checks and allocates the tensors and fills these structs.
// Tensors are dense: x is row-major (rows, cols) for LayerNorm/RMSNorm, and (n, c, hw) for
// BatchNorm ((n * hw, c) rows when channels_last). Parameters and statistics are float32.
// Every launcher returns the first CUDA error it met (cudaSuccess otherwise) and launches
// nothing for empty inputs.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace fastdl::cuda {

enum class DType : int { kFloat32, kFloat16, kBFloat16 };

// LayerNorm (rms = false) or RMSNorm (rms = true) over rows, with the optional residual add
// s = x + residual (written to `sum`, rounded to the input dtype) normalized in its place.
struct NormFwdParams {
  const void* x = nullptr;
  const void* residual = nullptr;  // nullable
  const float* weight = nullptr;   // (cols,), nullable
  const float* bias = nullptr;     // (cols,), nullable; LayerNorm only
  void* out = nullptr;
  void* sum = nullptr;    // required iff residual
  float* mean = nullptr;  // (rows,); LayerNorm only
  float* rstd = nullptr;  // (rows,)
  int64_t rows = 0;
  int64_t cols = 0;
  float eps = 1e-5f;
  DType dtype = DType::kFloat32;
  bool rms = false;
};

cudaError_t norm_fwd(const NormFwdParams& p, cudaStream_t stream);

// Backward of NormFwdParams' op. `input` is x (or s when there was a residual); grad_sum, the
// gradient reaching `sum`, is added to grad_input. A null output pointer means "not wanted".
// grad_weight/grad_bias are reduced deterministically: per-block partial sums in `workspace`,
// then a fixed-order sum over the blocks.
struct NormBwdParams {
  const void* grad_out = nullptr;
  const void* grad_sum = nullptr;  // nullable
  const void* input = nullptr;
  const float* mean = nullptr;  // LayerNorm only
  const float* rstd = nullptr;
  const float* weight = nullptr;  // nullable
  void* grad_input = nullptr;
  float* grad_weight = nullptr;
  float* grad_bias = nullptr;  // LayerNorm only
  void* workspace = nullptr;   // norm_bwd_workspace_bytes(p) bytes
  int64_t rows = 0;
  int64_t cols = 0;
  DType dtype = DType::kFloat32;
  bool rms = false;
};

size_t norm_bwd_workspace_bytes(const NormBwdParams& p);
cudaError_t norm_bwd(const NormBwdParams& p, cudaStream_t stream);

// BatchNorm over the channels of x (n, c, hw). Training: batch statistics; eval: the running
// ones. save_mean/save_invstd receive the statistics used. relu fuses max(0, .).
struct BatchNormFwdParams {
  const void* x = nullptr;
  const float* weight = nullptr;        // (c,), nullable
  const float* bias = nullptr;          // (c,), nullable
  const float* running_mean = nullptr;  // (c,), eval only
  const float* running_var = nullptr;   // (c,), eval only
  void* out = nullptr;
  float* save_mean = nullptr;
  float* save_invstd = nullptr;
  void* workspace = nullptr;  // batch_norm_fwd_workspace_bytes(p) bytes
  int64_t n = 0;
  int64_t c = 0;
  int64_t hw = 0;
  float eps = 1e-5f;
  DType dtype = DType::kFloat32;
  bool channels_last = false;
  bool training = true;
  bool relu = false;
};

size_t batch_norm_fwd_workspace_bytes(const BatchNormFwdParams& p);
cudaError_t batch_norm_fwd(const BatchNormFwdParams& p, cudaStream_t stream);

// grad_out has x's layout. With relu, the gradient is masked where the pre-activation output,
// recomputed from x, save_*, weight and bias, is <= 0.
struct BatchNormBwdParams {
  const void* grad_out = nullptr;
  const void* x = nullptr;
  const float* weight = nullptr;  // nullable
  const float* bias = nullptr;    // nullable; read only with relu
  const float* save_mean = nullptr;
  const float* save_invstd = nullptr;
  void* grad_input = nullptr;  // nullable
  float* grad_weight = nullptr;
  float* grad_bias = nullptr;
  void* workspace = nullptr;  // batch_norm_bwd_workspace_bytes(p) bytes
  int64_t n = 0;
  int64_t c = 0;
  int64_t hw = 0;
  DType dtype = DType::kFloat32;
  bool channels_last = false;
  bool training = true;
  bool relu = false;
};

size_t batch_norm_bwd_workspace_bytes(const BatchNormBwdParams& p);
cudaError_t batch_norm_bwd(const BatchNormBwdParams& p, cudaStream_t stream);

}  // namespace fastdl::cuda
