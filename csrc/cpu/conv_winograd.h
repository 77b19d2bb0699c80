// Winograd F(m x m, 3x3) transforms for stride-1, undilated 3x3 convs on NHWC, m = 2 or 4
// (csrc/cpu/conv_winograd.cpp runs the (m + 2)^2 GEMMs between them, conv.cpp picks m). An m x m
// output tile is A^T [ (G g G^T) . (B^T d B) ] A for the (m + 2) x (m + 2) input tile d: (m + 2)^2
// channel products per tile instead of 9 m^2, a 2.25x (m = 2) or 4x (m = 4) cut in the GEMM work.
// m = 2 takes the points 0, 1, -1 and infinity (Lavin's F(2, 3)): its float32 error is that of a
// direct conv (4-6e-7 of the output's largest magnitude on random 64- and 256-channel layers).
// m = 4 takes 0, 1, -1, 2, -1/2 and infinity: 2-5e-6 (7-10e-6 for the usual 0, +-1, +-2), most
// of it the float32 sums over the channels in the transformed domain, whose terms the output
// transform then combines with weights up to 8 -- within DESIGN.md section 4's 2e-5, but enough
// to flip the odd ReLU mask of a network a few steps into training.
// Included by csrc/cpu/conv_kernels.h inside an ISA namespace.

