// CPU implementations of the conv ops (schemas in csrc/ops.cpp): checks (csrc/common/conv.h),
// layouts, blocking and threading, and the GEMMs. The kernels around the GEMMs (im2col, col2im,
// the fused epilogue, the direct depthwise conv) are in csrc/cpu/conv_kernels.h, compiled per
// ISA.
//
// Every conv is an implicit GEMM on NHWC activations (conv_params.h): rows m = output pixels,
// cut into blocks whose im2col panel fits in L2 (at least kMinRows rows for deep layers), each
// block's GEMM run by cpu/gemm.h (fastdl's own for float32) and its epilogue applied while the
// block is in cache. NCHW inputs are read once into
// NHWC; 1x1 stride-1 convs need no im2col (the NHWC input already is the GEMM operand). The
// backward reuses the same blocks: grad_weight = col^T * grad_pre, grad_input = col2im(grad_pre *
// wmat^T). Small images, where over a quarter of the (pixel, tap) pairs read padding, run one GEMM
// per tap on the pixels that read the image instead (TapBlocks), and stride-1 3x3 convs with
// enough pixels Winograd (conv_winograd.h). conv_transpose2d is the adjoint conv2d
// (common/conv.h), so its forward is the conv2d input gradient.
//
// bfloat16 is computed in float32 (converted at the edges). Determinism: the weight/bias
// gradient sums run over chunks of blocks fixed by the shapes alone, merged in a fixed order, so
// results are bit-identical from run to run and for any number of threads.
#include <algorithm>
#include <cstdlib>
#include <array>
#include <atomic>
#include <memory>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/conv.h"
#include "common/isa.h"
#include "cpu/conv_params.h"
#include "cpu/gemm.h"
#include "cpu/output.h"

namespace fastdl::cpu {
namespace {

constexpr const char* kConv = "fastdl.conv2d";
constexpr const char* kConvT = "fastdl.conv_transpose2d";
constexpr std::initializer_list<c10::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kBFloat16};
// Bytes of one block's im2col panel: it stays in L2 between im2col, GEMM and epilogue.
constexpr int64_t kPanelBytes = int64_t{256} << 10;
// Rows of a block's GEMM when the panel would hold fewer than kDeepRows (deep layers: many
// channels, few pixels). Below that the GEMMs re-read the whole weight, and in the weight
// gradient read and write the whole partial gradient, for a handful of rows each: bound by
// memory instead of the FMAs (512 channels 3x3 took 14 rows a block, 2.6x torch's backward).
constexpr int64_t kDeepRows = 64, kMinRows = 256;
// Winograd F(m x m, 3x3) (cpu/conv_winograd.h) for float32 stride-1 undilated ungrouped 3x3
// convs with at least kWinogradMinCK channel pairs (fewer leave its GEMMs too little depth and
// width) and a transformed weight ((m + 2)^2 C K floats) no larger than the transformed input and
// output ((m + 2)^2 tiles (C + K)): on Zen 4, 256 channels on 32 images of 8x8 (equal sizes for
// m = 4) ran in 10 ms against 14 ms direct, 512 channels on 4x4 (m = 4: 1/8 the size) in 40-55
// against 15, and its forward + backward with m = 2 (1/2) in 62 against 44.
// A block holds at least kWinogradMinTiles tiles (rows of the GEMMs) and otherwise as many as
// keep its transformed input and products ((m + 2)^2 x tiles x (C + K) floats) within
// kWinogradBlockBytes of L2.
constexpr int64_t kWinogradMinCK = 16 * 16, kWinogradMinTiles = 24;
constexpr int64_t kWinogradBlockBytes = int64_t{512} << 10;
// Tiles of a weight-gradient block: the depth of its GEMMs V^T dM, each of which reads and
// rewrites a C x K partial (24 tiles left 256 channels on 8x8 at 0.55x torch; bound by those
// passes, not the FMAs).
constexpr int64_t kWinogradGradTiles = 256;
// Small images (deep layers): a 3x3 window with padding 1 on a 4x4 image reads padding at 31% of
// its taps, whose zeros im2col writes and the GEMMs multiply. When at most kTapsMaxValid of the
// taps read the image, the GEMMs run per tap instead, on just the rows whose tap lies inside it
// (conv_taps below): 512 channels on 32 images of 4x4 (ResNet-18's last stage on 32x32 inputs)
// ran forward in 10 ms against 14, forward + backward in 36-39 against 48. At 84% (3x3 stride 2
// from 8x8 to 4x4) it measured no faster.
constexpr double kTapsMaxValid = 0.75;
// Their blocks hold about kMinRows rows, in at least kTapBlocks blocks when there are as many
// images (a batch of 16 on 2x2 would otherwise be one block, for one thread).
constexpr int64_t kTapBlocks = 2;
// Input channels of a weight-gradient GEMM of the taps (its B, packed per call).
constexpr int64_t kTapWgradCols = 256;
// Most partial sums of the weight gradient (chunks of blocks), and their total memory.
constexpr int64_t kMaxChunks = 16;
constexpr int64_t kPartialBytes = int64_t{64} << 20;

const ConvKernels& kernels() {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::kAvx512:
      return conv_kernels_avx512();
    case Isa::kAvx2:
      return conv_kernels_avx2();
#endif
    default:
      return conv_kernels_scalar();
  }
}

template <typename T>
constexpr int dt() {
  return std::is_same_v<T, double> ? kConvF64 : kConvF32;
}

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// dst = src transposed image by image: N images of rows x cols into cols x rows, all in parallel
// (NCHW <-> NHWC through the conv kernels' transpose, ~2x torch's permute copy here).
void transpose_images(const float* src, int64_t N, int64_t rows, int64_t cols, float* dst) {
  constexpr int64_t kStep = 64;  // rows per task, a multiple of the 16-row register blocks
  const int64_t per = (rows + kStep - 1) / kStep;
  at::parallel_for(0, N * per, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / per, r0 = b % per * kStep;
      kernels().transpose[kConvF32](src + (n * rows + r0) * cols, cols, dst + n * rows * cols + r0,
                                    rows, std::min(kStep, rows - r0), cols);
    }
  });
}

