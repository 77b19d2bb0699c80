// The interface between csrc/cpu/attention.cpp (torch-facing: checks, blocking, GEMMs, threading)
// and the attention row kernels compiled once per ISA (csrc/cpu/isa/*.cpp): plain function
// pointers on raw rows, indexed by the accumulation type (0: float, 1: double). Plain data only,
// as norm_params.h.
//
// A block of scores is `rows` rows of `cols` values, row r at s + r * ld (A = float or double).
#pragma once

#include <cstdint>

namespace fastdl::cpu {

// FlashAttention-2's online-softmax step (Dao, 2023, Alg. 1) on one block of scores, in place:
// per row, m' = max(m, max_j s_j); s_j <- exp(s_j - m'); l <- l * exp(m - m') + sum_j s_j;
// corr <- exp(m - m') (the factor the caller applies to its output accumulator); m <- m'.
// A row whose m' is -inf (nothing allowed yet) gets s = 0, corr = 1.
using SoftmaxStepFn = void (*)(void* s, int64_t rows, int64_t cols, int64_t ld, void* m, void* l,
                               void* corr);
// The backward's probabilities: s_j <- exp(s_j - lse_r) (0 where lse_r is -inf).
using ExpRowsFn = void (*)(void* s, int64_t rows, int64_t cols, int64_t ld, const void* lse);
// dS = P * (dP - D_r), written over dp.
using DsRowsFn = void (*)(const void* p, void* dp, int64_t rows, int64_t cols, int64_t ld,
                          const void* d);

struct AttentionKernels {
  SoftmaxStepFn softmax_step[2];
  ExpRowsFn exp_rows[2];
  DsRowsFn ds_rows[2];
};

// One table per ISA, defined in csrc/cpu/isa/{avx512,avx2,scalar}.cpp.
const AttentionKernels& attention_kernels_scalar();
#if defined(__x86_64__)
const AttentionKernels& attention_kernels_avx2();
const AttentionKernels& attention_kernels_avx512();
#endif

}  // namespace fastdl::cpu
