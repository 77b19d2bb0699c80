// CPU implementations of the conv ops (schemas in csrc/ops.cpp): checks (csrc/common/conv.h),
// layouts, blocking and threading, the plan of the GEMMs and the implicit GEMM itself. The
// kernels around the GEMMs (im2col, col2im, the fused epilogue, the direct depthwise conv, the
// Winograd transforms) are in csrc/cpu/conv_kernels.h, compiled per ISA; what the files of the
// family share is in csrc/cpu/conv.h.
//
// Every conv is an implicit GEMM on NHWC activations (conv_params.h): rows m = output pixels,
// cut into blocks whose im2col panel fits in L2 (at least kMinRows rows for deep layers), each
// block's GEMM run by cpu/gemm.h (fastdl's own for float32) and its epilogue applied while the
// block is in cache. NCHW float32 inputs are transposed block by block, the image rows a block
// reads into an NHWC slab in L2 (Winograd, and the implicit GEMM's forward and weight gradient
// where the slabs stay small: slabs_suit), or read in place by 1x1 stride-1 convs (per image);
// the other NCHW inputs are read once into NHWC. 1x1 stride-1 convs need no im2col (the NHWC
// input already is the GEMM operand). The backward reuses the same blocks: grad_weight =
// col^T * grad_pre, grad_input = col2im(grad_pre * wmat^T). Small images, where over a quarter of
// the (pixel, tap) pairs read padding, run one GEMM per tap on the pixels that read the image
// instead (conv_taps.cpp), stride-1 3x3 convs with enough pixels Winograd (conv_winograd.cpp),
// and depthwise convs and groups of 2 or 4 channels, or of 8 to 32 output channels, direct
// kernels (conv_direct.cpp), as do NCHW convs of few input channels (an image model's stem:
// plane_suits), SIMD over the pixels of the output planes.
// conv_transpose2d is the adjoint conv2d (common/conv.h), so its forward is the conv2d input
// gradient.
//
// bfloat16 is multiplied as it is on the implicit GEMM where the CPU has AVX512-BF16 (forward,
// input and weight gradients: gemm_bf16, exact products summed in float32), else widened to
// float32 (Winograd, the per-tap GEMMs, the direct kernels); sums are float32, and outputs are
// rounded once, as the epilogue stores them. Determinism: the weight/bias
// gradient sums run over chunks of blocks fixed by the shapes alone, merged in a fixed order, so
// results are bit-identical from run to run and for any number of threads.
#include <algorithm>
#include <array>
#include <cstdlib>
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
#include "cpu/conv.h"
#include "cpu/gemm.h"
#include "cpu/output.h"

namespace fastdl::cpu::conv_impl {
namespace {

constexpr const char* kConv = "fastdl.conv2d";
constexpr const char* kConvT = "fastdl.conv_transpose2d";
static_assert(kRelu == static_cast<int>(conv::Activation::kRelu) &&
              kSilu == static_cast<int>(conv::Activation::kSilu) &&
              kGelu == static_cast<int>(conv::Activation::kGelu));
constexpr std::initializer_list<c10::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kBFloat16};
// Output channels a group below which the implicit GEMM runs transposed (forward_narrow), and
// the bytes of its im2col of all groups of a block (in L2 / L3 between im2col and the GEMMs).
constexpr int64_t kNarrowChannels = 16;
constexpr int64_t kNarrowPanelBytes = int64_t{1} << 20;
// Bytes of one block's im2col panel: it stays in L2 between im2col, GEMM and epilogue.
constexpr int64_t kPanelBytes = int64_t{256} << 10;
// Winograd F(m x m, 3x3) (conv_winograd.cpp) for float32 stride-1 undilated ungrouped 3x3
// convs with at least kWinogradMinCK channel pairs (fewer leave its GEMMs too little depth and
// width) and a transformed weight ((m + 2)^2 C K floats) no larger than the transformed input and
// output ((m + 2)^2 tiles (C + K)): on Zen 4, 256 channels on 32 images of 8x8 (equal sizes for
// m = 4) ran in 10 ms against 14 ms direct, 512 channels on 4x4 (m = 4: 1/8 the size) in 40-55
// against 15, and its forward + backward with m = 2 (1/2) in 62 against 44.
constexpr int64_t kWinogradMinCK = 16 * 16;
// Small images (deep layers): a 3x3 window with padding 1 on a 4x4 image reads padding at 31% of
// its taps, whose zeros im2col writes and the GEMMs multiply. When at most kTapsMaxValid of the
// taps read the image, the GEMMs run per tap instead, on just the rows whose tap lies inside it
// (conv_taps.cpp): 512 channels on 32 images of 4x4 (ResNet-18's last stage on 32x32 inputs)
// ran forward in 10 ms against 14, forward + backward in 36-39 against 48. At 84% (3x3 stride 2
// from 8x8 to 4x4) it measured no faster.
constexpr double kTapsMaxValid = 0.75;

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

// FASTDL_CONV_WINOGRAD, read once, at the first conv: 2 or 4 takes F(m x m, 3x3) with that m
// wherever Winograd suits, 0 runs every conv on the implicit GEMM; unset (-1) picks per call
// (winograd_tile).
int64_t winograd_setting() {
  static const int64_t m = [] {
    const char* v = std::getenv("FASTDL_CONV_WINOGRAD");
    const std::string_view s = v == nullptr ? "" : v;
    return s == "0" ? 0 : s == "2" ? 2 : s == "4" ? 4 : -1;
  }();
  return m;
}

// Whether Winograd F(m x m, 3x3) suits the conv g with elements of `elem` bytes (see
// kWinogradMinCK).
bool winograd_suits(const conv::ConvGeom& g, int64_t elem, int64_t m) {
  return elem == int64_t(sizeof(float)) && g.groups == 1 && g.R == 3 && g.S == 3 &&
         g.stride_h == 1 && g.stride_w == 1 && g.dil_h == 1 && g.dil_w == 1 &&
         g.C * g.K >= kWinogradMinCK &&
         g.N * ((g.P + m - 1) / m) * ((g.Q + m - 1) / m) * (g.C + g.K) >= g.C * g.K;
}

// The Winograd tile size m for g (0: none). By default F(2x2, 3x3) where the output will be
// differentiated: its float32 error is that of a direct conv, so training follows torch's as
// closely as the direct path. An inference forward takes F(4x4, 3x3), a 4x instead of a 2.25x
// cut in multiply-adds, with ~8x the rounding error (4-8e-6 of the output's largest
// magnitude: within DESIGN section 4, yet enough to flip the odd ReLU mask and move a network's
// training loss by ~1e-4 within a few steps).
int64_t winograd_tile(const conv::ConvGeom& g, int64_t elem, bool inference) {
  const int64_t set = winograd_setting();
  if (set >= 0) return set > 0 && winograd_suits(g, elem, set) ? set : 0;
  if (inference && winograd_suits(g, elem, 4)) return 4;
  return winograd_suits(g, elem, 2) ? 2 : 0;
}

// Rows of a block: `rows` within [16, 1024], but no more than the conv has (rounded up to 16):
// the per-thread buffers sized by them are allocated and zeroed every call, which for a small
// conv (1x8x8x8) took longer than the conv itself.
int64_t block_rows(int64_t rows, int64_t M) {
  return std::min(std::clamp<int64_t>(rows, 16, 1024), std::max<int64_t>(16, (M + 15) / 16 * 16));
}

}  // namespace

