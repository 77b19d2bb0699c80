// CPU kernels of the graph family, written once on the Vec abstraction of common/vec.h and
// compiled once per ISA: csrc/cpu/isa/*.cpp include this file inside their own namespace (after
// vec.h), and export kGraphKernels. No torch, no std templates, no exceptions here (see vec.h).
//
// Row-wise sparse x dense products over a CSR ("pull" form, as in Yang, Buluc & Owens,
// "Design principles for sparse matrix multiplication on the GPU", 2018, and the CPU kernels of
// pytorch_sparse): each output row is accumulated in registers over its entries and written
// once, so there are no atomics and the result does not depend on the thread count. The gathered
// rows are the latency-bound part: they are prefetched kPrefetch entries ahead, across row
// boundaries by the GAT kernels (a row has ~20 entries in a typical graph; inside the row only,
// its first gathers would wait on memory after the row's softmax) and by spmm's windowed passes,
// inside the row by its one-pass sum (long rows only, then: the out-of-order core keeps a short
// row's gathers in flight by itself) and, kPrefetchInRow ahead, by max/min. Features are cut
// into tiles of four vectors so the accumulators stay in registers.

// Entries ahead whose gathered rows are prefetched: several hundred cycles of memory latency
// against ~10-40 cycles of work per entry. 16 and 32 ran the GAT passes 5-20% faster than 8
// (paired runs on a noisy machine).
constexpr int64_t kPrefetch = 32;
// The scalar max/min loop's distance, inside the row: at kPrefetch a typical row would get no
// prefetch at all (spmm max 77 -> 100 ms).
constexpr int64_t kPrefetchInRow = 8;
// Features per tile of the scalar (max/min) kernels.
constexpr int64_t kScalarTile = 64;

template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t k = 0; k < n * static_cast<int64_t>(sizeof(T)); k += 64) __builtin_prefetch(c + k);
}

// Prefetches n elements at offset f of the row gathered kPrefetch entries after e, if that entry
// is before `end`: the end of the caller's range of rows, so the next rows' first gathers are in
// flight while this row finishes. Entries past the current row are not validated yet; a prefetch
// of a wild address is harmless (it never faults).
template <typename T>
inline void prefetch_ahead(const int64_t* col, int64_t e, int64_t end, const T* x, int64_t stride,
                           int64_t f, int64_t n) {
  if (e + kPrefetch < end) prefetch_row(x + col[e + kPrefetch] * stride + f, n);
}

// Whether the entries [e0, e1) index inside the addressed arrays; checked for a whole row
// before the row's gathers.
inline bool entries_ok(const CsrView& g, int64_t e0, int64_t e1) {
  uint64_t bad = 0;
  for (int64_t e = e0; e < e1; ++e)
    bad |=
        static_cast<uint64_t>(static_cast<uint64_t>(g.col[e]) >= static_cast<uint64_t>(g.num_cols));
  if (g.perm != nullptr)
    for (int64_t e = e0; e < e1; ++e)
      bad |= static_cast<uint64_t>(static_cast<uint64_t>(g.perm[e]) >=
                                   static_cast<uint64_t>(g.perm_size));
  return bad == 0;
}

// acc[k] = sum over entries e in [e0, e1) of coef(f0 + k W)(e) * x[col e, f0 + k W ...] for the
// n <= 4 W features of the tile at f0 (kFull: n == 4 W). coef(f) gives the per-entry coefficient
// of the vector at feature f: one for the whole row (spmm), or per attention head (GAT, where
// each vector lies inside one head); it is resolved once per tile, outside the entry loop.
// The prefetch reaches entry `ahead` (>= e1) and covers pf elements from the row's start.
template <typename V, bool kFull, typename T, typename C>
inline void gather_tile(V (&acc)[4], const int64_t* col, int64_t e0, int64_t e1, int64_t ahead,
                        int64_t pf, const T* x, int64_t stride, int64_t f0, int64_t n, C&& coef) {
  constexpr int W = V::W;
  using Coef = decltype(coef(f0));
  const Coef c[4] = {coef(f0), coef(f0 + W), coef(f0 + 2 * W), coef(f0 + 3 * W)};
  for (auto& a : acc) a = V::zero();
  for (int64_t e = e0; e < e1; ++e) {
    prefetch_ahead(col, e, ahead, x, stride, f0, pf);
    const T* xr = x + col[e] * stride + f0;
    if constexpr (kFull) {
      for (int k = 0; k < 4; ++k) acc[k] = fma(V::set1(c[k](e)), V::load(xr + k * W), acc[k]);
    } else {
      for (int k = 0; k < 4 && k * W < n; ++k)
        acc[k] = fma(V::set1(c[k](e)), ld<V>(xr + k * W, imin(W, n - k * W)), acc[k]);
    }
  }
}