// Whether x is float32 NCHW memory (not also channels_last): what the conv kernels' own
// transposes take, whole (nhwc below) or a block of image rows at a time (WinogradSource).
bool nchw_float(const at::Tensor& x) {
  return x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous() &&
         !x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// x in compute dtype, NHWC memory ((N, C, H, W) channels_last view).
at::Tensor nhwc(const at::Tensor& x) {
  if (nchw_float(x)) {
    at::Tensor y = new_output(x.sizes(), x.options(), at::MemoryFormat::ChannelsLast);
    transpose_images(x.const_data_ptr<float>(), x.size(0), x.size(1), x.size(2) * x.size(3),
                     y.data_ptr<float>());
    return y;
  }
  return as_output(x, compute_type(x), at::MemoryFormat::ChannelsLast);
}

// t ((N, C, H, W), dense channels_last) in `fmt` and `dtype`.
at::Tensor from_channels_last(const at::Tensor& t, at::MemoryFormat fmt, at::ScalarType dtype) {
  if (fmt == at::MemoryFormat::Contiguous && dtype == at::kFloat && t.scalar_type() == at::kFloat &&
      !t.is_contiguous()) {
    at::Tensor y = new_output(t.sizes(), t.options());
    transpose_images(t.const_data_ptr<float>(), t.size(0), t.size(2) * t.size(3), t.size(1),
                     y.data_ptr<float>());
    return y;
  }
  return as_output(t, dtype, fmt);
}

// The Winograd tile size m (cpu/conv_winograd.h): FASTDL_CONV_WINOGRAD=2 (the default: float32
// error of a direct conv, so training follows torch's as closely as the direct path), 4 (a 4x
// instead of 2.25x cut, ~10x the rounding error: for inference) or 0 (every conv runs the
// implicit GEMM); read once, at the first conv.
int64_t winograd_setting() {
  static const int64_t m = [] {
    const char* v = std::getenv("FASTDL_CONV_WINOGRAD");
    const std::string_view s = v == nullptr ? "2" : v;
    return s == "0" ? 0 : s == "2" ? 2 : 4;
  }();
  return m;
}

struct Gemm {
  ConvArgs a;
  int64_t M, j, cg, kg, rows, blocks;
  bool direct;   // 1x1, stride 1, no padding, P x Q = H x W: the NHWC input is the GEMM operand
  int64_t wino;  // the forward runs Winograd F(wino x wino, 3x3); 0: the implicit GEMM
  bool taps;     // where Winograd does not run, the GEMMs run per tap (conv_taps below)
};

// Output positions [first, second) along one axis whose tap t reads inside the input (o * stride
// - pad + t * dil in [0, size)).
std::pair<int64_t, int64_t> tap_range(int64_t out, int64_t size, int64_t stride, int64_t pad,
                                      int64_t dil, int64_t t) {
  const int64_t off = t * dil - pad;  // input position o * stride + off
  const int64_t lo = off >= 0 ? 0 : (-off + stride - 1) / stride;
  const int64_t hi = size - 1 - off < 0 ? 0 : (size - 1 - off) / stride + 1;
  return {std::min(lo, out), std::clamp(hi, std::min(lo, out), out)};
}

// The fraction of a conv's (output pixel, tap) pairs whose tap reads inside the input.
double valid_taps(const conv::ConvGeom& g) {
  int64_t rows = 0, cols = 0;
  for (int64_t r = 0; r < g.R; ++r) {
    const auto [lo, hi] = tap_range(g.P, g.H, g.stride_h, g.pad_h, g.dil_h, r);
    rows += hi - lo;
  }
  for (int64_t s = 0; s < g.S; ++s) {
    const auto [lo, hi] = tap_range(g.Q, g.W, g.stride_w, g.pad_w, g.dil_w, s);
    cols += hi - lo;
  }
  return double(rows) * double(cols) / double(std::max<int64_t>(1, g.R * g.S * g.P * g.Q));
}

Gemm plan(const conv::ConvGeom& g, int act, const at::Tensor& out_like, int64_t elem,
          const at::Tensor& weight) {
  Gemm p{};
  p.a =
      ConvArgs{g.N,        g.C,     g.H,     g.W,     g.K,     g.R,      g.S, g.P, g.Q, g.stride_h,
               g.stride_w, g.pad_h, g.pad_w, g.dil_h, g.dil_w, g.groups, 0,   0,   0,   act};
  if (out_like.defined()) {
    p.a.out_sn = out_like.stride(0);
    p.a.out_sk = out_like.stride(1);
    p.a.out_spq = out_like.stride(3);
  }
  p.M = g.N * g.P * g.Q;
  p.cg = g.c_per_group();
  p.kg = g.k_per_group();
  p.j = g.R * g.S * p.cg;
  // P == H, Q == W: a conv_transpose2d's adjoint with output_padding has an input larger than
  // its output even for a 1x1 stride-1 unpadded kernel.
  p.direct = g.R == 1 && g.S == 1 && g.stride_h == 1 && g.stride_w == 1 && g.pad_h == 0 &&
             g.pad_w == 0 && g.P == g.H && g.Q == g.W;
  const int64_t m = winograd_setting();
  const bool wino = m > 0 && elem == int64_t(sizeof(float)) && g.groups == 1 && g.R == 3 &&
                    g.S == 3 && g.stride_h == 1 && g.stride_w == 1 && g.dil_h == 1 &&
                    g.dil_w == 1 && g.C * g.K >= kWinogradMinCK &&
                    g.N * ((g.P + m - 1) / m) * ((g.Q + m - 1) / m) * (g.C + g.K) >= g.C * g.K;
  p.wino = wino ? m : 0;
  p.taps = g.groups == 1 && !p.direct && valid_taps(g) <= kTapsMaxValid;
  const int64_t panel_rows = kPanelBytes / (elem * std::max(p.j, p.kg));
  p.rows = std::clamp<int64_t>(panel_rows < kDeepRows ? kMinRows : panel_rows, 16, 1024);
  p.blocks = (p.M + p.rows - 1) / p.rows;
  // (c, r, s) columns (ConvArgs::crs) when the weight is larger than the im2col of all rows
  // (deep layers: many channels, few pixels) and not channels_last.
  p.a.crs = weight.defined() && !p.direct && !p.taps && g.R * g.S > 1 && p.M < 2 * g.K &&
            !conv::channels_last(weight);
  return p;
}

// The GEMM operand wmat^T[k, j] (K rows; group g's are [g K/G, (g + 1) K/G)), the GEMMs take it
// transposed where they need wmat: torch's (K, C/G, R, S) itself when p.a.crs, else
// (K, R, S, C/G), which a channels_last weight already is (no copy either way).
at::Tensor weight_matrix(const at::Tensor& w, const Gemm& p, at::ScalarType ct) {
  return p.a.crs ? w.to(ct).contiguous() : w.to(ct).permute({0, 2, 3, 1}).contiguous();
}

// Rows [m0, m0 + mb) (mb <= p.rows) of out (in its layout, via p.a.out_*) = epilogue(conv(x,
// wmat)): im2col into col (unless p.direct), the GEMM into eb.acc, the epilogue.
template <typename T>
void forward_rows(const Gemm& p, const T* x, const T* wmat, const ConvEpilogue& eb, int64_t m0,
                  int64_t mb, T* col) {
  for (int64_t g = 0; g < p.a.groups; ++g) {
    const T* A = x + m0 * p.a.C + g * p.cg;
    if (!p.direct) {
      kernels().im2col[dt<T>()](p.a, x, m0, mb, g, col);
      A = col;
    }
    gemm<T>(false, true, mb, p.kg, p.j, A, p.direct ? p.a.C : p.j, wmat + g * p.kg * p.j, p.j, T(0),
            static_cast<T*>(const_cast<void*>(eb.acc)), p.kg);
    kernels().epilogue[dt<T>()](p.a, eb, m0, mb, g);
  }
}

template <typename T>
void forward(const Gemm& p, const T* x, const T* wmat, ConvEpilogue e) {
  at::parallel_for(0, p.blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> col(p.direct ? 0 : p.rows * p.j), acc(p.rows * p.kg);
    ConvEpilogue eb = e;
    eb.acc = acc.data();
    for (int64_t b = b0; b < b1; ++b)
      forward_rows<T>(p, x, wmat, eb, b * p.rows, std::min(p.rows, p.M - b * p.rows), col.data());
  });
}

