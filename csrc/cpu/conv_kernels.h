// The conv kernels around the GEMMs (csrc/cpu/conv_params.h): im2col, col2im, the fused
// epilogue (bias + residual + activation) and its backward, the direct depthwise conv and its
// gradients, the grouped convs (cpu/conv_grouped.h), the dense direct conv SIMD over output
// planes (cpu/conv_plane.h) and the Winograd transforms (cpu/conv_winograd.h).
// Included inside an ISA namespace by csrc/cpu/isa/*.cpp; plain loops the compiler vectorizes
// for that ISA (the innermost loops run over contiguous NHWC channels). No torch, no std
// templates (see vec.h).

namespace conv_detail {

template <typename T>
inline T activate(T v, int act) {
  switch (act) {
    case kRelu:
      return v > T(0) ? v : (v != v ? v : T(0));
    case kSilu:
      return v / (T(1) + __builtin_exp(-v));
    case kGelu:  // exact GELU: v * Phi(v)
      return T(0.5) * v * (T(1) + __builtin_erf(v * T(0.70710678118654752440)));
    default:
      return v;
  }
}

// d act / d v at the pre-activation v (silu, gelu) or from the output y (relu: y > 0 <=> v > 0).
template <typename T>
inline T activate_grad(T v, T y, int act) {
  switch (act) {
    case kRelu:
      return y > T(0) ? T(1) : T(0);
    case kSilu: {
      const T sig = T(1) / (T(1) + __builtin_exp(-v));
      return sig * (T(1) + v * (T(1) - sig));
    }
    case kGelu: {
      const T cdf = T(0.5) * (T(1) + __builtin_erf(v * T(0.70710678118654752440)));
      const T pdf = T(0.39894228040143267794) * __builtin_exp(T(-0.5) * v * v);
      return cdf + v * pdf;
    }
    default:
      return T(1);
  }
}

// v + residual at element offset o of residual, pre and out, stored as S; writes pre (when
// asked) and out.
template <typename S, typename T>
inline void store_as(const ConvArgs& a, const ConvEpilogue& e, T v, int64_t o) {
  if (e.residual != nullptr) v += widen(static_cast<const S*>(e.residual)[o]);
  if (e.pre != nullptr) narrow(static_cast<S*>(e.pre) + o, v);
  narrow(static_cast<S*>(e.out) + o, activate(v, a.activation));
}

// v = acc + bias[k] + residual at element offset o; writes pre (when asked) and out, in T or
// (e.bf16) bfloat16.
template <typename T>
inline void store(const ConvArgs& a, const ConvEpilogue& e, T v, int64_t k, int64_t o) {
  if (e.bias != nullptr) v += static_cast<const T*>(e.bias)[k];
  if constexpr (sizeof(T) == 4)
    if (e.bf16) return store_as<bf16>(a, e, v, o);
  store_as<T>(a, e, v, o);
}

// dst[0, n) = src[0, n), or zeros when src is null: whole or masked vectors for float and double.
template <typename T>
inline void copy_run(T* dst, const T* src, int64_t n) {
  if constexpr (sizeof(T) >= 4) {
    using V = Vec<T>;
    for_vectors<V::W>(0, n, [&](int64_t c, int64_t len) {
      st(dst + c, src != nullptr ? ld<V>(src + c, len) : V::zero(), len);
    });
  } else {
    for (int64_t c = 0; c < n; ++c) dst[c] = src != nullptr ? src[c] : T(0);
  }
}

// The taps [s0, s1) of a row of S taps starting at input column w0 that read inside [0, W) with
// unit dilation.
inline void inside_taps(int64_t w0, int64_t S, int64_t W, int64_t& s0, int64_t& s1) {
  s0 = std::min(S, std::max<int64_t>(0, -w0));
  s1 = std::max(s0, std::min(S, W - w0));
}

// Output pixel (n, p, q) of GEMM row m = (n P + p) Q + q, stepped a row at a time without the
// three divisions per row (for a 3-channel 4x4 conv they had cost as much as the row's copy).
struct OutPixel {
  int64_t n, p, q;
  OutPixel(const ConvArgs& a, int64_t m)
      : n(m / (a.P * a.Q)), p(m % (a.P * a.Q) / a.Q), q(m % a.Q) {}
  void next(const ConvArgs& a) {
    if (++q < a.Q) return;
    q = 0;
    if (++p < a.P) return;
    p = 0;
    ++n;
  }
  int64_t out_offset(const ConvArgs& a) const { return n * a.out_sn + (p * a.Q + q) * a.out_spq; }
};

// A row r of one output pixel's taps when the conv has one group and unit column dilation: the
// taps inside the image are consecutive pixels, one run of (s1 - s0) C elements of x (a 4x4
// kernel on 3 channels: 12 elements, one masked vector, where a copy per tap moved 3).
inline bool tap_rows_run(const ConvArgs& a) {
  return a.groups == 1 && a.dil_w == 1;
}

}  // namespace conv_detail

// Column j of tap (r, s) and channel c: (r S + s) cg + c, or c R S + r S + s with a.crs (a
// strided gather then: plain loops, not SIMD work). kCrs makes the channel stride a constant.
template <typename T, bool kCrs>
void im2col_impl(const ConvArgs& a, const T* x, int64_t m0, int64_t mb, int64_t g0, int64_t g1,
                 T* col) {
  const int64_t cg = a.C / a.groups, RS = a.R * a.S, j = RS * cg;
  const int64_t cs = kCrs ? RS : 1;
  const bool runs = !kCrs && conv_detail::tap_rows_run(a);
  conv_detail::OutPixel o(a, m0);
  for (int64_t i = 0; i < mb; ++i, o.next(a)) {
    const int64_t n = o.n, p = o.p, w0 = o.q * a.stride_w - a.pad_w;
    int64_t s0 = 0, s1 = 0;
    if (runs) conv_detail::inside_taps(w0, a.S, a.W, s0, s1);
    for (int64_t r = 0; r < a.R; ++r) {
      const int64_t h = p * a.stride_h - a.pad_h + r * a.dil_h;
      if (runs) {
        T* dst = col + i * j + r * a.S * cg;
        const bool row = h >= 0 && h < a.H && s1 > s0;
        const int64_t b = row ? s0 : 0, e = row ? s1 : 0;
        conv_detail::copy_run<T>(dst, nullptr, b * cg);
        if (row)
          conv_detail::copy_run(dst + b * cg, x + ((n * a.H + h) * a.W + w0 + b) * a.C,
                                (e - b) * cg);
        conv_detail::copy_run<T>(dst + e * cg, nullptr, (a.S - e) * cg);
        continue;
      }
      for (int64_t s = 0; s < a.S; ++s) {
        const int64_t w = w0 + s * a.dil_w;
        const bool inside = h >= 0 && h < a.H && w >= 0 && w < a.W;
        const T* pixel = inside ? x + ((n * a.H + h) * a.W + w) * a.C : nullptr;
        for (int64_t g = g0; g < g1; ++g) {
          T* dst = col + ((g - g0) * mb + i) * j + (r * a.S + s) * (kCrs ? 1 : cg);
          const T* src = inside ? pixel + g * cg : nullptr;
          if constexpr (!kCrs) {  // cg channels (float, double: whole or masked vectors)
            conv_detail::copy_run<T>(dst, src, cg);
            continue;
          }
          for (int64_t c = 0; c < cg; ++c) dst[c * cs] = inside ? src[c] : T(0);
        }
      }
    }
  }
}

template <typename T>
void conv_im2col(const ConvArgs& a, const void* x, int64_t m0, int64_t mb, int64_t g0, int64_t g1,
                 void* col) {
  const T* xt = static_cast<const T*>(x);
  T* ct = static_cast<T*>(col);
  a.crs ? im2col_impl<T, true>(a, xt, m0, mb, g0, g1, ct)
        : im2col_impl<T, false>(a, xt, m0, mb, g0, g1, ct);
}

template <typename T, bool kCrs>
void col2im_impl(const ConvArgs& a, const T* gcol, int64_t m0, int64_t mb, int64_t g, T* gx) {
  const int64_t cg = a.C / a.groups, RS = a.R * a.S, j = RS * cg;
  const int64_t cs = kCrs ? RS : 1;
  const bool runs = !kCrs && conv_detail::tap_rows_run(a);
  conv_detail::OutPixel o(a, m0);
  for (int64_t i = 0; i < mb; ++i, o.next(a)) {
    const int64_t n = o.n, p = o.p, w0 = o.q * a.stride_w - a.pad_w;
    const T* row = gcol + i * j;
    int64_t s0 = 0, s1 = a.S;
    if (runs) conv_detail::inside_taps(w0, a.S, a.W, s0, s1);
    for (int64_t r = 0; r < a.R; ++r) {
      const int64_t h = p * a.stride_h - a.pad_h + r * a.dil_h;
      if (h < 0 || h >= a.H) continue;
      if (runs) {  // the row's taps inside: one run of (s1 - s0) C elements of gx
        if (s1 == s0) continue;
        T* dst = gx + ((n * a.H + h) * a.W + w0 + s0) * a.C;
        const T* src = row + (r * a.S + s0) * cg;
        using V = Vec<T>;  // float or double
        for_vectors<V::W>(0, (s1 - s0) * cg, [&](int64_t c, int64_t len) {
          st(dst + c, ld<V>(dst + c, len) + ld<V>(src + c, len), len);
        });
        continue;
      }
      for (int64_t s = 0; s < a.S; ++s) {
        const int64_t w = w0 + s * a.dil_w;
        if (w < 0 || w >= a.W) continue;
        const T* src = row + (r * a.S + s) * (kCrs ? 1 : cg);
        T* dst = gx + ((n * a.H + h) * a.W + w) * a.C + g * cg;
        for (int64_t c = 0; c < cg; ++c) dst[c] += src[c * cs];
      }
    }
  }
}

