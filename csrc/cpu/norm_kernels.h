// CPU kernels of the norm family, written once on the Vec abstraction of common/vec.h and
// compiled once per ISA: csrc/cpu/isa/*.cpp include this file inside their own namespace (after
// vec.h), and export kNormKernels. No torch, no std templates, no exceptions here (see vec.h).
//
// Statistics are exact-ish and deterministic: a row (or BatchNorm channel) is cut into chunks
// fixed by the shape alone; each chunk is reduced with two passes while it sits in L1/L2 (mean,
// then squared deviations: no E[x^2] - E[x]^2 cancellation), and the chunks are merged in order
// in double (Chan et al., "Updating formulae and a pairwise algorithm for computing sample
// variances", 1979). Forward work is one read and one write of each element, the floor for a
// memory-bound op; outputs too large for the caches use non-temporal stores so the write does
// not first read the destination line.

// Elements reduced per statistics chunk: 16 KiB of float, which stays in L1 between the passes.
constexpr int64_t kChunk = 4096;

// Running count/mean/M2 merged chunk by chunk in double.
struct Moments {
  double count = 0, mean = 0, m2 = 0;
  void add(double n, double chunk_mean, double chunk_m2) {
    const double total = count + n;
    const double d = chunk_mean - mean;
    mean += d * (n / total);
    m2 += chunk_m2 + d * d * (count * n / total);
    count = total;
  }
};

// Adds one chunk to m: `segs` segments of `len` values, segment k read by load(k, i, l); two
// passes (mean, then squared deviations) while the chunk sits in L1/L2.
template <typename V, typename L>
inline void add_chunk(Moments& m, int64_t segs, int64_t len, L&& load) {
  V s = V::zero(), q = V::zero();
  for (int64_t k = 0; k < segs; ++k)
    s = s + reduce<V>(len, [&](int64_t i, int64_t l) { return load(k, i, l); });
  const auto mu = s.sum() / (segs * len);
  const V muv = V::set1(mu);
  for (int64_t k = 0; k < segs; ++k)
    q = q + reduce<V>(len, [&](int64_t i, int64_t l) {
          const V d = load(k, i, l) - muv;
          return d * d;
        });
  m.add(static_cast<double>(segs * len), mu, q.sum());
}

// Adds the n values load(i, len) to m, chunk by chunk.
template <typename V, typename L>
inline void add_moments(Moments& m, int64_t n, L&& load) {
  for (int64_t c = 0; c < n; c += kChunk)
    add_chunk<V>(m, 1, imin(kChunk, n - c),
                 [&](int64_t, int64_t i, int64_t l) { return load(c + i, l); });
}

// ---------------------------------------------------------------- LayerNorm / RMSNorm rows

template <typename T, bool kRms, bool kRes>
void row_norm_fwd(const RowNormFwd& p, int64_t r0, int64_t r1) {
  using A = Acc<T>;
  using V = Vec<A>;
  const int64_t n = p.n;
  const A* w = static_cast<const A*>(p.weight);
  const A* b = static_cast<const A*>(p.bias);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(p.x) + r * n;
    const T* res = kRes ? static_cast<const T*>(p.residual) + r * n : nullptr;
    // s = x + residual, rounded as the `sum` output stores it, so the statistics describe
    // exactly the tensor the backward will receive.
    auto load = [&](int64_t i, int64_t l) {
      V s = ld<V>(x + i, l);
      if constexpr (kRes) {
        s = s + ld<V>(res + i, l);
        if constexpr (kIsBf16<T>) s = s.round_bf16();
      }
      return s;
    };
    double mean = 0, var;
    if constexpr (kRms) {
      double ss = 0;
      for (int64_t c = 0; c < n; c += kChunk)
        ss += reduce<V>(imin(kChunk, n - c), [&](int64_t i, int64_t l) {
                const V s = load(c + i, l);
                return s * s;
              }).sum();
      var = ss / n;
    } else {
      Moments m;
      add_moments<V>(m, n, load);
      mean = m.mean;
      var = m.m2 / n;
    }
    const A mu = static_cast<A>(mean), rs = static_cast<A>(1.0 / __builtin_sqrt(var + p.eps));
    if constexpr (!kRms) static_cast<A*>(p.mean)[r] = mu;
    static_cast<A*>(p.rstd)[r] = rs;

    const V muv = V::set1(mu), rsv = V::set1(rs);
    T* out = static_cast<T*>(p.out) + r * n;
    T* sum = kRes ? static_cast<T*>(p.sum) + r * n : nullptr;
    // The row is in L1 now and the hardware prefetcher idles: fetch the next row meanwhile.
    const bool more = r + 1 < r1;
    store_row<V>(out, n, p.stream, [&](int64_t i, int64_t l, auto store) {
      if (more) {
        __builtin_prefetch(x + n + i);
        if constexpr (kRes) __builtin_prefetch(res + n + i);
      }
      const V s = load(i, l);
      if constexpr (kRms)
        store(out + i, s * rsv * ld<V>(w + i, l));
      else
        store(out + i, fma((s - muv) * rsv, ld<V>(w + i, l), ld<V>(b + i, l)));
      if constexpr (kRes) store(sum + i, s);
    });
  }
  if (p.stream) V::fence();
}

