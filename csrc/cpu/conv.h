// What the CPU files of the conv family share (as csrc/cuda/conv.cuh for the CUDA ones): the plan
// of a conv's GEMMs, the layout helpers and the entry points of each path. conv.cpp holds the ops,
// the plan and the implicit GEMM; conv_winograd.cpp the Winograd drivers (their transforms are
// kernels: conv_winograd.h, compiled per ISA); conv_taps.cpp the GEMMs per tap for small images;
// conv_direct.cpp the drivers of the depthwise and grouped direct kernels (conv_kernels.h) and of
// the bfloat16 conv on AMX tiles (conv_amx.h).
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common/conv.h"
#include "cpu/conv_params.h"
#include "cpu/gemm.h"

namespace fastdl::cpu::conv_impl {

// Rows of a block's GEMM when the panel would hold fewer than kDeepRows (deep layers: many
// channels, few pixels). Below that the GEMMs re-read the whole weight, and in the weight
// gradient read and write the whole partial gradient, for a handful of rows each: bound by
// memory instead of the FMAs (512 channels 3x3 took 14 rows a block, 2.6x torch's backward).
constexpr int64_t kDeepRows = 64, kMinRows = 256;
// Most partial sums of the weight gradient (chunks of blocks), and their total memory.
constexpr int64_t kMaxChunks = 16;
constexpr int64_t kPartialBytes = int64_t{64} << 20;
// Their memory where slices of the groups can share a chunk instead (direct_params).
constexpr int64_t kSplitPartialBytes = int64_t{4} << 20;

struct Gemm {
  ConvArgs a;
  int64_t M, j, cg, kg, rows, blocks;
  bool direct;   // 1x1, stride 1, no padding, P x Q = H x W: the NHWC input is the GEMM operand
  int64_t wino;  // the forward runs Winograd F(wino x wino, 3x3); 0: the implicit GEMM
  bool taps;     // where Winograd does not run, the GEMMs run per tap (conv_taps.cpp)
};

// The conv kernels of the ISA this CPU runs.
const ConvKernels& kernels();

// The kernel tables' dtype index of T.
template <typename T>
constexpr int dt() {
  return std::is_same_v<T, double> ? kConvF64 : kConvF32;
}

// Whether x is float32 NCHW memory (not also channels_last): what the conv kernels' own
// transposes take, whole (nhwc) or a block of image rows at a time (conv_winograd.cpp, the
// implicit GEMM's slabs in conv.cpp).
bool nchw_float(const at::Tensor& x);

// float64 for float64 x, else float32 (bfloat16 is computed in float32).
at::ScalarType compute_type(at::ScalarType dtype);
at::ScalarType compute_type(const at::Tensor& x);

// x in compute dtype, NHWC memory ((N, C, H, W) channels_last view).
at::Tensor nhwc(const at::Tensor& x);

// The epilogue that writes out alone (no bias, residual, pre-activation; ConvArgs without an
// activation), in out's dtype, streamed when out is large.
ConvEpilogue plain_epilogue(at::Tensor& out);

// An (N, H, W, C) NHWC buffer as (N, C, H, W) in `fmt` and `dtype`.
at::Tensor from_nhwc(const at::Tensor& t, at::MemoryFormat fmt, at::ScalarType dtype);

// The GEMMs of the conv g with activation `act`, writing through out_like's strides (when
// defined), on operands of `dtype` (computed in compute_type's); the weight (when defined) picks
// its matrix layout. An inference forward (no gradient will flow through it) may take a coarser
// Winograd tile.
Gemm plan(const conv::ConvGeom& g, int act, const at::Tensor& out_like, at::ScalarType dtype,
          const at::Tensor& weight, bool inference = false);

// The GEMM operand wmat^T[k, j] of p in dtype ct (see conv.cpp).
at::Tensor weight_matrix(const at::Tensor& w, const Gemm& p, at::ScalarType ct);

// The packed GEMM operand of elements E: PackedB, or for bfloat16 bits (uint16_t) PackedBBf16.
template <typename E>
using PackedOf = std::conditional_t<std::is_same_v<E, uint16_t>, PackedBBf16, PackedB<E>>;

// Each group's block (kg, j) of wmat as the B operand of the GEMMs that share it, packed once per
// op rather than once per block of rows: wmat^T for the forward (trans), wmat for the input
// gradient.
template <typename E>
std::vector<PackedOf<E>> pack_weight(const Gemm& p, const E* wmat, bool trans);

// Rows [m0, m0 + mb) of out = epilogue(conv(x, wmat)) by the implicit GEMM (conv.cpp); wp is
// pack_weight(p, wmat, true). T: the compute dtype (eb.acc's); E: x's and wmat's, T or (T float)
// bfloat16 bits, multiplied on gemm_bf16. x is NHWC, or with a `slab` NCHW float32 memory: the
// image rows the block reads are transposed into the slab first (not p.direct).
template <typename T, typename E = T>
void forward_rows(const Gemm& p, const E* x, const std::vector<PackedOf<E>>& wp,
                  const ConvEpilogue& eb, int64_t m0, int64_t mb, E* col,
                  std::vector<E>* slab = nullptr);

// Sums chunks partial sums of part elements each, element by element in chunk order (so the
// result does not depend on the thread count), and hands sum i to put(i, sum).
template <typename T, typename Put>
void sum_chunks(const T* partial, int64_t chunks, int64_t part, Put put) {
  at::parallel_for(0, part, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T s = T(0);
      for (int64_t c = 0; c < chunks; ++c) s += partial[c * part + i];
      put(i, s);
    }
  });
}