// For each tile of the F features: gather_tile, then store(f0, n, acc). The first tile's pass
// prefetches whole rows of F, up to entry `ahead` (past e1: the next rows); the rows are then in
// L1/L2 for the row's other tiles, which prefetch only their own part within the row.
template <typename V, typename T, typename C, typename S>
inline void gather_row(const int64_t* col, int64_t e0, int64_t e1, int64_t ahead, const T* x,
                       int64_t stride, int64_t F, C&& coef, S&& store) {
  constexpr int64_t kTile = 4 * V::W;
  V acc[4];
  int64_t f0 = 0;
  for (; f0 + kTile <= F; f0 += kTile) {
    const bool first = f0 == 0;
    gather_tile<V, true>(acc, col, e0, e1, first ? ahead : e1, first ? F : kTile, x, stride, f0,
                         kTile, coef);
    store(f0, kTile, acc);
  }
  if (f0 < F) {
    const bool first = f0 == 0;
    gather_tile<V, false>(acc, col, e0, e1, first ? ahead : e1, F - f0, x, stride, f0, F - f0,
                          coef);
    store(f0, F - f0, acc);
  }
}

// Multi-head gather: out[k, f] = sum_e coef(e, k) x[col e, k, f] over the H heads of F features
// of x's rows (H F elements). When F is a multiple of the vector width every vector lies inside
// one head, so one pass over the entries gathers whole rows (H F elements, one stream of
// contiguous lines) for all heads at once; otherwise one pass per head. store(f0, n, acc) gets
// offsets into the H F row, each vector inside head f / F.
template <typename V, typename T, typename C, typename S>
inline void gather_heads(const int64_t* col, int64_t e0, int64_t e1, int64_t ahead, const T* x,
                         int64_t H, int64_t F, C&& coef, S&& store) {
  if (F % V::W == 0) {
    gather_row<V>(
        col, e0, e1, ahead, x, H * F, H * F,
        [&](int64_t f) {
          const int64_t k = f / F;
          return [&coef, k](int64_t e) { return coef(e, k); };
        },
        store);
    return;
  }
  for (int64_t k = 0; k < H; ++k)
    gather_row<V>(
        col, e0, e1, ahead, x + k * F, H * F, F,
        [&](int64_t) { return [&coef, k](int64_t e) { return coef(e, k); }; },
        [&](int64_t f0, int64_t n, const V(&acc)[4]) { store(k * F + f0, n, acc); });
}

// Writes the tile acc * scale (+ d * xd) to out[f0, f0 + n).
template <typename V, typename T, typename A>
inline void store_tile(T* out, const V (&acc)[4], int64_t f0, int64_t n, A scale, A d,
                       const T* xd) {
  constexpr int W = V::W;
  for (int k = 0; k < 4 && k * W < n; ++k) {
    const int64_t f = f0 + k * W, l = imin(W, n - k * W);
    V v = acc[k] * V::set1(scale);
    if (xd != nullptr) v = fma(V::set1(d), ld<V>(xd + f, l), v);
    st(out + f, v, l);
  }
}

// ---------------------------------------------------------------- spmm

// lo <= c < lo + width, without overflow for any c.
inline bool in_window(int64_t c, int64_t lo, int64_t width) {
  return static_cast<uint64_t>(c) - static_cast<uint64_t>(lo) < static_cast<uint64_t>(width);
}