template <typename T, bool kRms, bool kGradSum, bool kParams>
void row_norm_bwd_rows(const RowNormBwd& p, int64_t r0, int64_t r1, Acc<T>* dw, Acc<T>* db) {
  using A = Acc<T>;
  using V = Vec<A>;
  constexpr int W = V::W;
  const int64_t n = p.n;
  const A* w = static_cast<const A*>(p.weight);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(p.input) + r * n;
    const T* dy = static_cast<const T*>(p.grad_out) + r * n;
    const A mu = kRms ? A(0) : static_cast<const A*>(p.mean)[r];
    const A rs = static_cast<const A*>(p.rstd)[r];
    const V muv = V::set1(mu), rsv = V::set1(rs);
    auto xhat = [&](int64_t i, int64_t l) {
      return kRms ? ld<V>(x + i, l) * rsv : (ld<V>(x + i, l) - muv) * rsv;
    };
    // a = sum(dy * w), b = sum(dy * w * xhat); float per chunk, double across chunks.
    double a = 0, bsum = 0;
    for (int64_t c = 0; c < n; c += kChunk) {
      V va = V::zero(), vb = V::zero();
      for_vectors<W>(c, imin(n, c + kChunk), [&](int64_t i, int64_t l) {
        const V g = ld<V>(dy + i, l), xh = xhat(i, l), gw = g * ld<V>(w + i, l);
        va = va + gw;
        vb = fma(gw, xh, vb);
        if constexpr (kParams) {
          st(dw + i, fma(g, xh, ld<V>(dw + i, l)), l);
          if constexpr (!kRms) st(db + i, ld<V>(db + i, l) + g, l);
        }
      });
      a += va.sum();
      bsum += vb.sum();
    }
    if (p.grad_input == nullptr) continue;
    // dx = rstd * (dy*w - mean(dy*w) - xhat * mean(dy*w*xhat))   (RMSNorm: no mean(dy*w) term)
    const V c1 = V::set1(static_cast<A>(rs * bsum / n));
    const V c2 = V::set1(kRms ? A(0) : static_cast<A>(rs * a / n));
    T* dx = static_cast<T*>(p.grad_input) + r * n;
    const T* gs = kGradSum ? static_cast<const T*>(p.grad_sum) + r * n : nullptr;
    store_row<V>(dx, n, p.stream, [&](int64_t i, int64_t l, auto store) {
      const V gw = ld<V>(dy + i, l) * ld<V>(w + i, l);
      V d = gw * rsv - fma(xhat(i, l), c1, c2);
      if constexpr (kGradSum) d = d + ld<V>(gs + i, l);
      store(dx + i, d);
    });
  }
  if (p.stream) V::fence();
}

template <typename T, bool kRms, bool kGradSum>
void row_norm_bwd(const RowNormBwd& p, int64_t r0, int64_t r1, void* dw, void* db) {
  using A = Acc<T>;
  A* dwp = static_cast<A*>(dw);
  A* dbp = static_cast<A*>(db);
  if (dwp == nullptr) return row_norm_bwd_rows<T, kRms, kGradSum, false>(p, r0, r1, dwp, dbp);
  for (int64_t j = 0; j < p.n; ++j) dwp[j] = A(0);
  if constexpr (!kRms)
    for (int64_t j = 0; j < p.n; ++j) dbp[j] = A(0);
  row_norm_bwd_rows<T, kRms, kGradSum, true>(p, r0, r1, dwp, dbp);
}