at::ScalarType compute_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::ScalarType compute_type(const at::Tensor& x) {
  return compute_type(x.scalar_type());
}

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

bool nchw_float(const at::Tensor& x) {
  return x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous() &&
         !x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor nhwc(const at::Tensor& x) {
  if (nchw_float(x)) {
    at::Tensor y = new_output(x.sizes(), x.options(), at::MemoryFormat::ChannelsLast);
    transpose_images(x.const_data_ptr<float>(), x.size(0), x.size(1), x.size(2) * x.size(3),
                     y.data_ptr<float>());
    return y;
  }
  return as_output(x, compute_type(x), at::MemoryFormat::ChannelsLast);
}

ConvEpilogue plain_epilogue(at::Tensor& out) {
  return {nullptr,
          nullptr,
          nullptr,
          out.data_ptr(),
          nullptr,
          out.nbytes() >= kStreamBytes,
          out.scalar_type() == at::kBFloat16};
}

at::Tensor from_nhwc(const at::Tensor& t, at::MemoryFormat fmt, at::ScalarType dtype) {
  return from_channels_last(t.permute({0, 3, 1, 2}), fmt, dtype);
}

Gemm plan(const conv::ConvGeom& g, int act, const at::Tensor& out_like, at::ScalarType dtype,
          const at::Tensor& weight, bool inference) {
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
  p.taps = g.groups == 1 && !p.direct && valid_taps(g) <= kTapsMaxValid;
  // bfloat16 operands multiplied on AMX tiles (gemm_bf16; not on the per-tap GEMMs, which widen
  // them): im2col panels of bfloat16 in blocks of whole 32-row tile blocks, and no Winograd
  // (float32 only, which the tiles outrun: 32 images of 64 channels on 56x56, forward, 11.5 ms
  // against 8).
  const bool amx = dtype == at::kBFloat16 && !p.taps && cpu_amx();
  const int64_t elem = amx ? 2 : c10::elementSize(compute_type(dtype));
  p.wino = amx ? 0 : winograd_tile(g, elem, inference);
  // Both 0 for a conv without input and output channels.
  const int64_t panel_rows = kPanelBytes / (elem * std::max({p.j, p.kg, int64_t{1}}));
  p.rows = block_rows(panel_rows < kDeepRows ? kMinRows : panel_rows, p.M);
  if (amx && p.rows > 32) p.rows = p.rows / 32 * 32;
  p.blocks = (p.M + p.rows - 1) / p.rows;
  // (c, r, s) columns (ConvArgs::crs) when the weight is larger than the im2col of all rows
  // (deep layers: many channels, few pixels) and not channels_last.
  p.a.crs = weight.defined() && !p.direct && !p.taps && g.R * g.S > 1 && p.M < 2 * g.K &&
            !conv::channels_last(weight);
  return p;
}

// The GEMM operand wmat^T[k, j] (K rows; group g's are [g K/G, (g + 1) K/G)), the GEMMs take it
// transposed where they need wmat: torch's (K, C/G, R, S) itself when p.a.crs, else
// (K, R, S, C/G), which a channels_last weight already is (no copy either way). A copy comes
// from the output cache: a fresh 9.4 MB (512, 512, 3, 3) took ~1 ms of page faults per op.
at::Tensor weight_matrix(const at::Tensor& w, const Gemm& p, at::ScalarType ct) {
  return as_output(p.a.crs ? w : w.permute({0, 2, 3, 1}), ct, at::MemoryFormat::Contiguous);
}

template <typename E>
std::vector<PackedOf<E>> pack_weight(const Gemm& p, const E* wmat, bool trans) {
  std::vector<PackedOf<E>> wp(p.a.groups);
  for (int64_t g = 0; g < p.a.groups; ++g)
    wp[g].pack(trans, trans ? p.j : p.kg, trans ? p.kg : p.j, wmat + g * p.kg * p.j, p.j);
  return wp;
}
template std::vector<PackedB<float>> pack_weight<float>(const Gemm&, const float*, bool);

// Whether p's implicit GEMM multiplies operands of `dtype` as they are: bfloat16 on gemm_bf16
// where the CPU runs it natively (exact products, float sums: the precision of the widened path).
bool bf16_products(const Gemm& p, at::ScalarType dtype) {
  return dtype == at::kBFloat16 && p.wino == 0 && !p.taps && gemm_bf16_native();
}

// The GEMMs of the implicit-GEMM paths for operands of elements E (T, or bfloat16 bits with T
// float): im2col of a block, the product with a packed weight, and the product of two unpacked
// operands (cpu/gemm.h's signatures).
template <typename T, typename E>
void im2col(const Gemm& p, const E* x, int64_t m0, int64_t mb, int64_t g0, int64_t g1, E* col) {
  if constexpr (std::is_same_v<E, uint16_t>)
    kernels().im2col_bf16(p.a, x, m0, mb, g0, g1, col);
  else
    kernels().im2col[dt<T>()](p.a, x, m0, mb, g0, g1, col);
}

template <typename T, typename E>
void packed_gemm(const PackedOf<E>& b, int64_t m, int64_t n, int64_t k, const E* A, int64_t lda,
                 T beta, T* C, int64_t ldc) {
  if constexpr (std::is_same_v<E, uint16_t>)
    b.gemm(m, n, k, A, lda, beta, C, ldc);
  else
    b.gemm(false, m, n, k, A, lda, beta, C, ldc);
}

template <typename T, typename E>
void any_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const E* A, int64_t lda,
              const E* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if constexpr (std::is_same_v<E, uint16_t>)
    gemm_bf16(ta, tb, m, n, k, A, lda, B, ldb, beta, C, ldc);
  else
    gemm<T>(ta, tb, m, n, k, A, lda, B, ldb, beta, C, ldc);
}

