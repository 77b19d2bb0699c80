// The norm kernels compiled for AVX2 + FMA; chosen at run time by
// csrc/cpu/norm.cpp when cpu_isa() says so. See csrc/common/vec.h for the ODR rules.
#if defined(__x86_64__)

#include <cstdint>

#include <immintrin.h>

#include "cpu/int8_params.h"
#include "cpu/norm_params.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FASTDL_VEC 256
namespace fastdl::cpu::avx2 {
#include "common/vec.h"
#include "cpu/int8_kernels.h"
#include "cpu/norm_kernels.h"
}  // namespace fastdl::cpu::avx2
#undef FASTDL_VEC
#pragma GCC pop_options

namespace fastdl::cpu {
const NormKernels& norm_kernels_avx2() {
  return avx2::kNormKernels;
}
const Int8Kernels& int8_kernels_avx2() {
  return avx2::kInt8Kernels;
}
}  // namespace fastdl::cpu

#endif