template <typename T>
void conv_col2im(const ConvArgs& a, const void* gcol, int64_t m0, int64_t mb, int64_t g, void* gx) {
  const T* gt = static_cast<const T*>(gcol);
  T* xt = static_cast<T*>(gx);
  a.crs ? col2im_impl<T, true>(a, gt, m0, mb, g, xt) : col2im_impl<T, false>(a, gt, m0, mb, g, xt);
}

template <typename T>
void conv_epilogue_bwd(const ConvArgs& a, const void* grad_out_, const void* out_, const void* pre_,
                       void* gpre_, int64_t m0, int64_t m1) {
  const T* go = static_cast<const T*>(grad_out_);
  const T* out = static_cast<const T*>(out_);
  const T* pre = static_cast<const T*>(pre_);
  T* gpre = static_cast<T*>(gpre_);
  const int64_t pq = a.P * a.Q;
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t base = m / pq * a.out_sn + m % pq * a.out_spq;
    for (int64_t k = 0; k < a.K; ++k) {
      const int64_t o = base + k * a.out_sk;
      const T v = pre != nullptr ? pre[o] : T(0), y = out != nullptr ? out[o] : T(0);
      gpre[m * a.K + k] = go[o] * conv_detail::activate_grad(v, y, a.activation);
    }
  }
}

constexpr int64_t kTransposeAhead = 4;

