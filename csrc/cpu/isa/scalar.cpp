// The norm kernels for the baseline target (no ISA extension assumed; the compiler vectorizes
// the portable vectors for it): the fallback on any CPU and the reference for the SIMD builds.
#include <cstdint>

#include "cpu/int8_params.h"
#include "cpu/norm_params.h"

#define FASTDL_VEC 0
namespace fastdl::cpu::scalar {
#include "common/vec.h"
#include "cpu/int8_kernels.h"
#include "cpu/norm_kernels.h"
}  // namespace fastdl::cpu::scalar
#undef FASTDL_VEC

namespace fastdl::cpu {
const NormKernels& norm_kernels_scalar() {
  return scalar::kNormKernels;
}
const Int8Kernels& int8_kernels_scalar() {
  return scalar::kInt8Kernels;
}
}  // namespace fastdl::cpu