// e as the accumulation type T.
template <typename T, typename E>
T widened(E e) {
  if constexpr (std::is_same_v<E, uint16_t>)
    return static_cast<float>(c10::BFloat16(e, c10::BFloat16::from_bits()));
  else
    return e;
}

namespace {

// The part of a block of GEMM rows that lies in one image, GEMM rows [first, first + mb), and
// what its im2col reads: the image rows [h0, h0 + a.H) it needs, transposed to NHWC at `x` in a
// slab, which `a` indexes as an image of those rows (padding moved by h0: the rows it reads
// above h0 are the padding), the part's rows from first % (P Q) on.
struct SlabPart {
  ConvArgs a;
  int64_t first, mb, h0;
  const float* x;
};

// The image rows [h0, h1) that GEMM rows [i, end) of one image read.
std::pair<int64_t, int64_t> image_rows(const ConvArgs& a, int64_t i, int64_t end) {
  const int64_t pq = a.P * a.Q, span = (a.R - 1) * a.dil_h + 1;
  const int64_t p0 = i % pq / a.Q, p1 = (end - 1) % pq / a.Q;
  const int64_t h0 = std::clamp(p0 * a.stride_h - a.pad_h, int64_t{0}, a.H);
  return {h0, std::clamp(p1 * a.stride_h - a.pad_h + span, h0, a.H)};
}

// Calls f(i, end) for the part of GEMM rows [m0, m0 + mb) in each image.
template <typename F>
void for_image_parts(const ConvArgs& a, int64_t m0, int64_t mb, F&& f) {
  const int64_t pq = a.P * a.Q;
  for (int64_t i = m0; i < m0 + mb;) {
    const int64_t end = std::min(m0 + mb, (i / pq + 1) * pq);
    f(i, end);
    i = end;
  }
}

// The parts of GEMM rows [m0, m0 + mb), one per image, and the image rows each reads (x unset).
std::vector<SlabPart> slab_parts(const Gemm& p, int64_t m0, int64_t mb) {
  const ConvArgs& a = p.a;
  std::vector<SlabPart> parts;
  for_image_parts(a, m0, mb, [&](int64_t i, int64_t end) {
    const auto [h0, h1] = image_rows(a, i, end);
    SlabPart part{a, i, end - i, h0, nullptr};
    part.a.N = 1;
    part.a.H = h1 - h0;
    part.a.pad_h = a.pad_h + h0;
    parts.push_back(part);
  });
  return parts;
}

// The image rows that GEMM rows [m0, m0 + mb) of NCHW float32 x read, transposed image by image
// into slab (NHWC rows), and the parts that index them. The implicit GEMM otherwise transposes
// all of x into an NHWC copy in memory first, which its im2col reads back: a 3x3 stride-2 conv
// on 32x128x56x56 spent a fifth of its time on those passes, an eighth now.
std::vector<SlabPart> nchw_slab(const Gemm& p, const float* x, int64_t m0, int64_t mb,
                                std::vector<float>& slab) {
  const ConvArgs& a = p.a;
  std::vector<SlabPart> parts = slab_parts(p, m0, mb);
  int64_t rows = 0;
  for (const SlabPart& part : parts) rows += part.a.H;
  slab.resize(rows * a.W * a.C);
  float* dst = slab.data();
  for (SlabPart& part : parts) {
    const int64_t n = part.first / (a.P * a.Q);
    kernels().transpose[kConvF32](x + (n * a.C * a.H + part.h0) * a.W, a.H * a.W, dst, a.C, a.C,
                                  part.a.H * a.W);
    part.x = dst;
    dst += part.a.H * a.W * a.C;
  }
  return parts;
}

// Whether the implicit GEMM reads an NCHW float32 x block by block (nchw_slab) rather than an
// NHWC copy: not p.direct (which reads x's rows as the GEMM's), when the blocks' slabs hold at
// most kSlabRowsFactor times x's rows (the rows that blocks share are transposed once per block:
// all of them for blocks within one output row) and none is over kSlabBytes (a block's rows of
// a wide, deep layer would not stay in L2).
bool slabs_suit(const Gemm& p, const at::Tensor& x) {
  constexpr int64_t kSlabRowsFactor = 2, kSlabBytes = int64_t{1} << 20;
  if (p.direct || !nchw_float(x)) return false;
  const ConvArgs& a = p.a;
  int64_t rows = 0, widest = 0;
  for (int64_t b = 0; b < p.blocks; ++b) {
    int64_t block = 0;
    for_image_parts(a, b * p.rows, std::min(p.rows, p.M - b * p.rows), [&](int64_t i, int64_t e) {
      const auto [h0, h1] = image_rows(a, i, e);
      block += h1 - h0;
    });
    rows += block;
    widest = std::max(widest, block);
  }
  return rows <= kSlabRowsFactor * a.N * a.H && widest * a.W * a.C * 4 <= kSlabBytes;
}

// The im2col of GEMM rows [m0, m0 + mb), group g, into col: from x (NHWC) when there are no
// slab parts, else from the parts' slab (nchw_slab).
template <typename T, typename E>
void block_im2col(const Gemm& p, const E* x, const std::vector<SlabPart>& parts, int64_t m0,
                  int64_t mb, int64_t g, E* col) {
  if (parts.empty()) return im2col<T>(p, x, m0, mb, g, g + 1, col);
  for (const SlabPart& part : parts)
    kernels().im2col[kConvF32](part.a, part.x, part.first % (p.a.P * p.a.Q), part.mb, g, g + 1,
                               col + (part.first - m0) * p.j);
}

// nchw_slab's parts for rows [m0, m0 + mb) when `slab` is given (E float32), else none.
template <typename E>
std::vector<SlabPart> block_slab(const Gemm& p, const E* x, int64_t m0, int64_t mb,
                                 std::vector<E>* slab) {
  if constexpr (std::is_same_v<E, float>)
    if (slab != nullptr) return nchw_slab(p, x, m0, mb, *slab);
  return {};
}

}  // namespace