// dst[c ldd + r] = src[r lds + c] for r < rows, c < cols: a transposed copy, NCHW <-> NHWC of an
// image for conv.cpp (torch's permute copy moved ~15 GB/s here) and the NCHW epilogue's blocks.
// AVX-512 transposes 16 x 16 blocks in registers (transpose16), a last block of
// fewer rows through masked loads and stores (the epilogue's tiles of 14 pixels had run the plain
// loop), AVX2 8 x 8 blocks (transpose8), the last ones of fewer rows or columns masked (the
// grouped kernels' copies of NCHW rows of 7 pixels); AVX-512's remaining columns, and the scalar
// build, run plain loops (AVX2's had: its NCHW Winograd forward's transposes ~15% of its time
// on a Zen 3, as much as the GEMMs'). The AVX-512 loop prefetches
// the source kTransposeAhead blocks ahead: its rows are often the channel planes of an NCHW
// image, 16 streams from memory at once (the NCHW Winograd forward's input, 3-4% faster).
template <typename T>
void conv_transpose(const void* src_, int64_t lds, void* dst_, int64_t ldd, int64_t rows,
                    int64_t cols) {
  const T* src = static_cast<const T*>(src_);
  T* dst = static_cast<T*>(dst_);
  int64_t r = 0;
#if FASTDL_VEC == 512
  if constexpr (sizeof(T) == 4) {
    for (; r < rows; r += 16) {
      const int64_t nr = imin(16, rows - r);
      const __mmask16 live = static_cast<__mmask16>((1u << nr) - 1u);
      int64_t c = 0;
      for (; c + 16 <= cols; c += 16) {
        __m512 a[16];
        if (c + 16 * kTransposeAhead < cols)
          for (int i = 0; i < nr; ++i)
            __builtin_prefetch(src + (r + i) * lds + c + 16 * kTransposeAhead);
        for (int i = 0; i < 16; ++i)
          a[i] = i < nr ? _mm512_loadu_ps(src + (r + i) * lds + c) : _mm512_setzero_ps();
        transpose16(a);
        for (int j = 0; j < 16; ++j) {
          if (nr == 16)
            _mm512_storeu_ps(dst + (c + j) * ldd + r, a[j]);
          else {
            check_store(dst + (c + j) * ldd + r, nr * 4);
            _mm512_mask_storeu_ps(dst + (c + j) * ldd + r, live, a[j]);
          }
        }
      }
      for (; c < cols; ++c)
        for (int64_t i = r; i < r + nr; ++i) dst[c * ldd + i] = src[i * lds + c];
    }
  }
#elif FASTDL_VEC == 256
  if constexpr (sizeof(T) == 4) {
    for (; r < rows; r += 8) {
      const int64_t nr = imin(8, rows - r);
      for (int64_t c = 0; c < cols; c += 8) {
        const int64_t nc = imin(8, cols - c);
        __m256 a[8];
        for (int i = 0; i < 8; ++i)
          a[i] = i < nr ? ld<VecF>(src + (r + i) * lds + c, nc).v : _mm256_setzero_ps();
        transpose8(a);
        for (int j = 0; j < nc; ++j) st(dst + (c + j) * ldd + r, VecF{a[j]}, nr);
      }
    }
  }
#endif
  for (; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

namespace conv_detail {

// Whether the len outputs at out are streamed (e.stream): a whole vector, aligned to its size.
template <typename V, typename S>
inline bool streams(const ConvEpilogue& e, const S* out, int64_t len) {
  return e.stream && len == V::W && reinterpret_cast<uintptr_t>(out) % (V::W * sizeof(S)) == 0;
}

// The epilogue of len contiguous outputs at element offset o (one SIMD vector of T) after the
// bias: v + residual, pre stored when asked, then the activation (ReLU in SIMD, the
// transcendental ones per lane), residual, pre and out stored as S. A whole vector at an
// aligned `out` is streamed when e.stream.
template <typename S, typename T, typename V>
inline void store_vec_as(const ConvArgs& a, const ConvEpilogue& e, V v, int64_t o, int64_t len) {
  if (e.residual != nullptr) v = v + ld<V>(static_cast<const S*>(e.residual) + o, len);
  if (e.pre != nullptr) st(static_cast<S*>(e.pre) + o, v, len);
  S* out = static_cast<S*>(e.out) + o;
  if (a.activation == 0 || a.activation == kRelu) {
    const V y = a.activation == kRelu ? relu(v) : v;
    if (streams<V>(e, out, len))
      y.stream(out);
    else
      st(out, y, len);
    return;
  }
  T lanes[V::W];
  v.store(lanes);
  for (int64_t i = 0; i < len; ++i) narrow(out + i, activate(lanes[i], a.activation));
}

// store_vec_as of v + bias (per lane), in T or (e.bf16) bfloat16.
template <typename T, typename V>
inline void store_vec(const ConvArgs& a, const ConvEpilogue& e, V v, V bias, int64_t o,
                      int64_t len) {
  v = v + bias;
  if constexpr (sizeof(T) == 4)
    if (e.bf16) return store_vec_as<bf16, T>(a, e, v, o, len);
  store_vec_as<T, T>(a, e, v, o, len);
}

// The epilogue of nq consecutive output pixels (the first at element offset base), channels
// [c0, c0 + len) of each in acc[j]: vectors where the channels are contiguous in out
// (channels_last), else lane by lane. Channels_last with at most a ReLU (no residual or pre:
// lean_store) takes a loop of its own with the settings read once, out stored as S (T, or
// bfloat16 for a bf16 output): per vector, store_vec's checks had doubled the time of a 3x3
// depthwise conv (whose stores re-read them, as out may alias), and 3.4x it for bf16.
inline bool lean_store(const ConvArgs& a, const ConvEpilogue& e) {
  return e.residual == nullptr && e.pre == nullptr && (a.activation == 0 || a.activation == kRelu);
}
// lean_store with out in T itself.
inline bool lean_epilogue(const ConvArgs& a, const ConvEpilogue& e) {
  return lean_store(a, e) && !e.bf16;
}
template <typename S, typename V>
inline void store_pixels_lean(const ConvArgs& a, const ConvEpilogue& e, const V* acc, int64_t nq,
                              int64_t base, int64_t c0, int64_t len, V vb) {
  S* out = static_cast<S*>(e.out) + base + c0;
  const int64_t step = a.out_spq;
  const bool relu_ = a.activation == kRelu;
  // Streamed only by whole cache lines: the next pixel's vector is a row of C elements away, so
  // a half-line vector (bf16 on AVX-512, float on AVX2) leaves the write-combining buffer half
  // full (a bf16 3x3 depthwise conv ran at a third of its float32 speed); store_pixel_lines
  // streams such vectors in pairs. store_vec_as, which serves the other epilogues (mostly
  // vectors along one pixel's channels, that fill the lines they share), still streams half
  // lines.
  constexpr bool kLines = V::W * sizeof(S) % 64 == 0;
  const bool stream = kLines && e.stream && len == V::W && step % V::W == 0 &&
                      reinterpret_cast<uintptr_t>(out) % (V::W * sizeof(S)) == 0;
  for (int64_t j = 0; j < nq; ++j) {
    const V y = relu_ ? relu(acc[j] + vb) : acc[j] + vb;
    if (stream)
      y.stream(out + j * step);
    else
      st(out + j * step, y, len);
  }
}

// Whether store_pixel_lines applies to a channels_last output of T: its vectors are half a cache
// line (float on AVX2), out streams (e.stream) in T with at most a ReLU, and every pixel's
// channels start on a line (C and the pixel step whole lines, out aligned).
template <typename T>
inline bool pixel_lines(const ConvArgs& a, const ConvEpilogue& e) {
  constexpr int64_t kLine = 64 / sizeof(T);
  return Vec<T>::W * 2 == kLine && e.stream && a.out_sk == 1 && lean_epilogue(a, e) &&
         a.K % kLine == 0 && a.out_spq % kLine == 0 && reinterpret_cast<uintptr_t>(e.out) % 64 == 0;
}

// store_pixels_lean of two vectors of channels a pixel, lo[j] and hi[j] (channels [c0, c0 + 2 W)
// of pixel j, c0 on a line; pixel_lines holds), streamed back to back: the pixel's whole line.
// One vector at a time, the other half of a line came a whole tile later: not streamable, and a
// regular store first reads the line, three passes over memory for a 3x3 depthwise conv instead
// of two (32 x 256 x 28 x 28 channels_last on the Zen 3: 3.6-4.2 -> 2.4-2.8 ms).
template <typename T, typename V>
inline void store_pixel_lines(const ConvArgs& a, const ConvEpilogue& e, const V* lo, const V* hi,
                              int64_t nq, int64_t base, int64_t c0, V vb_lo, V vb_hi) {
  T* out = static_cast<T*>(e.out) + base + c0;
  const bool relu_ = a.activation == kRelu;
  for (int64_t j = 0; j < nq; ++j) {
    const V y0 = lo[j] + vb_lo, y1 = hi[j] + vb_hi;
    (relu_ ? relu(y0) : y0).stream(out + j * a.out_spq);
    (relu_ ? relu(y1) : y1).stream(out + j * a.out_spq + V::W);
  }
}
template <typename T, typename V>
inline void store_pixels(const ConvArgs& a, const ConvEpilogue& e, const V* acc, int64_t nq,
                         int64_t base, int64_t c0, int64_t len, V vb) {
  if (a.out_sk == 1 && lean_store(a, e)) {
    if constexpr (sizeof(T) == 4)
      if (e.bf16) return store_pixels_lean<bf16>(a, e, acc, nq, base, c0, len, vb);
    return store_pixels_lean<T>(a, e, acc, nq, base, c0, len, vb);
  }
  for (int64_t j = 0; j < nq; ++j) {
    const int64_t o = base + j * a.out_spq;
    if (a.out_sk == 1) {
      store_vec<T>(a, e, acc[j], vb, o + c0, len);
      continue;
    }
    T lanes[V::W];
    acc[j].store(lanes);
    for (int64_t c = 0; c < len; ++c) store<T>(a, e, lanes[c], c0 + c, o + (c0 + c) * a.out_sk);
  }
}

// The pixels of an NCHW block that nchw_block_lean stores: two vectors on AVX2, whose 8 floats
// are half a cache line; a channel's two vectors then fill their line back to back (streamed one
// vector at a time, a channel's half lines waited for the next block of pixels, 64 channels
// later, in the write-combining buffers: the NCHW Winograd 3x3 forward's epilogue ~20% of its
// time on a Zen 3).
template <typename T>
constexpr int64_t kNchwSpan = Vec<T>::W * (FASTDL_VEC == 256 && sizeof(T) == 4 ? 2 : 1);

// The NCHW epilogue of len pixels (a whole number of vectors, at most kNchwSpan; lda apart in
// acc) of W channels from k, with at most a ReLU, in registers: each W x W block transposed, the
// bias added, each channel's pixels stored at out + o + k' out_sk (streamed when e.stream and
// aligned). False, with nothing done, for the other blocks and epilogues (transposed through
// memory then, and stored by store_vec: 14% of an NCHW Winograd 3x3 forward).
template <typename T>
inline bool nchw_block_lean(const ConvArgs& a, const ConvEpilogue& e, const T* acc, int64_t lda,
                            int64_t len, int64_t nk, const T* bias, int64_t k, int64_t o) {
#if FASTDL_VEC == 512 || FASTDL_VEC == 256
  if constexpr (sizeof(T) == 4) {
    constexpr int W = VecF::W, kBlocks = kNchwSpan<T> / W;
    if (len % W != 0 || nk != W || !lean_epilogue(a, e)) return false;
    const int blocks = static_cast<int>(len / W);
    decltype(VecF::v) r[kBlocks][W];
    for (int h = 0; h < blocks; ++h) {
      for (int i = 0; i < W; ++i) r[h][i] = VecF::load(acc + (h * W + i) * lda).v;
#if FASTDL_VEC == 512
      transpose16(r[h]);
#else
      transpose8(r[h]);
#endif
    }
    T* out = static_cast<T*>(e.out) + o;
    const bool stream =
        e.stream && a.out_sk % W == 0 && reinterpret_cast<uintptr_t>(out) % (W * 4) == 0;
    for (int i = 0; i < W; ++i) {
      const VecF vb = VecF::set1(bias != nullptr ? bias[k + i] : T(0));
      for (int h = 0; h < blocks; ++h) {
        VecF y = VecF{r[h][i]} + vb;
        if (a.activation == kRelu) y = relu(y);
        if (stream)
          y.stream(out + i * a.out_sk + h * W);
        else
          y.store(out + i * a.out_sk + h * W);
      }
    }
    return true;
  }
#endif
  return false;
}

// The block's GEMM result acc (mb rows x the group's kg channels) through the epilogue into out,
// one SIMD vector at a time: along the channels where they are contiguous in out (channels_last),
// else along the pixels of each channel plane (NCHW), a vector of pixels of one image transposed
// through a small tile in L1 (per-element strided stores had cost ~0.8x the GEMM's time), or in
// registers (nchw_block_lean). The caller fences streamed stores.
template <typename T>
void epilogue_rows(const ConvArgs& a, const ConvEpilogue& e, int64_t m0, int64_t mb, int64_t g) {
  using V = Vec<T>;
  const T* acc = static_cast<const T*>(e.acc);
  const T* bias = static_cast<const T*>(e.bias);
  const int64_t kg = a.K / a.groups, k0 = g * kg, pq = a.P * a.Q;
  if (a.out_sk == 1 || a.out_spq != 1) {
    OutPixel o(a, m0);
    for (int64_t i = 0; i < mb; ++i, o.next(a)) {
      const int64_t base = o.out_offset(a);
      if (a.out_sk != 1) {
        for (int64_t k = k0; k < k0 + kg; ++k)
          store<T>(a, e, acc[i * kg + k - k0], k, base + k * a.out_sk);
        continue;
      }
      for_vectors<V::W>(0, kg, [&](int64_t c, int64_t len) {
        const V vb = bias != nullptr ? ld<V>(bias + k0 + c, len) : V::zero();
        store_vec<T>(a, e, ld<V>(acc + i * kg + c, len), vb, base + k0 + c, len);
      });
    }
    return;
  }
  T tile[V::W * V::W];
  for (int64_t i0 = 0; i0 < mb;) {
    const int64_t m = m0 + i0, run = imin(mb - i0, pq - m % pq);
    const int64_t base = m / pq * a.out_sn + m % pq;
    // kNchwSpan pixels at a time, W channels at a time: in registers (nchw_block_lean), or each
    // W x W block of acc transposed into the tile, whose rows are then one channel's pixels each.
    for_vectors<kNchwSpan<T>>(0, run, [&](int64_t j0, int64_t span) {
      for (int64_t kc = 0; kc < kg; kc += V::W) {
        const int64_t nk = imin(V::W, kg - kc);
        if (nchw_block_lean<T>(a, e, acc + (i0 + j0) * kg + kc, kg, span, nk, bias, k0 + kc,
                               base + (k0 + kc) * a.out_sk + j0))
          continue;
        for_vectors<V::W>(j0, j0 + span, [&](int64_t j, int64_t len) {
          conv_transpose<T>(acc + (i0 + j) * kg + kc, kg, tile, V::W, len, nk);
          for (int64_t k = kc; k < kc + nk; ++k) {
            const V vb = V::set1(bias != nullptr ? bias[k0 + k] : T(0));
            store_vec<T>(a, e, ld<V>(tile + (k - kc) * V::W, len), vb,
                         base + (k0 + k) * a.out_sk + j, len);
          }
        });
      }
    });
    i0 += run;
  }
}

}  // namespace conv_detail

// Flattened: epilogue_rows' per-vector lambda and the NCHW blocks' transpose16 had stayed out of
// line (the 7x7 stem's forward 4%, the NCHW Winograd 3x3 forward 2-4% slower).
template <typename T>
FASTDL_FLATTEN void conv_epilogue(const ConvArgs& a, const ConvEpilogue& e, int64_t m0, int64_t mb,
                                  int64_t g) {
  conv_detail::epilogue_rows<T>(a, e, m0, mb, g);
  if (e.stream) Vec<T>::fence();
}

// kTile output pixels of a direct conv from (n, p, q0), nq of them real, channels [c0, c0 + len):
// taps(acc, xrow, r) adds the products of tap row r into acc[kTile] from the input row xrow (at
// channel c0 of its first pixel), for the tap rows that lie inside x; then the epilogue, with the
// bias. kTile independent accumulators hide the FMA latency and reuse each weight load.
template <typename T, int64_t kTile, typename Tap>
inline void direct_tile(const ConvArgs& a, const T* x, const ConvEpilogue& e, int64_t n, int64_t p,
                        int64_t q0, int64_t nq, int64_t c0, int64_t len, Tap&& taps) {
  using V = Vec<T>;
  V acc[kTile];
  for (int64_t j = 0; j < kTile; ++j) acc[j] = V::zero();
  for (int64_t r = 0; r < a.R; ++r) {
    const int64_t h = p * a.stride_h - a.pad_h + r * a.dil_h;
    if (h < 0 || h >= a.H) continue;
    const T* xrow = x + (n * a.H + h) * a.W * a.C + c0;
    taps(acc, xrow, r);
  }
  const T* bias = static_cast<const T*>(e.bias);
  const V vb = bias != nullptr ? ld<V>(bias + c0, len) : V::zero();
  conv_detail::store_pixels<T>(a, e, acc, nq, n * a.out_sn + (p * a.Q + q0) * a.out_spq, c0, len,
                               vb);
}

#if FASTDL_VEC == 512
constexpr int kVecRegs = 32;
#else
constexpr int kVecRegs = 16;
#endif

namespace conv_detail {

// Input row (n, h) of x (NHWC, T or, x_bf16, bfloat16 bits widened here) into dst, laid out as a
// DepthwiseRing row.
template <typename T>
void depthwise_row_copy(const ConvArgs& a, const DepthwiseRing& g, const void* x, bool x_bf16,
                        int64_t n, int64_t h, T* dst) {
  using V = Vec<T>;
  const int64_t row = (n * a.H + h) * a.W * a.C;
  const T* src = static_cast<const T*>(x) + row;
  const bf16* src_bf16 = static_cast<const bf16*>(x) + row;
  for (int64_t w = 0; w < g.width; ++w) {
    const int64_t wi = w - a.pad_w, o = wi * a.C;
    const bool in = wi >= 0 && wi < a.W;
    for_vectors<V::W>(0, a.C, [&](int64_t c, int64_t len) {
      V v = V::zero();
      if (in) v = x_bf16 ? ld<V>(src_bf16 + o + c, len) : ld<V>(src + o + c, len);
      v.store(dst + w * g.pixel + c);
    });
  }
}

// acc[i] = output pixel q0 + i of an output row, channels [c0, c0 + W): the sum over its taps
// of the ring rows (rows[r]: tap row r's, null outside x) times the blocked weight (wb: channel
// c0's tap 0). With kS > 0 the taps are kS wide, stride kSW, undilated, and each input column
// loaded serves every pixel of the tile that reads it (3x3, stride 1, 8 pixels: 13 loads for 24
// multiply-adds a tap row, not 27); kS = 0 takes S, stride and dilation at run time.
template <typename T, int kT, int kS, int kSW, typename V>
inline void depthwise_tile(const ConvArgs& a, const DepthwiseRing& g, const T* const* rows,
                           const T* wb, int64_t q0, int64_t c0, V* out) {
  constexpr int64_t kLine = 64 / sizeof(T);
  V acc[kT];  // only constant indices: in registers (out, indexed at run time, is not)
  for (int i = 0; i < kT; ++i) acc[i] = V::zero();
  const int64_t px = g.pixel;
  for (int64_t r = 0; r < a.R; ++r) {
    if (rows[r] == nullptr) continue;
    const T* wr = wb + r * a.S * kLine;
    if constexpr (kS > 0) {
      const T* xr = rows[r] + q0 * kSW * px + c0;
      V wv[kS];
      for (int s = 0; s < kS; ++s) wv[s] = V::load(wr + s * kLine);
#pragma GCC unroll 32
      for (int j = 0; j < (kT - 1) * kSW + kS; ++j) {
        const V xv = V::load(xr + j * px);
#pragma GCC unroll 8
        for (int s = 0; s < kS; ++s) {
          const int d = j - s;
          if (d >= 0 && d % kSW == 0 && d / kSW < kT) acc[d / kSW] = fma(xv, wv[s], acc[d / kSW]);
        }
      }
    } else {
      const T* xr = rows[r] + q0 * a.stride_w * px + c0;
      for (int64_t s = 0; s < a.S; ++s) {
        const V wv = V::load(wr + s * kLine);
        const T* xs = xr + s * a.dil_w * px;
        for (int i = 0; i < kT; ++i) acc[i] = fma(V::load(xs + i * a.stride_w * px), wv, acc[i]);
      }
    }
  }
  for (int i = 0; i < kT; ++i) out[i] = acc[i];
}

// conv_depthwise_fwd's walk over output rows [r0, r1), depthwise_tile<kS, kSW> its tiles.
template <typename T, int kS, int kSW>
void depthwise_fwd_rows(const ConvArgs& a, const void* x, bool x_bf16, const T* w,
                        const ConvEpilogue& e, int64_t r0, int64_t r1, T* ring) {
  using V = Vec<T>;
  constexpr int kT = kVecRegs == 32 ? int{kDepthwiseTile} : int{kDepthwiseTile} / 2;
  constexpr int64_t kLine = 64 / sizeof(T);
  const T* bias = static_cast<const T*>(e.bias);
  const DepthwiseRing g = depthwise_ring(a, sizeof(T));
  std::vector<int64_t> held(g.slots, -1);  // the input row (n H + h) each slot holds
  std::vector<const T*> rows(a.R);
  const bool lines = pixel_lines<T>(a, e);
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t n = row / a.P, p = row % a.P;
    for (int64_t r = 0; r < a.R; ++r) {
      const int64_t h = p * a.stride_h - a.pad_h + r * a.dil_h;
      rows[r] = nullptr;
      if (h < 0 || h >= a.H) continue;
      T* slot = ring + h % g.slots * g.row;
      if (held[h % g.slots] != n * a.H + h) {
        depthwise_row_copy<T>(a, g, x, x_bf16, n, h, slot);
        held[h % g.slots] = n * a.H + h;
      }
      rows[r] = slot;
    }
    for (int64_t q0 = 0; q0 < a.Q; q0 += kT) {
      const int64_t nq = imin(kT, a.Q - q0), base = n * a.out_sn + (p * a.Q + q0) * a.out_spq;
      const auto tile = [&](int64_t c0, V* acc) {
        depthwise_tile<T, kT, kS, kSW>(
            a, g, rows.data(), w + c0 / kLine * a.R * a.S * kLine + c0 % kLine, q0, c0, acc);
      };
      const auto bias_vec = [&](int64_t c0, int64_t len) {
        return bias != nullptr ? ld<V>(bias + c0, len) : V::zero();
      };
      if (lines) {
        for (int64_t c0 = 0; c0 < a.C; c0 += 2 * V::W) {
          V lo[kT], hi[kT];
          tile(c0, lo);
          tile(c0 + V::W, hi);
          store_pixel_lines<T>(a, e, lo, hi, nq, base, c0, bias_vec(c0, V::W),
                               bias_vec(c0 + V::W, V::W));
        }
        continue;
      }
      for_vectors<V::W>(0, a.C, [&](int64_t c0, int64_t len) {
        V acc[kT];
        tile(c0, acc);
        store_pixels<T>(a, e, acc, nq, base, c0, len, bias_vec(c0, len));
      });
    }
  }
}

}  // namespace conv_detail

// Direct depthwise conv on NHWC: each output pixel is R * S multiply-adds per channel, far too
// little work per byte for a GEMM. Channels are contiguous in NHWC: one SIMD vector covers W
// channels. x is read through a ring of zero-padded row copies (DepthwiseRing: every input row
// copied once, the taps without bounds checks), an output row a vector of channels at a time,
// tiles of pixels in registers (depthwise_tile; compile-time widths and strides for the usual
// 3x3, 5x5 and 7x7) through the epilogue.
template <typename T>
void conv_depthwise_fwd(const ConvArgs& a, const void* x, bool x_bf16, const void* w_,
                        const ConvEpilogue& e, int64_t r0, int64_t r1, void* scratch) {
  using namespace conv_detail;
  const T* w = static_cast<const T*>(w_);
  T* ring = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(scratch) + 63) / 64 * 64);
  const auto is = [&](int64_t S, int64_t stride) {
    return a.dil_w == 1 && a.S == S && a.stride_w == stride;
  };
  if (is(3, 1))
    depthwise_fwd_rows<T, 3, 1>(a, x, x_bf16, w, e, r0, r1, ring);
  else if (is(3, 2))
    depthwise_fwd_rows<T, 3, 2>(a, x, x_bf16, w, e, r0, r1, ring);
  else if (is(5, 1))
    depthwise_fwd_rows<T, 5, 1>(a, x, x_bf16, w, e, r0, r1, ring);
  else if (is(5, 2))
    depthwise_fwd_rows<T, 5, 2>(a, x, x_bf16, w, e, r0, r1, ring);
  else if (is(7, 1))
    depthwise_fwd_rows<T, 7, 1>(a, x, x_bf16, w, e, r0, r1, ring);
  else
    depthwise_fwd_rows<T, 0, 0>(a, x, x_bf16, w, e, r0, r1, ring);
  if (e.stream) Vec<T>::fence();
}

