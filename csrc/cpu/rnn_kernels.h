// The fused pointwise step of the LSTM (Hochreiter & Schmidhuber, 1997, with the forget gate of
// Gers et al., 2000) and the GRU (Cho et al., 2014), forward and backward, in torch's gate order
// and formulas. Compiled once per ISA: csrc/cpu/isa/*.cpp include this file inside their own
// namespace and export kRnnKernels. No torch, no std templates (see common/vec.h).
//
// One pass per row reads the gate pre-activations and the state and writes the new state, the
// output and what BPTT needs, so a step's pointwise work touches each value once. The loops are
// `omp simd` so the compiler vectorizes them for the ISA of the including file; float uses the
// branch-free exp below (libm's scalar expf would cost more than the recurrent GEMM at batch 64),
// double calls libm (float64 exists for gradcheck, it only needs to be exact).

// exp(x) for float, ~1 ulp on the clamped range: Cody-Waite reduction x = n ln2 + r with
// |r| <= ln2 / 2 and the degree-6 minimax polynomial of Cephes' expf, scaled by 2^n built in the
// exponent bits. The clamp keeps 2^n normal (exp(88) ~ 1.7e38); NaN passes the clamps unchanged
// and propagates through the polynomial.
inline float exp_f(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + kShift;
  const float n = t - kShift;
  int32_t ti, si;
  __builtin_memcpy(&ti, &t, 4);
  __builtin_memcpy(&si, &kShift, 4);
  const int32_t bits = (ti - si + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, 4);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * scale;
}

inline float sigmoid(float x) {
  return 1.0f / (1.0f + exp_f(-x));
}
inline double sigmoid(double x) {
  return 1.0 / (1.0 + __builtin_exp(-x));
}

// tanh(x) = (1 - e) / (1 + e) with e = exp(-2|x|); below |x| = 0.3 that difference cancels, so the
// Taylor series (terms to x^11, truncation < 1e-9 there) takes over.
inline float tanh_f(float x) {
  const float a = x < 0 ? -x : x;
  const float e = exp_f(-2.0f * a);
  const float big = (1.0f - e) / (1.0f + e);
  const float s = a * a;
  const float small =
      a * (1.0f +
           s * (-1.0f / 3 + s * (2.0f / 15 + s * (-17.0f / 315 +
                                                  s * (62.0f / 2835 + s * (-1382.0f / 155925))))));
  const float t = a < 0.3f ? small : big;
  return x < 0 ? -t : t;
}
inline float tanh_a(float x) {
  return tanh_f(x);
}
inline double tanh_a(double x) {
  return __builtin_tanh(x);
}

template <typename A>
void lstm_fwd_step(const RnnStep& p, int64_t b0, int64_t b1) {
  const int64_t B = p.B, H = p.H, j0 = p.j0, n = (p.j1 != 0 ? p.j1 : H) - j0;
  for (int64_t b = b0; b < b1; ++b) {
    if (p.pos[b] < 0) continue;
    const int64_t row = p.pos[b] * B + b;
    const A* __restrict gx = static_cast<const A*>(p.gx) + row * 4 * H + j0;
    const A* __restrict bx = static_cast<const A*>(p.bx) + j0;
    const A* __restrict gh = static_cast<const A*>(p.gh) + b * 4 * H + 4 * j0;
    A* __restrict c = static_cast<A*>(p.c) + b * H + j0;
    A* __restrict out = static_cast<A*>(p.out) + b * H + j0;
    A* __restrict gates = static_cast<A*>(p.gates) + row * 4 * H + j0;
    A* __restrict cs = static_cast<A*>(p.cs) + row * H + j0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const A i = sigmoid(gx[j] + bx[j] + gh[j]);
      const A f = sigmoid(gx[H + j] + bx[H + j] + gh[n + j]);
      const A g = tanh_a(gx[2 * H + j] + bx[2 * H + j] + gh[2 * n + j]);
      const A o = sigmoid(gx[3 * H + j] + bx[3 * H + j] + gh[3 * n + j]);
      const A cn = f * c[j] + i * g;
      c[j] = cn;
      cs[j] = cn;
      out[j] = o * tanh_a(cn);
      gates[j] = i;
      gates[H + j] = f;
      gates[2 * H + j] = g;
      gates[3 * H + j] = o;
    }
    if (p.y != nullptr) {
      A* __restrict y = static_cast<A*>(p.y) + row * H + j0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) y[j] = out[j];
    }
  }
}