template <typename A>
void sum_blocks(const void* part_, int64_t blocks, int64_t n, void* out_, int64_t j0, int64_t j1) {
  const A* part = static_cast<const A*>(part_);
  A* out = static_cast<A*>(out_);
  constexpr int64_t kCols = 64;  // a strip of double accumulators that stays in registers/L1
  for (int64_t j = j0; j < j1; j += kCols) {
    const int64_t m = imin(kCols, j1 - j);
    double acc[kCols] = {};
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t k = 0; k < m; ++k) acc[k] += part[b * n + j + k];
    for (int64_t k = 0; k < m; ++k) out[j + k] = static_cast<A>(acc[k]);
  }
}

// ---------------------------------------------------------------- BatchNorm

template <typename T, bool kRelu>
void bn_fwd_nchw_impl(const BatchNormArgs& p, int64_t c0, int64_t c1) {
  using A = Acc<T>;
  using V = Vec<A>;
  const int64_t C = p.C, HW = p.HW;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  A* mean = static_cast<A*>(p.mean);
  A* invstd = static_cast<A*>(p.invstd);
  for (int64_t c = c0; c < c1; ++c) {
    if (p.training) {
      // Small planes are gathered into chunks of about kChunk values, large ones cut into them.
      Moments m;
      const int64_t per = HW >= kChunk ? 1 : kChunk / HW;
      for (int64_t i0 = 0; i0 < p.N; i0 += per) {
        const T* plane = x + (i0 * C + c) * HW;
        if (per == 1)
          add_moments<V>(m, HW, [&](int64_t j, int64_t l) { return ld<V>(plane + j, l); });
        else
          add_chunk<V>(m, imin(per, p.N - i0), HW, [&](int64_t k, int64_t j, int64_t l) {
            return ld<V>(plane + k * C * HW + j, l);
          });
      }
      mean[c] = static_cast<A>(m.mean);
      invstd[c] = static_cast<A>(1.0 / __builtin_sqrt(m.m2 / m.count + p.eps));
    }
    const V mu = V::set1(mean[c]), shift = V::set1(static_cast<const A*>(p.bias)[c]);
    const V scale = V::set1(static_cast<const A*>(p.weight)[c] * invstd[c]);
    for (int64_t i = 0; i < p.N; ++i) {
      const T* src = x + (i * C + c) * HW;
      T* dst = out + (i * C + c) * HW;
      store_row<V>(dst, HW, p.stream, [&](int64_t j, int64_t l, auto store) {
        V y = fma(ld<V>(src + j, l) - mu, scale, shift);
        if constexpr (kRelu) y = relu(y);
        store(dst + j, y);
      });
    }
  }
  if (p.stream) V::fence();
}

template <typename T>
void bn_fwd_nchw(const BatchNormArgs& p, int64_t c0, int64_t c1) {
  p.relu ? bn_fwd_nchw_impl<T, true>(p, c0, c1) : bn_fwd_nchw_impl<T, false>(p, c0, c1);
}