namespace conv_detail {

// tap(s, acc) for s in [0, S), even s into even and odd into odd: two FMA chains, half the
// latency chain of one.
template <typename V, typename Tap>
inline void two_chains(int64_t S, V& even, V& odd, Tap&& tap) {
  int64_t s = 0;
  for (; s + 1 < S; s += 2) {
    even = tap(s, even);
    odd = tap(s + 1, odd);
  }
  if (s < S) even = tap(s, even);
}

// acc + vb into out (e.out) at element o: directly where lean (lean_epilogue, ReLU where relu_;
// all three read once by the caller, as stores through out may alias e), else by store_vec.
// Streamed as store_vec streams.
template <typename T, typename V>
inline void store_plane_vec(const ConvArgs& a, const ConvEpilogue& e, T* out, bool lean, bool relu_,
                            V acc, V vb, int64_t o, int64_t len) {
  if (!lean) return store_vec<T>(a, e, acc, vb, o, len);
  V y = acc + vb;
  if (relu_) y = relu(y);
  if (streams<V>(e, out + o, len))
    y.stream(out + o);
  else
    st(out + o, y, len);
}

// Plane (n, c)'s weights w + c RS (broadcast once, when their number kRS is known at compile
// time), its bias vector and its output's first element.
template <typename T, typename V, int kRS>
struct PlaneWeights {
  const T* wc;
  V wb[kRS > 0 ? kRS : 1];
  V vb;
  int64_t base;