// The entries e of [e0, e1) whose col lies in the window, in order: their col to wcol, e to
// went (each with room for 8 past the count); returns the count.
inline int64_t pack_window(const int64_t* col, int64_t e0, int64_t e1, int64_t lo, int64_t width,
                           int64_t* wcol, int64_t* went) {
  int64_t n = 0, e = e0;
#if FASTDL_VEC == 512
  const __m512i vlo = _mm512_set1_epi64(lo), vwidth = _mm512_set1_epi64(width);
  __m512i idx = _mm512_add_epi64(_mm512_set1_epi64(e0), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  for (; e + 8 <= e1; e += 8) {
    const __m512i c = _mm512_loadu_si512(col + e);
    const __mmask8 in = _mm512_cmplt_epu64_mask(_mm512_sub_epi64(c, vlo), vwidth);
    _mm512_storeu_si512(wcol + n, _mm512_maskz_compress_epi64(in, c));
    _mm512_storeu_si512(went + n, _mm512_maskz_compress_epi64(in, idx));
    n += __builtin_popcount(in);
    idx = _mm512_add_epi64(idx, _mm512_set1_epi64(8));
  }
#endif
  for (; e < e1; ++e) {  // without branches: the test is a coin flip
    wcol[n] = col[e];
    went[n] = e;
    n += in_window(col[e], lo, width);
  }
  return n;
}

template <typename T>
bool spmm_sum(const SpmmArgs& p, int64_t r0, int64_t r1) {
  using A = Acc<T>;
  using V = Vec<A>;
  const CsrView& g = p.g;
  const A* w = static_cast<const A*>(p.w);
  const A* cs = static_cast<const A*>(p.cs);
  const A* rs = static_cast<const A*>(p.rs);
  const A* ds = static_cast<const A*>(p.ds);
  const T* x = static_cast<const T*>(p.x);
  const T* xd = static_cast<const T*>(p.xd);
  T* out = static_cast<T*>(p.out);
  const int64_t F = p.F;
  auto coef = [&](int64_t e) {
    A c = w != nullptr ? w[g.perm != nullptr ? g.perm[e] : e] : A(1);
    return cs != nullptr ? c * cs[g.col[e]] : c;
  };
  // bfloat16 out would round between passes: all in the first pass whatever the window.
  const int64_t lo = p.col_lo, width = p.col_hi - lo, ahead = g.rowptr[r1];
  const bool window = !kIsBf16<T> && (lo > 0 || p.col_hi < g.num_cols);
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t e0 = g.rowptr[i], e1 = g.rowptr[i + 1];
    const bool whole = !window || e1 - e0 > kWindowRow;
    if (lo > 0 && whole) continue;  // done whole in the first pass
    // Checked in the first pass: the caller raises before a later one runs.
    if (lo == 0 && !entries_ok(g, e0, e1)) return false;
    const A scale = rs != nullptr ? rs[i] : A(1);
    const A d = ds != nullptr ? ds[i] : A(0);
    const T* xdi = ds != nullptr ? xd + i * F : nullptr;
    T* o = out + i * F;
    if (whole) {
      gather_row<V>(
          // The prefetch stays inside the row here: across rows it measured 0.91x, while
          // GAT's rows, with their softmax between the gathers, gain from it.
          g.col, e0, e1, e1, x, F, F, [&](int64_t) { return coef; },
          [&](int64_t f0, int64_t n, const V(&acc)[4]) {
            store_tile(o, acc, f0, n, scale, d, xdi);
          });
      continue;
    }
    // The row's entries in the window; and the rows in the window of the entries kPrefetch
    // ahead are prefetched (the others, the window's first row again): the packing between the
    // rows' gathers leaves the out-of-order core fewer of them in flight.
    int64_t wcol[kWindowRow + 8], went[kWindowRow + 8];
    const int64_t n = pack_window(g.col, e0, e1, lo, width, wcol, went);
    for (int64_t e = e0; e < e1 && e + kPrefetch < ahead; ++e) {
      const int64_t c2 = g.col[e + kPrefetch];  // not validated yet: a prefetch never faults
      prefetch_row(x + (in_window(c2, lo, width) ? c2 : lo) * F, F);
    }
    if (n == 0 && lo > 0) continue;
    const auto wcoef = [&](int64_t j) { return coef(went[j]); };
    gather_row<V>(
        wcol, 0, n, n, x, F, F, [&](int64_t) { return wcoef; },
        [&](int64_t f0, int64_t m, const V(&acc)[4]) {
          if (lo == 0)
            store_tile(o, acc, f0, m, scale, d, xdi);
          else  // o + acc * scale
            store_tile(o, acc, f0, m, scale, A(1), static_cast<const T*>(o));
        });
  }
  return true;
}