template <typename A>
void lstm_bwd_step(const RnnStep& p, int64_t b0, int64_t b1) {
  const int64_t B = p.B, H = p.H, j0 = p.j0, n = (p.j1 != 0 ? p.j1 : H) - j0;
  for (int64_t b = b0; b < b1; ++b) {
    if (p.pos[b] < 0) continue;
    const int64_t row = p.pos[b] * B + b;
    const A* __restrict dh = static_cast<const A*>(p.dh) + b * H + j0;
    const A* __restrict gy = p.gy != nullptr ? static_cast<const A*>(p.gy) + row * H + j0 : nullptr;
    const A* __restrict gates = static_cast<const A*>(p.gates) + row * 4 * H + j0;
    const A* __restrict cs = static_cast<const A*>(p.cs) + row * H + j0;
    const A* __restrict cprev = static_cast<const A*>(p.prev) + row * H + j0;
    A* __restrict dc = static_cast<A*>(p.dc) + b * H + j0;
    A* __restrict dg = static_cast<A*>(p.dgates) + row * 4 * H + j0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const A dr = gy != nullptr ? dh[j] + gy[j] : dh[j];
      const A i = gates[j], f = gates[H + j], g = gates[2 * H + j], o = gates[3 * H + j];
      const A tc = tanh_a(cs[j]);
      const A dct = dc[j] + dr * o * (A(1) - tc * tc);
      dg[j] = dct * g * i * (A(1) - i);
      dg[H + j] = dct * cprev[j] * f * (A(1) - f);
      dg[2 * H + j] = dct * i * (A(1) - g * g);
      dg[3 * H + j] = dr * tc * o * (A(1) - o);
      dc[j] = dct * f;
    }
  }
}

template <typename A>
void gru_fwd_step(const RnnStep& p, int64_t b0, int64_t b1) {
  const int64_t B = p.B, H = p.H, j0 = p.j0, m = (p.j1 != 0 ? p.j1 : H) - j0;
  for (int64_t b = b0; b < b1; ++b) {
    if (p.pos[b] < 0) continue;
    const int64_t row = p.pos[b] * B + b;
    const A* __restrict gx = static_cast<const A*>(p.gx) + row * 3 * H + j0;
    const A* __restrict bx = static_cast<const A*>(p.bx) + j0;
    const A* __restrict gh = static_cast<const A*>(p.gh) + b * 3 * H + 3 * j0;
    const A* __restrict h = static_cast<const A*>(p.h) + b * H + j0;
    A* __restrict hout = static_cast<A*>(p.out) + b * H + j0;
    A* __restrict y = static_cast<A*>(p.y) + row * H + j0;
    A* __restrict gates = static_cast<A*>(p.gates) + row * 4 * H + j0;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const A r = sigmoid(gx[j] + bx[j] + gh[j]);
      const A z = sigmoid(gx[H + j] + bx[H + j] + gh[m + j]);
      const A ghn = gh[2 * m + j];
      const A n = tanh_a(gx[2 * H + j] + bx[2 * H + j] + r * ghn);
      const A hn = n + z * (h[j] - n);  // torch's (1 - z) * n + z * h, as its kernels round it
      hout[j] = hn;
      y[j] = hn;
      gates[j] = r;
      gates[H + j] = z;
      gates[2 * H + j] = n;
      gates[3 * H + j] = ghn;
    }
  }
}