// Per channel: g is masked by the ReLU (its pre-activation recomputed from x); training
// dx = scale * (g - mean(g) - xhat * mean(g * xhat)) = scale * g - (x - mean) * k1 - k2.
template <typename T, bool kRelu>
void bn_bwd_nchw_impl(const BatchNormArgs& p, int64_t c0, int64_t c1) {
  using A = Acc<T>;
  using V = Vec<A>;
  constexpr int W = V::W;
  const int64_t C = p.C, HW = p.HW;
  const double count = static_cast<double>(p.N) * HW;
  const T* x = static_cast<const T*>(p.x);
  const T* gy = static_cast<const T*>(p.grad_out);
  T* dx = static_cast<T*>(p.out);
  for (int64_t c = c0; c < c1; ++c) {
    const A mu = static_cast<const A*>(p.mean)[c], is = static_cast<const A*>(p.invstd)[c];
    const A sc = static_cast<const A*>(p.weight)[c] * is;
    const V muv = V::set1(mu), scv = V::set1(sc), shv = V::set1(static_cast<const A*>(p.bias)[c]);
    auto grad = [&](const T* xs, const T* gs, int64_t j, int64_t l, V& d) {
      d = ld<V>(xs + j, l) - muv;
      const V g = ld<V>(gs + j, l);
      return kRelu ? where_pos(fma(d, scv, shv), g) : g;
    };
    // sum(g), sum(g * (x - mean)): float over about kChunk values, then double.
    double sg = 0, sgd = 0;
    if (p.training || p.grad_weight != nullptr || p.grad_bias != nullptr) {
      V vg = V::zero(), vgd = V::zero();
      int64_t pending = 0;
      for (int64_t i = 0; i < p.N; ++i) {
        const T* xs = x + (i * C + c) * HW;
        const T* gs = gy + (i * C + c) * HW;
        for (int64_t k = 0; k < HW; k += kChunk) {
          for_vectors<W>(k, imin(HW, k + kChunk), [&](int64_t j, int64_t l) {
            V d;
            const V g = grad(xs, gs, j, l, d);
            vg = vg + g;
            vgd = fma(g, d, vgd);
          });
          pending += imin(kChunk, HW - k);
          if (pending >= kChunk || (i + 1 == p.N && k + kChunk >= HW)) {
            sg += vg.sum();
            sgd += vgd.sum();
            vg = vgd = V::zero();
            pending = 0;
          }
        }
      }
    }
    if (p.grad_weight != nullptr) static_cast<A*>(p.grad_weight)[c] = static_cast<A>(sgd * is);
    if (p.grad_bias != nullptr) static_cast<A*>(p.grad_bias)[c] = static_cast<A>(sg);
    if (dx == nullptr) continue;
    const V k1 = V::set1(p.training ? static_cast<A>(sc * is * is * sgd / count) : A(0));
    const V k2 = V::set1(p.training ? static_cast<A>(sc * sg / count) : A(0));
    for (int64_t i = 0; i < p.N; ++i) {
      const T* xs = x + (i * C + c) * HW;
      const T* gs = gy + (i * C + c) * HW;
      T* dst = dx + (i * C + c) * HW;
      store_row<V>(dst, HW, p.stream, [&](int64_t j, int64_t l, auto store) {
        V d;
        const V g = grad(xs, gs, j, l, d);
        store(dst + j, g * scv - fma(d, k1, k2));
      });
    }
  }
  if (p.stream) V::fence();
}

template <typename T>
void bn_bwd_nchw(const BatchNormArgs& p, int64_t c0, int64_t c1) {
  p.relu ? bn_bwd_nchw_impl<T, true>(p, c0, c1) : bn_bwd_nchw_impl<T, false>(p, c0, c1);
}

// channels_last: x is rows of C channels. Rows are walked in tiles that stay in L1/L2 and,
// within a tile, in groups of channels whose per-channel coefficients and accumulators live in
// registers for the whole tile (AVX2 has 16 vector registers, AVX-512 32).
template <typename V>
struct ChannelGroup {
  static constexpr int kVecs = V::W >= 16 ? 4 : 2;
  static constexpr int64_t kSpan = kVecs * V::W;
  int64_t c0;
  int64_t len[kVecs];  // lanes of each vector inside [0, C); 0 for a vector past the end

  ChannelGroup(int64_t C, int64_t c) : c0(c) {
    for (int k = 0; k < kVecs; ++k) {
      const int64_t l = C - c - k * V::W;
      len[k] = l < 0 ? 0 : imin(l, V::W);
    }
  }
  template <typename P>
  void load(V (&v)[kVecs], const P* row) const {
    for (int k = 0; k < kVecs; ++k) v[k] = len[k] ? ld<V>(row + c0 + k * V::W, len[k]) : V::zero();
  }
  template <typename P>
  void store(P* row, const V (&v)[kVecs]) const {
    for (int k = 0; k < kVecs; ++k)
      if (len[k]) st(row + c0 + k * V::W, v[k], len[k]);
  }
};

// Rows of about 32 KiB of x per tile.
inline int64_t cl_tile_rows(int64_t C) {
  return 8192 / C > 1 ? 8192 / C : 1;
}