// The kernel tables' index of tile size m.
int winograd_index(int64_t m) {
  return m == 4 ? kWinograd4 : kWinograd2;
}

// The distance, in floats, to give consecutive arrays of n floats (the points of a block's
// transformed tiles): whole cache lines, an odd number of them, so that the 16 or 36 arrays a
// transform reads or writes at once start in different cache sets (n * 4 bytes is often a
// multiple of 2-4 KiB, which would put them all in a few sets of the 8-way L1).
int64_t skewed(int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(float);
  const int64_t lines = (n + kLine - 1) / kLine;
  return (lines | 1) * kLine;
}

// The tiles of a Winograd conv (m = p.wino) cut into blocks of whole tile rows: tile row r is
// (image r / th, row of tiles r % th), tiles run along it, and `per` tile rows make a block. The
// output rows of a block are one contiguous range.
struct WinogradBlocks {
  int64_t m, points, tile, th, tw, per, tile_rows, blocks;

  // Blocks of about `tiles` tiles (at least one tile row).
  WinogradBlocks(const Gemm& p, int64_t tiles)
      : m(p.wino),
        points((m + 2) * (m + 2)),
        tile(winograd_index(m)),
        th((p.a.P + m - 1) / m),
        tw((p.a.Q + m - 1) / m),
        per(std::max<int64_t>(1, tiles / tw)),
        tile_rows(p.a.N * th),
        blocks((tile_rows + per - 1) / per) {}
  int64_t t0(int64_t b) const { return b * per * tw; }
  int64_t nt(int64_t b) const { return (std::min(tile_rows, (b + 1) * per) - b * per) * tw; }
  // Output rows [first, last) of block b.
  std::pair<int64_t, int64_t> rows(const ConvArgs& a, int64_t b) const {
    const auto first = [&](int64_t r) { return (r / th * a.P + std::min(a.P, r % th * m)) * a.Q; };
    return {first(b * per), first(std::min(tile_rows, (b + 1) * per))};
  }
  // The image rows [first, last) (row n * H + h) that the tiles of block b read: one range, as a
  // block that ends an image reads it to its last row and the next image's first tiles read
  // from row 0.
  std::pair<int64_t, int64_t> input_rows(const ConvArgs& a, int64_t b) const {
    const int64_t r0 = b * per, r1 = std::min(tile_rows, (b + 1) * per) - 1;
    const auto row = [&](int64_t r, int64_t off) {
      return r / th * a.H + std::clamp(r % th * m - a.pad_h + off, int64_t{0}, a.H);
    };
    return {row(r0, 0), std::max(row(r0, 0), row(r1, m + 2))};
  }
};

// The input of a Winograd conv: NHWC memory, or NCHW float32 memory (`nchw`) from which each
// block transposes the image rows its tiles read into an NHWC slab that stays in L2, instead of
// the whole input into an NHWC copy in memory first (a pass over memory less for NCHW inputs).
struct WinogradSource {
  const float* x;
  bool nchw;

  // x (NHWC layout) for the tiles of block b and its first image row: the input itself, or the
  // block's rows transposed into slab.
  std::pair<const float*, int64_t> block(const ConvArgs& a, const WinogradBlocks& wb, int64_t b,
                                         std::vector<float>& slab) const {
    if (!nchw) return {x, 0};
    const auto [g0, g1] = wb.input_rows(a, b);
    slab.resize((g1 - g0) * a.W * a.C);
    for (int64_t n = g0 / a.H; n * a.H < g1; ++n) {
      const int64_t h0 = std::max(g0, n * a.H) - n * a.H,
                    h1 = std::min(g1, (n + 1) * a.H) - n * a.H;
      kernels().transpose[kConvF32](x + (n * a.C * a.H + h0) * a.W, a.H * a.W,
                                    slab.data() + (n * a.H + h0 - g0) * a.W * a.C, a.C, a.C,
                                    (h1 - h0) * a.W);
    }
    return {slab.data(), g0};
  }
};

// U ((m + 2)^2, C, K) = G g G^T for every (output, input) channel pair of w (K, C, 3, 3);
// undefined when a weight is not finite.
at::Tensor winograd_weight(const at::Tensor& w, int64_t m) {
  const int64_t K = w.size(0), C = w.size(1);
  const at::Tensor wt = w.to(at::kFloat).permute({1, 2, 3, 0}).contiguous();  // (C, 3, 3, K)
  at::Tensor u = new_output({(m + 2) * (m + 2), C, K}, wt.options());
  std::atomic<bool> finite{true};
  at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
    if (!kernels().winograd_weight[winograd_index(m)](wt.const_data_ptr<float>(), C, K, c0, c1,
                                                      u.data_ptr<float>()))
      finite = false;
  });
  return finite ? u : at::Tensor();
}

