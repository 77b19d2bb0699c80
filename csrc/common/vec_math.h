// Vector math shared by the CPU kernels: max, horizontal max and exp on the Vec abstraction of
// common/vec.h. Included right after vec.h, inside the ISA namespace, by csrc/cpu/isa/*.cpp (the
// same rules as vec.h: no std templates, nothing outside the namespace).

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