// Rows [m0, m0 + mb) (mb <= p.rows) of out (in its layout, via p.a.out_*) = epilogue(conv(x,
// wmat)): im2col into col (unless p.direct), the GEMM into eb.acc, the epilogue.
template <typename T, typename E>
void forward_rows(const Gemm& p, const E* x, const std::vector<PackedOf<E>>& wp,
                  const ConvEpilogue& eb, int64_t m0, int64_t mb, E* col, std::vector<E>* slab) {
  T* acc = static_cast<T*>(const_cast<void*>(eb.acc));
  const std::vector<SlabPart> parts = block_slab(p, x, m0, mb, slab);
  for (int64_t g = 0; g < p.a.groups; ++g) {
    if (!p.direct) block_im2col<T>(p, x, parts, m0, mb, g, col);
    const E* A = p.direct ? x + m0 * p.a.C + g * p.cg : col;
    packed_gemm<T, E>(wp[g], mb, p.kg, p.j, A, p.direct ? p.a.C : p.j, T(0), acc, p.kg);
    kernels().epilogue[dt<T>()](p.a, eb, m0, mb, g);
  }
}
template void forward_rows<float>(const Gemm&, const float*, const std::vector<PackedB<float>>&,
                                  const ConvEpilogue&, int64_t, int64_t, float*,
                                  std::vector<float>*);

namespace {

// Groups of few output channels (< kNarrowChannels; 2 or 4 with as many input channels, or a
// multiple of 8, run conv_direct.cpp's kernels instead), and convs with few: as the GEMMs' columns,
// a group's kg channels would fill a fraction of one vector of the micro-tile, and an im2col per
// group would read each pixel's cache lines once per group. Here one im2col per block reads them
// once for all groups, and the transposed products acc^T = wmat_g col_g^T run the block's pixels
// along the columns; a transpose in cache hands the epilogue its (mb, kg) rows.
bool narrow_groups(const Gemm& p) {
  return p.kg < kNarrowChannels && p.M >= kNarrowChannels;
}

template <typename T, typename E>
void forward_narrow(const Gemm& p, const E* x, const E* wmat, ConvEpilogue e) {
  const int64_t G = p.a.groups, j = p.j;
  const int64_t rows = block_rows(kNarrowPanelBytes / std::max<int64_t>(1, G * j * sizeof(E)), p.M);
  at::parallel_for(0, (p.M + rows - 1) / rows, 1, [&](int64_t b0, int64_t b1) {
    std::vector<E> col(p.direct ? 0 : G * rows * j);
    std::vector<T> acc(rows * p.kg), acc_t(rows * p.kg);
    ConvEpilogue eb = e;
    eb.acc = acc.data();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * rows, mb = std::min(rows, p.M - m0);
      if (!p.direct) im2col<T>(p, x, m0, mb, 0, G, col.data());
      for (int64_t g = 0; g < G; ++g) {
        const E* B = p.direct ? x + m0 * p.a.C + g * p.cg : col.data() + g * mb * j;
        any_gemm<T, E>(false, true, p.kg, mb, j, wmat + g * p.kg * j, j, B, p.direct ? p.a.C : j,
                       T(0), acc_t.data(), mb);
        kernels().transpose[dt<T>()](acc_t.data(), mb, acc.data(), p.kg, p.kg, mb);
        kernels().epilogue[dt<T>()](p.a, eb, m0, mb, g);
      }
    }
  });
}

