// The GEMM kernels compiled once more for AVX-512 with AMX-TILE and AMX-BF16 (Sapphire Rapids
// on): the same table, its bfloat16 block kernel on AMX tiles (cpu/gemm_kernels.h, gemm_amx),
// and the bfloat16 stride-1 conv on tiles (cpu/conv_amx.h). csrc/cpu/gemm.cpp and conv_direct.cpp
// run them where cpu_amx() says so. See csrc/common/vec.h for the ODR rules.
#if defined(__x86_64__)

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <immintrin.h>

#include "cpu/conv_params.h"
#include "cpu/gemm_params.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16,amx-tile,amx-bf16")
// As csrc/cpu/isa/avx512.cpp: GCC 12's AVX-512 intrinsics trip -W(maybe-)uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define FASTDL_VEC 512
#define FASTDL_AMX
namespace fastdl::cpu::amx {
#include "common/vec.h"
#include "cpu/gemm_kernels.h"
#include "cpu/conv_amx.h"
}  // namespace fastdl::cpu::amx
#undef FASTDL_AMX
#undef FASTDL_VEC
#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace fastdl::cpu {
const GemmKernels& gemm_kernels_amx() {
  return amx::kGemmKernels;
}
AmxBandFn conv_amx_band() {
  return &amx::conv_amx::band;
}
}  // namespace fastdl::cpu

#endif