  PlaneWeights(const ConvArgs& a, const ConvEpilogue& e, const T* w, int64_t plane, int64_t RS)
      : wc(w + plane % a.C * RS) {
    if constexpr (kRS > 0)
      for (int64_t t = 0; t < kRS; ++t) wb[t] = V::set1(wc[t]);
    const T* bias = static_cast<const T*>(e.bias);
    vb = bias != nullptr ? V::set1(bias[plane % a.C]) : V::zero();
    base = plane / a.C * a.out_sn + plane % a.C * a.out_sk;
  }
  V tap(int64_t t) const { return kRS > 0 ? wb[kRS > 0 ? t : 0] : V::set1(wc[t]); }
};

// The lane masks of the flat planes (depthwise_flat): bit j of masks[v R S + r S + s] is set
// where pixel v kW + j of an output plane exists and its tap (r, s) lies inside the input plane;
// for each tap, ranges of bits: the output rows and columns whose tap row and column are inside.
// Not made for the vectors of [skip0, skip1) (output pixels, multiples of kW), read whole.
template <int kW>
void depthwise_flat_masks(const ConvArgs& a, uint32_t* masks, int64_t skip0 = 0,
                          int64_t skip1 = 0) {
  const int64_t pq = a.P * a.Q, rs = a.R * a.S;
  for (int64_t i = 0; i < (pq + kW - 1) / kW; ++i)
    if (i * kW < skip0 || i * kW >= skip1)
      for (int64_t t = 0; t < rs; ++t) masks[i * rs + t] = 0;
  const auto clamp = [](int64_t v, int64_t hi) { return v < 0 ? int64_t{0} : imin(v, hi); };
  for (int64_t r = 0; r < a.R; ++r)
    for (int64_t s = 0; s < a.S; ++s) {
      const int64_t dh = r * a.dil_h - a.pad_h, dw = s * a.dil_w - a.pad_w;
      const int64_t p1 = clamp(a.H - dh, a.P), q0 = clamp(-dw, a.Q), q1 = clamp(a.W - dw, a.Q);
      for (int64_t p = clamp(-dh, a.P); p < p1; ++p) {
        if (p * a.Q >= skip0 && (p + 1) * a.Q <= skip1) continue;
        for (int64_t o = p * a.Q + q0, end = p * a.Q + q1; o < end;) {
          const int64_t j = o % kW, n = imin(end - o, kW - j);
          masks[o / kW * rs + r * a.S + s] |= ((1u << n) - 1u) << j;  // n <= kW <= 16
          o += n;
        }
      }
    }
}

// The vectors of a 3x3 kernel's flat planes (depthwise_flat_fwd) read whole, as output pixels
// [first, second) (multiples of kW): those whose lanes' rows p have every tap row inside the
// plane (pad_h <= p < P - pad_h) and whose reads stay inside it.
template <int kW>
std::pair<int64_t, int64_t> flat_whole_range(const ConvArgs& a) {
  const int64_t pq = a.P * a.Q, shift = a.pad_h * a.W + a.pad_w;
  const int64_t end =
      imin((a.P - a.pad_h) * a.Q, a.H * a.W + shift - 2 * a.dil_h * a.W - 2 * a.dil_w);
  const int64_t begin = imin((std::max(a.pad_h * a.Q, shift) + kW - 1) / kW * kW, pq);
  return {begin, std::max(begin, end / kW * kW)};
}

// The column masks of a 3x3 kernel's flat planes (depthwise_flat_fwd, so pad_w == dil_w) in cm:
// lane i of cm[2 v kW ..] (cm[(2 v + 1) kW ..]) is 1 where output column (v kW + i) % Q reads the
// kernel's left (right) column inside the input row, else 0, for the Q / gcd(Q, kW) vectors v
// after which an output plane's columns repeat (returned).
template <typename T, int kW>
int64_t depthwise_flat_col_masks(const ConvArgs& a, T* cm) {
  int64_t g = kW;
  while (a.Q % g != 0) g /= 2;  // kW is a power of 2
  const int64_t period = a.Q / g;
  for (int64_t v = 0; v < period; ++v)
    for (int64_t i = 0; i < kW; ++i) {
      const int64_t q = (v * kW + i) % a.Q;
      cm[2 * v * kW + i] = T(q >= a.dil_w ? 1 : 0);
      cm[(2 * v + 1) * kW + i] = T(q + a.dil_w < a.W ? 1 : 0);
    }
  return period;
}

// The masks of flat planes (depthwise_flat), in scratch of depthwise_flat_scratch: a 3x3
// kernel's vectors read whole, [whole.first, whole.second), with their column masks cm
// (`period` vectors), and the lane masks of the others; any other kernel's lane masks alone.
template <typename T>
struct FlatMasks {
  const uint32_t* lanes;
  std::pair<int64_t, int64_t> whole;
  const T* cm;
  int64_t period;
};
template <typename T, int kW>
FlatMasks<T> flat_masks(const ConvArgs& a, void* scratch) {
  uint32_t* lanes = static_cast<uint32_t*>(scratch);
  T* cm = static_cast<T*>(scratch) + depthwise_col_mask_offset(a, sizeof(T));
  if (a.R != 3 || a.S != 3) {
    depthwise_flat_masks<kW>(a, lanes);
    return {lanes, {0, 0}, cm, 0};
  }
  const std::pair<int64_t, int64_t> whole = flat_whole_range<kW>(a);
  depthwise_flat_masks<kW>(a, lanes, whole.first, whole.second);
  return {lanes, whole, cm, depthwise_flat_col_masks<T, kW>(a, cm)};
}

// Calls f(o, x0, x1, x2, m) for the vectors [o0, o1) of a flat plane read whole by a 3x3 kernel
// (x at xp, shifted as in depthwise_flat_planes; tap rows `row` elements apart): x0, x1, x2 the
// tap rows' first columns, m the vector's column masks (left, then right), from cm
// (depthwise_flat_col_masks, `period` vectors).
template <int kW, typename T, typename F>
inline void for_whole_vectors_3x3(const T* xp, int64_t row, int64_t o0, int64_t o1, const T* cm,
                                  int64_t period, F&& f) {
  const T* m = cm + o0 / kW % period * 2 * kW;
  const T* const m_end = cm + period * 2 * kW;
  for (int64_t o = o0; o < o1; o += kW) {
    const T* x0 = xp + o;
    f(o, x0, x0 + row, x0 + 2 * row, m);
    m += 2 * kW;
    if (m == m_end) m = cm;
  }
}

// Vectors [o0, o1) of a flat plane of a 3x3 depthwise conv (x at xp, shifted as in
// depthwise_flat_planes; its output from element base of out, e.out) read whole: each tap column
// summed apart, the outer two then masked by their column masks cm (lanes 1 or 0). The taps in
// named locals: GCC had kept an array of them in memory and reloaded each for every vector (a
// loop of 9 loads more, 1.3-1.5x the time). kDilW: dil_w at compile time (0: at run time), so that
// a row's taps take one address register. Out of line: inlined, the same loop had spilled them.
template <typename T, int kDilW, typename V>
__attribute__((noinline)) void flat_whole_vectors_3x3(const ConvArgs& a, const ConvEpilogue& e,
                                                      const T* xp, T* out, int64_t base,
                                                      const T* wc, V vb, bool lean, bool relu_,
                                                      int64_t o0, int64_t o1, const T* cm,
                                                      int64_t period) {
  constexpr int kW = V::W;
  const V w0 = V::set1(wc[0]), w1 = V::set1(wc[1]), w2 = V::set1(wc[2]);
  const V w3 = V::set1(wc[3]), w4 = V::set1(wc[4]), w5 = V::set1(wc[5]);
  const V w6 = V::set1(wc[6]), w7 = V::set1(wc[7]), w8 = V::set1(wc[8]);
  const int64_t row = a.dil_h * a.W, col = kDilW > 0 ? kDilW : a.dil_w;
  for_whole_vectors_3x3<kW>(
      xp, row, o0, o1, cm, period,
      [&](int64_t o, const T* x0, const T* x1, const T* x2, const T* m) {
        __builtin_prefetch(x2 + 256);
        V left = V::load(x0) * w0, mid = V::load(x0 + col) * w1, right = V::load(x0 + 2 * col) * w2;
        left = fma(V::load(x1), w3, left);
        mid = fma(V::load(x1 + col), w4, mid);
        right = fma(V::load(x1 + 2 * col), w5, right);
        left = fma(V::load(x2), w6, left);
        mid = fma(V::load(x2 + col), w7, mid);
        right = fma(V::load(x2 + 2 * col), w8, right);
        const V y = where_pos(V::load(m), left) + mid + where_pos(V::load(m + kW), right);
        store_plane_vec<T>(a, e, out, lean, relu_, y, vb, base + o, kW);
      });
}

// Planes [plane0, plane1) taken flat: output rows as wide as the input's and stride 1, so a
// vector of W consecutive outputs of a plane (across its rows) reads tap (r, s) from one shift of
// the flat input plane, (r dil_h - pad_h) W + s dil_w - pad_w. A 3x3 kernel's vectors whose every
// tap row lies inside the plane (all but those of the first and last pad_h rows or so) read it
// whole (flat_whole_vectors_3x3: a row's first and last columns read the neighbouring rows'
// pixels, masked off by column, Inf and NaN included). The others read each tap with its lanes
// outside the plane masked off (FlatMasks::lanes, not read): on AVX2 a masked load and the mask's
// making per tap, 2-3x the time of a whole vector (22-26 cycles against 10 on a Zen 3). No
// copy, no partial vectors but the plane's last. The kR x kS kernel at compile time, or (0, 0)
// for any at run time.
template <typename T, int kR, int kS, typename PlaneX>
void depthwise_flat_planes(const ConvArgs& a, PlaneX&& plane_x, const T* w, const ConvEpilogue& e,
                           int64_t plane0, int64_t plane1, const FlatMasks<T>& fm) {
  using V = Vec<T>;
  constexpr int kW = V::W;
  const int64_t R = kR > 0 ? kR : a.R, S = kS > 0 ? kS : a.S, RS = R * S;
  const int64_t pq = a.P * a.Q, shift = a.pad_h * a.W + a.pad_w;
  const auto [whole0, whole1] = fm.whole;
  T* out = static_cast<T*>(e.out);
  const bool lean = lean_epilogue(a, e), relu_ = a.activation == kRelu;
  for (int64_t plane = plane0; plane < plane1; ++plane) {
    const PlaneWeights<T, V, kR * kS> pw(a, e, w, plane, RS);
    const T* xp = plane_x(plane) - shift;
    const auto masked = [&](int64_t o, int64_t len) {
      const uint32_t* m = fm.lanes + o / kW * RS;
      // The last tap row's lines 1 KB ahead: AVX2's masked loads waited on them from memory
      // (34% of the kernel's samples on one of them on a Zen 3: 32 x 256 x 28 x 28 6.2 -> 4.8 ms).
      __builtin_prefetch(xp + o + (R - 1) * a.dil_h * a.W + 256);
      V acc0 = V::zero(), acc1 = V::zero();
      for (int64_t r = 0; r < R; ++r) {
        const T* row = xp + o + r * a.dil_h * a.W;
        two_chains(S, acc0, acc1, [&](int64_t s, V acc) {
          const int64_t t = r * S + s;
          return fma(V::load_lanes(row + s * a.dil_w, m[t]), pw.tap(t), acc);
        });
      }
      store_plane_vec<T>(a, e, out, lean, relu_, acc0 + acc1, pw.vb, pw.base + o, len);
    };
    for_vectors<kW>(0, whole0, masked);
    if constexpr (kR == 3 && kS == 3) {
      const auto whole_vectors =
          a.dil_w == 1 ? flat_whole_vectors_3x3<T, 1, V> : flat_whole_vectors_3x3<T, 0, V>;
      whole_vectors(a, e, xp, out, pw.base, pw.wc, pw.vb, lean, relu_, whole0, whole1, fm.cm,
                    fm.period);
    }
    for_vectors<kW>(whole1, pq, masked);
  }
}

// The lanes [0, len) (len <= 32) of a vector whose lane i reads column w0 + i of an input row:
// those inside it.
inline uint32_t inside_lanes(const ConvArgs& a, int64_t w0, int64_t len) {
  const int64_t lo = w0 < 0 ? imin(-w0, len) : 0, hi = imin(len, a.W - w0);
  const auto below = [](int64_t n) { return (uint64_t{1} << n) - 1u; };
  return hi > lo ? static_cast<uint32_t>(below(hi) & ~below(lo)) : 0u;
}

// The lanes [0, len) of a vector of output columns from q0 whose tap column s lies inside x.
inline uint32_t depthwise_col_lanes(const ConvArgs& a, int64_t q0, int64_t len, int64_t s) {
  return inside_lanes(a, q0 + s * a.dil_w - a.pad_w, len);
}

// Planes [plane0, plane1) row by row (any row stride, dilation and output width): a vector of
// output columns of kT output rows at a time, kR x kS at compile time with kT rows sharing each
// input row vector they read (stride_h == dil_h == 1: output row p0 + j reads input row
// p0 + j + r - pad_h, so a tile loads kT + kR - 1 rows for kT kR rows' taps), or (kT, kR, kS) =
// (1, 0, 0) for any at run time. Input rows outside x are skipped, columns outside it masked off
// (not read): no padded copy.
template <typename T, int kT, int kR, int kS, typename PlaneX>
void depthwise_row_tiles(const ConvArgs& a, PlaneX&& plane_x, const T* w, const ConvEpilogue& e,
                         int64_t plane0, int64_t plane1) {
  using V = Vec<T>;
  constexpr bool kFixed = kR > 0;
  static_assert(kFixed || kT == 1);
  const int64_t R = kFixed ? kR : a.R, S = kFixed ? kS : a.S;
  T* out = static_cast<T*>(e.out);
  const bool lean = lean_epilogue(a, e), relu_ = a.activation == kRelu;
  for (int64_t plane = plane0; plane < plane1; ++plane) {
    const T* xp = plane_x(plane);
    // The taps broadcast where used (kT rows share each).
    const PlaneWeights<T, V, 0> pw(a, e, w, plane, R * S);
    for (int64_t p0 = 0; p0 < a.P; p0 += kT)
      for_vectors<V::W>(0, a.Q, [&](int64_t q0, int64_t len) {
        V acc[kT];
        for (int j = 0; j < kT; ++j) acc[j] = V::zero();
        if constexpr (kFixed) {
          uint32_t lanes[kS];
          for (int s = 0; s < kS; ++s) lanes[s] = depthwise_col_lanes(a, q0, len, s);
#pragma GCC unroll 16
          for (int i = 0; i < kT + kR - 1; ++i) {
            const int64_t h = p0 + i - a.pad_h;
            if (h < 0 || h >= a.H) continue;
            const T* row = xp + h * a.W + q0 - a.pad_w;
            V in[kS];
#pragma GCC unroll 8
            for (int s = 0; s < kS; ++s) in[s] = V::load_lanes(row + s * a.dil_w, lanes[s]);
#pragma GCC unroll 8
            for (int j = 0; j < kT; ++j)
              if (i - j >= 0 && i - j < kR)
#pragma GCC unroll 8
                for (int s = 0; s < kS; ++s) acc[j] = fma(in[s], pw.tap((i - j) * kS + s), acc[j]);
          }
        } else {  // output row p0 alone
          V odd = V::zero();
          for (int64_t r = 0; r < R; ++r) {
            const int64_t h = p0 * a.stride_h + r * a.dil_h - a.pad_h;
            if (h < 0 || h >= a.H) continue;
            const T* row = xp + h * a.W + q0 - a.pad_w;
            two_chains(S, acc[0], odd, [&](int64_t s, V sum) {
              return fma(V::load_lanes(row + s * a.dil_w, depthwise_col_lanes(a, q0, len, s)),
                         pw.tap(r * S + s), sum);
            });
          }
          acc[0] = acc[0] + odd;
        }
        for (int64_t j = 0; j < imin(kT, a.P - p0); ++j)
          store_plane_vec<T>(a, e, out, lean, relu_, acc[j], pw.vb, pw.base + (p0 + j) * a.Q + q0,
                             len);
      });
  }
}

// Planes [plane0, plane1) at column stride 2 (any row stride, dilations and kernel): each plane's
// input rows split by parity first (split: 2 depthwise_split_len(a) elements a row, padded
// column u, x's u - pad_w or zero outside x, at element u / 2 of the even or the odd half; then
// a zero row), so that output column q's tap s, padded column 2 q + s dil_w, is element q + s
// dil_w / 2 of the half of parity s dil_w % 2: one unit-stride load per tap and output vector,
// as at stride 1 (this stride had run on NHWC through transposes of x and out: ~10x the conv's
// own time). A vector of kRows output rows at a time, each its own FMA chain (small planes have
// one vector a row; one chain per row left its FMAs waiting on each other), tap rows outside x
// read from the zero row. The kR x kS kernel at compile time, or (0, 0) for any at run time.
template <typename T, int kR, int kS, typename PlaneX>
void depthwise_split_planes(const ConvArgs& a, PlaneX&& plane_x, const T* w, const ConvEpilogue& e,
                            int64_t plane0, int64_t plane1, T* split) {
  using V = Vec<T>;
  constexpr int kRows = 4;
  const int64_t R = kR > 0 ? kR : a.R, S = kS > 0 ? kS : a.S, RS = R * S;
  const int64_t len = depthwise_split_len(a), vecs = len / V::W;
  // Which of the 2 W columns from 2 j - pad_w each split vector j reads (the same every row).
  std::vector<uint32_t> lanes(vecs);
  for (int64_t v = 0; v < vecs; ++v) lanes[v] = inside_lanes(a, 2 * v * V::W - a.pad_w, 2 * V::W);
  // Tap s's offset in a split row: its half, then its shift.
  std::vector<int64_t> tap(S);
  for (int64_t s = 0; s < S; ++s) tap[s] = s * a.dil_w % 2 * len + s * a.dil_w / 2;
  T* zero = split + 2 * a.H * len;
  for (int64_t i = 0; i < 2 * len; ++i) zero[i] = T(0);
  T* out = static_cast<T*>(e.out);
  const bool lean = lean_epilogue(a, e), relu_ = a.activation == kRelu;
  for (int64_t plane = plane0; plane < plane1; ++plane) {
    const T* xp = plane_x(plane) - a.pad_w;
    for (int64_t h = 0; h < a.H; ++h)
      for (int64_t v = 0; v < vecs; ++v) {
        V ev, od;
        V::deinterleave(xp + h * a.W + 2 * v * V::W, lanes[v], ev, od);
        ev.store(split + 2 * h * len + v * V::W);
        od.store(split + (2 * h + 1) * len + v * V::W);
      }
    const PlaneWeights<T, V, kR * kS> pw(a, e, w, plane, RS);
    for (int64_t p0 = 0; p0 < a.P; p0 += kRows) {
      const int64_t rows = imin(kRows, a.P - p0);
      for_vectors<V::W>(0, a.Q, [&](int64_t q0, int64_t vlen) {
        V acc[kRows];
#pragma GCC unroll 4
        for (int j = 0; j < kRows; ++j) acc[j] = V::zero();
#pragma GCC unroll 8
        for (int64_t r = 0; r < R; ++r) {
          const T* row[kRows];
#pragma GCC unroll 4
          for (int j = 0; j < kRows; ++j) {
            const int64_t h = (p0 + j) * a.stride_h + r * a.dil_h - a.pad_h;
            row[j] = (j < rows && h >= 0 && h < a.H ? split + 2 * h * len : zero) + q0;
          }
#pragma GCC unroll 8
          for (int64_t s = 0; s < S; ++s) {
            const V wt = pw.tap(r * S + s);
#pragma GCC unroll 4
            for (int j = 0; j < kRows; ++j) acc[j] = fma(ld<V>(row[j] + tap[s], vlen), wt, acc[j]);
          }
        }
#pragma GCC unroll 4
        for (int j = 0; j < kRows; ++j)
          if (j < rows)
            store_plane_vec<T>(a, e, out, lean, relu_, acc[j], pw.vb, pw.base + (p0 + j) * a.Q + q0,
                               vlen);
      });
    }
  }
}

}  // namespace conv_detail