// Per block of block_rows rows: the per-channel mean and M2 ([block][2][C]).
template <typename T>
void bn_stats_cl(const BatchNormArgs& p, int64_t b0, int64_t b1, void* partials) {
  using A = Acc<T>;
  using V = Vec<A>;
  using G = ChannelGroup<V>;
  constexpr int K = G::kVecs;
  const int64_t C = p.C, M = p.N * p.HW;
  const T* x = static_cast<const T*>(p.x);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t r0 = blk * p.block_rows, r1 = imin(M, r0 + p.block_rows);
    A* pm = static_cast<A*>(partials) + blk * 2 * C;
    const V inv = V::set1(A(1) / static_cast<A>(r1 - r0));
    for (int64_t c = 0; c < C; c += G::kSpan) {
      const G g(C, c);
      V mu[K], m2[K];
      for (int k = 0; k < K; ++k) mu[k] = m2[k] = V::zero();
      for (int64_t r = r0; r < r1; ++r)
        for (int k = 0; k < K; ++k)
          if (g.len[k]) mu[k] = mu[k] + ld<V>(x + r * C + c + k * V::W, g.len[k]);
      for (int k = 0; k < K; ++k) mu[k] = mu[k] * inv;
      for (int64_t r = r0; r < r1; ++r)
        for (int k = 0; k < K; ++k)
          if (g.len[k]) {
            const V d = ld<V>(x + r * C + c + k * V::W, g.len[k]) - mu[k];
            m2[k] = fma(d, d, m2[k]);
          }
      g.store(pm, mu);
      g.store(pm + C, m2);
    }
  }
}

// Merges the per-block (mean, M2) of bn_stats_cl: with the grand mean known, the total M2 is
// sum(M2_b + n_b * (mean_b - mean)^2), evaluated in double in block order.
template <typename A>
void bn_stats_cl_combine(const BatchNormArgs& p, const void* partials, int64_t blocks) {
  const A* part = static_cast<const A*>(partials);
  const int64_t C = p.C, M = p.N * p.HW;
  constexpr int64_t kCols = 64;
  for (int64_t c0 = 0; c0 < C; c0 += kCols) {
    const int64_t m = imin(kCols, C - c0);
    double mu[kCols] = {}, m2[kCols] = {};
    for (int64_t b = 0; b < blocks; ++b) {
      const double nb = static_cast<double>(imin(M - b * p.block_rows, p.block_rows));
      for (int64_t k = 0; k < m; ++k) mu[k] += nb * part[b * 2 * C + c0 + k];
    }
    for (int64_t k = 0; k < m; ++k) mu[k] /= static_cast<double>(M);
    for (int64_t b = 0; b < blocks; ++b) {
      const double nb = static_cast<double>(imin(M - b * p.block_rows, p.block_rows));
      for (int64_t k = 0; k < m; ++k) {
        const double d = part[b * 2 * C + c0 + k] - mu[k];
        m2[k] += part[b * 2 * C + C + c0 + k] + nb * d * d;
      }
    }
    for (int64_t k = 0; k < m; ++k) {
      static_cast<A*>(p.mean)[c0 + k] = static_cast<A>(mu[k]);
      static_cast<A*>(p.invstd)[c0 + k] =
          static_cast<A>(1.0 / __builtin_sqrt(m2[k] / static_cast<double>(M) + p.eps));
    }
  }
}

// Writes one tile row's group: full aligned vectors stream when the caller allows it.
template <typename V, int K, typename T>
inline void cl_store(const ChannelGroup<V>& g, T* row, const V (&v)[K], bool stream) {
  if (!stream) return g.store(row, v);
  for (int k = 0; k < K; ++k)
    if (g.len[k]) v[k].stream(row + g.c0 + k * V::W);
}

template <typename T, bool kRelu>
void bn_fwd_cl_impl(const BatchNormArgs& p, int64_t r0, int64_t r1) {
  using A = Acc<T>;
  using V = Vec<A>;
  using G = ChannelGroup<V>;
  constexpr int K = G::kVecs;
  const int64_t C = p.C, tile = cl_tile_rows(C);
  // Streaming needs every vector aligned: whole vectors per row (the base is 64-byte aligned).
  const bool stream = p.stream && C % V::W == 0;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  for (int64_t t0 = r0; t0 < r1; t0 += tile) {
    const int64_t t1 = imin(r1, t0 + tile);
    for (int64_t c = 0; c < C; c += G::kSpan) {
      const G g(C, c);
      V mu[K], scale[K], shift[K], is[K];
      g.load(mu, static_cast<const A*>(p.mean));
      g.load(is, static_cast<const A*>(p.invstd));
      g.load(scale, static_cast<const A*>(p.weight));
      g.load(shift, static_cast<const A*>(p.bias));
      for (int k = 0; k < K; ++k) scale[k] = scale[k] * is[k];
      for (int64_t r = t0; r < t1; ++r) {
        V y[K];
        for (int k = 0; k < K; ++k) {
          y[k] = g.len[k] ? ld<V>(x + r * C + c + k * V::W, g.len[k]) : V::zero();
          y[k] = fma(y[k] - mu[k], scale[k], shift[k]);
          if constexpr (kRelu) y[k] = relu(y[k]);
        }
        cl_store(g, out + r * C, y, stream);
      }
    }
  }
  if (stream) V::fence();
}