// max/min: NaN wins (as torch's amax/amin); ties keep the first entry.
template <typename T, bool kMin>
bool spmm_max(const SpmmArgs& p, int64_t r0, int64_t r1) {
  using A = Acc<T>;
  const CsrView& g = p.g;
  const A* w = static_cast<const A*>(p.w);
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const int64_t F = p.F;
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t e0 = g.rowptr[i], e1 = g.rowptr[i + 1];
    if (!entries_ok(g, e0, e1)) return false;
    T* o = out + i * F;
    int64_t* ao = p.arg_out + i * F;
    for (int64_t f0 = 0; f0 < F; f0 += kScalarTile) {
      const int64_t n = imin(kScalarTile, F - f0);
      A best[kScalarTile];
      int64_t arg[kScalarTile];
      if (e0 == e1) {
        for (int64_t f = 0; f < n; ++f) best[f] = A(0), arg[f] = -1;
      } else {
        // The first entry initializes; the others replace it when strictly better (or NaN), a
        // branch-free select the compiler vectorizes.
        const A c0 = w != nullptr ? w[e0] : A(1);
        const T* x0 = x + g.col[e0] * F + f0;
        for (int64_t f = 0; f < n; ++f) best[f] = c0 * widen(x0[f]), arg[f] = e0;
      }
      for (int64_t e = e0 + 1; e < e1; ++e) {
        if (e + kPrefetchInRow < e1) prefetch_row(x + g.col[e + kPrefetchInRow] * F + f0, n);
        const A c = w != nullptr ? w[e] : A(1);
        const T* xr = x + g.col[e] * F + f0;
        for (int64_t f = 0; f < n; ++f) {
          const A v = c * widen(xr[f]);
          const bool better = kMin ? v < best[f] : v > best[f];
          const bool take = better || (v != v && best[f] == best[f]);
          best[f] = take ? v : best[f];
          arg[f] = take ? e : arg[f];
        }
      }
      for (int64_t f = 0; f < n; ++f) narrow(o + f0 + f, best[f]), ao[f0 + f] = arg[f];
    }
  }
  return true;
}

// Over the transpose: out[j, f] = sum over t of [arg[col t, f] == perm t] * w[perm t] * x[col t,
// f].
template <typename T>
bool spmm_max_bwd_x(const SpmmArgs& p, int64_t r0, int64_t r1) {
  using A = Acc<T>;
  const CsrView& g = p.g;
  const A* w = static_cast<const A*>(p.w);
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const int64_t F = p.F;
  for (int64_t j = r0; j < r1; ++j) {
    const int64_t t0 = g.rowptr[j], t1 = g.rowptr[j + 1];
    if (!entries_ok(g, t0, t1)) return false;
    for (int64_t f0 = 0; f0 < F; f0 += kScalarTile) {
      const int64_t n = imin(kScalarTile, F - f0);
      A acc[kScalarTile];
      for (int64_t f = 0; f < n; ++f) acc[f] = A(0);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i = g.col[t], q = g.perm[t];
        const A c = w != nullptr ? w[q] : A(1);
        const T* xr = x + i * F + f0;
        const int64_t* ar = p.arg + i * F + f0;
        for (int64_t f = 0; f < n; ++f) acc[f] += ar[f] == q ? c * widen(xr[f]) : A(0);
      }
      for (int64_t f = 0; f < n; ++f) narrow(out + j * F + f0 + f, acc[f]);
    }
  }
  return true;
}

// ---------------------------------------------------------------- per-entry dot products