// Direct depthwise conv on NCHW with stride_w 1 or 2, planes (n, c) in [plane0, plane1), SIMD over
// the pixels of each plane (no layout transpose of the input or the output): at stride_w 2 on
// rows split by parity (in scratch); flat where depthwise_flat_fwd (the lane masks in scratch),
// else row by row, in tiles of 8 output rows for the usual square kernels at unit row stride and
// dilation.
template <typename T>
void conv_depthwise_plane_fwd(const ConvArgs& a, const void* x_, bool x_bf16, const void* w_,
                              const ConvEpilogue& e_, int64_t plane0, int64_t plane1,
                              void* scratch) {
  // Ordinary stores even for a large output: streaming was slower, flat (1.9 ms against 1.65
  // for 32 x 256 x 28 x 28, whose planes are whole cache lines) and row by row (whose rows end
  // mid-vector: 3.6 against 2.8 in an earlier kernel).
  ConvEpilogue e = e_;
  e.stream = false;
  const T* w = static_cast<const T*>(w_);
  using namespace conv_detail;
  using V = Vec<T>;
  // Plane (n, c) of x: in place, or (bfloat16 bits) widened into the scratch's last H W.
  T* wide = static_cast<T*>(scratch) + depthwise_plane_scratch(a, sizeof(T), false);
  const auto plane_x = [&](int64_t plane) -> const T* {
    const int64_t hw = a.H * a.W;
    if (!x_bf16) return static_cast<const T*>(x_) + plane * hw;
    const bf16* src = static_cast<const bf16*>(x_) + plane * hw;
    for_vectors<V::W>(0, hw,
                      [&](int64_t i, int64_t len) { st(wide + i, ld<V>(src + i, len), len); });
    return wide;
  };
  if (a.stride_w == 2) {
    T* split = static_cast<T*>(scratch);
    if (a.R == 3 && a.S == 3)
      return depthwise_split_planes<T, 3, 3>(a, plane_x, w, e, plane0, plane1, split);
    if (a.R == 5 && a.S == 5)
      return depthwise_split_planes<T, 5, 5>(a, plane_x, w, e, plane0, plane1, split);
    return depthwise_split_planes<T, 0, 0>(a, plane_x, w, e, plane0, plane1, split);
  }
  if (depthwise_flat_fwd(a)) {
    const FlatMasks<T> fm = flat_masks<T, V::W>(a, scratch);
    if (a.R == 3 && a.S == 3)
      return depthwise_flat_planes<T, 3, 3>(a, plane_x, w, e, plane0, plane1, fm);
    return depthwise_flat_planes<T, 0, 0>(a, plane_x, w, e, plane0, plane1, fm);
  }
  const bool unit = a.stride_h == 1 && a.dil_h == 1;
  if (unit && a.R == 3 && a.S == 3)
    return depthwise_row_tiles<T, 8, 3, 3>(a, plane_x, w, e, plane0, plane1);
  if (unit && a.R == 5 && a.S == 5)
    return depthwise_row_tiles<T, 8, 5, 5>(a, plane_x, w, e, plane0, plane1);
  if (unit && a.R == 7 && a.S == 7)
    return depthwise_row_tiles<T, 8, 7, 7>(a, plane_x, w, e, plane0, plane1);
  depthwise_row_tiles<T, 1, 0, 0>(a, plane_x, w, e, plane0, plane1);
}

