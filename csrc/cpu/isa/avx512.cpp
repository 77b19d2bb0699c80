// Every family's CPU kernels compiled for AVX-512 (F, BW, VL, DQ) + FMA; chosen at run time by
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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
// GCC 12's AVX-512 intrinsics build their "undefined" vectors by self-initialization, which
// -W(maybe-)uninitialized reports once inlined; the values are never read.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define FASTDL_VEC 512
namespace fastdl::cpu::avx512 {
#include "common/vec.h"
#include "common/vec_math.h"
#include "cpu/graph_kernels.h"
#include "cpu/conv_kernels.h"
#include "cpu/gemm_kernels.h"
#include "cpu/int8_kernels.h"
#include "cpu/norm_kernels.h"
#include "cpu/rnn_kernels.h"
#include "cpu/attention_kernels.h"
}  // namespace fastdl::cpu::avx512
#undef FASTDL_VEC
#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace fastdl::cpu {
const NormKernels& norm_kernels_avx512() {
  return avx512::kNormKernels;
}
const GraphKernels& graph_kernels_avx512() {
  return avx512::kGraphKernels;
}
const ConvKernels& conv_kernels_avx512() {
  return avx512::kConvKernels;
}
const RnnKernels& rnn_kernels_avx512() {
  return avx512::kRnnKernels;
}
const AttentionKernels& attention_kernels_avx512() {
  return avx512::kAttentionKernels;
}
const GemmKernels& gemm_kernels_avx512() {
  return avx512::kGemmKernels;
}
const Int8Kernels& int8_kernels_avx512() {
  return avx512::kInt8Kernels;
}
}  // namespace fastdl::cpu

#endif
