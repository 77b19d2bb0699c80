// Every family's CPU kernels compiled for AVX2 + FMA; chosen at run time by
// csrc/cpu/<family>.cpp when cpu_isa() says so. See csrc/common/vec.h for the ODR rules.
#if defined(__x86_64__)

#include <cstdint>

#include <immintrin.h>

#include "cpu/graph_params.h"
#include "cpu/conv_params.h"
#include "cpu/attention_params.h"
#include "cpu/gemm_params.h"
#include "cpu/int8_params.h"
#include "cpu/norm_params.h"
#include "cpu/rnn_params.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FASTDL_VEC 256
namespace fastdl::cpu::avx2 {
#include "common/vec.h"
#include "common/vec_math.h"
#include "cpu/graph_kernels.h"
#include "cpu/conv_kernels.h"
#include "cpu/gemm_kernels.h"
#include "cpu/int8_kernels.h"
#include "cpu/norm_kernels.h"
#include "cpu/rnn_kernels.h"
#include "cpu/attention_kernels.h"
}  // namespace fastdl::cpu::avx2
#undef FASTDL_VEC
#pragma GCC pop_options

namespace fastdl::cpu {
const NormKernels& norm_kernels_avx2() {
  return avx2::kNormKernels;
}
const GraphKernels& graph_kernels_avx2() {
  return avx2::kGraphKernels;
}
const ConvKernels& conv_kernels_avx2() {
  return avx2::kConvKernels;
}
const RnnKernels& rnn_kernels_avx2() {
  return avx2::kRnnKernels;
}
const AttentionKernels& attention_kernels_avx2() {
  return avx2::kAttentionKernels;
}
const GemmKernels& gemm_kernels_avx2() {
  return avx2::kGemmKernels;
}
const Int8Kernels& int8_kernels_avx2() {
  return avx2::kInt8Kernels;
}
}  // namespace fastdl::cpu

#endif
