// Winograd F(m x m, 3x3) for the CPU conv ops (csrc/cpu/conv.cpp picks it in plan()): blocks of
// whole tile rows go through the input transform, (m + 2)^2 GEMMs (cpu/gemm.h) and the output
// transform with the fused epilogue while they sit in L2; the weight gradient runs the adjoint
// transforms. The transforms themselves are kernels, compiled per ISA (cpu/conv_winograd.h).
#include <algorithm>
#include <atomic>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu/conv.h"
#include "cpu/gemm.h"
#include "cpu/output.h"

namespace fastdl::cpu::conv_impl {
namespace {

// A block holds at least kWinogradMinTiles tiles (rows of the GEMMs) and otherwise as many as
// keep its transformed input and products ((m + 2)^2 x tiles x (C + K) floats) within
// kWinogradBlockBytes of L2.
constexpr int64_t kWinogradMinTiles = 24;
constexpr int64_t kWinogradBlockBytes = int64_t{512} << 10;
// Tiles of a weight-gradient block: the depth of its GEMMs V^T dM, each of which reads and
// rewrites a C x K partial (24 tiles left 256 channels on 8x8 at 0.55x torch; bound by those
// passes, not the FMAs).
constexpr int64_t kWinogradGradTiles = 256;

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

}  // namespace

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
  const std::vector<PackedB<float>> wp = pack_weight(p, wm.const_data_ptr<float>(), true);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> col(p.rows * p.j), acc(p.rows * K);
    ConvEpilogue eb = e;
    eb.acc = acc.data();
    for (int64_t b = b0; b < b1; ++b) {
      const auto [m0, m1] = wb.rows(a, b);
      for (int64_t i = m0; direct[b] && i < m1; i += p.rows)
        forward_rows<float>(p, xn.const_data_ptr<float>(), wp, eb, i, std::min(p.rows, m1 - i),
                            col.data());
    }
  });
  return true;
}

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
// (N, C, H, W) in memory format fmt. Undefined when Winograd does not apply (padding over 2
// included).
at::Tensor winograd_input_grad(const conv::ConvGeom& g, const at::Tensor& gpre,
                               const at::Tensor& weight, at::MemoryFormat fmt) {
  conv::ConvGeom adj = g;
  std::swap(adj.C, adj.K);
  std::tie(adj.H, adj.W, adj.P, adj.Q) = std::make_tuple(g.P, g.Q, g.H, g.W);
  adj.pad_h = g.R - 1 - g.pad_h;
  adj.pad_w = g.S - 1 - g.pad_w;
  if (gpre.scalar_type() != at::kFloat || adj.pad_h < 0 || adj.pad_w < 0 || g.N * g.H * g.W == 0)
    return {};
  at::Tensor gx = new_output({g.N, g.C, g.H, g.W}, gpre.options(), fmt);
  const Gemm p = plan(adj, 0, gx, at::kFloat, at::Tensor());  // the weight only sets crs
  if (p.wino == 0) return {};  // before flipping the weight (a pass over it)
  const at::Tensor w = weight.flip({2, 3}).transpose(0, 1);
  return winograd_forward(p, gpre, w, plain_epilogue(gx)) ? gx : at::Tensor();
}
}  // namespace fastdl::cpu::conv_impl
