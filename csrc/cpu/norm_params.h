// The interface between csrc/cpu/norm.cpp (torch-facing: checks, allocation, threading) and the
// norm kernels compiled once per ISA (csrc/cpu/isa/*.cpp): launch parameters on raw pointers and
// a table of plain function pointers. Plain data only, so every translation unit can include it
// without sharing any inline code across ISAs.
//
// Element types: T is the tensor dtype (float, double or bfloat16); A is the accumulation and
// statistics type (double for float64, float otherwise). weight/bias pointers are A, already
// converted by norm.cpp, and never null (ones/zeros stand in for a missing parameter).
#pragma once

#include <cstdint>

namespace fastdl::cpu {

enum NormDtype : int { kF32 = 0, kF64 = 1, kBF16 = 2, kNumNormDtypes = 3 };

// LayerNorm / RMSNorm forward; x viewed as (rows, n). Each call handles rows [r0, r1).
struct RowNormFwd {
  const void* x;         // T
  const void* residual;  // T, null without residual
  const void* weight;    // A (n)
  const void* bias;      // A (n), LayerNorm only
  void* out;             // T
  void* sum;             // T, x + residual; null without residual
  void* mean;            // A (rows), LayerNorm only
  void* rstd;            // A (rows)
  int64_t n;
  double eps;
  bool stream;  // non-temporal stores for out/sum (outputs too large to stay in cache)
};

// LayerNorm / RMSNorm backward. Each call handles one block of rows and overwrites the block's
// dweight/dbias partial sums (A, n each) when asked for them.
struct RowNormBwd {
  const void* grad_out;  // T
  const void* grad_sum;  // T, null when the forward had no residual output to differentiate
  const void* input;     // T (x, or x + residual)
  const void* mean;      // A (rows), LayerNorm only
  const void* rstd;      // A (rows)
  const void* weight;    // A (n)
  void* grad_input;      // T, null when not wanted
  int64_t n;
  bool stream;
};

// BatchNorm on x (N, C, HW) contiguous ("nchw") or rows (N * HW, C) ("cl": channels_last, and
// NCHW with HW == 1, which is the same memory).
struct BatchNormArgs {
  const void* x;         // T
  const void* grad_out;  // T, backward only
  const void* weight;    // A (C)
  const void* bias;      // A (C)
  void* mean;            // A (C): written by the training forward, read otherwise
  void* invstd;          // A (C): as mean
  void* out;             // T: y (forward) or grad_input (backward; null when not wanted)
  void* grad_weight;     // A (C), backward; null when not wanted
  void* grad_bias;       // A (C), backward; null when not wanted
  int64_t N, C, HW;
  int64_t block_rows;  // cl: rows per partial-sum block
  double eps;
  bool training, relu, stream;
};

using RowFwdFn = void (*)(const RowNormFwd&, int64_t r0, int64_t r1);
using RowBwdFn = void (*)(const RowNormBwd&, int64_t r0, int64_t r1, void* dw, void* db);
using BnRangeFn = void (*)(const BatchNormArgs&, int64_t begin, int64_t end);
using BnBlockFn = void (*)(const BatchNormArgs&, int64_t b0, int64_t b1, void* partials);
using BnRowsFn = void (*)(const BatchNormArgs&, int64_t r0, int64_t r1, const void* sums);
using BnCombineFn = void (*)(const BatchNormArgs&, const void* partials, int64_t blocks);
using SumBlocksFn = void (*)(const void* part, int64_t blocks, int64_t n, void* out, int64_t j0,
                             int64_t j1);

struct NormKernels {
  // [dtype][has residual]
  RowFwdFn layer_norm_fwd[kNumNormDtypes][2];
  RowFwdFn rms_norm_fwd[kNumNormDtypes][2];
  // [dtype][has grad_sum]
  RowBwdFn layer_norm_bwd[kNumNormDtypes][2];
  RowBwdFn rms_norm_bwd[kNumNormDtypes][2];
  // out[j] = sum over b of part[b * n + j] for j in [j0, j1), b in increasing order, in double.
  // [0]: A = float, [1]: A = double.
  SumBlocksFn sum_blocks[2];

  // NCHW, channels [begin, end): training forward computes and writes mean/invstd first.
  BnRangeFn bn_fwd_nchw[kNumNormDtypes];
  // NCHW backward, channels [begin, end): grad_weight/grad_bias entries and grad_input.
  BnRangeFn bn_bwd_nchw[kNumNormDtypes];
  // cl training statistics: per block of block_rows rows, the per-channel mean and
  // M2 (partials laid out [block][2][C]); then bn_stats_cl_combine writes mean/invstd.
  BnBlockFn bn_stats_cl[kNumNormDtypes];
  BnCombineFn bn_stats_cl_combine[2];
  // cl forward rows [r0, r1) from mean/invstd (sums unused).
  BnRowsFn bn_fwd_cl[kNumNormDtypes];
  // cl backward: per block, the per-channel sums of g and g * (x - mean) (g masked
  // by the ReLU), laid out [block][2][C]; reduced by sum_blocks into `sums` (2 * C, A); then
  // grad_input rows [r0, r1).
  BnBlockFn bn_bwd_sums_cl[kNumNormDtypes];
  BnRowsFn bn_bwd_dx_cl[kNumNormDtypes];
};

// One table per ISA, defined in csrc/cpu/isa/{avx512,avx2,scalar}.cpp.
const NormKernels& norm_kernels_scalar();
#if defined(__x86_64__)
const NormKernels& norm_kernels_avx2();
const NormKernels& norm_kernels_avx512();
#endif

}  // namespace fastdl::cpu
