// The conv as one GEMM per tap, for small images (deep layers) where many taps read padding
// (csrc/cpu/conv.cpp picks it in plan(): valid_taps): forward, input gradient and weight gradient,
// each GEMM on just the output pixels whose tap reads inside the input.
#include <algorithm>
#include <array>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu/conv.h"
#include "cpu/gemm.h"

namespace fastdl::cpu::conv_impl {
namespace {

// The blocks of the per-tap GEMMs hold about kMinRows rows, in at least kTapBlocks blocks when
// there are as many images (a batch of 16 on 2x2 would otherwise be one block, for one thread).
constexpr int64_t kTapBlocks = 2;
// Input channels of a weight-gradient GEMM of the taps (its B, packed per call).
constexpr int64_t kTapWgradCols = 256;

// Output positions [first, second) along one axis whose tap t reads inside the input (o * stride
// - pad + t * dil in [0, size)).
std::pair<int64_t, int64_t> tap_range(int64_t out, int64_t size, int64_t stride, int64_t pad,
                                      int64_t dil, int64_t t) {
  const int64_t off = t * dil - pad;  // input position o * stride + off
  const int64_t lo = off >= 0 ? 0 : (-off + stride - 1) / stride;
  const int64_t hi = size - 1 - off < 0 ? 0 : (size - 1 - off) / stride + 1;
  return {std::min(lo, out), std::clamp(hi, std::min(lo, out), out)};
}

// This thread's scratch buffer `slot`, at least n elements (kept for its later calls).
template <typename T>
T* scratch(int slot, int64_t n) {
  thread_local std::vector<T> buf[3];
  if (buf[slot].size() < static_cast<size_t>(n)) buf[slot].resize(n);
  return buf[slot].data();
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

}  // namespace

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

template void taps_forward<float>(const Gemm&, const float*, const float*, ConvEpilogue);
template void taps_input_grad<float>(const Gemm&, const float*, const float*, float*);
template void taps_params<float>(const Gemm&, const float*, const float*, float*, float*);
template void taps_forward<double>(const Gemm&, const double*, const double*, ConvEpilogue);
template void taps_input_grad<double>(const Gemm&, const double*, const double*, double*);
template void taps_params<double>(const Gemm&, const double*, const double*, double*, double*);

}  // namespace fastdl::cpu::conv_impl