namespace winograd {

// o = B^T d: the 1-D input transform of m + 2 values.
template <int kM, typename T, typename V>
inline void input_1d(const V* d, V* o) {
  if constexpr (kM == 2) {
    o[0] = d[0] - d[2];
    o[1] = d[1] + d[2];
    o[2] = d[2] - d[1];
    o[3] = d[1] - d[3];
  } else {
    const V a = d[1] - d[3], b = d[4] - d[2];
    o[0] = fma(V::set1(T(1.5)), a, d[0] + d[4] - d[2] - d[2]);
    o[1] = fma(V::set1(T(-0.5)), d[3], fma(V::set1(T(-2.5)), d[2], d[4] - d[1]));
    o[2] = fma(V::set1(T(-2.5)), d[3], fma(V::set1(T(0.5)), d[2], d[4] + d[1]));
    o[3] = fma(V::set1(T(-0.5)), a, b);
    o[4] = fma(V::set1(T(2)), a, b);
    o[5] = fma(V::set1(T(-1.5)), b, d[1] + d[5] - d[3] - d[3]);
  }
}

// o = A^T m: the 1-D output transform of m + 2 values into m.
template <int kM, typename T, typename V>
inline void output_1d(const V* m, V* o) {
  const V s = m[1] + m[2], d = m[1] - m[2];
  if constexpr (kM == 2) {
    o[0] = m[0] + s;
    o[1] = d - m[3];
  } else {
    o[0] = m[0] + s + m[3] + m[4];
    o[1] = fma(V::set1(T(-0.5)), m[4], fma(V::set1(T(2)), m[3], d));
    o[2] = fma(V::set1(T(0.25)), m[4], fma(V::set1(T(4)), m[3], s));
    o[3] = fma(V::set1(T(-0.125)), m[4], fma(V::set1(T(8)), m[3], d)) + m[5];
  }
}

// o = G g: the 1-D weight transform of 3 values into m + 2.
template <int kM, typename T, typename V>
inline void weight_1d(const V* g, V* o) {
  const V a = g[0] + g[2];
  o[0] = g[0];
  o[kM + 1] = g[2];
  if constexpr (kM == 2) {
    o[1] = (a + g[1]) * V::set1(T(0.5));
    o[2] = (a - g[1]) * V::set1(T(0.5));
  } else {
    o[1] = (a + g[1]) * V::set1(T(-1) / 3);
    o[2] = (a - g[1]) * V::set1(T(1) / 3);
    o[3] = fma(V::set1(T(4) / 15), g[2], fma(V::set1(T(2) / 15), g[1], g[0] * V::set1(T(1) / 15)));
    o[4] =
        fma(V::set1(T(-4) / 15), g[2], fma(V::set1(T(8) / 15), g[1], g[0] * V::set1(T(-16) / 15)));
  }
}

// The adjoints, for the weight gradient (conv_winograd.cpp sums V^T dM over the tiles in between):
// o = A y, m + 2 values from the m of a column of the output gradient.
template <int kM, typename T, typename V>
inline void output_1d_adjoint(const V* y, V* o) {
  if constexpr (kM == 2) {
    o[0] = y[0];
    o[1] = y[0] + y[1];
    o[2] = y[0] - y[1];
    o[3] = V::zero() - y[1];
  } else {
    const V even = y[0] + y[2], odd = y[1] + y[3];
    o[0] = y[0];
    o[1] = even + odd;
    o[2] = even - odd;
    o[3] = fma(V::set1(T(8)), y[3], fma(V::set1(T(4)), y[2], fma(V::set1(T(2)), y[1], y[0])));
    o[4] = fma(V::set1(T(-0.125)), y[3],
               fma(V::set1(T(0.25)), y[2], fma(V::set1(T(-0.5)), y[1], y[0])));
    o[5] = y[3];
  }
}

// g = G^T u: 3 values from m + 2 of the transformed weight gradient.
template <int kM, typename T, typename V>
inline void weight_1d_adjoint(const V* u, V* g) {
  if constexpr (kM == 2) {
    const V s = (u[1] + u[2]) * V::set1(T(0.5));
    g[0] = u[0] + s;
    g[1] = (u[1] - u[2]) * V::set1(T(0.5));
    g[2] = s + u[3];
  } else {
    const V s = (u[1] + u[2]) * V::set1(T(-1) / 3), d = (u[2] - u[1]) * V::set1(T(1) / 3);
    g[0] = fma(V::set1(T(-16) / 15), u[4], fma(V::set1(T(1) / 15), u[3], u[0] + d));
    g[1] = fma(V::set1(T(8) / 15), u[4], fma(V::set1(T(2) / 15), u[3], s));
    g[2] = fma(V::set1(T(-4) / 15), u[4], fma(V::set1(T(4) / 15), u[3], d + u[5]));
  }
}

// Tile t of an F(kM x kM, 3x3) conv (ceil(P / kM) x ceil(Q / kM) tiles per image, row-major):
// its image n and the output pixel (p0, q0) of its top-left corner, np x nq of its pixels inside
// the output.
struct Tile {
  int64_t n, p0, q0, np, nq;
};

template <int kM>
inline Tile tile(const ConvArgs& a, int64_t t) {
  const int64_t tw = (a.Q + kM - 1) / kM, th = (a.P + kM - 1) / kM;
  const int64_t p0 = t / tw % th * kM, q0 = t % tw * kM;
  return {t / (th * tw), p0, q0, imin(kM, a.P - p0), imin(kM, a.Q - q0)};
}

// The sum of n running sums.
template <int n, typename V>
inline V total(const V (&sums)[n]) {
  V t = sums[0];
  for (int i = 1; i < n; ++i) t = t + sums[i];
  return t;
}

// Whether every lane of a running sum is finite (a NaN or Inf among its terms, or an overflow).
template <typename T, typename V>
inline bool finite(V sum) {
  T lanes[V::W];
  sum.store(lanes);
  for (int64_t i = 0; i < V::W; ++i)
    if (!(lanes[i] - lanes[i] == T(0))) return false;
  return true;
}

// The separable 2-D transform o = T g T^T of a kRows x kRows grid by the 1-D transform f (kRows
// values into kOut): f down each column (load(r, s) gives grid element (r, s), one SIMD vector),
// then along each row of the result; store(i, j, v) takes output (i, j).
template <int kRows, int kOut, typename V, typename F, typename Load, typename Store>
inline void transform_2d(F f, Load load, Store store) {
  V cols[kRows][kOut];  // cols[s] = f of column s
  for (int64_t s = 0; s < kRows; ++s) {
    V d[kRows];
    for (int64_t r = 0; r < kRows; ++r) d[r] = load(r, s);
    f(d, cols[s]);
  }
  for (int64_t i = 0; i < kOut; ++i) {
    V row[kRows], o[kOut];
    for (int64_t s = 0; s < kRows; ++s) row[s] = cols[s][i];
    f(row, o);
    for (int64_t j = 0; j < kOut; ++j) store(i, j, o[j]);
  }
}

}  // namespace winograd