// out = epilogue(conv(x, weight)) by Winograd F(m x m, 3x3), m = p.wino, on blocks of whole tile
// rows (their output rows are one contiguous range): the block's input transform, (m + 2)^2
// GEMMs (tiles x C) x (C x K) against U packed once, the output transform into the rows and the
// epilogue, all while the block is in L2. x is float32, NHWC or NCHW memory (WinogradSource).
// Blocks with a non-finite input run the direct path afterwards (NaN and Inf stay where torch's
// conv puts them). False, with nothing written, when Winograd does not apply or the weight is
// not finite.
bool winograd_forward(const Gemm& p, const at::Tensor& x, const at::Tensor& weight,
                      ConvEpilogue e) {
  if (p.wino == 0) return false;
  const at::Tensor u = winograd_weight(weight, p.wino);
  if (!u.defined()) return false;
  const ConvArgs& a = p.a;
  const ConvKernels& kr = kernels();
  const int64_t C = a.C, K = a.K, points = (p.wino + 2) * (p.wino + 2);
  const WinogradBlocks wb(
      p, std::max(kWinogradMinTiles, kWinogradBlockBytes / (points * 4 * (C + K))));
  const int64_t blocks = wb.blocks, wt = wb.tile, tiles = wb.per * wb.tw;
  std::vector<PackedB<float>> packs(points);
  at::parallel_for(0, points, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      packs[i].pack(false, C, K, u.const_data_ptr<float>() + i * C * K, K);
  });
  const WinogradSource src{x.const_data_ptr<float>(), nchw_float(x)};
  const int64_t ldv = skewed(tiles * C), ldm = skewed(tiles * K);
  std::vector<char> direct(blocks, 0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> v(points * ldv), prod(points * ldm), slab;
    std::vector<float> acc(wb.per * wb.m * a.Q * K);
    ConvEpilogue eb = e;
    eb.acc = acc.data();
    for (int64_t b = b0; b < b1; ++b) {
      const auto [m0, m1] = wb.rows(a, b);
      const int64_t t0 = wb.t0(b), nt = wb.nt(b);
      const auto [xb, row0] = src.block(a, wb, b, slab);
      if (!kr.winograd_input[wt](a, xb, row0, t0, nt, v.data(), ldv)) {
        direct[b] = 1;
        continue;
      }
      for (int64_t i = 0; i < points; ++i)
        packs[i].gemm(false, nt, K, C, v.data() + i * ldv, C, 0.f, prod.data() + i * ldm, K);
      kr.winograd_output[wt](a, prod.data(), ldm, t0, nt, m0, acc.data());
      kr.epilogue[kConvF32](a, eb, m0, m1 - m0, 0);
    }
  });
  if (std::find(direct.begin(), direct.end(), 1) == direct.end()) return true;
  const at::Tensor xn = nhwc(x);
  const at::Tensor wm = weight_matrix(weight, p, at::kFloat);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> col(p.rows * p.j), acc(p.rows * K);
    ConvEpilogue eb = e;
    eb.acc = acc.data();
    for (int64_t b = b0; b < b1; ++b) {
      const auto [m0, m1] = wb.rows(a, b);
      for (int64_t i = m0; direct[b] && i < m1; i += p.rows)
        forward_rows<float>(p, xn.const_data_ptr<float>(), wm.const_data_ptr<float>(), eb, i,
                            std::min(p.rows, m1 - i), col.data());
    }
  });
  return true;
}

// grad_x (N, H, W, C), zero-filled, += the input gradient of gpre (M, K).
template <typename T>
void backward_input(const Gemm& p, const T* gpre, const T* wmat, T* gx) {
  const int64_t K = p.a.K, C = p.a.C;
  if (p.direct) {  // rows map one to one onto input pixels: no scatter, any block split
    at::parallel_for(0, p.blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t m0 = b * p.rows, mb = std::min(p.rows, p.M - m0);
        for (int64_t g = 0; g < p.a.groups; ++g)
          gemm<T>(false, false, mb, p.cg, p.kg, gpre + m0 * K + g * p.kg, K, wmat + g * p.kg * p.j,
                  p.j, T(0), gx + m0 * C + g * p.cg, C);
      }
    });
    return;
  }
  // col2im scatters into overlapping windows of one image: a task owns whole images (several
  // per block when an image has fewer than p.rows pixels, so that the GEMM keeps p.rows rows),
  // its blocks in order. The blocks are fixed by the shapes alone.
  const int64_t pq = p.a.P * p.a.Q, per = std::max<int64_t>(1, p.rows / pq);
  const int64_t step = pq <= p.rows ? per * pq : p.rows;
  at::parallel_for(0, (p.a.N + per - 1) / per, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> gcol(step * p.j);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t end = std::min(p.a.N, (t + 1) * per) * pq;
      for (int64_t m0 = t * per * pq; m0 < end; m0 += step) {
        const int64_t mb = std::min(step, end - m0);
        for (int64_t g = 0; g < p.a.groups; ++g) {
          gemm<T>(false, false, mb, p.j, p.kg, gpre + m0 * K + g * p.kg, K, wmat + g * p.kg * p.j,
                  p.j, T(0), gcol.data(), p.j);
          kernels().col2im[dt<T>()](p.a, gcol.data(), m0, mb, g, gx);
        }
      }
    }
  });
}

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

// This thread's scratch buffer `slot`, at least n elements (kept for its later calls).
template <typename T>
T* scratch(int slot, int64_t n) {
  thread_local std::vector<T> buf[3];
  if (buf[slot].size() < static_cast<size_t>(n)) buf[slot].resize(n);
  return buf[slot].data();
}

// gw (K, R, S, C/G) = (col^T gpre)^T and gb (K) = column sums of gpre (either may be null).
template <typename T>
void backward_params(const Gemm& p, const T* x, const T* gpre, T* gw, T* gb) {
  const int64_t K = p.a.K, wsize = p.a.groups * p.j * p.kg, part = wsize + K;
  const int64_t chunks = std::max<int64_t>(
      1, std::min({p.blocks, kMaxChunks, kPartialBytes / (part * int64_t(sizeof(T)))}));
  // Uninitialized: each chunk's first block overwrites its partial (beta 0), the bias part is
  // zeroed here (fresh zero-filled pages cost as much as a pass over the gradient).
  const std::unique_ptr<T[]> partial(new T[chunks * part]);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> col(p.direct || gw == nullptr ? 0 : p.rows * p.j);
    for (int64_t c = c0; c < c1; ++c) {
      T* pw = partial.get() + c * part;
      T* pb = pw + wsize;
      std::fill(pb, pb + K, T(0));
      const int64_t first = c * p.blocks / chunks;
      for (int64_t b = first; b < (c + 1) * p.blocks / chunks; ++b) {
        const int64_t m0 = b * p.rows, mb = std::min(p.rows, p.M - m0);
        for (int64_t m = m0; gb != nullptr && m < m0 + mb; ++m)
          for (int64_t k = 0; k < K; ++k) pb[k] += gpre[m * K + k];
        for (int64_t g = 0; gw != nullptr && g < p.a.groups; ++g) {
          const T* A = x + m0 * p.a.C + g * p.cg;
          if (!p.direct) {
            kernels().im2col[dt<T>()](p.a, x, m0, mb, g, col.data());
            A = col.data();
          }
          gemm<T>(true, false, p.kg, p.j, mb, gpre + m0 * K + g * p.kg, K, A,
                  p.direct ? p.a.C : p.j, T(b == first ? 0 : 1), pw + g * p.kg * p.j, p.j);
        }
      }
    }
  });
  sum_chunks(partial.get(), chunks, part, [&](int64_t i, T s) {
    if (i < wsize && gw != nullptr) gw[i] = s;
    if (i >= wsize && gb != nullptr) gb[i - wsize] = s;
  });
}