template <typename T>
bool edge_dot(const EdgeDotArgs& p, int64_t r0, int64_t r1) {
  using A = Acc<T>;
  using V = Vec<A>;
  const CsrView& g = p.g;
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const A* rs = static_cast<const A*>(p.rs);
  const A* cs = static_cast<const A*>(p.cs);
  A* out = static_cast<A*>(p.out);
  const int64_t F = p.F, ahead = g.rowptr[r1];
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t e0 = g.rowptr[i], e1 = g.rowptr[i + 1];
    if (!entries_ok(g, e0, e1)) return false;
    const T* ar = a + i * F;
    const A scale = rs != nullptr ? rs[i] : A(1);
    for (int64_t e = e0; e < e1; ++e) {
      prefetch_ahead(g.col, e, ahead, b, F, 0, F);
      const int64_t j = g.col[e];
      const T* br = b + j * F;
      A s = A(0);
      if (p.arg != nullptr) {
        const int64_t* am = p.arg + i * F;
        for (int64_t f = 0; f < F; ++f) s += am[f] == e ? widen(ar[f]) * widen(br[f]) : A(0);
      } else {
        s = reduce<V>(F, [&](int64_t f, int64_t l) {
              return ld<V>(ar + f, l) * ld<V>(br + f, l);
            }).sum();
      }
      out[e] = s * scale * (cs != nullptr ? cs[j] : A(1));
    }
  }
  return true;
}

// ---------------------------------------------------------------- graph attention

template <typename T>
bool gat_scores(const GatArgs& p, int64_t n0, int64_t n1) {
  using A = Acc<T>;
  using V = Vec<A>;
  const T* h = static_cast<const T*>(p.h);
  const A* att_src = static_cast<const A*>(p.att_src);
  const A* att_dst = static_cast<const A*>(p.att_dst);
  const int64_t H = p.H, F = p.F;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t k = 0; k < H; ++k) {
      const T* hr = h + (n * H + k) * F;
      const A* as = att_src + k * F;
      const A* ad = att_dst + k * F;
      V s = V::zero(), d = V::zero();
      for_vectors<V::W>(0, F, [&](int64_t f, int64_t l) {
        const V v = ld<V>(hr + f, l);
        s = fma(v, ld<V>(as + f, l), s);
        d = fma(v, ld<V>(ad + f, l), d);
      });
      static_cast<A*>(p.a_src)[n * H + k] = s.sum();
      static_cast<A*>(p.a_dst)[n * H + k] = d.sum();
    }
  return true;
}

template <typename A>
inline A leaky(A z, A slope) {
  return z > A(0) ? z : z * slope;
}

// alpha[e, k0 + k] <- LeakyReLU(a_src[col e, k0 + k] + ad[k0 + k]) for the row's entries e and
// the nk heads from k0, and m[k] <- their max over the entries (a NaN score may be dropped from
// the max: it makes its head's whole softmax NaN anyway). Up to a vector of heads, an entry's
// scores are one masked load (the source's scores are adjacent) and the running max stays in a
// register: per head and entry, a chain through m in memory took half of the 4-head forward. The
// sources' scores are gathered from an array larger than L2 for several heads: on that path,
// prefetched kPrefetch entries ahead, across rows up to `ahead`.
template <typename A>
inline void gat_row_scores(const int64_t* col, int64_t e0, int64_t e1, int64_t ahead,
                           const A* a_src, const A* ad, A* alpha, int64_t H, int64_t k0, int64_t nk,
                           A slope, A* m) {
  using V = Vec<A>;
  if (nk <= V::W) {
    const V d = ld<V>(ad + k0, nk), sl = V::set1(slope);
    V mv = V::set1(-__builtin_inf());
    for (int64_t e = e0; e < e1; ++e) {
      if (e + kPrefetch < ahead) __builtin_prefetch(a_src + col[e + kPrefetch] * H + k0);
      const V z = ld<V>(a_src + col[e] * H + k0, nk) + d;
      const V v = where_pos(z, z, z * sl);
      st(alpha + e * H + k0, v, nk);
      mv = vmax(mv, v);
    }
    A lanes[V::W];
    mv.store(lanes);
    for (int64_t k = 0; k < nk; ++k) m[k] = lanes[k];
    return;
  }
  for (int64_t k = 0; k < nk; ++k) m[k] = -__builtin_inf();
  for (int64_t e = e0; e < e1; ++e) {
    const A* as = a_src + col[e] * H + k0;
    A* al = alpha + e * H + k0;
    for (int64_t k = 0; k < nk; ++k) {
      const A s = leaky(as[k] + ad[k0 + k], slope);
      al[k] = s;
      m[k] = s > m[k] ? s : m[k];
    }
  }
}

