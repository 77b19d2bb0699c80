// The attention row kernels (see attention_params.h), written once on the Vec<A> abstraction of
// common/vec.h and compiled per ISA inside its namespace; they export kAttentionKernels. No torch,
// no std templates (see vec.h). The GEMMs around them are in attention.cpp.

// ---------------------------------------------------------------- exp, max

// e^x for x <= 0 (scores minus their running max), following Cephes' expf: x = n ln2 + r with
// |r| <= ln2 / 2 (ln2 split in two for an exact reduction), e^r by its degree-6 minimax
// polynomial, times 2^n. About 1 ulp; x below -87.3 (e^x subnormal) and -inf give exactly 0,
// NaN stays NaN.
#if FASTDL_VEC == 512
inline VecF vmax(VecF a, VecF b) {
  return {_mm512_max_ps(a.v, b.v)};
}
inline float hmax(VecF a) {
  return _mm512_reduce_max_ps(a.v);
}
inline VecF vexp(VecF x) {
  const __m512 lo = _mm512_set1_ps(-87.3365f);
  const __mmask16 under = _mm512_cmp_ps_mask(x.v, lo, _CMP_LT_OQ);
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(88.0f), x.v);  // NaN x stays NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  return {_mm512_maskz_scalef_ps(static_cast<__mmask16>(~under), y, n)};
}
#elif FASTDL_VEC == 256
inline VecF vmax(VecF a, VecF b) {
  return {_mm256_max_ps(a.v, b.v)};
}
inline float hmax(VecF a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
inline VecF vexp(VecF x) {
  const __m256 under = _mm256_cmp_ps(x.v, _mm256_set1_ps(-87.3365f), _CMP_LT_OQ);
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.0f), x.v);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
  // 2^n through the exponent bits: n is in [-126, 127] after the clamps.
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 out = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return {_mm256_andnot_ps(under, out)};
}
#endif

template <typename A, int N>
inline ArrVec<A, N> vmax(ArrVec<A, N> a, ArrVec<A, N> b) {
  for (int i = 0; i < N; ++i) a.v[i] = b.v[i] > a.v[i] ? b.v[i] : a.v[i];
  return a;
}
template <typename A, int N>
inline A hmax(ArrVec<A, N> a) {
  A m = a.v[0];
  for (int i = 1; i < N; ++i) m = a.v[i] > m ? a.v[i] : m;
  return m;
}
inline float sexp(float x) {
  return __builtin_expf(x);
}
inline double sexp(double x) {
  return __builtin_exp(x);
}
template <typename A, int N>
inline ArrVec<A, N> vexp(ArrVec<A, N> a) {
  for (int i = 0; i < N; ++i) a.v[i] = sexp(a.v[i]);
  return a;
}

// ---------------------------------------------------------------- row kernels

template <typename A>
inline A row_max(const A* s, int64_t n) {
  using V = Vec<A>;
  constexpr int W = V::W;
  A m = -__builtin_inf();
  int64_t j = 0;
  if (n >= W) {
    V vm = V::load(s);
    for (j = W; j + W <= n; j += W) vm = vmax(vm, V::load(s + j));
    m = hmax(vm);
  }
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// s <- exp(s - shift) over a row, returning the sum.
template <typename A>
inline A exp_row(A* s, int64_t n, A shift) {
  using V = Vec<A>;
  const V vs = V::set1(shift);
  V acc = V::zero();
  for_vectors<V::W>(0, n, [&](int64_t j, int64_t len) {
    const V e = vexp(ld<V>(s + j, len) - vs).first(len);
    st(s + j, e, len);
    acc = acc + e;
  });
  return acc.sum();
}

template <typename A>
void softmax_step(void* sv, int64_t rows, int64_t cols, int64_t ld, void* mv, void* lv, void* cv) {
  A* s = static_cast<A*>(sv);
  A* m = static_cast<A*>(mv);
  A* l = static_cast<A*>(lv);
  A* corr = static_cast<A*>(cv);
  const A ninf = -__builtin_inf();
  for (int64_t r = 0; r < rows; ++r) {
    A* row = s + r * ld;
    const A bm = row_max(row, cols);
    const A mn = bm > m[r] ? bm : m[r];
    if (mn == ninf) {  // nothing allowed so far: keep exp from seeing -inf - -inf
      for (int64_t j = 0; j < cols; ++j) row[j] = A(0);
      corr[r] = A(1);
      continue;
    }
    const A c = sexp(m[r] - mn);
    l[r] = l[r] * c + exp_row(row, cols, mn);
    corr[r] = c;
    m[r] = mn;
  }
}

template <typename A>
void exp_rows(void* sv, int64_t rows, int64_t cols, int64_t ld, const void* lsev) {
  A* s = static_cast<A*>(sv);
  const A* lse = static_cast<const A*>(lsev);
  for (int64_t r = 0; r < rows; ++r) {
    A* row = s + r * ld;
    if (lse[r] == -__builtin_inf()) {  // a row with no allowed key has P = 0
      for (int64_t j = 0; j < cols; ++j) row[j] = A(0);
      continue;
    }
    exp_row(row, cols, lse[r]);
  }
}

template <typename A>
void ds_rows(const void* pv, void* dpv, int64_t rows, int64_t cols, int64_t stride,
             const void* dv) {
  using V = Vec<A>;
  const A* p = static_cast<const A*>(pv);
  A* dp = static_cast<A*>(dpv);
  const A* d = static_cast<const A*>(dv);
  for (int64_t r = 0; r < rows; ++r) {
    const V dr = V::set1(d[r]);
    const A* pr = p + r * stride;
    A* dr_row = dp + r * stride;
    for_vectors<V::W>(0, cols, [&](int64_t j, int64_t len) {
      const V ds = ld<V>(pr + j, len) * (ld<V>(dr_row + j, len) - dr);
      st(dr_row + j, ds, len);
    });
  }
}

const AttentionKernels kAttentionKernels = {
    .softmax_step = {softmax_step<float>, softmax_step<double>},
    .exp_rows = {exp_rows<float>, exp_rows<double>},
    .ds_rows = {ds_rows<float>, ds_rows<double>},
};