// Weight transform of input channels [c0, c1): u ((m + 2)^2, C, K) = G g G^T for w (C, 3, 3, K)
// (the output channels contiguous: one SIMD vector covers W of them). False when a weight it read
// is not finite.
template <int kM, typename T>
FASTDL_FLATTEN bool conv_winograd_weight(const void* w_, int64_t C, int64_t K, int64_t c0,
                                         int64_t c1, void* u_) {
  using V = Vec<T>;
  constexpr int64_t kIn = kM + 2;
  const T* w = static_cast<const T*>(w_);
  T* u = static_cast<T*>(u_);
  V sum = V::zero();
  for (int64_t c = c0; c < c1; ++c)
    for_vectors<V::W>(0, K, [&](int64_t k, int64_t len) {
      winograd::transform_2d<3, kIn, V>(
          [](const V* g, V* o) { winograd::weight_1d<kM, T>(g, o); },
          [&](int64_t r, int64_t s) {
            const V g = ld<V>(w + ((c * 3 + r) * 3 + s) * K + k, len);
            sum = sum + g;
            return g;
          },
          [&](int64_t i, int64_t j, V o) { st(u + ((i * kIn + j) * C + c) * K + k, o, len); });
    });
  return winograd::finite<T>(sum);
}

// Input transform of tiles [t0, t0 + nt) (tile t = (n, tile row, tile column), ceil(P / m) x
// ceil(Q / m) per image) from x (N, H, W, C) into v ((m + 2)^2, nt, C), its points ldv elements
// apart: point (i, j) of tile t0 + l, channel c at (i * (m + 2) + j) * ldv + l * C + c. x holds the
// image rows (row n * H + h) from row0 on: all of them (row0 = 0), or a slab of the rows these
// tiles read. Returns false when any input it read is not finite: Winograd would smear a NaN or Inf
// over whole tiles, and conv_winograd.cpp recomputes such blocks directly so that they propagate as
// torch's conv does.
template <int kM, typename T>
FASTDL_FLATTEN bool conv_winograd_input(const ConvArgs& a, const void* x_, int64_t row0, int64_t t0,
                                        int64_t nt, void* v_, int64_t ldv) {
  using V = Vec<T>;
  constexpr int64_t kIn = kM + 2;
  const T* x = static_cast<const T*>(x_);
  T* v = static_cast<T*>(v_);
  const int64_t C = a.C;
  V sums[kIn];  // by tile row: one running sum had chained every load's add
  for (V& sm : sums) sm = V::zero();
  for (int64_t l = 0; l < nt; ++l) {
    const winograd::Tile tl = winograd::tile<kM>(a, t0 + l);
    const int64_t h0 = tl.p0 - a.pad_h, w0 = tl.q0 - a.pad_w;
    // The pixel (h0, w0) of the tile's corner, x's row tl.n * H + h0 from row0 (outside x at
    // the edges: only the pixels inside are read).
    const int64_t corner = (tl.n * a.H + h0 - row0) * a.W + w0;
    // A tile whose pixels all lie inside x (all but the edge ones) loads without bounds checks.
    const bool inside = h0 >= 0 && h0 + kIn <= a.H && w0 >= 0 && w0 + kIn <= a.W;
    for_vectors<V::W>(0, C, [&](int64_t c, int64_t len) {
      const auto run = [&](auto in_x) {
        winograd::transform_2d<kIn, kIn, V>(
            [](const V* d, V* o) { winograd::input_1d<kM, T>(d, o); },
            [&](int64_t r, int64_t s) {
              const V d = in_x(r, s) ? ld<V>(x + (corner + r * a.W + s) * C + c, len) : V::zero();
              sums[r] = sums[r] + d;
              return d;
            },
            [&](int64_t i, int64_t j, V o) { st(v + (i * kIn + j) * ldv + l * C + c, o, len); });
      };
      if (inside)
        run([](int64_t, int64_t) { return true; });
      else
        run([&](int64_t r, int64_t s) {
          return h0 + r >= 0 && h0 + r < a.H && w0 + s >= 0 && w0 + s < a.W;
        });
    });
  }
  return winograd::finite<T>(winograd::total(sums));
}