template <typename T>
void bn_fwd_cl(const BatchNormArgs& p, int64_t r0, int64_t r1, const void*) {
  p.relu ? bn_fwd_cl_impl<T, true>(p, r0, r1) : bn_fwd_cl_impl<T, false>(p, r0, r1);
}

// Per-group constants of the channels_last backward: g is masked by the ReLU (pre-activation
// (x - mean) * scale + shift recomputed from x) and d = x - mean.
template <typename A, typename V, int K>
struct ClGrad {
  V mu[K], scale[K], shift[K];

  ClGrad(const BatchNormArgs& p, const ChannelGroup<V>& g) {
    V is[K];
    g.load(mu, static_cast<const A*>(p.mean));
    g.load(is, static_cast<const A*>(p.invstd));
    g.load(scale, static_cast<const A*>(p.weight));
    g.load(shift, static_cast<const A*>(p.bias));
    for (int k = 0; k < K; ++k) scale[k] = scale[k] * is[k];
  }
  template <bool kRelu, typename T>
  V grad(const ChannelGroup<V>& g, const T* xr, const T* gr, int k, V& d) const {
    d = ld<V>(xr + g.c0 + k * V::W, g.len[k]) - mu[k];
    const V gv = ld<V>(gr + g.c0 + k * V::W, g.len[k]);
    return kRelu ? where_pos(fma(d, scale[k], shift[k]), gv) : gv;
  }
};

// Per block of block_rows rows: the per-channel sums of g and g * (x - mean) ([block][2][C]).
template <typename T, bool kRelu>
void bn_bwd_sums_cl_impl(const BatchNormArgs& p, int64_t b0, int64_t b1, void* partials) {
  using A = Acc<T>;
  using V = Vec<A>;
  using G = ChannelGroup<V>;
  constexpr int K = G::kVecs;
  const int64_t C = p.C, M = p.N * p.HW;
  const T* x = static_cast<const T*>(p.x);
  const T* gy = static_cast<const T*>(p.grad_out);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t r0 = blk * p.block_rows, r1 = imin(M, r0 + p.block_rows);
    A* part = static_cast<A*>(partials) + blk * 2 * C;
    for (int64_t c = 0; c < C; c += G::kSpan) {
      const G g(C, c);
      const ClGrad<A, V, K> cg(p, g);
      V sg[K], sgd[K];
      for (int k = 0; k < K; ++k) sg[k] = sgd[k] = V::zero();
      for (int64_t r = r0; r < r1; ++r)
        for (int k = 0; k < K; ++k)
          if (g.len[k]) {
            V d;
            const V gv = cg.template grad<kRelu>(g, x + r * C, gy + r * C, k, d);
            sg[k] = sg[k] + gv;
            sgd[k] = fma(gv, d, sgd[k]);
          }
      g.store(part, sg);
      g.store(part + C, sgd);
    }
  }
}

template <typename T>
void bn_bwd_sums_cl(const BatchNormArgs& p, int64_t b0, int64_t b1, void* partials) {
  p.relu ? bn_bwd_sums_cl_impl<T, true>(p, b0, b1, partials)
         : bn_bwd_sums_cl_impl<T, false>(p, b0, b1, partials);
}