namespace conv_detail {

// The weight gradient of a 3x3 depthwise conv from the vectors [o0, o1) of a flat plane (x at xp,
// shifted as in depthwise_flat_planes; gy at gp) read whole, as flat_whole_vectors_3x3 reads them:
// the outer tap columns' row-edge lanes of x zeroed by the column masks cm (the products of the
// neighbouring rows' pixels dropped, Inf and NaN included). Added to sums[0, 9).
template <typename T, int kDilW, typename V>
__attribute__((noinline)) void flat_whole_params_3x3(const ConvArgs& a, const T* xp, const T* gp,
                                                     int64_t o0, int64_t o1, const T* cm,
                                                     int64_t period, T* sums) {
  constexpr int kW = V::W;
  const int64_t row = a.dil_h * a.W, col = kDilW > 0 ? kDilW : a.dil_w;
  V s0 = V::zero(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0, s8 = s0;
  for_whole_vectors_3x3<kW>(xp, row, o0, o1, cm, period,
                            [&](int64_t o, const T* x0, const T* x1, const T* x2, const T* m) {
                              const V g = V::load(gp + o), left = V::load(m),
                                      right = V::load(m + kW);
                              s0 = fma(where_pos(left, V::load(x0)), g, s0);
                              s1 = fma(V::load(x0 + col), g, s1);
                              s2 = fma(where_pos(right, V::load(x0 + 2 * col)), g, s2);
                              s3 = fma(where_pos(left, V::load(x1)), g, s3);
                              s4 = fma(V::load(x1 + col), g, s4);
                              s5 = fma(where_pos(right, V::load(x1 + 2 * col)), g, s5);
                              s6 = fma(where_pos(left, V::load(x2)), g, s6);
                              s7 = fma(V::load(x2 + col), g, s7);
                              s8 = fma(where_pos(right, V::load(x2 + 2 * col)), g, s8);
                            });
  sums[0] += s0.sum(), sums[1] += s1.sum(), sums[2] += s2.sum();
  sums[3] += s3.sum(), sums[4] += s4.sum(), sums[5] += s5.sum();
  sums[6] += s6.sum(), sums[7] += s7.sum(), sums[8] += s8.sum();
}

}  // namespace conv_detail

// Weight and bias gradients of a depthwise conv on flat NCHW planes (depthwise_flat), planes
// (n, c) in [plane0, plane1): sums[plane (R S + 1) + t] = the sum over the plane's outputs of gy
// times what tap t = r S + s reads of x, and sums[plane (R S + 1) + R S] = the sum of gy (alone
// when x is null). Up to 9 taps a pass over the plane (in L1 for planes up to ~64x64, L2
// beyond), gy loaded once for them, x through the forward's lane masks; a 3x3 kernel's vectors
// away from the top and bottom rows read whole (flat_whole_params_3x3). Scratch of
// depthwise_flat_scratch.
template <typename T>
void conv_depthwise_plane_bwd_params(const ConvArgs& a, const void* x_, const void* gy_,
                                     void* sums_, int64_t plane0, int64_t plane1, void* scratch) {
  using namespace conv_detail;
  using V = Vec<T>;
  constexpr int kTaps = 9;
  const T* x = static_cast<const T*>(x_);
  const T* gy = static_cast<const T*>(gy_);
  T* sums = static_cast<T*>(sums_);
  const FlatMasks<T> fm = flat_masks<T, V::W>(a, scratch);
  const auto [whole0, whole1] = fm.whole;
  const auto whole_params =
      a.dil_w == 1 ? flat_whole_params_3x3<T, 1, V> : flat_whole_params_3x3<T, 0, V>;
  const int64_t rs = a.R * a.S, pq = a.P * a.Q;
  for (int64_t plane = plane0; plane < plane1; ++plane) {
    const T* gp = gy + plane * pq;
    T* out = sums + plane * (rs + 1);
    out[rs] = reduce<V>(pq, [&](int64_t o, int64_t len) { return ld<V>(gp + o, len); }).sum();
    if (x == nullptr) continue;
    const T* xp = x + plane * a.H * a.W - a.pad_h * a.W - a.pad_w;
    for (int64_t t0 = 0; t0 < rs; t0 += kTaps) {
      const int64_t nt = imin(kTaps, rs - t0);
      int64_t off[kTaps];
      for (int64_t j = 0; j < nt; ++j)
        off[j] = (t0 + j) / a.S * a.dil_h * a.W + (t0 + j) % a.S * a.dil_w;
      V acc[kTaps];
      for (int j = 0; j < kTaps; ++j) acc[j] = V::zero();
      const auto masked = [&](int64_t o, int64_t len) {
        const V g = ld<V>(gp + o, len);
        const uint32_t* m = fm.lanes + o / V::W * rs + t0;
        for (int j = 0; j < kTaps; ++j)
          if (j < nt) acc[j] = fma(V::load_lanes(xp + o + off[j], m[j]), g, acc[j]);
      };
      for_vectors<V::W>(0, whole0, masked);
      for_vectors<V::W>(whole1, pq, masked);
      for (int64_t j = 0; j < nt; ++j) out[t0 + j] = acc[j].sum();
    }
    if (whole1 > whole0) whole_params(a, xp, gp, whole0, whole1, fm.cm, fm.period, out);
  }
}

// Input gradient of a depthwise conv on NHWC, input rows (n, h) in [r0, r1): gx[n, h, w] = the
// sum over the taps (r, s) that read (h, w), in tap order, of gy[n, p, q] * w[r, s] (p = (h +
// pad_h - r dil_h) / stride_h where that divides exactly, q alike). A gather, so rows are
// independent and every element written once; each pixel's C channels stay in L1 while the taps
// add into them, SIMD over the channels.
template <typename T>
void conv_depthwise_bwd_input(const ConvArgs& a, const void* gy_, const void* w_, void* gx_,
                              int64_t r0, int64_t r1) {
  using V = Vec<T>;
  const T* gy = static_cast<const T*>(gy_);
  const T* w = static_cast<const T*>(w_);
  T* gx = static_cast<T*>(gx_);
  const int64_t C = a.C;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t n = row / a.H, h = row % a.H;
    for (int64_t wc = 0; wc < a.W; ++wc) {
      T* out = gx + (row * a.W + wc) * C;
      bool first = true;
      for (int64_t r = 0; r < a.R; ++r) {
        const int64_t hp = h + a.pad_h - r * a.dil_h;
        if (hp < 0 || hp % a.stride_h != 0 || hp / a.stride_h >= a.P) continue;
        for (int64_t s = 0; s < a.S; ++s) {
          const int64_t wq = wc + a.pad_w - s * a.dil_w;
          if (wq < 0 || wq % a.stride_w != 0 || wq / a.stride_w >= a.Q) continue;
          const T* g = gy + ((n * a.P + hp / a.stride_h) * a.Q + wq / a.stride_w) * C;
          const T* wt = w + (r * a.S + s) * C;
          for_vectors<V::W>(0, C, [&](int64_t c, int64_t len) {
            const V prod = ld<V>(g + c, len) * ld<V>(wt + c, len);
            st(out + c, first ? prod : prod + ld<V>(out + c, len), len);
          });
          first = false;
        }
      }
      if (first)
        for_vectors<V::W>(0, C, [&](int64_t c, int64_t len) { st(out + c, V::zero(), len); });
    }
  }
}