// Output transform of tiles [t0, t0 + nt) from m ((m + 2)^2, nt, K), its points ldm elements
// apart, into acc, the rows of output
// pixels from m0 on (row m = (n * P + p) * Q + q at (m - m0) * K): the pixels of the tiles that lie
// inside the output.
template <int kM, typename T>
FASTDL_FLATTEN void conv_winograd_output(const ConvArgs& a, const void* m_, int64_t ldm, int64_t t0,
                                         int64_t nt, int64_t m0, void* acc_) {
  using V = Vec<T>;
  constexpr int64_t kIn = kM + 2;
  const T* m = static_cast<const T*>(m_);
  T* acc = static_cast<T*>(acc_);
  const int64_t K = a.K;
  for (int64_t l = 0; l < nt; ++l) {
    const winograd::Tile tl = winograd::tile<kM>(a, t0 + l);
    T* corner = acc + ((tl.n * a.P + tl.p0) * a.Q + tl.q0 - m0) * K;  // the tile's first pixel
    for_vectors<V::W>(0, K, [&](int64_t k, int64_t len) {
      const auto run = [&](auto in_out) {
        winograd::transform_2d<kIn, kM, V>(
            [](const V* d, V* o) { winograd::output_1d<kM, T>(d, o); },
            [&](int64_t r, int64_t s) { return ld<V>(m + (r * kIn + s) * ldm + l * K + k, len); },
            [&](int64_t i, int64_t j, V y) {
              if (in_out(i, j)) st(corner + (i * a.Q + j) * K + k, y, len);
            });
      };
      // A tile wholly inside the output (all but the partial ones at its edges) stores unchecked.
      if (tl.np == kM && tl.nq == kM)
        run([](int64_t, int64_t) { return true; });
      else
        run([&](int64_t i, int64_t j) { return i < tl.np && j < tl.nq; });
    });
  }
}

// Adjoint output transform of tiles [t0, t0 + nt) for the weight gradient: dm ((m + 2)^2, nt, K),
// its points ldd elements apart, = A dy A^T of each tile's m x m pixels of gy (N, P, Q, K) (zero
// outside the output). False when a value it read is not finite.
template <int kM, typename T>
FASTDL_FLATTEN bool conv_winograd_grad_output(const ConvArgs& a, const void* gy_, int64_t t0,
                                              int64_t nt, void* dm_, int64_t ldd) {
  using V = Vec<T>;
  constexpr int64_t kIn = kM + 2;
  const T* gy = static_cast<const T*>(gy_);
  T* dm = static_cast<T*>(dm_);
  const int64_t K = a.K;
  V sums[kM];
  for (V& sm : sums) sm = V::zero();
  for (int64_t l = 0; l < nt; ++l) {
    const winograd::Tile tl = winograd::tile<kM>(a, t0 + l);
    for_vectors<V::W>(0, K, [&](int64_t k, int64_t len) {
      winograd::transform_2d<kM, kIn, V>(
          [](const V* y, V* o) { winograd::output_1d_adjoint<kM, T>(y, o); },
          [&](int64_t i, int64_t j) {
            const V y = i < tl.np && j < tl.nq
                            ? ld<V>(gy + ((tl.n * a.P + tl.p0 + i) * a.Q + tl.q0 + j) * K + k, len)
                            : V::zero();
            sums[i] = sums[i] + y;
            return y;
          },
          [&](int64_t r, int64_t s, V o) { st(dm + (r * kIn + s) * ldd + l * K + k, o, len); });
    });
  }
  return winograd::finite<T>(winograd::total(sums));
}

// Adjoint weight transform of input channels [c0, c1): dw (C, 3, 3, K) = G^T du G for
// du ((m + 2)^2, C, K).
template <int kM, typename T>
FASTDL_FLATTEN void conv_winograd_grad_weight(const void* du_, int64_t C, int64_t K, int64_t c0,
                                              int64_t c1, void* dw_) {
  using V = Vec<T>;
  constexpr int64_t kIn = kM + 2;
  const T* du = static_cast<const T*>(du_);
  T* dw = static_cast<T*>(dw_);
  for (int64_t c = c0; c < c1; ++c)
    for_vectors<V::W>(0, K, [&](int64_t k, int64_t len) {
      winograd::transform_2d<kIn, 3, V>(
          [](const V* u, V* g) { winograd::weight_1d_adjoint<kM, T>(u, g); },
          [&](int64_t i, int64_t j) { return ld<V>(du + ((i * kIn + j) * C + c) * K + k, len); },
          [&](int64_t r, int64_t s, V g) { st(dw + ((c * 3 + r) * 3 + s) * K + k, g, len); });
    });
}