// Heads whose softmax state (running max, sum) a GAT row keeps on the stack at once.
constexpr int64_t kHeadChunk = 16;

// alpha[e, k0 + k] <- exp(alpha - m[k]) / sum over the row's entries e, for the nk heads from
// k0. With all heads in one chunk and their count dividing the vector width, the row's scores are
// one flat array whose lane l always holds head l % H: vector exp with per-lane shifts. Otherwise
// per entry and head.
template <typename A>
inline void softmax_heads(A* alpha, int64_t e0, int64_t e1, int64_t H, int64_t k0, int64_t nk,
                          const A* m) {
  using V = Vec<A>;
  constexpr int W = V::W;
  A sum[kHeadChunk];
  if (nk == H && W % H == 0) {
    A lanes[W];
    for (int l = 0; l < W; ++l) lanes[l] = m[l % H];
    const V shift = V::load(lanes);
    A* row = alpha + e0 * H;
    V acc = V::zero();
    for_vectors<W>(0, (e1 - e0) * H, [&](int64_t j, int64_t len) {
      const V v = vexp(ld<V>(row + j, len) - shift).first(len);
      st(row + j, v, len);
      acc = acc + v;
    });
    acc.store(lanes);
    for (int64_t k = 0; k < H; ++k) sum[k] = A(0);
    for (int l = 0; l < W; ++l) sum[l % H] += lanes[l];
    for (int l = 0; l < W; ++l) lanes[l] = A(1) / sum[l % H];
    const V inv = V::load(lanes);
    for_vectors<W>(0, (e1 - e0) * H,
                   [&](int64_t j, int64_t len) { st(row + j, ld<V>(row + j, len) * inv, len); });
    return;
  }
  for (int64_t k = 0; k < nk; ++k) sum[k] = A(0);
  for (int64_t e = e0; e < e1; ++e) {
    A* al = alpha + e * H + k0;
    for (int64_t k = 0; k < nk; ++k) {
      const A v = sexp(al[k] - m[k]);
      al[k] = v;
      sum[k] += v;
    }
  }
  for (int64_t k = 0; k < nk; ++k) sum[k] = A(1) / sum[k];
  for (int64_t e = e0; e < e1; ++e)
    for (int64_t k = 0; k < nk; ++k) alpha[e * H + k0 + k] *= sum[k];
}

// Softmax attention rows (Velickovic et al., 2018), max-subtracted per row and head. Each pass
// over a row's entries handles all heads (chunks of kHeadChunk): the per-head scores of an entry
// are adjacent (alpha is (edges, heads)), and the aggregation gathers each source's whole
// heads x features row once (gather_heads) instead of once per head.
template <typename T>
bool gat_fwd(const GatArgs& p, int64_t r0, int64_t r1) {
  using A = Acc<T>;
  using V = Vec<A>;
  const CsrView& g = p.g;
  const A* a_src = static_cast<const A*>(p.a_src);
  const A* a_dst = static_cast<const A*>(p.a_dst);
  const A* drop = static_cast<const A*>(p.drop);
  A* alpha = static_cast<A*>(p.alpha);
  const T* h = static_cast<const T*>(p.h);
  T* out = static_cast<T*>(p.out);
  const int64_t H = p.H, F = p.F, ahead = g.rowptr[r1];
  const A slope = static_cast<A>(p.slope);
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t e0 = g.rowptr[i], e1 = g.rowptr[i + 1];
    if (!entries_ok(g, e0, e1)) return false;
    for (int64_t k0 = 0; k0 < H; k0 += kHeadChunk) {
      const int64_t nk = imin(kHeadChunk, H - k0);
      A m[kHeadChunk];
      gat_row_scores(g.col, e0, e1, ahead, a_src, a_dst + i * H, alpha, H, k0, nk, slope, m);
      softmax_heads(alpha, e0, e1, H, k0, nk, m);
    }
    auto coef = [&](int64_t e, int64_t k) {
      return drop != nullptr ? alpha[e * H + k] * drop[e * H + k] : alpha[e * H + k];
    };
    T* o = out + i * H * F;
    gather_heads<V>(g.col, e0, e1, ahead, h, H, F, coef,
                    [&](int64_t f0, int64_t n, const V(&acc)[4]) {
                      store_tile(o, acc, f0, n, A(1), A(0), static_cast<const T*>(nullptr));
                    });
  }
  return true;
}