// The implicit GEMM forward over all blocks of rows (T, E: as forward_rows; x NHWC, or NCHW
// float32 memory with x_nchw: see forward_nchw).
template <typename T, typename E = T>
void forward(const Gemm& p, const E* x, const E* wmat, ConvEpilogue e, bool x_nchw = false) {
  if (narrow_groups(p)) return forward_narrow<T, E>(p, x, wmat, e);
  const std::vector<PackedOf<E>> wp = pack_weight(p, wmat, true);
  at::parallel_for(0, p.blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<E> col(p.direct ? 0 : p.rows * p.j), slab;
    std::vector<T> acc(p.rows * p.kg);
    ConvEpilogue eb = e;
    eb.acc = acc.data();
    for (int64_t b = b0; b < b1; ++b)
      forward_rows<T, E>(p, x, wp, eb, b * p.rows, std::min(p.rows, p.M - b * p.rows), col.data(),
                         x_nchw ? &slab : nullptr);
  });
}

// Whether forward() reads an NCHW float32 x block by block (slabs_suit): the implicit GEMM with
// an im2col per group.
bool forward_nchw(const Gemm& p, const at::Tensor& x) {
  return !p.taps && !narrow_groups(p) && slabs_suit(p, x);
}

// A direct (1x1, stride 1, unpadded) conv of NCHW float32 x: per image and block of its pixels
// the GEMM wmat_g (kg x cg) X_n (cg x pixels, read in place, the GEMM packing its rows as B),
// transposed in cache into the epilogue's (pixels x kg) rows. The NHWC copy of x the other paths
// read had cost 1.5x the GEMMs (32x256x56x56 to 64 channels: 36 ms, 21 of them in the copy; now
// 19 ms: the GEMMs at the FMA peak and B's packing at the copy bandwidth); taking X_n^T as a
// transposed A operand instead, packed 6 pixels by 6, took 22 ms.
bool direct_nchw(const Gemm& p, const at::Tensor& x) {
  return p.direct && !narrow_groups(p) && nchw_float(x);
}

void forward_direct_nchw(const Gemm& p, const float* x, const float* wmat, ConvEpilogue e) {
  const int64_t hw = p.a.H * p.a.W, per = (hw + p.rows - 1) / p.rows;
  at::parallel_for(0, p.a.N * per, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> acc(p.rows * p.kg), acc_t(p.rows * p.kg);
    ConvEpilogue eb = e;
    eb.acc = acc.data();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / per, i0 = b % per * p.rows, mb = std::min(p.rows, hw - i0);
      for (int64_t g = 0; g < p.a.groups; ++g) {
        gemm<float>(false, false, p.kg, mb, p.cg, wmat + g * p.kg * p.cg, p.cg,
                    x + (n * p.a.C + g * p.cg) * hw + i0, hw, 0.f, acc_t.data(), mb);
        kernels().transpose[kConvF32](acc_t.data(), mb, acc.data(), p.kg, p.kg, mb);
        kernels().epilogue[kConvF32](p.a, eb, n * hw + i0, mb, g);
      }
    }
  });
}

const uint16_t* bits(const at::Tensor& t) {
  return static_cast<const uint16_t*>(t.const_data_ptr());
}

// The input gradient of a direct (1x1, stride 1, unpadded) conv, gpre (M, K), into gx ((N, C, H,
// W) in any layout, dtype T or, T float, bfloat16): rows map one to one onto input pixels, so
// each block's GEMM result goes from cache through the epilogue (no bias, no activation) into gx
// in its own layout and dtype, with no NHWC float32 copy to convert afterwards.
template <typename T, typename E>
void direct_input_grad(const Gemm& p, const E* gpre, const E* wmat, at::Tensor& gx) {
  ConvArgs a = p.a;  // the epilogue's view: C channels out on the H x W input pixels
  a.K = p.a.C;
  a.P = p.a.H;
  a.Q = p.a.W;
  a.activation = 0;
  a.out_sn = gx.stride(0);
  a.out_sk = gx.stride(1);
  a.out_spq = gx.stride(3);
  const ConvEpilogue e = plain_epilogue(gx);
  const std::vector<PackedOf<E>> wp = pack_weight(p, wmat, false);
  at::parallel_for(0, p.blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> acc(p.rows * p.cg);
    ConvEpilogue eb = e;
    eb.acc = acc.data();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * p.rows, mb = std::min(p.rows, p.M - m0);
      for (int64_t g = 0; g < p.a.groups; ++g) {
        packed_gemm<T, E>(wp[g], mb, p.cg, p.kg, gpre + m0 * p.a.K + g * p.kg, p.a.K, T(0),
                          acc.data(), p.cg);
        kernels().epilogue[dt<T>()](a, eb, m0, mb, g);
      }
    }
  });
}