template <typename A>
void gru_bwd_step(const RnnStep& p, int64_t b0, int64_t b1) {
  const int64_t B = p.B, H = p.H, j0 = p.j0, m = (p.j1 != 0 ? p.j1 : H) - j0;
  for (int64_t b = b0; b < b1; ++b) {
    if (p.pos[b] < 0) continue;
    const int64_t row = p.pos[b] * B + b;
    const A* __restrict dh = static_cast<const A*>(p.dh) + b * H + j0;
    const A* __restrict gy = p.gy != nullptr ? static_cast<const A*>(p.gy) + row * H + j0 : nullptr;
    const A* __restrict gates = static_cast<const A*>(p.gates) + row * 4 * H + j0;
    const A* __restrict hprev = static_cast<const A*>(p.prev) + row * H + j0;
    A* __restrict dg = static_cast<A*>(p.dgates) + row * 4 * H + j0;
    A* __restrict direct = static_cast<A*>(p.dh_direct) + b * H + j0;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const A d = gy != nullptr ? dh[j] + gy[j] : dh[j];
      const A r = gates[j], z = gates[H + j], n = gates[2 * H + j], ghn = gates[3 * H + j];
      const A dn = d * (A(1) - z) * (A(1) - n * n);
      dg[j] = dn * ghn * r * (A(1) - r);
      dg[H + j] = d * (hprev[j] - n) * z * (A(1) - z);
      dg[2 * H + j] = dn * r;
      dg[3 * H + j] = dn;
      direct[j] = d * z;
    }
  }
}

// ---------------------------------------------------------------- small-batch sequence forward

// The row of step s for sequence b, or -1 when it has ended.
inline int64_t seq_row(const RnnSeqFwd& p, int64_t s, int64_t b) {
  const int64_t L = p.len != nullptr ? p.len[b] : p.T;
  if (s >= L) return -1;
  return (p.reverse ? L - 1 - s : s) * p.B + b;
}

// acc[q][u] += sum over k of h[k] * w[k][q][u]: the GEMV of one register block, all gates of a
// unit together so the pointwise that follows needs nothing from other threads. w is the block's
// packed weights (RnnSeqFwd::wp): one contiguous stream of kGates * kSeqUnits per k, zeros past H.
// W: A, or bf16 (a bfloat16 layer's weights read as they are, half the bytes, widened exactly).
template <typename A, typename W, int kGates>
inline void seq_gemv(A (&acc)[kGates][kSeqUnits], const A* __restrict h, const W* __restrict w,
                     int64_t H) {
  for (int64_t k = 0; k < H; ++k, w += kGates * kSeqUnits) {
    const A hk = h[k];
    for (int q = 0; q < kGates; ++q)
#pragma omp simd
      for (int64_t u = 0; u < kSeqUnits; ++u) acc[q][u] += hk * widen(w[q * kSeqUnits + u]);
  }
}

template <typename A, typename W, bool kFull>
inline void lstm_seq_block(const RnnSeqFwd& p, int64_t row, const A* __restrict hin,
                           A* __restrict hout, A* __restrict c, int64_t j, int64_t n) {
  const int64_t H = p.H, m = kFull ? kSeqUnits : n;
  const A* __restrict gx = static_cast<const A*>(p.gx) + row * 4 * H + j;
  const A* __restrict bx = static_cast<const A*>(p.bx) + j;
  A acc[4][kSeqUnits];
  for (int q = 0; q < 4; ++q)
    for (int64_t u = 0; u < kSeqUnits; ++u) acc[q][u] = u < m ? gx[q * H + u] + bx[q * H + u] : 0;
  seq_gemv<A, W, 4>(acc, hin, static_cast<const W*>(p.wp) + j * 4 * H, H);
  A* __restrict y = static_cast<A*>(p.y) + row * H + j;
  A* __restrict cs = static_cast<A*>(p.cs) + row * H + j;
  A* __restrict gates = static_cast<A*>(p.gates) + row * 4 * H + j;
#pragma omp simd
  for (int64_t u = 0; u < m; ++u) {
    const A i = sigmoid(acc[0][u]), f = sigmoid(acc[1][u]), g = tanh_a(acc[2][u]),
            o = sigmoid(acc[3][u]);
    const A cn = f * c[j + u] + i * g;
    const A hn = o * tanh_a(cn);
    c[j + u] = cn;
    cs[u] = cn;
    hout[j + u] = hn;
    y[u] = hn;
    gates[u] = i;
    gates[H + u] = f;
    gates[2 * H + u] = g;
    gates[3 * H + u] = o;
  }
}