// conv_winograd.cpp: the forward, weight gradient and input gradient by Winograd F(m x m, 3x3),
// m = p.wino. Each returns false / an undefined tensor, having written nothing, when Winograd
// does not apply or the weight is not finite (the weight gradient also when x or gpre is not);
// the caller then runs the direct path.
bool winograd_forward(const Gemm& p, const at::Tensor& x, const at::Tensor& weight, ConvEpilogue e);
at::Tensor winograd_weight_grad(const Gemm& p, const at::Tensor& x, const float* gpre);
at::Tensor winograd_input_grad(const conv::ConvGeom& g, const at::Tensor& gpre,
                               const at::Tensor& weight, at::MemoryFormat fmt);

// A conv's gradients; the ones not asked for stay undefined.
struct ConvGrads {
  at::Tensor input, weight, bias;
};

// conv_direct.cpp: depthwise convs (groups == C == K > 1) and grouped ones with 2 or 4
// channels a group in and out or 8 to 32 out (a multiple of 8), on direct kernels instead of
// GEMMs (direct_conv). The forward
// through e (x in any layout; T: the compute dtype), and the gradients of the conv g with
// pre-activation gradient gpre ((N, K, P, Q), any layout), the input gradient in `fmt` and
// `dtype`; a strided grouped conv's input gradient stays undefined (the caller's GEMMs).
bool direct_conv(const ConvArgs& a);
template <typename T>
void direct_forward(const Gemm& p, const at::Tensor& x, const at::Tensor& weight,
                    const ConvEpilogue& e);
ConvGrads direct_grads(const conv::ConvGeom& g, const Gemm& p, const at::Tensor& x,
                       const at::Tensor& gpre, const at::Tensor& weight, at::MemoryFormat fmt,
                       at::ScalarType dtype, bool want_input, bool want_weight, bool want_bias);

// conv_direct.cpp too: the input gradient (in `fmt` and `dtype`) of a stride-1 conv g as the
// forward of its adjoint (in and out channels swapped, each group's weight transposed and
// flipped, padding dil (R - 1) - pad) on a direct kernel or AMX tiles (amx_forward, gpre in
// bfloat16); undefined where that does not apply (strided, padded beyond the kernel's reach, or
// an adjoint neither takes).
at::Tensor adjoint_input_grad(const conv::ConvGeom& g, const at::Tensor& gpre,
                              const at::Tensor& weight, at::MemoryFormat fmt, at::ScalarType dtype);

// conv_direct.cpp too: the forward of a dense conv of few input channels and taps
// (conv_plane_fwd where plane_suits and Winograd does not run, x in T, out dense NCHW or NHWC);
// false, having written nothing, for the others.
template <typename T>
bool plane_forward(const Gemm& p, const at::Tensor& x, const at::Tensor& weight,
                   const ConvEpilogue& e);

// conv_direct.cpp too: the forward on AMX tiles without im2col of a bfloat16 conv that suits
// them (groups 1, stride 1, C and K multiples of 32, not per tap; conv_amx.h; x in any layout,
// but a 1x1 conv's NCHW only; out through e); false, having written nothing, for the others.
bool amx_forward(const Gemm& p, const at::Tensor& x, const at::Tensor& weight,
                 const ConvEpilogue& e);
// Test hook: how many convs amx_forward has run (forwards and input gradients).
int64_t conv_amx_runs();

// conv_taps.cpp: the fraction of g's (output pixel, tap) pairs whose tap reads inside the input
// (plan runs the GEMMs per tap at or below kTapsMaxValid), and the three products per tap.
double valid_taps(const conv::ConvGeom& g);
template <typename T>
void taps_forward(const Gemm& p, const T* x, const T* wmat, ConvEpilogue e);
template <typename T>
void taps_input_grad(const Gemm& p, const T* gpre, const T* wmat, T* gx);
template <typename T>
void taps_params(const Gemm& p, const T* x, const T* gpre, T* gw, T* gb);

}  // namespace fastdl::cpu::conv_impl