// grad_input rows [r0, r1); sums: [sum(g) (C), sum(g * (x - mean)) (C)] over all rows.
template <typename T, bool kRelu>
void bn_bwd_dx_cl_impl(const BatchNormArgs& p, int64_t r0, int64_t r1, const void* sums) {
  using A = Acc<T>;
  using V = Vec<A>;
  using G = ChannelGroup<V>;
  constexpr int K = G::kVecs;
  const int64_t C = p.C, tile = cl_tile_rows(C);
  const bool stream = p.stream && C % V::W == 0;
  const T* x = static_cast<const T*>(p.x);
  const T* gy = static_cast<const T*>(p.grad_out);
  T* dx = static_cast<T*>(p.out);
  const V inv_count = V::set1(p.training ? static_cast<A>(1.0 / (double(p.N) * p.HW)) : A(0));
  for (int64_t t0 = r0; t0 < r1; t0 += tile) {
    const int64_t t1 = imin(r1, t0 + tile);
    for (int64_t c = 0; c < C; c += G::kSpan) {
      const G g(C, c);
      const ClGrad<A, V, K> cg(p, g);
      // dx = scale * (g - mean(g) - xhat * mean(g * xhat)) = scale * g - d * k1 - k2
      V k1[K], k2[K], is[K];
      g.load(k2, static_cast<const A*>(sums));
      g.load(k1, static_cast<const A*>(sums) + C);
      g.load(is, static_cast<const A*>(p.invstd));
      for (int k = 0; k < K; ++k) {
        k1[k] = cg.scale[k] * is[k] * is[k] * k1[k] * inv_count;
        k2[k] = cg.scale[k] * k2[k] * inv_count;
      }
      for (int64_t r = t0; r < t1; ++r) {
        V out[K];
        for (int k = 0; k < K; ++k) {
          V d = V::zero();
          const V gv = g.len[k] ? cg.template grad<kRelu>(g, x + r * C, gy + r * C, k, d) : d;
          out[k] = gv * cg.scale[k] - fma(d, k1[k], k2[k]);
        }
        cl_store(g, dx + r * C, out, stream);
      }
    }
  }
  if (stream) V::fence();
}

template <typename T>
void bn_bwd_dx_cl(const BatchNormArgs& p, int64_t r0, int64_t r1, const void* sums) {
  p.relu ? bn_bwd_dx_cl_impl<T, true>(p, r0, r1, sums)
         : bn_bwd_dx_cl_impl<T, false>(p, r0, r1, sums);
}

// ---------------------------------------------------------------- the table

const NormKernels kNormKernels = {
    .layer_norm_fwd = {{row_norm_fwd<float, false, false>, row_norm_fwd<float, false, true>},
                       {row_norm_fwd<double, false, false>, row_norm_fwd<double, false, true>},
                       {row_norm_fwd<bf16, false, false>, row_norm_fwd<bf16, false, true>}},
    .rms_norm_fwd = {{row_norm_fwd<float, true, false>, row_norm_fwd<float, true, true>},
                     {row_norm_fwd<double, true, false>, row_norm_fwd<double, true, true>},
                     {row_norm_fwd<bf16, true, false>, row_norm_fwd<bf16, true, true>}},
    .layer_norm_bwd = {{row_norm_bwd<float, false, false>, row_norm_bwd<float, false, true>},
                       {row_norm_bwd<double, false, false>, row_norm_bwd<double, false, true>},
                       {row_norm_bwd<bf16, false, false>, row_norm_bwd<bf16, false, true>}},
    .rms_norm_bwd = {{row_norm_bwd<float, true, false>, row_norm_bwd<float, true, true>},
                     {row_norm_bwd<double, true, false>, row_norm_bwd<double, true, true>},
                     {row_norm_bwd<bf16, true, false>, row_norm_bwd<bf16, true, true>}},
    .sum_blocks = {sum_blocks<float>, sum_blocks<double>},
    .bn_fwd_nchw = {bn_fwd_nchw<float>, bn_fwd_nchw<double>, bn_fwd_nchw<bf16>},
    .bn_bwd_nchw = {bn_bwd_nchw<float>, bn_bwd_nchw<double>, bn_bwd_nchw<bf16>},
    .bn_stats_cl = {bn_stats_cl<float>, bn_stats_cl<double>, bn_stats_cl<bf16>},
    .bn_stats_cl_combine = {bn_stats_cl_combine<float>, bn_stats_cl_combine<double>},
    .bn_fwd_cl = {bn_fwd_cl<float>, bn_fwd_cl<double>, bn_fwd_cl<bf16>},
    .bn_bwd_sums_cl = {bn_bwd_sums_cl<float>, bn_bwd_sums_cl<double>, bn_bwd_sums_cl<bf16>},
    .bn_bwd_dx_cl = {bn_bwd_dx_cl<float>, bn_bwd_dx_cl<double>, bn_bwd_dx_cl<bf16>},
};
