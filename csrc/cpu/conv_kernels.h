// The conv kernels around the GEMMs (csrc/cpu/conv_params.h): im2col, col2im, the fused
// epilogue (bias + residual + activation) and its backward, and the direct depthwise conv.
// Included inside an ISA namespace by csrc/cpu/isa/*.cpp; plain loops the compiler vectorizes
// for that ISA (the innermost loops run over contiguous NHWC channels). No torch, no std
// templates (see vec.h).

namespace conv_detail {

constexpr int kRelu = 1, kSilu = 2, kGelu = 3;

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

// v = acc + bias[k] + residual at element offset o; writes pre (when asked) and out.
template <typename T>
inline void store(const ConvArgs& a, const ConvEpilogue& e, T v, int64_t k, int64_t o) {
  if (e.bias != nullptr) v += static_cast<const T*>(e.bias)[k];
  if (e.residual != nullptr) v += static_cast<const T*>(e.residual)[o];
  if (e.pre != nullptr) static_cast<T*>(e.pre)[o] = v;
  static_cast<T*>(e.out)[o] = activate(v, a.activation);
}

}  // namespace conv_detail

template <typename T>
void conv_im2col(const ConvArgs& a, const void* x_, int64_t m0, int64_t mb, int64_t g, void* col_) {
  const T* x = static_cast<const T*>(x_);
  T* col = static_cast<T*>(col_);
  const int64_t cg = a.C / a.groups, pq = a.P * a.Q, ld = a.R * a.S * cg;
  for (int64_t i = 0; i < mb; ++i) {
    const int64_t m = m0 + i, n = m / pq, p = m % pq / a.Q, q = m % a.Q;
    T* row = col + i * ld;
    for (int64_t r = 0; r < a.R; ++r) {
      const int64_t h = p * a.stride_h - a.pad_h + r * a.dil_h;
      for (int64_t s = 0; s < a.S; ++s) {
        const int64_t w = q * a.stride_w - a.pad_w + s * a.dil_w;
        T* dst = row + (r * a.S + s) * cg;
        if (h < 0 || h >= a.H || w < 0 || w >= a.W) {
          for (int64_t c = 0; c < cg; ++c) dst[c] = T(0);
          continue;
        }
        const T* src = x + ((n * a.H + h) * a.W + w) * a.C + g * cg;
        for (int64_t c = 0; c < cg; ++c) dst[c] = src[c];
      }
    }
  }
}

template <typename T>
void conv_col2im(const ConvArgs& a, const void* gcol_, int64_t m0, int64_t mb, int64_t g,
                 void* gx_) {
  const T* gcol = static_cast<const T*>(gcol_);
  T* gx = static_cast<T*>(gx_);
  const int64_t cg = a.C / a.groups, pq = a.P * a.Q, ld = a.R * a.S * cg;
  for (int64_t i = 0; i < mb; ++i) {
    const int64_t m = m0 + i, n = m / pq, p = m % pq / a.Q, q = m % a.Q;
    const T* row = gcol + i * ld;
    for (int64_t r = 0; r < a.R; ++r) {
      const int64_t h = p * a.stride_h - a.pad_h + r * a.dil_h;
      if (h < 0 || h >= a.H) continue;
      for (int64_t s = 0; s < a.S; ++s) {
        const int64_t w = q * a.stride_w - a.pad_w + s * a.dil_w;
        if (w < 0 || w >= a.W) continue;
        const T* src = row + (r * a.S + s) * cg;
        T* dst = gx + ((n * a.H + h) * a.W + w) * a.C + g * cg;
        for (int64_t c = 0; c < cg; ++c) dst[c] += src[c];
      }
    }
  }
}

template <typename T>
void conv_epilogue(const ConvArgs& a, const ConvEpilogue& e, int64_t m0, int64_t mb, int64_t g) {
  const T* acc = static_cast<const T*>(e.acc);
  const int64_t kg = a.K / a.groups, pq = a.P * a.Q;
  for (int64_t i = 0; i < mb; ++i) {
    const int64_t m = m0 + i, base = m / pq * a.out_sn + m % pq * a.out_spq;
    for (int64_t k = g * kg; k < (g + 1) * kg; ++k)
      conv_detail::store<T>(a, e, acc[i * kg + k - g * kg], k, base + k * a.out_sk);
  }
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

// Direct depthwise conv: each output pixel is R * S multiply-adds per channel, far too little
// work per byte for a GEMM; channels are contiguous in NHWC, so the inner loop is a SIMD FMA
// over kLanes channels with the accumulators in registers.
template <typename T>
void conv_depthwise_fwd(const ConvArgs& a, const void* x_, const void* w_, const ConvEpilogue& e,
                        int64_t r0, int64_t r1) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  const T* x = static_cast<const T*>(x_);
  const T* w = static_cast<const T*>(w_);
  const int64_t C = a.C;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t n = row / a.P, p = row % a.P;
    for (int64_t q = 0; q < a.Q; ++q) {
      const int64_t base = n * a.out_sn + (p * a.Q + q) * a.out_spq;
      for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
        const int64_t nc = C - c0 < kLanes ? C - c0 : kLanes;
        T acc[kLanes] = {};
        for (int64_t r = 0; r < a.R; ++r) {
          const int64_t h = p * a.stride_h - a.pad_h + r * a.dil_h;
          if (h < 0 || h >= a.H) continue;
          for (int64_t s = 0; s < a.S; ++s) {
            const int64_t wi = q * a.stride_w - a.pad_w + s * a.dil_w;
            if (wi < 0 || wi >= a.W) continue;
            const T* xp = x + ((n * a.H + h) * a.W + wi) * C + c0;
            const T* wp = w + (r * a.S + s) * C + c0;
            if (nc == kLanes) {
              for (int64_t c = 0; c < kLanes; ++c) acc[c] += xp[c] * wp[c];
            } else {
              for (int64_t c = 0; c < nc; ++c) acc[c] += xp[c] * wp[c];
            }
          }
        }
        for (int64_t c = 0; c < nc; ++c)
          conv_detail::store<T>(a, e, acc[c], c0 + c, base + (c0 + c) * a.out_sk);
      }
    }
  }
}

const ConvKernels kConvKernels = {
    .im2col = {conv_im2col<float>, conv_im2col<double>},
    .col2im = {conv_col2im<float>, conv_col2im<double>},
    .epilogue = {conv_epilogue<float>, conv_epilogue<double>},
    .epilogue_bwd = {conv_epilogue_bwd<float>, conv_epilogue_bwd<double>},
    .depthwise_fwd = {conv_depthwise_fwd<float>, conv_depthwise_fwd<double>},
};