template <typename A, typename W, bool kFull>
inline void gru_seq_block(const RnnSeqFwd& p, int64_t row, const A* __restrict hin,
                          A* __restrict hout, int64_t j, int64_t n) {
  const int64_t H = p.H, m = kFull ? kSeqUnits : n;
  const A* __restrict gx = static_cast<const A*>(p.gx) + row * 3 * H + j;
  const A* __restrict bx = static_cast<const A*>(p.bx) + j;
  const A* __restrict bh = static_cast<const A*>(p.bh);
  A acc[3][kSeqUnits];
  for (int q = 0; q < 3; ++q)
    for (int64_t u = 0; u < kSeqUnits; ++u)
      acc[q][u] = bh != nullptr && u < m ? bh[q * H + j + u] : 0;
  seq_gemv<A, W, 3>(acc, hin, static_cast<const W*>(p.wp) + j * 3 * H, H);
  A* __restrict y = static_cast<A*>(p.y) + row * H + j;
  A* __restrict gates = static_cast<A*>(p.gates) + row * 4 * H + j;
#pragma omp simd
  for (int64_t u = 0; u < m; ++u) {
    const A r = sigmoid(gx[u] + bx[u] + acc[0][u]), z = sigmoid(gx[H + u] + bx[H + u] + acc[1][u]);
    const A ghn = acc[2][u];
    const A nn = tanh_a(gx[2 * H + u] + bx[2 * H + u] + r * ghn);
    const A hn = nn + z * (hin[j + u] - nn);
    hout[j + u] = hn;
    y[u] = hn;
    gates[u] = r;
    gates[H + u] = z;
    gates[2 * H + u] = nn;
    gates[3 * H + u] = ghn;
  }
}

template <typename A, typename W, bool kLstm>
void seq_fwd_step(const RnnSeqFwd& p, int64_t s, int64_t j0, int64_t j1) {
  const int64_t H = p.H;
  for (int64_t b = 0; b < p.B; ++b) {
    const A* hin = static_cast<const A*>(p.h[s & 1]) + b * H;
    A* hout = static_cast<A*>(p.h[(s + 1) & 1]) + b * H;
    const int64_t row = seq_row(p, s, b);
    if (row < 0) {  // an ended sequence keeps its state
      for (int64_t j = j0; j < j1; ++j) hout[j] = hin[j];
      continue;
    }
    A* c = kLstm ? static_cast<A*>(p.c) + b * H : nullptr;
    for (int64_t j = j0; j < j1; j += kSeqUnits) {
      const int64_t n = imin(kSeqUnits, j1 - j);
      if constexpr (kLstm) {
        if (n == kSeqUnits)
          lstm_seq_block<A, W, true>(p, row, hin, hout, c, j, n);
        else
          lstm_seq_block<A, W, false>(p, row, hin, hout, c, j, n);
      } else {
        if (n == kSeqUnits)
          gru_seq_block<A, W, true>(p, row, hin, hout, j, n);
        else
          gru_seq_block<A, W, false>(p, row, hin, hout, j, n);
      }
    }
  }
}

const RnnKernels kRnnKernels = {
    .lstm_fwd = {lstm_fwd_step<float>, lstm_fwd_step<double>},
    .lstm_bwd = {lstm_bwd_step<float>, lstm_bwd_step<double>},
    .gru_fwd = {gru_fwd_step<float>, gru_fwd_step<double>},
    .gru_bwd = {gru_bwd_step<float>, gru_bwd_step<double>},
    .lstm_seq_fwd = {seq_fwd_step<float, float, true>, seq_fwd_step<double, double, true>,
                     seq_fwd_step<float, bf16, true>},
    .gru_seq_fwd = {seq_fwd_step<float, float, false>, seq_fwd_step<double, double, false>,
                    seq_fwd_step<float, bf16, false>},
};