// The conv per tap (p.taps): for tap t = (r, s) the output pixels whose tap reads inside the
// input, a rectangle of every image (tap_range), gathered into rows for GEMMs of depth C (K in
// the input gradient) against the tap's slice of wmat^T ((K, R, S, C): p.a.crs is false). Blocks
// of whole images, about kMinRows rows each, so that a block's scatters stay inside it.
class TapBlocks {
 public:
  explicit TapBlocks(const ConvArgs& a)
      : a_(a),
        pq_(a.P * a.Q),
        per_(std::max<int64_t>(1, std::min(kMinRows / std::max<int64_t>(pq_, 1),
                                           (a.N + kTapBlocks - 1) / kTapBlocks))) {
    for (int64_t r = 0; r < a.R; ++r)
      for (int64_t s = 0; s < a.S; ++s) {
        const auto [p0, p1] = tap_range(a.P, a.H, a.stride_h, a.pad_h, a.dil_h, r);
        const auto [q0, q1] = tap_range(a.Q, a.W, a.stride_w, a.pad_w, a.dil_w, s);
        range_.push_back({r, s, p0, p1, q0, q1});
      }
  }
  int64_t taps() const { return a_.R * a_.S; }
  int64_t blocks() const { return (a_.N + per_ - 1) / per_; }
  int64_t max_rows() const { return per_ * pq_; }
  // Block b's images [first, second).
  std::pair<int64_t, int64_t> images(int64_t b) const {
    return {b * per_, std::min(a_.N, (b + 1) * per_)};
  }
  // Output pixels of tap t in `images` images, and of all taps.
  int64_t rows(int64_t t, int64_t images) const {
    const auto& g = range_[t];
    return images * (g[3] - g[2]) * (g[5] - g[4]);
  }
  int64_t rows_all(int64_t images) const {
    int64_t n = 0;
    for (int64_t t = 0; t < taps(); ++t) n += rows(t, images);
    return n;
  }
  // f(i, out, in) for the i-th output pixel of tap t in images [n0, n1): out its NHWC row in the
  // output, in the input's row its tap reads.
  template <typename F>
  void visit(int64_t t, int64_t n0, int64_t n1, F f) const {
    const auto& [r, s, p0, p1, q0, q1] = range_[t];
    const ConvArgs& a = a_;
    int64_t i = 0;
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t in = (n * a.H + p * a.stride_h - a.pad_h + r * a.dil_h) * a.W;
        for (int64_t q = q0; q < q1; ++q, ++i)
          f(i, (n * a.P + p) * a.Q + q, in + q * a.stride_w - a.pad_w + s * a.dil_w);
      }
  }

 private:
  const ConvArgs& a_;
  int64_t pq_, per_;
  std::vector<std::array<int64_t, 6>> range_;  // per tap: r, s, p0, p1, q0, q1
};

template <typename T>
void add_row(const T* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// Tap t's slice of wmat^T packed as op(B) of every block's GEMMs: (C x K), or transposed for the
// input gradient.
template <typename T>
std::vector<PackedB<T>> pack_taps(const Gemm& p, const T* wmat, bool transposed) {
  const int64_t taps = p.a.R * p.a.S, C = p.a.C, K = p.a.K;
  std::vector<PackedB<T>> w(taps);
  at::parallel_for(0, taps, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      w[t].pack(!transposed, transposed ? K : C, transposed ? C : K, wmat + t * C, p.j);
  });
  return w;
}

// For each tap over images [n0, n1): dst's rows += src's rows, gathered, x the tap's w. Forward
// (adjoint false): src (width ks) is read at the input pixels the taps read and dst (width kd)
// at their output pixels, less row0; the input gradient (adjoint true) the other way round.
// rows and prod: tb.max_rows() x ks and x kd of scratch.
template <typename T>
void tap_products(const TapBlocks& tb, const std::vector<PackedB<T>>& w, bool adjoint, int64_t n0,
                  int64_t n1, const T* src, int64_t ks, T* dst, int64_t kd, int64_t row0, T* rows,
                  T* prod) {
  for (int64_t t = 0; t < tb.taps(); ++t) {
    const int64_t n = tb.rows(t, n1 - n0);
    if (n == 0) continue;
    tb.visit(t, n0, n1, [&](int64_t i, int64_t out, int64_t in) {
      std::copy_n(src + (adjoint ? out : in) * ks, ks, rows + i * ks);
    });
    w[t].gemm(false, n, kd, ks, rows, ks, T(0), prod, kd);
    tb.visit(t, n0, n1, [&](int64_t i, int64_t out, int64_t in) {
      add_row(prod + i * kd, kd, dst + ((adjoint ? in : out) - row0) * kd);
    });
  }
}

// out = epilogue(conv(x, wmat)) per tap: the block's sums add up in acc, then its epilogue.
template <typename T>
void taps_forward(const Gemm& p, const T* x, const T* wmat, ConvEpilogue e) {
  const ConvArgs& a = p.a;
  const int64_t C = a.C, K = a.K, pq = a.P * a.Q;
  const TapBlocks tb(a);
  const std::vector<PackedB<T>> w = pack_taps(p, wmat, false);
  at::parallel_for(0, tb.blocks(), 1, [&](int64_t b0, int64_t b1) {
    T* rows = scratch<T>(0, tb.max_rows() * C);
    T* prod = scratch<T>(1, tb.max_rows() * K);
    T* acc = scratch<T>(2, tb.max_rows() * K);
    ConvEpilogue eb = e;
    eb.acc = acc;
    for (int64_t b = b0; b < b1; ++b) {
      const auto [n0, n1] = tb.images(b);
      std::fill_n(acc, (n1 - n0) * pq * K, T(0));
      tap_products(tb, w, false, n0, n1, x, C, acc, K, n0 * pq, rows, prod);
      kernels().epilogue[dt<T>()](a, eb, n0 * pq, (n1 - n0) * pq, 0);
    }
  });
}

// grad_x (N, H, W, C), zero-filled, += the input gradient of gpre (M, K), per tap.
template <typename T>
void taps_input_grad(const Gemm& p, const T* gpre, const T* wmat, T* gx) {
  const int64_t C = p.a.C, K = p.a.K;
  const TapBlocks tb(p.a);
  const std::vector<PackedB<T>> w = pack_taps(p, wmat, true);
  at::parallel_for(0, tb.blocks(), 1, [&](int64_t b0, int64_t b1) {
    T* rows = scratch<T>(0, tb.max_rows() * K);
    T* prod = scratch<T>(1, tb.max_rows() * C);
    for (int64_t b = b0; b < b1; ++b) {
      const auto [n0, n1] = tb.images(b);
      tap_products(tb, w, true, n0, n1, gpre, K, gx, C, 0, rows, prod);
    }
  });
}