// grad_x (N, H, W, C), zero-filled, = the col2im scatter of the input gradient of gpre (M, K)
// (T, E: as forward_rows; not p.direct: direct_input_grad). With `nchw`, grad_x is
// (N, C, H, W), unfilled: each task scatters its images into a zero-filled NHWC scratch and
// transposes them into grad_x while they are in cache (a zero-filled NHWC grad_x transposed
// afterwards had cost three passes over memory more).
template <typename T, typename E = T>
void backward_input(const Gemm& p, const E* gpre, const E* wmat, T* gx, bool nchw = false) {
  const int64_t K = p.a.K;
  const std::vector<PackedOf<E>> wp = pack_weight(p, wmat, false);
  // col2im scatters into overlapping windows of one image: a task owns whole images (several
  // per block when an image has fewer than p.rows pixels, so that the GEMM keeps p.rows rows),
  // its blocks in order. The blocks are fixed by the shapes alone.
  const int64_t pq = p.a.P * p.a.Q, per = std::max<int64_t>(1, p.rows / pq);
  const int64_t step = pq <= p.rows ? per * pq : p.rows;
  const int64_t image = p.a.H * p.a.W * p.a.C;
  at::parallel_for(0, (p.a.N + per - 1) / per, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> gcol(step * p.j);
    // Filled per task below (a vector would zero it once more on construction).
    const std::unique_ptr<T[]> local(nchw ? new T[std::min(per, p.a.N) * image] : nullptr);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * per, n1 = std::min(p.a.N, n0 + per), end = n1 * pq;
      // The task's images: gx's, or the scratch's from image n0 on.
      ConvArgs a = p.a;
      T* dst = gx;
      if (nchw) {
        a.N = n1 - n0;
        dst = local.get();
        std::fill(dst, dst + a.N * image, T(0));
      }
      for (int64_t m0 = n0 * pq; m0 < end; m0 += step) {
        const int64_t mb = std::min(step, end - m0);
        for (int64_t g = 0; g < p.a.groups; ++g) {
          packed_gemm<T, E>(wp[g], mb, p.j, p.kg, gpre + m0 * K + g * p.kg, K, T(0), gcol.data(),
                            p.j);
          kernels().col2im[dt<T>()](a, gcol.data(), nchw ? m0 - n0 * pq : m0, mb, g, dst);
        }
      }
      for (int64_t n = n0; nchw && n < n1; ++n)
        kernels().transpose[dt<T>()](dst + (n - n0) * image, p.a.C, gx + n * image, p.a.H * p.a.W,
                                     p.a.H * p.a.W, p.a.C);
    }
  });
}