// Backward, CSR rows i: with beta_e = alpha_e * drop_e and g_i = grad_out[i],
//   dalpha_e = drop_e * <g_i, h[col e]>, ds_e = alpha_e * (dalpha_e - sum_e' alpha_e' dalpha_e'),
//   dz_e = ds_e * LeakyReLU'(z_e), g_dst[i] = sum_e dz_e.
// One pass over the entries computes the dot products of all heads from the source's whole
// heads x features row; g_dst[i] holds sum_e' alpha_e' dalpha_e' in between.
template <typename T>
bool gat_bwd_rows(const GatArgs& p, int64_t r0, int64_t r1) {
  using A = Acc<T>;
  using V = Vec<A>;
  const CsrView& g = p.g;
  const A* a_src = static_cast<const A*>(p.a_src);
  const A* a_dst = static_cast<const A*>(p.a_dst);
  const A* drop = static_cast<const A*>(p.drop);
  const A* alpha = static_cast<const A*>(p.alpha);
  A* dz = static_cast<A*>(p.dz);
  A* g_dst = static_cast<A*>(p.g_dst);
  const T* h = static_cast<const T*>(p.h);
  const T* grad = static_cast<const T*>(p.grad);
  const int64_t H = p.H, F = p.F, ahead = g.rowptr[r1];
  const A slope = static_cast<A>(p.slope);
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t e0 = g.rowptr[i], e1 = g.rowptr[i + 1];
    if (!entries_ok(g, e0, e1)) return false;
    const T* gr = grad + i * H * F;
    A* t = g_dst + i * H;
    for (int64_t k = 0; k < H; ++k) t[k] = A(0);
    for (int64_t e = e0; e < e1; ++e) {
      prefetch_ahead(g.col, e, ahead, h, H * F, 0, H * F);
      prefetch_ahead(g.col, e, ahead, a_src, H, 0, H);  // for the second pass
      const T* hr = h + g.col[e] * H * F;
      for (int64_t k = 0; k < H; ++k) {
        A da = reduce<V>(F, [&](int64_t f, int64_t l) {
                 return ld<V>(gr + k * F + f, l) * ld<V>(hr + k * F + f, l);
               }).sum();
        if (drop != nullptr) da *= drop[e * H + k];
        dz[e * H + k] = da;
        t[k] += alpha[e * H + k] * da;
      }
    }
    const A* ad = a_dst + i * H;
    for (int64_t k0 = 0; k0 < H; k0 += kHeadChunk) {
      const int64_t nk = imin(kHeadChunk, H - k0);
      if (nk <= V::W) {  // the heads of an entry as one vector, as in gat_row_scores
        const V d = ld<V>(ad + k0, nk), tv = ld<V>(t + k0, nk), sl = V::set1(slope);
        V gd = V::zero();
        for (int64_t e = e0; e < e1; ++e) {
          const int64_t q = e * H + k0;
          const V z = ld<V>(a_src + g.col[e] * H + k0, nk) + d;
          V v = ld<V>(alpha + q, nk) * (ld<V>(dz + q, nk) - tv);
          v = where_pos(z, v, v * sl);
          st(dz + q, v, nk);
          gd = gd + v;
        }
        st(t + k0, gd, nk);
        continue;
      }
      A gd[kHeadChunk];
      for (int64_t k = 0; k < nk; ++k) gd[k] = A(0);
      for (int64_t e = e0; e < e1; ++e) {
        const A* as = a_src + g.col[e] * H + k0;
        for (int64_t k = 0; k < nk; ++k) {
          const int64_t q = e * H + k0 + k;
          const A z = as[k] + ad[k0 + k];
          const A v = alpha[q] * (dz[q] - t[k0 + k]) * (z > A(0) ? A(1) : slope);
          dz[q] = v;
          gd[k] += v;
        }
      }
      for (int64_t k = 0; k < nk; ++k) t[k0 + k] = gd[k];
    }
  }
  return true;
}

