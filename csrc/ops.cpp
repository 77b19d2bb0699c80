// The schema of every native fastdl op, in one place, and the Python module fastdl._C.
// Forward and backward are separate ops; a backward op takes what its forward saved.
#include <string>

#include <torch/extension.h>
#include <torch/library.h>

#include "common/isa.h"

TORCH_LIBRARY(fastdl, m) {
  // ---- norm: x is viewed as (rows, normalized_numel); mean/rstd have shape (rows,) and dtype
  // float32 (float64 for float64 x). `sum` is x + residual (an empty tensor when residual is
  // None); backward ops take it as `input` and add grad_sum to the input gradient.
  // Masked-off gradients (output_mask false) come back as empty tensors.
  m.def(
      "layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
      "int normalized_numel, float eps) -> (Tensor out, Tensor sum, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor? grad_sum, Tensor input, Tensor mean, Tensor rstd, "
      "Tensor? weight, int normalized_numel, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "rms_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, int normalized_numel, float eps) "
      "-> (Tensor out, Tensor sum, Tensor rstd)");
  m.def(
      "rms_norm_bwd(Tensor grad_out, Tensor? grad_sum, Tensor input, Tensor rstd, Tensor? weight, "
      "int normalized_numel, bool[2] output_mask) -> (Tensor grad_input, Tensor grad_weight)");
  // batch_norm: x is (N, C, *); save_mean/save_invstd have shape (C,), dtype as above. Training
  // uses batch statistics (running stats are updated by the caller from save_*), eval uses the
  // running statistics. relu=True fuses max(0, .) and its backward (recomputed from x).
  m.def(
      "batch_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps, bool relu) "
      "-> (Tensor out, Tensor save_mean, Tensor save_invstd)");
  m.def(
      "batch_norm_bwd(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor save_mean, "
      "Tensor save_invstd, bool training, bool relu, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // ---- int8: symmetric int8 quantization and int8 x int8 -> int32 GEMMs with the per-row x
  // per-column dequantization and bias fused into the epilogue. int8_quantize quantizes the
  // rows of x (..., K): q (x's shape, int8) and scale (x.shape[:-1], float32).
  // int8_pack_weight packs w (N, K) into the CPU GEMM's layout (a uint8 buffer, CPU only);
  // int8_linear takes it as w_packed (other backends read w and accept an empty w_packed),
  // quantizes x per row on the fly and keeps input columns with any |x| >= outlier_threshold in
  // floating point (LLM.int8). Its gradient w.r.t. x is composed from torch ops in Python.
  m.def("int8_quantize(Tensor x) -> (Tensor q, Tensor scale)");
  m.def("int8_pack_weight(Tensor w) -> Tensor");
  m.def(
      "int8_matmul(Tensor a, Tensor b, Tensor? a_scale, Tensor? b_scale, Tensor? bias, "
      "ScalarType out_dtype) -> Tensor");
  m.def(
      "int8_linear(Tensor x, Tensor w, Tensor w_packed, Tensor w_scale, Tensor? bias, "
      "float? outlier_threshold) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_isa", [] { return std::string(fastdl::isa_name(fastdl::cpu_isa())); });
  m.def("best_cpu_isa", [] { return std::string(fastdl::isa_name(fastdl::detect_cpu_isa())); });
  m.def("set_cpu_isa",
        [](const std::string& name) { fastdl::set_cpu_isa(fastdl::parse_isa(name.c_str())); });
  m.def("has_cuda", [] {
#ifdef FASTDL_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