// Weight and bias gradients of a depthwise conv on NHWC, output rows (n, p) in [r0, r1): part
// (R * S + 1, C) += gy[n, p, q] * x[n, h, w] at each tap (r, s) that reads inside x (row
// r * S + s; none when x is null) and gy itself (the last row: the bias gradient). Runs of kRun
// pixels of a row: per tap, each vector of channels of part updated once with the run's
// products (read, added and written at every pixel it had cost 43 cycles a gy vector); the
// channels innermost, so every read runs along contiguous memory.
template <typename T>
void conv_depthwise_bwd_params(const ConvArgs& a, const void* x_, const void* gy_, void* part_,
                               int64_t r0, int64_t r1, int64_t, int64_t, void*) {
  using V = Vec<T>;
  constexpr int kRun = 4;
  const T* x = static_cast<const T*>(x_);
  const T* gy = static_cast<const T*>(gy_);
  T* part = static_cast<T*>(part_);
  const int64_t C = a.C;
  T* gb = part + a.R * a.S * C;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t n = row / a.P, p = row % a.P;
    for (int64_t q0 = 0; q0 < a.Q; q0 += kRun) {
      const int64_t nq = imin(kRun, a.Q - q0);
      const T* g = gy + (row * a.Q + q0) * C;
      for_vectors<V::W>(0, C, [&](int64_t c, int64_t len) {
        V sum = ld<V>(gb + c, len);
        for (int j = 0; j < kRun; ++j)
          if (j < nq) sum = sum + ld<V>(g + j * C + c, len);
        st(gb + c, sum, len);
      });
      for (int64_t r = 0; x != nullptr && r < a.R; ++r) {
        const int64_t h = p * a.stride_h - a.pad_h + r * a.dil_h;
        if (h < 0 || h >= a.H) continue;
        const T* xr = x + (n * a.H + h) * a.W * C;
        for (int64_t s = 0; s < a.S; ++s) {
          const T* xp[kRun];  // the run's pixels' input at this tap; null outside x
          for (int j = 0; j < kRun; ++j) {
            const int64_t wi = (q0 + j) * a.stride_w - a.pad_w + s * a.dil_w;
            xp[j] = j < nq && wi >= 0 && wi < a.W ? xr + wi * C : nullptr;
          }
          T* acc = part + (r * a.S + s) * C;
          for_vectors<V::W>(0, C, [&](int64_t c, int64_t len) {
            V sum = ld<V>(acc + c, len);
            for (int j = 0; j < kRun; ++j)
              if (xp[j] != nullptr)
                sum = fma(ld<V>(g + j * C + c, len), ld<V>(xp[j] + c, len), sum);
            st(acc + c, sum, len);
          });
        }
      }
    }
  }
}

#include "cpu/conv_grouped.h"
#include "cpu/conv_plane.h"
#include "cpu/conv_winograd.h"

const ConvKernels kConvKernels = {
    .im2col = {conv_im2col<float>, conv_im2col<double>},
    .col2im = {conv_col2im<float>, conv_col2im<double>},
    .epilogue = {conv_epilogue<float>, conv_epilogue<double>},
    .epilogue_bwd = {conv_epilogue_bwd<float>, conv_epilogue_bwd<double>},
    .depthwise_fwd = {conv_depthwise_fwd<float>, conv_depthwise_fwd<double>},
    .depthwise_plane_fwd = {conv_depthwise_plane_fwd<float>, conv_depthwise_plane_fwd<double>},
    .grouped_fwd = {conv_grouped_fwd<float>, conv_grouped_fwd<double>},
    .depthwise_bwd_input = {conv_depthwise_bwd_input<float>, conv_depthwise_bwd_input<double>},
    .depthwise_bwd_params = {conv_depthwise_bwd_params<float>, conv_depthwise_bwd_params<double>},
    .depthwise_plane_bwd_params = {conv_depthwise_plane_bwd_params<float>,
                                   conv_depthwise_plane_bwd_params<double>},
    .grouped_bwd_params = {conv_grouped_bwd_params<float>, conv_grouped_bwd_params<double>},
    .grouped_bcast_fwd = {conv_grouped_bcast_fwd<float>, conv_grouped_bcast_fwd<double>},
    .grouped_bcast_slice = {conv_grouped_bcast_slice<float>, conv_grouped_bcast_slice<double>},
    .plane_fwd = {conv_plane_fwd<float>, conv_plane_fwd<double>},
    .grouped_bcast_bwd_params = {conv_grouped_bcast_bwd_params<float>,
                                 conv_grouped_bcast_bwd_params<double>},
    .grouped_pairs_fwd = kGroupedPairsFwd,
    .grouped_pairs_bwd_params = kGroupedPairsBwdParams,
    .transpose = {conv_transpose<float>, conv_transpose<double>},
    .winograd_weight = {conv_winograd_weight<2, float>, conv_winograd_weight<4, float>},
    .winograd_input = {conv_winograd_input<2, float>, conv_winograd_input<4, float>},
    .winograd_output = {conv_winograd_output<2, float>, conv_winograd_output<4, float>},
    .winograd_grad_output = {conv_winograd_grad_output<2, float>,
                             conv_winograd_grad_output<4, float>},
    .winograd_grad_weight = {conv_winograd_grad_weight<2, float>,
                             conv_winograd_grad_weight<4, float>},
    .im2col_bf16 = conv_im2col<uint16_t>,
};
