// The interface between csrc/cpu/conv*.cpp (torch-facing: checks, layouts, blocking, threading,
// the GEMM calls) and the conv kernels compiled once per ISA (csrc/cpu/isa/*.cpp): parameters on
// raw pointers and a table of plain function pointers. Plain data only (see norm_params.h).
//
// Internally every conv runs on NHWC activations: the GEMM view of a conv2d is
// out[m, k] = sum_j col[m, j] * wmat[j, k] with m = (n, p, q) an output pixel, j = (r, s, c) a
// tap and channel of one group, k an output channel of that group (implicit GEMM, as cuDNN).
// Element type T is float or double (bfloat16 is computed in float by conv.cpp; the epilogue
// reads and writes it: ConvEpilogue::bf16).
#pragma once

#include <cstdint>
#include <vector>

namespace fastdl::cpu {

// ConvArgs::activation's values (fastdl::conv::Activation's).
constexpr int kRelu = 1, kSilu = 2, kGelu = 3;

struct ConvArgs {
  int64_t N, C, H, W, K, R, S, P, Q;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;
  // Layout of out / residual / pre / grad_out, all in the output's memory format: element
  // (n, k, pq) sits at n * out_sn + k * out_sk + pq * out_spq (pq = p * Q + q).
  int64_t out_sn, out_sk, out_spq;
  int activation;  // fastdl::conv::Activation
  // Column order of im2col / col2im: j = (c, r, s), as torch's (K, C/G, R, S) weight, rather
  // than (r, s, c). conv.cpp picks it for deep layers, whose weight the GEMMs then read and
  // write in torch's layout (no copy either way).
  bool crs;
  // x is contiguous NCHW, not NHWC: read so by the grouped broadcast kernels (their copies of
  // x's rows, group_input_rows), the only ones that take it.
  bool x_nchw = false;
};

// Epilogue of one block of GEMM rows [m0, m0 + mb) and one group g: acc is (mb, K / groups),
// row-major; bias (K) may be null, residual/pre may be null. With `stream` (large outputs:
// cpu/output.h, kStreamBytes), whole aligned vectors of out are written non-temporally and the
// kernel fences before it returns (the NCHW depthwise plane kernel keeps ordinary stores). With
// `bf16` (float32 kernels only), residual, pre and out are bfloat16: read widened, stored
// rounded, so a bfloat16 conv writes its output once.
struct ConvEpilogue {
  const void* acc;
  const void* bias;
  const void* residual;
  void* out;
  void* pre;
  bool stream = false;
  bool bf16 = false;
};

// im2col of rows [m0, m0 + mb), groups [g0, g1), from x (N, H, W, C) into col: group g's panel
// (mb, R * S * C / groups) at col + (g - g0) mb R S C / groups, columns in the order of
// ConvArgs::crs. Several groups at once read each pixel's channels once.
using Im2colFn = void (*)(const ConvArgs&, const void* x, int64_t m0, int64_t mb, int64_t g0,
                          int64_t g1, void* col);
// col2im: grad_x (N, H, W, C) += the scatter of gcol (mb, R * S * C / groups) of rows
// [m0, m0 + mb), group g. Rows of different images never touch the same grad_x element.
using Col2imFn = void (*)(const ConvArgs&, const void* gcol, int64_t m0, int64_t mb, int64_t g,
                          void* grad_x);
using EpilogueFn = void (*)(const ConvArgs&, const ConvEpilogue&, int64_t m0, int64_t mb,
                            int64_t g);
// Backward of the epilogue for rows [m0, m1): gpre (M, K) row-major = grad_out * act'(.), read
// from out (relu) or pre (silu, gelu); grad_out/out/pre in the output layout.
using EpilogueBwdFn = void (*)(const ConvArgs&, const void* grad_out, const void* out,
                               const void* pre, void* gpre, int64_t m0, int64_t m1);
// Depthwise (groups == C == K) direct conv on NHWC, vectorized over channels, for output rows
// (n, p) in [r0, r1): out/pre via the epilogue of ConvEpilogue (acc unused); x in the compute
// dtype or (x_bf16, float kernels) bfloat16, the weight blocked (depthwise_ring), scratch of
// depthwise_scratch(a) elements.
using DepthwiseFwdFn = void (*)(const ConvArgs&, const void* x, bool x_bf16, const void* w_blocked,
                                const ConvEpilogue&, int64_t r0, int64_t r1, void* scratch);
// Bytes of the lane masks of flat NCHW planes (conv_kernels.h): a uint32 by tap for every vector
// of an output plane (vectors of 8 lanes or more).
inline int64_t depthwise_mask_bytes(const ConvArgs& a) {
  return (a.P * a.Q + 7) / 8 * a.R * a.S * 4;
}
// Whether a depthwise conv's NCHW planes are taken flat: stride 1, output rows as wide as the
// input's, and a mask table of at most 1 MiB (a 3x3 on planes up to ~480x480; larger ones run
// row tiles).
inline bool depthwise_flat(const ConvArgs& a) {
  return a.stride_h == 1 && a.stride_w == 1 && a.Q == a.W && depthwise_mask_bytes(a) <= (1 << 20);
}
// The forward takes them flat only with at most 9 taps: few enough that reloading each for every
// output vector costs less than the partial vectors of row tiles (a 7x7 kernel took 2.3 ms flat
// against 1.0 in row tiles for 8 x 192 x 28 x 28, a 3x3 2.5 against 3.2 for 32 x 96 x 56 x 56).
inline bool depthwise_flat_fwd(const ConvArgs& a) {
  return depthwise_flat(a) && a.R * a.S <= 9;
}
// Elements of each half of a row split by parity for the NCHW depthwise forward at stride_w 2
// (conv_kernels.h): the output columns plus the farthest tap's shift (S - 1) dil_w / 2, in whole
// vectors (of 16 lanes or fewer).
inline int64_t depthwise_split_len(const ConvArgs& a) {
  return (a.Q + (a.S - 1) * a.dil_w / 2 + 15) / 16 * 16;
}
// Elements of the column masks of the flat NCHW 3x3 depthwise kernels (conv_kernels.h): two
// vectors (of 16 lanes or fewer) for each of an output row's period of Q / gcd(Q, lanes) vectors.
inline int64_t depthwise_col_mask_elems(const ConvArgs& a) {
  return a.Q * 2 * 16;
}
// Scratch of the kernels on flat NCHW planes in elements of `elem` bytes: the lane masks, then
// from depthwise_col_mask_offset on the column masks.
inline int64_t depthwise_col_mask_offset(const ConvArgs& a, int64_t elem) {
  return depthwise_mask_bytes(a) / elem + 1;
}
inline int64_t depthwise_flat_scratch(const ConvArgs& a, int64_t elem) {
  return depthwise_col_mask_offset(a, elem) + depthwise_col_mask_elems(a);
}
// Scratch of the NCHW depthwise forward (DepthwisePlaneFwdFn) in elements of `elem` bytes: the
// split rows at stride_w 2 (and a zero one), depthwise_flat_scratch where depthwise_flat_fwd;
// then, for a bfloat16 x, one plane widened.
inline int64_t depthwise_plane_scratch(const ConvArgs& a, int64_t elem, bool x_bf16) {
  const int64_t wide = x_bf16 ? a.H * a.W : 0;
  if (a.stride_w == 2) return 2 * (a.H + 1) * depthwise_split_len(a) + wide;
  return (depthwise_flat_fwd(a) ? depthwise_flat_scratch(a, elem) : 0) + wide;
}
// Depthwise conv with stride_w 1 or 2 on NCHW x and out/pre/residual (out_spq == 1), weight
// (C, R, S), for planes (n, c) in [plane0, plane1); x in the kernel's dtype or, with x_bf16 (a
// float32 kernel), bfloat16 bits; scratch of depthwise_plane_scratch.
using DepthwisePlaneFwdFn = void (*)(const ConvArgs&, const void* x, bool x_bf16, const void* w_crs,
                                     const ConvEpilogue&, int64_t plane0, int64_t plane1,
                                     void* scratch);

// Dense convs (groups 1, not 1x1) with few input channels and taps (plane_suits: an image
// model's stem), stride_w 1 or 2 (csrc/cpu/conv_plane.h): SIMD over the pixels of the output
// planes (NCHW out; NHWC out transposed a tile at a time). A block of output rows first copies
// the input rows it reads, of every channel, zero-padded into scratch: `halves` rows of `len`
// elements for each (at stride_w 2 two, its even and odd columns, so that every tap is a
// contiguous load), from column -pad_w on, whole 16-lane vectors of output columns plus the
// farthest tap's shift. Blocks of `rows` output rows of one image (the last one shorter), their
// `in_rows` input rows aiming at ~96 KiB (in L2). Against the implicit GEMM (im2col, then the
// output transposed back to NCHW), on 32 NCHW images: the 7x7 stride-2 stem of 224x224 RGB 32
// against 53 ms, a 3x3 of 3 channels 27 against 64, of 16 channels stride 2 3.1 against 3.5, a
// 5x5 of 16 channels 41 against 67; at 24 to 44 channels of 3x3 the GEMMs were 0-10% faster
// (Winograd, where it runs, as fast at 16).
constexpr int64_t kPlaneMaxChannels = 16, kPlaneMaxTaps = 512;
inline bool plane_suits(const ConvArgs& a) {
  return a.groups == 1 && a.stride_w <= 2 && a.R * a.S > 1 && a.C <= kPlaneMaxChannels &&
         a.C * a.R * a.S <= kPlaneMaxTaps;
}
struct PlaneRows {
  int64_t halves, len, rows, in_rows, blocks;  // blocks: of one image
};
inline PlaneRows plane_rows(const ConvArgs& a, int64_t elem) {
  PlaneRows g{};
  g.halves = a.stride_w == 2 ? 2 : 1;
  g.len = ((a.Q + 15) / 16 * 16 + (a.S - 1) * a.dil_w / g.halves + 15) / 16 * 16;
  const int64_t row_bytes = a.stride_h * a.C * g.halves * g.len * elem;
  const int64_t rows = (int64_t{96} << 10) / (row_bytes > 0 ? row_bytes : 1);
  g.rows = rows < 1 ? 1 : (rows > a.P ? a.P : rows);
  g.in_rows = (g.rows - 1) * a.stride_h + (a.R - 1) * a.dil_h + 1;
  g.blocks = (a.P + g.rows - 1) / g.rows;
  return g;
}
// Output channels a tile (wt's last dimension), and the most pixels a tile (two vectors of 16).
constexpr int64_t kPlaneChannels = 8, kPlanePixels = 32;
// Scratch elements: the input rows; for an NHWC out (out_spq != 1), a tile's accumulators of
// every channel, then the tile transposed (a pixel's channels a row); room to align it.
inline int64_t plane_scratch(const ConvArgs& a, int64_t elem) {
  const PlaneRows g = plane_rows(a, elem);
  const int64_t kp = (a.K + kPlaneChannels - 1) / kPlaneChannels * kPlaneChannels;
  const int64_t tiles = a.out_spq == 1 ? 0 : kPlanePixels * (kp + a.K);
  return a.C * g.in_rows * g.halves * g.len + tiles + 64 / elem;
}
// The forward of blocks [b0, b1) (block b: image b / blocks, its rows from b % blocks * rows on),
// x in the kernel's dtype, NCHW memory or (x_cl) NHWC, out NCHW or NHWC; the weight as wt
// (ceil(K / kPlaneChannels), C R S, kPlaneChannels), zero past K: wt[k / kPlaneChannels][t][k %
// kPlaneChannels] = w[k][t] (t = (c, r, s)).
using PlaneFwdFn = void (*)(const ConvArgs&, const void* x, bool x_cl, const void* wt,
                            const ConvEpilogue&, int64_t b0, int64_t b1, void* scratch);

// Grouped convs on NHWC x (NCHW where a.x_nchw, grouped_bcast_fwd only), for output rows (n, p)
// in [r0, r1), out/pre via the epilogue (csrc/cpu/conv_grouped.h). grouped_fwd: C == K and kg = C /
// groups in {2, 4}, the weight as wt (R, S, kg, C). grouped_bcast_fwd: kg = K / groups a multiple
// of 8 up to 32, any C / groups, the weight as (groups, kg / sw, R, S, C / groups, sw), sw =
// grouped_bcast_slice(kg) (the output channels a forward tile computes: kg, or a slice of them);
// scratch of group_scratch(a) elements (the other ignores it).
using GroupedFwdFn = void (*)(const ConvArgs&, const void* x, const void* wt, const ConvEpilogue&,
                              int64_t r0, int64_t r1, void* scratch);
using GroupedSliceFn = int64_t (*)(int64_t kg);
// Gradients of a depthwise conv (groups == C == K) on NHWC gy (N, P, Q, C): the input gradient
// of input rows (n, h) in [r0, r1) written into gx (N, H, W, C), weight w_rsc (R, S, C). And the
// weight and bias gradients of the direct kernels, over output rows (n, p) in [r0, r1): part
// (rows + 1, K) += the gy * x products of each of its rows (rows as the forward's weight:
// depthwise (r, s), grouped (r, s, t), grouped_bcast (g, r, s, c) with K / groups columns; none
// when x is null) and gy's sum (the last row); scratch as GroupedFwdFn's. The broadcast kernels
// add only their groups [g0, g1) (pairs of groups for the pairs kernel) and those groups' bias
// channels; the others take g0 = 0, g1 = 1 for all of them.
using DepthwiseBwdInputFn = void (*)(const ConvArgs&, const void* gy, const void* w_rsc, void* gx,
                                     int64_t r0, int64_t r1);
using DirectParamsFn = void (*)(const ConvArgs&, const void* x, const void* gy, void* part,
                                int64_t r0, int64_t r1, int64_t g0, int64_t g1, void* scratch);
// Weight and bias gradients of a depthwise conv on flat NCHW planes (depthwise_flat): each plane
// (n, c) in [plane0, plane1)'s R S + 1 sums (its taps' weight gradients, then its bias gradient;
// the latter alone when x is null) into sums (N C, R S + 1); scratch of depthwise_flat_scratch.
using DepthwisePlaneParamsFn = void (*)(const ConvArgs&, const void* x, const void* gy, void* sums,
                                        int64_t plane0, int64_t plane1, void* scratch);

// The grouped broadcast kernels read x through zero-padded copies of each group's input rows
// (group_chunk groups at a time): for a block of up to group_block_rows output rows of one image,
// the group_input_row_count input rows they read, each group_row_width(a) pixels of C / groups
// channels from column -pad_w on. A forward tile has at most kGroupTile pixels, and may read past
// the last output pixel up to the end of its tile. Blocks aim at ~128 KiB of input rows (in L2 for
// every group, with the next block's and the output gradient's), at least 32 output pixels (for
// which each group's weights are read once; a whole image where that is over half of it), at most
// 64 rows.
constexpr int64_t kGroupTile = 14;
inline int64_t group_block_rows(const ConvArgs& a, int64_t elem) {
  const int64_t row_bytes = a.stride_h * a.W * a.C * elem;
  int64_t rows = (int64_t{128} << 10) / (row_bytes > 0 ? row_bytes : 1);
  const int64_t pixels = (32 + a.Q - 1) / (a.Q > 0 ? a.Q : 1);
  rows = rows > pixels ? rows : pixels;
  rows = rows * 2 > a.P ? a.P : rows;  // blocks stay within an image: the whole one
  return rows < 1 ? 1 : (rows > 64 ? 64 : rows);
}
inline int64_t group_input_row_count(const ConvArgs& a, int64_t block_rows) {
  return (block_rows - 1) * a.stride_h + (a.R - 1) * a.dil_h + 1;
}
inline int64_t group_row_width(const ConvArgs& a) {
  return (a.Q + kGroupTile - 2) * a.stride_w + (a.S - 1) * a.dil_w + 1;
}
// One group's copy, in elements.
inline int64_t group_rows_elems(const ConvArgs& a, int64_t elem) {
  return group_input_row_count(a, group_block_rows(a, elem)) * group_row_width(a) *
         (a.C / a.groups);
}
// The groups whose rows a block copies in one pass, each pixel's channels of them read at once:
// 256 bytes (4 cache lines) where the groups are narrower. One group a pass (32 bytes of every
// pixel, a call per group) and a copy of the tiles' columns past the row besides: a ResNeXt
// forward (32 groups of 8 channels, 28 x 28, on a Zen 3) ~20% slower.
inline int64_t group_chunk(const ConvArgs& a, int64_t elem) {
  const int64_t bytes = a.C / (a.groups > 0 ? a.groups : 1) * elem;
  const int64_t chunk = bytes > 0 ? 256 / bytes : 1;
  return chunk < 1 ? 1 : (chunk > a.groups ? a.groups : chunk);
}
// One group's copy of a block's output gradient (the weight gradient's), or its outputs before
// the epilogue (the forward's): pixels of K / groups.
inline int64_t group_gy_elems(const ConvArgs& a, int64_t elem) {
  return group_block_rows(a, elem) * a.Q * (a.K / a.groups);
}
inline int64_t group_scratch(const ConvArgs& a, int64_t elem) {
  return group_chunk(a, elem) * (group_rows_elems(a, elem) + group_gy_elems(a, elem));
}

// The NHWC depthwise forward reads x through a ring of `slots` zero-padded copies of input rows
// (the (R - 1) dil_h + 1 that one output row spans; input row h in slot h % slots), `row`
// elements apart: `width` pixels from column -pad_w on (whole tiles of up to kDepthwiseTile
// output pixels, past Q), `pixel` elements apart: the channels rounded up to whole cache lines
// (lanes past C zero), one more line where that makes an even number: pixels a power-of-2 lines
// apart (C = 256 floats: 1 KiB) fall in few of L1's sets, and a run of pixels' taps missed L1
// (a standalone 3x3 loop: 22.6 cycles a vector at C = 256, 14.6 at C = 240). The weight is
// blocked, (C / L, R S, L) with L channels a cache line (zero past C): a vector's taps in
// consecutive lines.
constexpr int64_t kDepthwiseTile = 8;
struct DepthwiseRing {
  int64_t width, pixel, row, slots;
};
inline DepthwiseRing depthwise_ring(const ConvArgs& a, int64_t elem) {
  const int64_t line = 64 / elem;
  const int64_t span = (a.Q + kDepthwiseTile - 1) / kDepthwiseTile * kDepthwiseTile;
  DepthwiseRing g{};
  g.width = (span - 1) * a.stride_w + (a.S - 1) * a.dil_w + 1;
  g.pixel = (a.C + line - 1) / line * line;
  if (g.pixel / line % 2 == 0) g.pixel += line;
  g.row = g.width * g.pixel;
  if (g.row * elem % 4096 == 0) g.row += line;  // slots apart by a multiple of 4 KiB alias too
  g.slots = (a.R - 1) * a.dil_h + 1;
  return g;
}
inline int64_t depthwise_scratch(const ConvArgs& a, int64_t elem) {
  const DepthwiseRing g = depthwise_ring(a, elem);
  return g.slots * g.row + 64 / elem;  // and a cache line's room to align it
}

// dst[c ldd + r] = src[r lds + c] for r < rows, c < cols (NCHW <-> NHWC).
using TransposeFn = void (*)(const void* src, int64_t lds, void* dst, int64_t ldd, int64_t rows,
                             int64_t cols);
// Winograd F(m x m, 3x3) transforms (csrc/cpu/conv_winograd.h), float32 only, one entry per
// tile size (kWinograd2, kWinograd4): the weight transform of input channels [c0, c1) of
// w (C, 3, 3, K) into u ((m + 2)^2, C, K); on blocks of nt tiles from tile t0 on, the input
// transform of x (N, H, W, C), its image rows from row0 on, into v ((m + 2)^2, nt, C), false
// when an input it read is not finite; the output transform of m ((m + 2)^2, nt, K) into the
// output rows from m0 on, acc (rows, K). For the weight gradient, their adjoints: the output
// gradient gy (N, P, Q, K) of nt tiles into dm ((m + 2)^2, nt, K), false when a value it read is
// not finite; du ((m + 2)^2, C, K) of input channels [c0, c1) into dw (C, 3, 3, K). The weight
// transform returns false when a weight it read is not finite. The points of v, m and dm lie
// ldv, ldm and ldd elements apart (conv_winograd.cpp skews them off multiples of 4 KiB).
using WinogradWeightFn = bool (*)(const void* w, int64_t C, int64_t K, int64_t c0, int64_t c1,
                                  void* u);
using WinogradGradWeightFn = void (*)(const void* du, int64_t C, int64_t K, int64_t c0, int64_t c1,
                                      void* dw);
using WinogradInputFn = bool (*)(const ConvArgs&, const void* x, int64_t row0, int64_t t0,
                                 int64_t nt, void* v, int64_t ldv);
using WinogradOutputFn = void (*)(const ConvArgs&, const void* m, int64_t ldm, int64_t t0,
                                  int64_t nt, int64_t m0, void* acc);
using WinogradGradOutputFn = bool (*)(const ConvArgs&, const void* gy, int64_t t0, int64_t nt,
                                      void* dm, int64_t ldd);
enum WinogradTile : int { kWinograd2 = 0, kWinograd4 = 1, kNumWinogradTiles = 2 };

enum ConvDtype : int { kConvF32 = 0, kConvF64 = 1, kNumConvDtypes = 2 };

struct ConvKernels {
  Im2colFn im2col[kNumConvDtypes];
  Col2imFn col2im[kNumConvDtypes];
  EpilogueFn epilogue[kNumConvDtypes];
  EpilogueBwdFn epilogue_bwd[kNumConvDtypes];
  DepthwiseFwdFn depthwise_fwd[kNumConvDtypes];
  DepthwisePlaneFwdFn depthwise_plane_fwd[kNumConvDtypes];
  GroupedFwdFn grouped_fwd[kNumConvDtypes];
  DepthwiseBwdInputFn depthwise_bwd_input[kNumConvDtypes];
  DirectParamsFn depthwise_bwd_params[kNumConvDtypes];
  DepthwisePlaneParamsFn depthwise_plane_bwd_params[kNumConvDtypes];
  DirectParamsFn grouped_bwd_params[kNumConvDtypes];
  GroupedFwdFn grouped_bcast_fwd[kNumConvDtypes];
  GroupedSliceFn grouped_bcast_slice[kNumConvDtypes];
  PlaneFwdFn plane_fwd[kNumConvDtypes];
  DirectParamsFn grouped_bcast_bwd_params[kNumConvDtypes];
  // float32, 8 channels a group in and out, an even number of groups, in pairs of groups: the
  // weight (groups / 2, R, S, 8, 16), part likewise; null where the ISA has none (conv_grouped.h).
  GroupedFwdFn grouped_pairs_fwd;
  DirectParamsFn grouped_pairs_bwd_params;
  TransposeFn transpose[kNumConvDtypes];
  WinogradWeightFn winograd_weight[kNumWinogradTiles];
  WinogradInputFn winograd_input[kNumWinogradTiles];
  WinogradOutputFn winograd_output[kNumWinogradTiles];
  WinogradGradOutputFn winograd_grad_output[kNumWinogradTiles];
  WinogradGradWeightFn winograd_grad_weight[kNumWinogradTiles];
  Im2colFn im2col_bf16;  // bfloat16 bits, for the forward on gemm_bf16
};

// Dense stride-1 convs of bfloat16 x (NHWC, or NCHW with x_nchw) on AMX tiles without im2col
// (csrc/cpu/conv_amx.h; only where cpu_amx()): output rows [p0, p1) of image n, the blocks of
// kAmxBlock flat positions (Wp = W + 2 pad_w a row) read from `pad`, a zero-padded copy of the
// input rows (amx_pad_rows of Wp x C values, zeroed by the caller before its first band), into
// `ring` (amx_ring_positions x K floats), each finished output row through e's epilogue (the
// common bfloat16 ones in the kernel, the others through `epi`). C and K multiples of 32; w
// packed by conv_direct.cpp's amx_weight.
constexpr int64_t kAmxBlock = 32;
inline int64_t amx_padded_width(const ConvArgs& a) {
  return a.W + 2 * a.pad_w;
}
// The padded rows that flat positions [0, end) read, the taps' reach included.
inline int64_t amx_rows_read(const ConvArgs& a, int64_t end) {
  const int64_t wp = amx_padded_width(a);
  return (end + (a.R - 1) * a.dil_h * wp + (a.S - 1) * a.dil_w + wp - 1) / wp;
}
// A band's: its positions in whole blocks (the last block's overrun is read, then dropped).
inline int64_t amx_pad_rows(const ConvArgs& a, int64_t band) {
  return amx_rows_read(a, (band * amx_padded_width(a) + kAmxBlock - 1) / kAmxBlock * kAmxBlock);
}
// From the start of the oldest row not yet through the epilogue to the end of the block being
// computed: at most Wp + kAmxBlock positions, in whole blocks.
inline int64_t amx_ring_positions(const ConvArgs& a) {
  return (amx_padded_width(a) + kAmxBlock - 1) / kAmxBlock * kAmxBlock + kAmxBlock;
}
using AmxBandFn = void (*)(const ConvArgs&, const uint16_t* x, bool x_nchw, const uint32_t* w,
                           int64_t n, int64_t p0, int64_t p1, uint16_t* pad, float* ring,
                           const ConvEpilogue& e, EpilogueFn epi);

const ConvKernels& conv_kernels_scalar();
#if defined(__x86_64__)
const ConvKernels& conv_kernels_avx2();
const ConvKernels& conv_kernels_avx512();
AmxBandFn conv_amx_band();
#endif

}  // namespace fastdl::cpu