// backward_params per tap: tap t's (K, C) slice of gw (K, R, S, C) = gpre's rows^T x's rows, over
// all the tap's pixels of a group of images at once (gathered first), one GEMM per tap and slice
// of input channels. Each element is one GEMM's sum, its groups added in order: no partial sums
// to add up, and the results do not depend on the thread count. (Per block of rows, a batch of
// 16 on 2x2 images gave GEMMs of 8-32 rows, each a pass over the tap's slice of a partial.)
template <typename T>
void taps_params(const Gemm& p, const T* x, const T* gpre, T* gw, T* gb) {
  const ConvArgs& a = p.a;
  const int64_t C = a.C, K = a.K;
  if (gb != nullptr)
    at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
      std::fill(gb + k0, gb + k1, T(0));
      for (int64_t m = 0; m < p.M; ++m) add_row(gpre + m * K + k0, k1 - k0, gb + k0);
    });
  if (gw == nullptr) return;
  const TapBlocks tb(a);
  const int64_t taps = tb.taps(), per_image = tb.rows_all(1);
  const int64_t group = std::clamp<int64_t>(
      kPartialBytes / std::max<int64_t>(1, per_image * (C + K) * int64_t(sizeof(T))), 1, a.N);
  const int64_t slices = (C + kTapWgradCols - 1) / kTapWgradCols;
  std::vector<T> xs(group * per_image * C), gs(group * per_image * K);
  std::vector<int64_t> first(taps + 1, 0);
  for (int64_t n0 = 0; n0 < a.N; n0 += group) {
    const int64_t n1 = std::min(a.N, n0 + group);
    for (int64_t t = 0; t < taps; ++t) first[t + 1] = first[t] + tb.rows(t, n1 - n0);
    at::parallel_for(0, taps, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        tb.visit(t, n0, n1, [&](int64_t i, int64_t out, int64_t in) {
          std::copy_n(x + in * C, C, xs.data() + (first[t] + i) * C);
          std::copy_n(gpre + out * K, K, gs.data() + (first[t] + i) * K);
        });
    });
    at::parallel_for(0, taps * slices, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t t = i / slices, c0 = i % slices * kTapWgradCols;
        const int64_t c1 = std::min(C, c0 + kTapWgradCols), n = first[t + 1] - first[t];
        T* dst = gw + t * C + c0;
        if (n == 0) {  // no pixel reads inside the input through this tap
          for (int64_t k = 0; n0 == 0 && k < K; ++k)
            std::fill(dst + k * p.j, dst + k * p.j + c1 - c0, T(0));
          continue;
        }
        gemm<T>(true, false, K, c1 - c0, n, gs.data() + first[t] * K, K,
                xs.data() + first[t] * C + c0, C, T(n0 == 0 ? 0 : 1), dst, p.j);
      }
    });
  }
}

// (N, H, W, C) NHWC buffer -> (N, C, H, W) in `fmt` and `dtype`.
at::Tensor from_nhwc(const at::Tensor& t, at::MemoryFormat fmt, at::ScalarType dtype) {
  return from_channels_last(t.permute({0, 3, 1, 2}), fmt, dtype);
}