// gw (K, R, S, C/G) = (col^T gpre)^T and gb (K) = column sums of gpre (either may be null; T,
// E: as forward_rows; x NHWC, or NCHW float32 memory with x_nchw, read block by block as the
// forward's: slabs_suit).
template <typename T, typename E = T>
void backward_params(const Gemm& p, const E* x, const E* gpre, T* gw, T* gb, bool x_nchw = false) {
  const int64_t K = p.a.K, wsize = p.a.groups * p.j * p.kg, part = wsize + K;
  // part is 0 for a conv without output channels (nothing to sum, one chunk).
  const int64_t chunks = std::max<int64_t>(
      1, std::min({p.blocks, kMaxChunks,
                   kPartialBytes / std::max<int64_t>(1, part * int64_t(sizeof(T)))}));
  // Uninitialized: each chunk's first block overwrites its partial (beta 0), the bias part is
  // zeroed here (fresh zero-filled pages cost as much as a pass over the gradient).
  const std::unique_ptr<T[]> partial(new T[chunks * part]);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<E> col(p.direct || gw == nullptr ? 0 : p.rows * p.j), slab;
    for (int64_t c = c0; c < c1; ++c) {
      T* pw = partial.get() + c * part;
      T* pb = pw + wsize;
      std::fill(pb, pb + K, T(0));
      const int64_t first = c * p.blocks / chunks;
      for (int64_t b = first; b < (c + 1) * p.blocks / chunks; ++b) {
        const int64_t m0 = b * p.rows, mb = std::min(p.rows, p.M - m0);
        for (int64_t m = m0; gb != nullptr && m < m0 + mb; ++m)
          for (int64_t k = 0; k < K; ++k) pb[k] += widened<T>(gpre[m * K + k]);
        const std::vector<SlabPart> parts =
            block_slab(p, x, m0, mb, gw != nullptr && x_nchw ? &slab : nullptr);
        for (int64_t g = 0; gw != nullptr && g < p.a.groups; ++g) {
          if (!p.direct) block_im2col<T>(p, x, parts, m0, mb, g, col.data());
          const E* A = p.direct ? x + m0 * p.a.C + g * p.cg : col.data();
          any_gemm<T, E>(true, false, p.kg, p.j, mb, gpre + m0 * K + g * p.kg, K, A,
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

// The weight gradient in weight_matrix's layout -> torch's contiguous (K, C/G, R, S).
at::Tensor weight_from_matrix(const at::Tensor& m, const Gemm& p, const at::Tensor& w) {
  return as_output(p.a.crs ? m : m.permute({0, 3, 1, 2}), w.scalar_type(),
                   at::MemoryFormat::Contiguous);
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.const_data_ptr<T>() : nullptr;
}

// out (and pre, residual: T, or bfloat16 with T float, which the epilogue writes and reads as
// such) = epilogue(conv(x, weight)); bias in T.
template <typename T>
void conv_fwd_impl(const Gemm& p, const at::Tensor& x, const at::Tensor& weight,
                   const at::Tensor& bias, const at::Tensor& residual, at::Tensor& out,
                   at::Tensor& pre) {
  const at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  ConvEpilogue e{nullptr,
                 ptr<T>(bias),
                 residual.defined() && residual.numel() > 0 ? residual.const_data_ptr() : nullptr,
                 out.data_ptr(),
                 pre.numel() > 0 ? pre.data_ptr() : nullptr,
                 out.nbytes() >= kStreamBytes,
                 out.scalar_type() == at::kBFloat16};
  const ConvArgs& a = p.a;
  if (direct_conv(a)) return direct_forward<T>(p, x, weight, e);
  if (plane_forward<T>(p, x, weight, e)) return;
  if constexpr (std::is_same_v<T, float>) {
    if (amx_forward(p, x, weight, e)) return;
    if (bf16_products(p, x.scalar_type())) {
      const at::Tensor xb = as_output(x, at::kBFloat16, at::MemoryFormat::ChannelsLast);
      const at::Tensor wb = weight_matrix(weight, p, at::kBFloat16);
      return forward<float, uint16_t>(p, bits(xb), bits(wb), e);
    }
  }
  // Winograd and (forward_nchw) the implicit GEMM transpose an NCHW float32 x block by block,
  // direct_nchw reads it in place; the other paths read it NHWC.
  const bool in_nchw = std::is_same_v<T, float> && direct_nchw(p, x);
  // (Not where Winograd runs: the slabs' plan would be work for nothing on every call.)
  const bool slabs = std::is_same_v<T, float> && p.wino == 0 && forward_nchw(p, x);
  at::Tensor xn =
      in_nchw || slabs || (std::is_same_v<T, float> && p.wino > 0 && nchw_float(x)) ? x : nhwc(x);
  if constexpr (std::is_same_v<T, float>) {
    if (winograd_forward(p, xn, weight, e)) return;
    if (in_nchw) {
      const at::Tensor wm = weight_matrix(weight, p, ct);
      return forward_direct_nchw(p, x.const_data_ptr<float>(), wm.const_data_ptr<float>(), e);
    }
  }
  if (!slabs) xn = nhwc(xn);
  const at::Tensor wm = weight_matrix(weight, p, ct);
  if (p.taps) return taps_forward<T>(p, xn.const_data_ptr<T>(), wm.const_data_ptr<T>(), e);
  forward<T>(p, xn.const_data_ptr<T>(), wm.const_data_ptr<T>(), e, slabs);
}

std::tuple<at::Tensor, at::Tensor> conv2d_fwd(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& residual,
                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation, int64_t groups,
                                              std::string_view activation, bool inference) {
  const auto g = conv::conv2d_geom(kConv, x, weight, stride, padding, dilation, groups, kDtypes);
  const auto act = conv::parse_activation(kConv, activation);
  conv::check_bias(kConv, bias, x, g.K);
  conv::check_residual(kConv, residual, x, g);
  const at::ScalarType ct = compute_type(x);
  const at::MemoryFormat fmt = conv::memory_format(x);
  // out, pre and residual in x's dtype (a bfloat16 epilogue rounds once, as it stores).
  at::Tensor out = new_output({g.N, g.K, g.P, g.Q}, x.options(), fmt);
  // pre is an empty 1-D tensor when the activation needs none: no memory format to keep.
  at::Tensor pre = conv::saves_pre(act) ? new_output(out.sizes(), out.options(), fmt)
                                        : at::empty({0}, x.options());
  if (out.numel() > 0) {
    const Gemm p = plan(g, static_cast<int>(act), out, x.scalar_type(), weight, inference);
    const at::Tensor b = bias.has_value() ? bias->to(ct).contiguous() : at::Tensor();
    const at::Tensor res =
        residual.has_value() ? as_output(*residual, x.scalar_type(), fmt) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(ct, "conv2d_fwd",
                               [&] { conv_fwd_impl<scalar_t>(p, x, weight, b, res, out, pre); });
  }
  return {out, pre};
}

// Parameter and input gradients of the conv2d g whose input is x ((N, C, H, W), undefined when
// the weight gradient is not wanted) and whose pre-activation gradient is gpre ((N, K, P, Q)),
// both in any layout; the input gradient in `fmt` and `dtype`. Where bf16_products, the GEMMs
// multiply gpre and x in bfloat16 (gpre rounded to it if it came in float32, as torch's
// bfloat16 autograd rounds every gradient). Masked-off results stay undefined.
ConvGrads conv_grads(const conv::ConvGeom& g, const at::Tensor& x, const at::Tensor& gpre,
                     const at::Tensor& weight, at::MemoryFormat fmt, at::ScalarType dtype,
                     bool want_input, bool want_weight, bool want_bias) {
  const at::ScalarType ct = compute_type(gpre);
  // bfloat16 operands where either gpre or the input is (see bf16_products).
  const at::ScalarType ops = gpre.scalar_type() == at::kBFloat16 ? at::kBFloat16 : dtype;
  const Gemm p = plan(g, 0, at::Tensor(), ops, weight);
  ConvGrads r;
  if (direct_conv(p.a)) {  // a grouped conv may leave the input gradient to the GEMMs below
    r = direct_grads(g, p, x, gpre, weight, fmt, dtype, want_input, want_weight, want_bias);
    if (!want_input || r.input.defined()) return r;
    want_weight = want_bias = false;
  }
  const bool bf16 = bf16_products(p, ops);
  // (M, K) rows: NHWC memory, in the dtype the GEMMs read.
  const at::Tensor gp =
      bf16 ? as_output(gpre, at::kBFloat16, at::MemoryFormat::ChannelsLast) : nhwc(gpre);
  const auto opts = gp.options().dtype(ct);
  if (want_input)  // bfloat16 on AMX tiles
    r.input = bf16 ? adjoint_input_grad(g, gp, weight, fmt, dtype)
                   : winograd_input_grad(g, gp, weight, fmt);
  if (r.input.defined()) {
    r.input = as_output(r.input, dtype, fmt);
  } else if (want_input && p.direct) {
    r.input = new_output({g.N, g.C, g.H, g.W}, gp.options().dtype(dtype), fmt);
    if (p.M > 0 && bf16) {
      const at::Tensor wm = weight_matrix(weight, p, at::kBFloat16);
      direct_input_grad<float, uint16_t>(p, bits(gp), bits(wm), r.input);
    } else if (p.M > 0) {
      const at::Tensor wm = weight_matrix(weight, p, ct);
      AT_DISPATCH_FLOATING_TYPES(ct, "conv_dgrad", [&] {
        direct_input_grad<scalar_t, scalar_t>(p, gp.const_data_ptr<scalar_t>(),
                                              wm.const_data_ptr<scalar_t>(), r.input);
      });
    }
  } else if (want_input) {
    // float32 NCHW on the implicit GEMM: backward_input transposes each task's images into gx
    // itself (every element written).
    const bool nchw_gx = !bf16 && !p.taps && p.M > 0 && ct == at::kFloat && dtype == at::kFloat &&
                         fmt == at::MemoryFormat::Contiguous;
    at::Tensor gx = nchw_gx ? new_output({g.N, g.C, g.H, g.W}, opts)
                            : new_output({g.N, g.H, g.W, g.C}, opts).zero_();
    if (p.M > 0 && bf16) {
      const at::Tensor wm = weight_matrix(weight, p, at::kBFloat16);
      backward_input<float, uint16_t>(p, bits(gp), bits(wm), gx.data_ptr<float>());
    } else if (p.M > 0) {
      const at::Tensor wm = weight_matrix(weight, p, ct);
      AT_DISPATCH_FLOATING_TYPES(ct, "conv_dgrad", [&] {
        const scalar_t* gpp = gp.const_data_ptr<scalar_t>();
        const scalar_t* wmp = wm.const_data_ptr<scalar_t>();
        if (p.taps)
          taps_input_grad<scalar_t>(p, gpp, wmp, gx.data_ptr<scalar_t>());
        else
          backward_input<scalar_t>(p, gpp, wmp, gx.data_ptr<scalar_t>(), nchw_gx);
      });
    }
    r.input = nchw_gx ? gx : from_nhwc(gx, fmt, dtype);
  }
  if (want_weight && !bf16 && p.M > 0 && ct == at::kFloat) {
    // Winograd reads an NCHW float32 x block by block (conv_winograd.cpp).
    r.weight = winograd_weight_grad(p, nchw_float(x) ? x : nhwc(x), gp.const_data_ptr<float>());
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
    at::Tensor gw = p.M > 0 ? new_output(wsizes, opts) : at::zeros(wsizes, opts);
    at::Tensor gb = at::zeros({g.K}, opts);
    // x is undefined when only the bias gradient is wanted (a frozen weight).
    if (p.M > 0 && bf16) {
      const at::Tensor xb =
          want_weight ? as_output(x, at::kBFloat16, at::MemoryFormat::ChannelsLast) : at::Tensor();
      backward_params<float, uint16_t>(p, want_weight ? bits(xb) : nullptr, bits(gp),
                                       want_weight ? gw.data_ptr<float>() : nullptr,
                                       want_bias ? gb.data_ptr<float>() : nullptr);
    } else if (p.M > 0) {
      // backward_params reads an NCHW float32 x block by block (slabs_suit; also for groups of
      // few channels, whose forward copies x to NHWC).
      const bool slabs = want_weight && ct == at::kFloat && !p.taps && slabs_suit(p, x);
      AT_DISPATCH_FLOATING_TYPES(ct, "conv_wgrad", [&] {
        const at::Tensor xr = want_weight ? (slabs ? x : nhwc(x)) : at::Tensor();
        const scalar_t* xp = want_weight ? xr.const_data_ptr<scalar_t>() : nullptr;
        scalar_t* gwp = want_weight ? gw.data_ptr<scalar_t>() : nullptr;
        scalar_t* gbp = want_bias ? gb.data_ptr<scalar_t>() : nullptr;
        if (p.taps)
          taps_params<scalar_t>(p, xp, gp.const_data_ptr<scalar_t>(), gwp, gbp);
        else
          backward_params<scalar_t>(p, xp, gp.const_data_ptr<scalar_t>(), gwp, gbp, slabs);
      });
    }
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
  // The pre-activation gradient (with an activation: computed in NHWC memory).
  at::Tensor gpre;
  if (act == conv::Activation::kNone) {
    gpre = grad_out;
  } else {
    const at::Tensor go = as_output(grad_out, ct, fmt);
    const at::Tensor saved = as_output(act == conv::Activation::kRelu ? out : pre, ct, fmt);
    gpre = new_output({g.N, g.K, g.P, g.Q}, go.options(), at::MemoryFormat::ChannelsLast);
    const Gemm p = plan(g, static_cast<int>(act), go, ct, at::Tensor());
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
  ConvGrads r = conv_grads(g, mask[1] ? x : at::Tensor(), gpre, weight, fmt, x.scalar_type(),
                           mask[0], mask[1], mask[2]);
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
  // The output in float32 (float64) until the bias is added: one rounding for bfloat16.
  at::Tensor out = conv_grads(g, at::Tensor(), x, weight, conv::memory_format(x), compute_type(x),
                              true, false, false)
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
    gi = new_output({g.N, g.K, g.P, g.Q}, x.options(), fmt);
    if (gi.numel() > 0) {
      const Gemm p = plan(g, 0, gi, grad_out.scalar_type(), weight);
      AT_DISPATCH_FLOATING_TYPES(ct, "conv_transpose2d_dgrad", [&] {
        const at::Tensor none;
        at::Tensor no_pre = at::empty({0}, gi.options());
        conv_fwd_impl<scalar_t>(p, grad_out, weight, none, none, gi, no_pre);
      });
    }
  }
  if (mask[1])
    gw = conv_grads(g, grad_out, x, weight, fmt, x.scalar_type(), false, true, false).weight;
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

}  // namespace fastdl::cpu::conv_impl
