// The dense direct conv SIMD over output planes (csrc/cpu/conv_params.h, PlaneFwdFn), included by
// conv_kernels.h inside an ISA namespace: convs of few input channels and taps (an image model's
// stem: 3 channels, 7x7, stride 2), as a GEMM micro-kernel whose rows are vectors of output
// pixels of a plane and whose columns are output channels, summing over the C R S taps: a tap is
// one load of each vector's inputs from the block's padded (stride 2: parity-split) input rows and
// one broadcast weight of each channel. The im2col and GEMM of the implicit GEMM, on NHWC, had
// written a 147-column panel and then transposed the output back to NCHW: 0.67x torch's time on
// the stem of 32 224x224 images.

namespace conv_detail {

// Input rows [h0, h0 + g.in_rows) of channel plane xc (H, W) into dst, each g.halves rows of
// g.len apart from column -pad_w on: as they are, or split into even and odd columns; rows and
// columns outside x zero.
template <typename T>
void plane_copy_rows(const ConvArgs& a, const PlaneRows& g, const T* xc, int64_t h0, T* dst) {
  using V = Vec<T>;
  for (int64_t i = 0; i < g.in_rows; ++i, dst += g.halves * g.len) {
    const int64_t h = h0 + i;
    if (h < 0 || h >= a.H) {
      for (int64_t j = 0; j < g.halves * g.len; j += V::W) V::zero().store(dst + j);
      continue;
    }
    const T* xr = xc + h * a.W - a.pad_w;
    for (int64_t j = 0; j < g.len; j += V::W) {
      if (g.halves == 1) {
        V::load_lanes(xr + j, inside_lanes(a, j - a.pad_w, V::W)).store(dst + j);
        continue;
      }
      V even, odd;
      V::deinterleave(xr + 2 * j, inside_lanes(a, 2 * j - a.pad_w, 2 * V::W), even, odd);
      even.store(dst + j);
      odd.store(dst + g.len + j);
    }
  }
}

// plane_copy_rows of every channel from image xn in NHWC memory, channel c's rows at dst + c
// plane: the rows zeroed, then each pixel's C channels read once, in order, and scattered (C
// strided passes, one a channel, had taken ~10% of the stem's time).
template <typename T>
void plane_copy_pixels(const ConvArgs& a, const PlaneRows& g, const T* xn, int64_t h0,
                       int64_t plane, T* dst) {
  using V = Vec<T>;
  const int64_t row = g.halves * g.len, odd = g.halves - 1;
  for (int64_t c = 0; c < a.C; ++c)
    for (int64_t j = 0; j < g.in_rows * row; j += V::W) V::zero().store(dst + c * plane + j);
  for (int64_t i = 0; i < g.in_rows; ++i) {
    const int64_t h = h0 + i;
    if (h < 0 || h >= a.H) continue;
    const T* xr = xn + h * a.W * a.C;
    T* d = dst + i * row;
    for (int64_t w = 0; w < a.W; ++w) {
      const int64_t col = w + a.pad_w, j = col >> odd;  // halves is 1 or 2: no division
      if (j >= g.len) break;
      T* dp = d + (col & odd) * g.len + j;
      for (int64_t c = 0; c < a.C; ++c) dp[c * plane] = xr[w * a.C + c];
    }
  }
}

// acc[j][i] = the sum over taps t of in[j][off[t]:] (a vector) times wk[t kPlaneChannels + i]:
// the tile's products, a function of its own so that nothing else the caller keeps in registers
// (the deinterleave's permutes, the epilogue's constants) pushes the accumulators out (they had
// spilled, once the function held both layouts' epilogues: 32 -> 61 ms on the stem).
template <typename V, int kV, int kK, typename T>
__attribute__((noinline)) void plane_products(const T* const (&in)[kV], const int64_t* off,
                                              const T* wk, int64_t taps, V (&acc)[kV][kK]) {
  static_assert(kPlaneChannels % kK == 0);
  V sum[kV][kK];
#pragma GCC unroll 8
  for (int j = 0; j < kV; ++j)
#pragma GCC unroll 8
    for (int i = 0; i < kK; ++i) sum[j][i] = V::zero();
  for (int64_t t = 0; t < taps; ++t, wk += kPlaneChannels) {
    V xv[kV];
#pragma GCC unroll 8
    for (int j = 0; j < kV; ++j) xv[j] = V::load(in[j] + off[t]);
#pragma GCC unroll 8
    for (int i = 0; i < kK; ++i) {
      const V w = V::set1(wk[i]);
#pragma GCC unroll 8
      for (int j = 0; j < kV; ++j) sum[j][i] = fma(xv[j], w, sum[j][i]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < kV; ++j)
#pragma GCC unroll 8
    for (int i = 0; i < kK; ++i) acc[j][i] = sum[j][i];
}

// Blocks [b0, b1) of output rows (PlaneRows): the block's input rows copied into scratch, then
// tiles of kV output vectors (consecutive in the block, across its rows; the last tile repeats
// its last vector, unstored) by kK output channels: kV kK FMAs for kV loads and kK broadcasts a
// tap. On the stem of 32 224x224 images, AVX-512: 2 x 8 took 32-34 ms, 4 x 4 (more loads, 3 in
// 4 across two cache lines) 33-36; streamed stores 29-31. AVX2 (16 registers): 3 x 4, half of a
// weight block a tile, ran its products at 94 GFLOP/s a Zen 3 core, 1 x 8 at 61-73 (8 FMA chains
// of 4 cycles' latency leave no slack for 2 FMAs a cycle), 2 x 4 at 86. An NCHW
// out (kPlanes) is stored plane by plane; an NHWC one takes a tile's accumulators of every
// channel into scratch, transposed there to a pixel's channels a row (the tile's pixels are
// consecutive rows m of the conv's GEMM view), then stored a vector of a pixel's channels at a
// time.
template <typename T, bool kPlanes>
FASTDL_FLATTEN void plane_blocks(const ConvArgs& a, const void* x_, bool x_cl, const void* w_,
                                 const ConvEpilogue& e, int64_t b0, int64_t b1, void* scratch) {
  using V = Vec<T>;
  // kV kK accumulators, kV inputs and a weight in registers: 19 of AVX-512's 32, else 16 (of
  // AVX2's 16).
  constexpr int kV = FASTDL_VEC == 512 ? 2 : 3, kK = FASTDL_VEC == 512 ? 8 : 4;
  static_assert(kV * Vec<T>::W <= kPlanePixels);
  const T* x = static_cast<const T*>(x_);
  const T* wt = static_cast<const T*>(w_);
  const T* bias = static_cast<const T*>(e.bias);
  // Rows from a cache line's start: the taps of no shift load whole lines.
  T* buf = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(scratch) + 63) / 64 * 64);
  T* out = static_cast<T*>(e.out);
  const PlaneRows g = plane_rows(a, sizeof(T));
  const int64_t taps = a.C * a.R * a.S, row = g.halves * g.len, plane = g.in_rows * row;
  const int64_t qv = (a.Q + V::W - 1) / V::W, hw = a.H * a.W;
  // NHWC out: the tile's accumulators (channel k's at tile + k kPlanePixels), then acc.
  T* tile = buf + a.C * plane;
  T* acc_rows = tile + (a.K + kK - 1) / kK * kK * kPlanePixels;
  // Tap t = (c, r, s)'s offset from a vector's first input: its channel, row, half and shift.
  std::vector<int64_t> off(taps);
  for (int64_t t = 0; t < taps; ++t) {
    const int64_t c = t / (a.R * a.S), r = t / a.S % a.R, sw = t % a.S * a.dil_w;
    off[t] = c * plane + r * a.dil_h * row + sw % g.halves * g.len + sw / g.halves;
  }
  const bool lean = lean_epilogue(a, e), relu_ = a.activation == kRelu;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n = b / g.blocks, p0 = b % g.blocks * g.rows, rows = imin(g.rows, a.P - p0);
    const int64_t h0 = p0 * a.stride_h - a.pad_h;
    if (x_cl)
      plane_copy_pixels(a, g, x + n * a.C * hw, h0, plane, buf);
    else
      for (int64_t c = 0; c < a.C; ++c)
        plane_copy_rows(a, g, x + (n * a.C + c) * hw, h0, buf + c * plane);
    const int64_t nvec = rows * qv;
    for (int64_t v0 = 0; v0 < nvec; v0 += kV) {
      const T* in[kV];
      int64_t o[kV], len[kV];
#pragma GCC unroll 8
      for (int j = 0; j < kV; ++j) {
        const int64_t v = imin(v0 + j, nvec - 1), pr = v / qv, q0 = v % qv * V::W;
        in[j] = buf + pr * a.stride_h * row + q0;
        o[j] = kPlanes ? n * a.out_sn + (p0 + pr) * a.Q + q0 : (n * a.P + p0 + pr) * a.Q + q0;
        len[j] = v0 + j < nvec ? imin(V::W, a.Q - q0) : 0;
      }
      for (int64_t k0 = 0; k0 < a.K; k0 += kK) {
        V acc[kV][kK];
        plane_products<V, kV, kK>(in, off.data(),
                                  wt + (k0 - k0 % kPlaneChannels) * taps + k0 % kPlaneChannels,
                                  taps, acc);
#pragma GCC unroll 8
        for (int i = 0; i < kK; ++i) {
          if constexpr (!kPlanes) {
#pragma GCC unroll 8
            for (int j = 0; j < kV; ++j) acc[j][i].store(tile + (k0 + i) * kPlanePixels + j * V::W);
            continue;
          }
          if (k0 + i >= a.K) break;
          const V vb = bias != nullptr ? V::set1(bias[k0 + i]) : V::zero();
#pragma GCC unroll 8
          for (int j = 0; j < kV; ++j)
            if (len[j] > 0)
              store_plane_vec<T>(a, e, out, lean, relu_, acc[j][i], vb, o[j] + (k0 + i) * a.out_sk,
                                 len[j]);
        }
      }
      if constexpr (kPlanes) continue;
      // o[j]: the GEMM row of vector j's first pixel; the tile's pixels are rows o[0] on.
      int64_t pixels = 0;
      for (int j = 0; j < kV; ++j) {
        conv_transpose<T>(tile + j * V::W, kPlanePixels, acc_rows + pixels * a.K, a.K, a.K, len[j]);
        pixels += len[j];
      }
      // Pixel by pixel (dense NHWC: pixel m's channels at m K on), a vector of channels at a time.
      for (int64_t i = 0; i < pixels; ++i)
        for_vectors<V::W>(0, a.K, [&](int64_t c, int64_t vlen) {
          const V vb = bias != nullptr ? ld<V>(bias + c, vlen) : V::zero();
          store_plane_vec<T>(a, e, out, lean, relu_, ld<V>(acc_rows + i * a.K + c, vlen), vb,
                             (o[0] + i) * a.K + c, vlen);
        });
    }
  }
}

}  // namespace conv_detail

// The forward of plane_blocks, NCHW out plane by plane or NHWC out through the tiles' transposes.
template <typename T>
FASTDL_FLATTEN void conv_plane_fwd(const ConvArgs& a, const void* x, bool x_cl, const void* wt,
                                   const ConvEpilogue& e, int64_t b0, int64_t b1, void* scratch) {
  if (a.out_spq == 1)
    conv_detail::plane_blocks<T, true>(a, x, x_cl, wt, e, b0, b1, scratch);
  else
    conv_detail::plane_blocks<T, false>(a, x, x_cl, wt, e, b0, b1, scratch);
  if (e.stream) Vec<T>::fence();
}