// Backward, transpose rows j (col = destination i, perm = CSR entry q):
//   g_src[j] = sum_t dz_q, grad_h[j] = sum_t beta_q g_i + g_src[j] att_src + g_dst[j] att_dst,
// all heads per pass (gather_heads).
template <typename T>
bool gat_bwd_nodes(const GatArgs& p, int64_t r0, int64_t r1) {
  using A = Acc<T>;
  using V = Vec<A>;
  const CsrView& g = p.g;
  const A* drop = static_cast<const A*>(p.drop);
  const A* alpha = static_cast<const A*>(p.alpha);
  const A* dz = static_cast<const A*>(p.dz);
  const A* att_src = static_cast<const A*>(p.att_src);
  const A* att_dst = static_cast<const A*>(p.att_dst);
  const A* g_dst = static_cast<const A*>(p.g_dst);
  A* g_src = static_cast<A*>(p.g_src);
  const T* grad = static_cast<const T*>(p.grad);
  T* out = static_cast<T*>(p.out);
  const int64_t H = p.H, F = p.F, ahead = g.rowptr[r1];
  for (int64_t j = r0; j < r1; ++j) {
    const int64_t t0 = g.rowptr[j], t1 = g.rowptr[j + 1];
    if (!entries_ok(g, t0, t1)) return false;
    A* gs = g_src + j * H;
    const A* gd = g_dst + j * H;
    for (int64_t k = 0; k < H; ++k) gs[k] = A(0);
    for (int64_t t = t0; t < t1; ++t) {
      const A* d = dz + g.perm[t] * H;
      for (int64_t k = 0; k < H; ++k) gs[k] += d[k];
    }
    auto coef = [&](int64_t t, int64_t k) {
      const int64_t q = g.perm[t] * H + k;
      return drop != nullptr ? alpha[q] * drop[q] : alpha[q];
    };
    T* o = out + j * H * F;
    gather_heads<V>(g.col, t0, t1, ahead, grad, H, F, coef,
                    [&](int64_t f0, int64_t n, const V(&acc)[4]) {
                      for (int q = 0; q < 4 && q * V::W < n; ++q) {
                        const int64_t f = f0 + q * V::W, l = imin(V::W, n - q * V::W), k = f / F;
                        V v = fma(V::set1(gs[k]), ld<V>(att_src + f, l), acc[q]);
                        st(o + f, fma(V::set1(gd[k]), ld<V>(att_dst + f, l), v), l);
                      }
                    });
  }
  return true;
}

const GraphKernels kGraphKernels = {
    .spmm_sum = {spmm_sum<float>, spmm_sum<double>, spmm_sum<bf16>},
    .spmm_max = {{spmm_max<float, false>, spmm_max<float, true>},
                 {spmm_max<double, false>, spmm_max<double, true>},
                 {spmm_max<bf16, false>, spmm_max<bf16, true>}},
    .spmm_max_bwd_x = {spmm_max_bwd_x<float>, spmm_max_bwd_x<double>, spmm_max_bwd_x<bf16>},
    .edge_dot = {edge_dot<float>, edge_dot<double>, edge_dot<bf16>},
    .gat_scores = {gat_scores<float>, gat_scores<double>, gat_scores<bf16>},
    .gat_fwd = {gat_fwd<float>, gat_fwd<double>, gat_fwd<bf16>},
    .gat_bwd_rows = {gat_bwd_rows<float>, gat_bwd_rows<double>, gat_bwd_rows<bf16>},
    .gat_bwd_nodes = {gat_bwd_nodes<float>, gat_bwd_nodes<double>, gat_bwd_nodes<bf16>},
};
