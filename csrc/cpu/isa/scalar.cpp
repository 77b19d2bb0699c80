// Every family's CPU kernels for the baseline target (no ISA extension assumed; the compiler
// vectorizes the portable vectors for it): the fallback on any CPU and the reference for the
// SIMD builds.
//
// Optimized as at -O2, not the extension's -O3: GCC 12 took 5 minutes over this file at -O3 (the
// longest of the build, alone on one of CI's two cores at its end) and under 3 at -O2, which
// still vectorizes the portable vectors' fixed-length loops.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O2")
#endif
#include <cstdint>

#include "cpu/graph_params.h"
#include "cpu/conv_params.h"
#include "cpu/attention_params.h"
#include "cpu/gemm_params.h"
#include "cpu/int8_params.h"
#include "cpu/norm_params.h"
#include "cpu/rnn_params.h"

#define FASTDL_VEC 0
namespace fastdl::cpu::scalar {
#include "common/vec.h"
#include "common/vec_math.h"
#include "cpu/graph_kernels.h"
#include "cpu/conv_kernels.h"
#include "cpu/gemm_kernels.h"
#include "cpu/int8_kernels.h"
#include "cpu/norm_kernels.h"
#include "cpu/rnn_kernels.h"
#include "cpu/attention_kernels.h"
}  // namespace fastdl::cpu::scalar
#undef FASTDL_VEC

namespace fastdl::cpu {
const NormKernels& norm_kernels_scalar() {
  return scalar::kNormKernels;
}
const GraphKernels& graph_kernels_scalar() {
  return scalar::kGraphKernels;
}
const ConvKernels& conv_kernels_scalar() {
  return scalar::kConvKernels;
}
const RnnKernels& rnn_kernels_scalar() {
  return scalar::kRnnKernels;
}
const AttentionKernels& attention_kernels_scalar() {
  return scalar::kAttentionKernels;
}
const GemmKernels& gemm_kernels_scalar() {
  return scalar::kGemmKernels;
}
const Int8Kernels& int8_kernels_scalar() {
  return scalar::kInt8Kernels;
}
}  // namespace fastdl::cpu