// The weight gradient in weight_matrix's layout -> torch's contiguous (K, C/G, R, S).
at::Tensor weight_from_matrix(const at::Tensor& m, const Gemm& p, const at::Tensor& w) {
  return (p.a.crs ? m : m.permute({0, 3, 1, 2})).to(w.scalar_type()).contiguous();
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
void conv_fwd_impl(const Gemm& p, const at::Tensor& x, const at::Tensor& weight,
                   const at::Tensor& bias, const at::Tensor& residual, at::Tensor& out,
                   at::Tensor& pre) {
  ConvEpilogue e{nullptr, ptr<T>(bias), ptr<T>(residual), out.data_ptr<T>(),
                 pre.numel() > 0 ? pre.data_ptr<T>() : nullptr};
  const ConvArgs& a = p.a;
  if (a.groups == a.C && a.K == a.C && a.C > 1) {
    const ConvKernels& kr = kernels();
    const at::Tensor wc = weight.to(out.scalar_type()).reshape({a.C, a.R * a.S});
    // NCHW output and unit width stride: SIMD over the width of each plane, no transposes.
    if (a.stride_w == 1 && a.out_spq == 1 && a.out_sk == a.P * a.Q && a.out_sn == a.C * a.P * a.Q) {
      const at::Tensor xc = x.to(out.scalar_type()).contiguous();
      const at::Tensor w = wc.contiguous();
      const int64_t scratch = (a.H + 2 * a.pad_h) * (a.W + 2 * a.pad_w);
      at::parallel_for(0, a.N * a.C, 1, [&](int64_t c0, int64_t c1) {
        std::vector<T> pad(scratch);
        kr.depthwise_plane_fwd[dt<T>()](a, xc.const_data_ptr<T>(), w.const_data_ptr<T>(), e, c0, c1,
                                        pad.data());
      });
      return;
    }
    const at::Tensor xn = nhwc(x);
    const at::Tensor w = wc.t().contiguous();
    at::parallel_for(0, a.N * a.P, 1, [&](int64_t r0, int64_t r1) {
      kr.depthwise_fwd[dt<T>()](a, xn.const_data_ptr<T>(), w.const_data_ptr<T>(), e, r0, r1);
    });
    return;
  }
  // Winograd transposes an NCHW float32 x block by block; the other paths read it NHWC.
  at::Tensor xn = std::is_same_v<T, float> && p.wino > 0 && nchw_float(x) ? x : nhwc(x);
  if constexpr (std::is_same_v<T, float>)
    if (winograd_forward(p, xn, weight, e)) return;
  xn = nhwc(xn);
  const at::Tensor wm = weight_matrix(weight, p, out.scalar_type());
  (p.taps ? taps_forward<T> : forward<T>)(p, xn.const_data_ptr<T>(), wm.const_data_ptr<T>(), e);
}

std::tuple<at::Tensor, at::Tensor> conv2d_fwd(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& residual,
                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation, int64_t groups,
                                              std::string_view activation) {
  const auto g = conv::conv2d_geom(kConv, x, weight, stride, padding, dilation, groups, kDtypes);
  const auto act = conv::parse_activation(kConv, activation);
  conv::check_bias(kConv, bias, x, g.K);
  conv::check_residual(kConv, residual, x, g);
  const at::ScalarType ct = compute_type(x);
  const at::MemoryFormat fmt = conv::memory_format(x);
  at::Tensor out = new_output({g.N, g.K, g.P, g.Q}, x.options().dtype(ct), fmt);
  at::Tensor pre = conv::saves_pre(act) ? new_output(out.sizes(), out.options(), fmt)
                                        : at::empty({0}, x.options());
  if (out.numel() > 0) {
    const Gemm p = plan(g, static_cast<int>(act), out, c10::elementSize(ct), weight);
    const at::Tensor b = bias.has_value() ? bias->to(ct).contiguous() : at::Tensor();
    const at::Tensor res = residual.has_value() ? as_output(*residual, ct, fmt) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(ct, "conv2d_fwd",
                               [&] { conv_fwd_impl<scalar_t>(p, x, weight, b, res, out, pre); });
  }
  // pre is an empty 1-D tensor when the activation needs none: no memory format to keep.
  return {as_output(out, x.scalar_type(), fmt),
          pre.dim() == 4 ? as_output(pre, x.scalar_type(), fmt) : pre.to(x.scalar_type())};
}

// Parameter and input gradients of the conv2d whose input is xn (NHWC memory, or NCHW float32
// that Winograd reads block by block: WinogradSource) and whose pre-activation gradient is
// gpre (M, K) row-major. Masked-off results stay undefined.
struct ConvGrads {
  at::Tensor input, weight, bias;
};

// The weight gradient (K, C, 3, 3) of a conv whose forward Winograd runs, by the adjoint of that
// forward: per block of tile rows (kWinogradGradTiles tiles), the input transform V of x and the
// adjoint output transform dM of gpre (N, P, Q, K), then dU[i] += V[i]^T dM[i] for each of the
// (m + 2)^2 points into a partial per chunk of blocks (chunks fixed by the shapes: the sums are
// bit-identical for any thread count), the partials summed in order and the adjoint weight
// transform G^T dU G. Undefined when Winograd does not apply or an input is not finite (the
// direct path then puts NaN and Inf where torch's conv does).
at::Tensor winograd_weight_grad(const Gemm& p, const at::Tensor& x, const float* gpre) {
  if (p.wino == 0) return {};
  const ConvArgs& a = p.a;
  const ConvKernels& kr = kernels();
  const WinogradBlocks wb(p, kWinogradGradTiles);
  const int64_t C = a.C, K = a.K, points = wb.points, wt = wb.tile, blocks = wb.blocks;
  const int64_t tiles = wb.per * wb.tw, part = points * C * K;
  const int64_t chunks =
      std::max<int64_t>(1, std::min({blocks, kMaxChunks, kPartialBytes / (part * 4)}));
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor partial = new_output({chunks, part}, opts);
  float* partial_data = partial.data_ptr<float>();
  const WinogradSource src{x.const_data_ptr<float>(), nchw_float(x)};
  const int64_t ldv = skewed(tiles * C), ldd = skewed(tiles * K);
  std::atomic<bool> finite{true};
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> v(points * ldv), dm(points * ldd), slab;
    for (int64_t c = c0; c < c1; ++c) {
      float* du = partial_data + c * part;
      const int64_t first = c * blocks / chunks;
      for (int64_t b = first; b < (c + 1) * blocks / chunks && finite; ++b) {
        const int64_t t0 = wb.t0(b), nt = wb.nt(b);
        const auto [xb, row0] = src.block(a, wb, b, slab);
        if (!kr.winograd_input[wt](a, xb, row0, t0, nt, v.data(), ldv) ||
            !kr.winograd_grad_output[wt](a, gpre, t0, nt, dm.data(), ldd)) {
          finite = false;
          break;
        }
        for (int64_t i = 0; i < points; ++i)
          gemm<float>(true, false, C, K, nt, v.data() + i * ldv, C, dm.data() + i * ldd, K,
                      b == first ? 0.f : 1.f, du + i * C * K, K);
      }
    }
  });
  if (!finite) return {};
  at::Tensor du = new_output({points, C, K}, opts);
  float* dup = du.data_ptr<float>();
  sum_chunks(partial.const_data_ptr<float>(), chunks, part,
             [&](int64_t i, float s) { dup[i] = s; });
  at::Tensor dw = new_output({C, 3, 3, K}, opts);
  at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
    kr.winograd_grad_weight[wt](du.const_data_ptr<float>(), C, K, c0, c1, dw.data_ptr<float>());
  });
  return dw.permute({3, 0, 1, 2});
}

// The input gradient of a conv whose forward Winograd runs, by Winograd too: the forward of the
// adjoint conv (gpre (N, P, Q, K) with the weight flipped and transposed, padding 2 - pad) into
// (N, C, H, W) channels_last. Undefined when Winograd does not apply (padding over 2 included).
at::Tensor winograd_input_grad(const conv::ConvGeom& g, const at::Tensor& gpre,
                               const at::Tensor& weight) {
  conv::ConvGeom adj = g;
  std::swap(adj.C, adj.K);
  std::tie(adj.H, adj.W, adj.P, adj.Q) = std::make_tuple(g.P, g.Q, g.H, g.W);
  adj.pad_h = g.R - 1 - g.pad_h;
  adj.pad_w = g.S - 1 - g.pad_w;
  if (gpre.scalar_type() != at::kFloat || adj.pad_h < 0 || adj.pad_w < 0 || g.N * g.H * g.W == 0)
    return {};
  at::Tensor gx = new_output({g.N, g.C, g.H, g.W}, gpre.options(), at::MemoryFormat::ChannelsLast);
  const Gemm p = plan(adj, 0, gx, sizeof(float), at::Tensor());  // the weight only sets crs
  if (p.wino == 0) return {};  // before flipping the weight (a pass over it)
  const at::Tensor w = weight.flip({2, 3}).transpose(0, 1);
  const ConvEpilogue e{nullptr, nullptr, nullptr, gx.data_ptr<float>(), nullptr};
  return winograd_forward(p, gpre, w, e) ? gx : at::Tensor();
}

ConvGrads conv_grads(const conv::ConvGeom& g, const at::Tensor& xn, const at::Tensor& gpre,
                     const at::Tensor& weight, at::MemoryFormat fmt, at::ScalarType dtype,
                     bool want_input, bool want_weight, bool want_bias) {
  const at::ScalarType ct = gpre.scalar_type();
  const Gemm p = plan(g, 0, at::Tensor(), c10::elementSize(ct), weight);
  ConvGrads r;
  const auto opts = gpre.options();
  if (want_input) r.input = winograd_input_grad(g, gpre, weight);
  if (r.input.defined()) {
    r.input = from_channels_last(r.input, fmt, dtype);
  } else if (want_input) {
    at::Tensor gx = new_output({g.N, g.H, g.W, g.C}, opts).zero_();
    if (p.M > 0) {
      const at::Tensor wm = weight_matrix(weight, p, ct);
      AT_DISPATCH_FLOATING_TYPES(ct, "conv_dgrad", [&] {
        (p.taps ? taps_input_grad<scalar_t>
                : backward_input<scalar_t>)(p, gpre.const_data_ptr<scalar_t>(),
                                            wm.const_data_ptr<scalar_t>(), gx.data_ptr<scalar_t>());
      });
    }
    r.input = from_nhwc(gx, fmt, dtype);
  }
  if (want_weight && xn.scalar_type() == at::kFloat && p.M > 0) {
    r.weight = winograd_weight_grad(p, xn, gpre.const_data_ptr<float>());
    if (r.weight.defined()) {
      r.weight = r.weight.to(weight.scalar_type()).contiguous();
      want_weight = false;
    }
  }
  if (want_weight || want_bias) {
    // Every element is written by backward_params unless there are no rows.
    const std::vector<int64_t> wsizes = p.a.crs
                                            ? std::vector<int64_t>{g.K, g.c_per_group(), g.R, g.S}
                                            : std::vector<int64_t>{g.K, g.R, g.S, g.c_per_group()};
    at::Tensor gw = p.M > 0 ? at::empty(wsizes, opts) : at::zeros(wsizes, opts);
    at::Tensor gb = at::zeros({g.K}, opts);
    if (p.M > 0)
      AT_DISPATCH_FLOATING_TYPES(ct, "conv_wgrad", [&] {
        // xn is undefined when only the bias gradient is wanted (a frozen weight).
        const at::Tensor xr = want_weight ? nhwc(xn) : at::Tensor();
        const scalar_t* x = want_weight ? xr.const_data_ptr<scalar_t>() : nullptr;
        (p.taps ? taps_params<scalar_t>
                : backward_params<scalar_t>)(p, x, gpre.const_data_ptr<scalar_t>(),
                                             want_weight ? gw.data_ptr<scalar_t>() : nullptr,
                                             want_bias ? gb.data_ptr<scalar_t>() : nullptr);
      });
    if (want_weight) r.weight = weight_from_matrix(gw, p, weight);
    if (want_bias) r.bias = gb.to(dtype);
  }
  return r;
}

at::Tensor or_empty(const at::Tensor& t, const at::Tensor& x) {
  return t.defined() ? t : at::empty({0}, x.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv2d_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& out, const at::Tensor& pre, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, std::string_view activation,
    std::array<bool, 4> mask) {
  const auto g = conv::conv2d_geom(kConv, x, weight, stride, padding, dilation, groups, kDtypes);
  const auto act = conv::parse_activation(kConv, activation);
  const std::vector<int64_t> osizes{g.N, g.K, g.P, g.Q};
  conv::check_saved(kConv, "grad_out", grad_out, x, osizes);
  if (act == conv::Activation::kRelu) conv::check_saved(kConv, "out", out, x, osizes);
  if (conv::saves_pre(act)) conv::check_saved(kConv, "pre", pre, x, osizes);
  const at::ScalarType ct = compute_type(x);
  const at::MemoryFormat fmt = conv::memory_format(x);
  // The pre-activation gradient as (M, K) rows: NHWC memory.
  at::Tensor gpre;
  if (act == conv::Activation::kNone) {
    gpre = nhwc(grad_out);
  } else {
    const at::Tensor go = as_output(grad_out, ct, fmt);
    const at::Tensor saved = as_output(act == conv::Activation::kRelu ? out : pre, ct, fmt);
    gpre = new_output({g.N, g.K, g.P, g.Q}, go.options(), at::MemoryFormat::ChannelsLast);
    const Gemm p = plan(g, static_cast<int>(act), go, c10::elementSize(ct), at::Tensor());
    const ConvKernels& kr = kernels();
    AT_DISPATCH_FLOATING_TYPES(ct, "conv_epilogue_bwd", [&] {
      const bool relu = act == conv::Activation::kRelu;
      at::parallel_for(0, p.M, 256, [&](int64_t m0, int64_t m1) {
        kr.epilogue_bwd[dt<scalar_t>()](
            p.a, go.const_data_ptr<scalar_t>(), relu ? saved.const_data_ptr<scalar_t>() : nullptr,
            relu ? nullptr : saved.const_data_ptr<scalar_t>(), gpre.data_ptr<scalar_t>(), m0, m1);
      });
    });
  }
  const at::Tensor xn = !mask[1] ? at::Tensor() : nchw_float(x) ? x : nhwc(x);
  ConvGrads r = conv_grads(g, xn, gpre, weight, fmt, x.scalar_type(), mask[0], mask[1], mask[2]);
  at::Tensor gp = mask[3] ? as_output(gpre, x.scalar_type(), fmt) : at::Tensor();
  return {or_empty(r.input, x), or_empty(r.weight, x), or_empty(r.bias, x), or_empty(gp, x)};
}

at::Tensor conv_transpose2d_fwd(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef output_padding,
                                int64_t groups, at::IntArrayRef dilation) {
  const auto g = conv::conv_transpose2d_geom(kConvT, x, weight, stride, padding, output_padding,
                                             groups, dilation, kDtypes);
  conv::check_bias(kConvT, bias, x, g.C);
  at::Tensor out = conv_grads(g, at::Tensor(), nhwc(x), weight, conv::memory_format(x),
                              compute_type(x), true, false, false)
                       .input;
  if (bias.has_value()) out.add_(bias->to(out.scalar_type()).view({1, g.C, 1, 1}));
  return out.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_transpose2d_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
    at::IntArrayRef dilation, std::array<bool, 3> mask) {
  const auto g = conv::conv_transpose2d_geom(kConvT, x, weight, stride, padding, output_padding,
                                             groups, dilation, kDtypes);
  conv::check_saved(kConvT, "grad_out", grad_out, x, {g.N, g.C, g.H, g.W});
  const at::ScalarType ct = compute_type(x);
  const at::MemoryFormat fmt = conv::memory_format(x);
  at::Tensor gi, gw, gb;
  if (mask[0]) {
    gi = new_output({g.N, g.K, g.P, g.Q}, x.options().dtype(ct), fmt);
    if (gi.numel() > 0) {
      const Gemm p = plan(g, 0, gi, c10::elementSize(ct), weight);
      AT_DISPATCH_FLOATING_TYPES(ct, "conv_transpose2d_dgrad", [&] {
        const at::Tensor none;
        at::Tensor no_pre = at::empty({0}, gi.options());
        conv_fwd_impl<scalar_t>(p, grad_out, weight, none, none, gi, no_pre);
      });
    }
    gi = as_output(gi, x.scalar_type(), fmt);
  }
  if (mask[1])
    gw = conv_grads(g, nhwc(grad_out), nhwc(x), weight, fmt, x.scalar_type(), false, true, false)
             .weight;
  if (mask[2]) gb = grad_out.to(ct).sum({0, 2, 3}).to(x.scalar_type());
  return {or_empty(gi, x), or_empty(gw, x), or_empty(gb, x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("conv2d_fwd", &conv2d_fwd);
  m.impl("conv2d_bwd", &conv2d_bwd);
  m.impl("conv_transpose2d_fwd", &conv_transpose2d_fwd);
  m.impl("conv_transpose2d_bwd", &conv_transpose2d_bwd);
}

}  // namespace fastdl::cpu
