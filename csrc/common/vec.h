// A small SIMD vector abstraction so each CPU kernel is written once for every ISA.
//
// Included *inside* an ISA namespace by csrc/cpu/isa/*.cpp, after `#pragma GCC target(...)` and
// after the including file has pulled in <immintrin.h> and <cstdint>. FASTDL_VEC selects the
// implementation of Vec<float>: 512 (AVX-512), 256 (AVX2 + FMA) or 0 (portable arrays, which the
// compiler auto-vectorizes for the baseline target). Vec<double> is always the portable array:
// float64 exists for gradcheck and only needs to be exact, not fast.
//
// Everything here lives in the including ISA namespace and uses no std templates, so no symbol
// compiled for AVX-512 can be picked by the linker for a caller running on a lesser CPU.
//
// Storage types: float, double and bf16 (bfloat16 bits). Loads widen to the accumulation type
// (float for bf16), stores narrow with round-to-nearest-even, NaN -> quiet NaN (as c10::BFloat16).
// Partial loads (n < W lanes) fill the remaining lanes with zero; partial stores write n lanes.

// Masked, non-temporal and AMX tile stores are builtins that AddressSanitizer does not see: in a
// sanitizer build (README, Developers) they first report the range they write.
#ifdef __SANITIZE_ADDRESS__
extern "C" void __asan_storeN(void*, unsigned long);
inline void check_store(const void* p, int64_t bytes) {
  if (bytes > 0) __asan_storeN(const_cast<void*>(p), static_cast<unsigned long>(bytes));
}
#else
inline void check_store(const void*, int64_t) {}
#endif

struct bf16 {
  uint16_t bits;
};

inline float widen(bf16 h) {
  uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}
inline float widen(float f) {
  return f;
}
inline double widen(double d) {
  return d;
}

inline void narrow(float* p, float v) {
  *p = v;
}
inline void narrow(double* p, double v) {
  *p = v;
}
inline void narrow(bf16* p, float v) {
  uint32_t u;
  __builtin_memcpy(&u, &v, sizeof u);
  if (v != v) {
    p->bits = 0x7fc0;
    return;
  }
  u += ((u >> 16) & 1u) + 0x7fffu;
  p->bits = static_cast<uint16_t>(u >> 16);
}

// The lane that lane i takes when each group of g lanes (g divides the width) is rotated t places
// (t < g): Vec::rotation's permutation.
inline int rotated_lane(int i, int g, int t) {
  return i - i % g + (i % g + t) % g;
}

// Portable N-lane vector of A (float or double); plain loops the optimizer vectorizes.
template <typename A, int N>
struct ArrVec {
  static constexpr int W = N;
  A v[N];

  static ArrVec set1(A a) {
    ArrVec r;
    for (int i = 0; i < N; ++i) r.v[i] = a;
    return r;
  }
  static ArrVec zero() { return set1(A(0)); }
  template <typename T>
  static ArrVec load(const T* p) {
    ArrVec r;
    for (int i = 0; i < N; ++i) r.v[i] = widen(p[i]);
    return r;
  }
  template <typename T>
  static ArrVec load(const T* p, int64_t n) {
    ArrVec r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = widen(p[i]);
    return r;
  }
  // Lane i from p[i] where bit i of `lanes` is set, else zero; the other lanes' memory is not
  // read.
  template <typename T>
  static ArrVec load_lanes(const T* p, uint32_t lanes) {
    ArrVec r = zero();
    for (int i = 0; i < N; ++i)
      if (lanes >> i & 1u) r.v[i] = widen(p[i]);
    return r;
  }
  // Each group of g lanes (g divides N) rotated t places (t < g): lane i from lane
  // rotated_lane(i, g, t). rotation(g, t) is the permutation, rotate applies it.
  struct Rotation {
    int from[N];
  };
  static Rotation rotation(int g, int t) {
    Rotation r;
    for (int i = 0; i < N; ++i) r.from[i] = rotated_lane(i, g, t);
    return r;
  }
  ArrVec rotate(const Rotation& r) const {
    ArrVec o;
    for (int i = 0; i < N; ++i) o.v[i] = v[r.from[i]];
    return o;
  }
  // The 2 N elements at p split into the even (2i) and odd (2i + 1) ones, element j read where
  // bit j of `lanes` is set (else zero; its memory not read).
  static void deinterleave(const A* p, uint32_t lanes, ArrVec& even, ArrVec& odd) {
    for (int i = 0; i < N; ++i) {
      even.v[i] = lanes >> (2 * i) & 1u ? p[2 * i] : A(0);
      odd.v[i] = lanes >> (2 * i + 1) & 1u ? p[2 * i + 1] : A(0);
    }
  }
  template <typename T>
  void store(T* p) const {
    for (int i = 0; i < N; ++i) narrow(p + i, v[i]);
  }
  template <typename T>
  void store(T* p, int64_t n) const {
    for (int i = 0; i < n; ++i) narrow(p + i, v[i]);
  }
  template <typename T>
  void stream(T* p) const {
    store(p);
  }
  static void fence() {}
  // Lanes >= n set to zero.
  ArrVec first(int64_t n) const {
    ArrVec r = *this;
    for (int i = static_cast<int>(n); i < N; ++i) r.v[i] = A(0);
    return r;
  }
  // The value a bf16 store followed by a load would give (identity for wider storage).
  ArrVec round_bf16() const {
    ArrVec r;
    for (int i = 0; i < N; ++i) {
      bf16 h;
      narrow(&h, static_cast<float>(v[i]));
      r.v[i] = widen(h);
    }
    return r;
  }
  A sum() const {
    // Pairwise, so the rounding does not grow with N.
    A t[N];
    for (int i = 0; i < N; ++i) t[i] = v[i];
    for (int h = N / 2; h > 0; h /= 2)
      for (int i = 0; i < h; ++i) t[i] += t[i + h];
    return t[0];
  }
};

template <typename A, int N>
ArrVec<A, N> operator+(ArrVec<A, N> a, ArrVec<A, N> b) {
  for (int i = 0; i < N; ++i) a.v[i] += b.v[i];
  return a;
}
template <typename A, int N>
ArrVec<A, N> operator-(ArrVec<A, N> a, ArrVec<A, N> b) {
  for (int i = 0; i < N; ++i) a.v[i] -= b.v[i];
  return a;
}
template <typename A, int N>
ArrVec<A, N> operator*(ArrVec<A, N> a, ArrVec<A, N> b) {
  for (int i = 0; i < N; ++i) a.v[i] *= b.v[i];
  return a;
}
// a * b + c
template <typename A, int N>
ArrVec<A, N> fma(ArrVec<A, N> a, ArrVec<A, N> b, ArrVec<A, N> c) {
  for (int i = 0; i < N; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
// max(0, a), NaN propagating as torch.relu.
template <typename A, int N>
ArrVec<A, N> relu(ArrVec<A, N> a) {
  for (int i = 0; i < N; ++i) a.v[i] = a.v[i] < A(0) ? A(0) : a.v[i];
  return a;
}
// g where y > 0, else 0 (the ReLU backward mask; NaN y masks).
template <typename A, int N>
ArrVec<A, N> where_pos(ArrVec<A, N> y, ArrVec<A, N> g) {
  for (int i = 0; i < N; ++i) g.v[i] = y.v[i] > A(0) ? g.v[i] : A(0);
  return g;
}
// a where y > 0, else b (NaN y takes b).
template <typename A, int N>
ArrVec<A, N> where_pos(ArrVec<A, N> y, ArrVec<A, N> a, ArrVec<A, N> b) {
  for (int i = 0; i < N; ++i) b.v[i] = y.v[i] > A(0) ? a.v[i] : b.v[i];
  return b;
}

#if FASTDL_VEC == 512

struct VecF {
  static constexpr int W = 16;
  __m512 v;

  static __mmask16 mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static __m512 from_bf16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  __m256i to_bf16() const {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    r = _mm512_srli_epi32(r, 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
  }

  static VecF set1(float a) { return {_mm512_set1_ps(a)}; }
  static VecF zero() { return {_mm512_setzero_ps()}; }
  static VecF load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static VecF load(const bf16* p) {
    return {from_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  static VecF load(const float* p, int64_t n) { return {_mm512_maskz_loadu_ps(mask(n), p)}; }
  static VecF load_lanes(const float* p, uint32_t lanes) {
    return {_mm512_maskz_loadu_ps(static_cast<__mmask16>(lanes), p)};
  }
  static VecF load(const bf16* p, int64_t n) {
    return {from_bf16(_mm256_maskz_loadu_epi16(mask(n), p))};
  }
  // As ArrVec's: one permute.
  using Rotation = __m512i;
  static Rotation rotation(int g, int t) {
    int from[W];
    for (int i = 0; i < W; ++i) from[i] = rotated_lane(i, g, t);
    return _mm512_loadu_si512(from);
  }
  VecF rotate(Rotation r) const { return {_mm512_permutexvar_ps(r, v)}; }
  // As ArrVec::deinterleave: two masked loads, two two-source permutes.
  static void deinterleave(const float* p, uint32_t lanes, VecF& even, VecF& odd) {
    const __m512 lo = load_lanes(p, lanes & 0xffffu).v, hi = load_lanes(p + W, lanes >> 16).v;
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    even.v = _mm512_permutex2var_ps(lo, ev, hi);
    odd.v = _mm512_permutex2var_ps(lo, _mm512_add_epi32(ev, _mm512_set1_epi32(1)), hi);
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(bf16* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16()); }
  void store(float* p, int64_t n) const {
    check_store(p, n * 4);
    _mm512_mask_storeu_ps(p, mask(n), v);
  }
  void store(bf16* p, int64_t n) const {
    check_store(p, n * 2);
    _mm256_mask_storeu_epi16(p, mask(n), to_bf16());
  }
  // Non-temporal stores; p must be aligned to W * sizeof(*p).
  void stream(float* p) const {
    check_store(p, W * 4);
    _mm512_stream_ps(p, v);
  }
  void stream(bf16* p) const {
    check_store(p, W * 2);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16());
  }
  static void fence() { _mm_sfence(); }
  VecF first(int64_t n) const { return {_mm512_maskz_mov_ps(mask(n), v)}; }
  VecF round_bf16() const { return {from_bf16(to_bf16())}; }
  float sum() const { return _mm512_reduce_add_ps(v); }
  // Lane c in lanes 0-7 and lane 8 + c in lanes 8-15 (c < 8): two groups' channel c, each to
  // its own group's lanes.
  VecF spread_halves(int c) const {
    const __m512i half = _mm512_set_epi32(8, 8, 8, 8, 8, 8, 8, 8, 0, 0, 0, 0, 0, 0, 0, 0);
    return {_mm512_permutexvar_ps(_mm512_add_epi32(half, _mm512_set1_epi32(c)), v)};
  }
};

inline VecF operator+(VecF a, VecF b) {
  return {_mm512_add_ps(a.v, b.v)};
}
inline VecF operator-(VecF a, VecF b) {
  return {_mm512_sub_ps(a.v, b.v)};
}
inline VecF operator*(VecF a, VecF b) {
  return {_mm512_mul_ps(a.v, b.v)};
}
inline VecF fma(VecF a, VecF b, VecF c) {
  return {_mm512_fmadd_ps(a.v, b.v, c.v)};
}
// MAXPS returns its second operand when either is NaN: NaN propagates as in torch.relu.
inline VecF relu(VecF a) {
  return {_mm512_max_ps(_mm512_setzero_ps(), a.v)};
}
inline VecF where_pos(VecF y, VecF g) {
  return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y.v, _mm512_setzero_ps(), _CMP_GT_OQ), g.v)};
}
inline VecF where_pos(VecF y, VecF a, VecF b) {
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(y.v, _mm512_setzero_ps(), _CMP_GT_OQ), b.v, a.v)};
}

// Eight float lanes (ymm) beside VecF's sixteen, for kernels whose natural vector is 8 wide
// (the grouped convs' groups of 8 or 24 channels): Zen 4 runs two ymm FMAs a cycle against one
// zmm, the same flops. Only what those kernels use.
struct VecF8 {
  static constexpr int W = 8;
  __m256 v;

  static VecF8 set1(float a) { return {_mm256_set1_ps(a)}; }
  static VecF8 zero() { return {_mm256_setzero_ps()}; }
  static VecF8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
};

inline VecF8 fma(VecF8 a, VecF8 b, VecF8 c) {
  return {_mm256_fmadd_ps(a.v, b.v, c.v)};
}

// The 16 x 16 block a[0..16) transposed in registers (lane j of a[i] to lane i of a[j]) in four
// rounds of shuffles. Only shuffles: the bits of any 32-bit words pass as floats unchanged.
inline void transpose16(__m512 (&a)[16]) {
  __m512 b[16];
  for (int i = 0; i < 16; i += 2) {  // pairs of rows interleaved
    b[i] = _mm512_unpacklo_ps(a[i], a[i + 1]);
    b[i + 1] = _mm512_unpackhi_ps(a[i], a[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // 4x4 blocks transposed within each 128-bit lane
    const __m512d lo01 = _mm512_castps_pd(b[g]), hi01 = _mm512_castps_pd(b[g + 1]);
    const __m512d lo23 = _mm512_castps_pd(b[g + 2]), hi23 = _mm512_castps_pd(b[g + 3]);
    a[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo01, lo23));
    a[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo01, lo23));
    a[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi01, hi23));
    a[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi01, hi23));
  }
  for (int j = 0; j < 4; ++j) {  // lanes gathered across the four row groups
    b[j] = _mm512_shuffle_f32x4(a[j], a[4 + j], 0x88);
    b[4 + j] = _mm512_shuffle_f32x4(a[j], a[4 + j], 0xdd);
    b[8 + j] = _mm512_shuffle_f32x4(a[8 + j], a[12 + j], 0x88);
    b[12 + j] = _mm512_shuffle_f32x4(a[8 + j], a[12 + j], 0xdd);
  }
  for (int j = 0; j < 4; ++j) {  // row 4 L + j of the result: lane L of each group
    a[j] = _mm512_shuffle_f32x4(b[j], b[8 + j], 0x88);
    a[8 + j] = _mm512_shuffle_f32x4(b[j], b[8 + j], 0xdd);
    a[4 + j] = _mm512_shuffle_f32x4(b[4 + j], b[12 + j], 0x88);
    a[12 + j] = _mm512_shuffle_f32x4(b[4 + j], b[12 + j], 0xdd);
  }
}

#elif FASTDL_VEC == 256

struct VecF {
  static constexpr int W = 8;
  __m256 v;

  static __m256i mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static __m256 from_bf16(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  __m128i to_bf16() const {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    r = _mm256_srli_epi32(r, 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    // Every lane is < 2^16, so the unsigned-saturating pack is exact; it packs per 128-bit half.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    return _mm256_castsi256_si128(packed);
  }

  static VecF set1(float a) { return {_mm256_set1_ps(a)}; }
  static VecF zero() { return {_mm256_setzero_ps()}; }
  static VecF load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static VecF load(const bf16* p) {
    return {from_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  static VecF load(const float* p, int64_t n) { return {_mm256_maskload_ps(p, mask(n))}; }
  static VecF load_lanes(const float* p, uint32_t lanes) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i on = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(lanes)), bit);
    return {_mm256_maskload_ps(p, _mm256_cmpeq_epi32(on, bit))};
  }
  static VecF load(const bf16* p, int64_t n) {
    bf16 t[W] = {};
    for (int64_t i = 0; i < n; ++i) t[i] = p[i];
    return load(t);
  }
  // As ArrVec's: one permute.
  using Rotation = __m256i;
  static Rotation rotation(int g, int t) {
    int from[W];
    for (int i = 0; i < W; ++i) from[i] = rotated_lane(i, g, t);
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from));
  }
  VecF rotate(Rotation r) const { return {_mm256_permutevar8x32_ps(v, r)}; }
  // As ArrVec::deinterleave: per 128-bit half the even (odd) pairs of both, then the 64-bit
  // quarters in order. Plain loads where every lane is read: the masked ones and their masks'
  // making had slowed the NCHW depthwise forward at stride 2 that splits rows with it (Zen 3:
  // 32x144x56x56 8.2-8.6 -> 5.7-6.9 ms, ~10% of its time in L2).
  static void deinterleave(const float* p, uint32_t lanes, VecF& even, VecF& odd) {
    const bool all = lanes == 0xffffu;
    const __m256 lo = all ? _mm256_loadu_ps(p) : load_lanes(p, lanes & 0xffu).v;
    const __m256 hi = all ? _mm256_loadu_ps(p + W) : load_lanes(p + W, lanes >> 8).v;
    const __m256d ev = _mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0x88));
    const __m256d od = _mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0xDD));
    even.v = _mm256_castpd_ps(_mm256_permute4x64_pd(ev, 0xD8));
    odd.v = _mm256_castpd_ps(_mm256_permute4x64_pd(od, 0xD8));
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(bf16* p) const { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16()); }
  void store(float* p, int64_t n) const {
    check_store(p, n * 4);
    _mm256_maskstore_ps(p, mask(n), v);
  }
  void store(bf16* p, int64_t n) const {
    bf16 t[W];
    store(t);
    for (int64_t i = 0; i < n; ++i) p[i] = t[i];
  }
  void stream(float* p) const {
    check_store(p, W * 4);
    _mm256_stream_ps(p, v);
  }
  void stream(bf16* p) const {
    check_store(p, W * 2);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bf16());
  }
  static void fence() { _mm_sfence(); }
  VecF first(int64_t n) const { return {_mm256_and_ps(v, _mm256_castsi256_ps(mask(n)))}; }
  VecF round_bf16() const { return {from_bf16(to_bf16())}; }
  float sum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

inline VecF operator+(VecF a, VecF b) {
  return {_mm256_add_ps(a.v, b.v)};
}
inline VecF operator-(VecF a, VecF b) {
  return {_mm256_sub_ps(a.v, b.v)};
}
inline VecF operator*(VecF a, VecF b) {
  return {_mm256_mul_ps(a.v, b.v)};
}
inline VecF fma(VecF a, VecF b, VecF c) {
  return {_mm256_fmadd_ps(a.v, b.v, c.v)};
}
inline VecF relu(VecF a) {
  return {_mm256_max_ps(_mm256_setzero_ps(), a.v)};
}
inline VecF where_pos(VecF y, VecF g) {
  return {_mm256_and_ps(g.v, _mm256_cmp_ps(y.v, _mm256_setzero_ps(), _CMP_GT_OQ))};
}
inline VecF where_pos(VecF y, VecF a, VecF b) {
  return {_mm256_blendv_ps(b.v, a.v, _mm256_cmp_ps(y.v, _mm256_setzero_ps(), _CMP_GT_OQ))};
}

// The 8 x 8 block a[0..8) transposed in registers (lane j of a[i] to lane i of a[j]), as
// transpose16 in three rounds of shuffles.
inline void transpose8(__m256 (&a)[8]) {
  __m256 b[8];
  for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved
    b[i] = _mm256_unpacklo_ps(a[i], a[i + 1]);
    b[i + 1] = _mm256_unpackhi_ps(a[i], a[i + 1]);
  }
  for (int g = 0; g < 8; g += 4) {  // 4x4 blocks transposed within each 128-bit lane
    const __m256d lo01 = _mm256_castps_pd(b[g]), hi01 = _mm256_castps_pd(b[g + 1]);
    const __m256d lo23 = _mm256_castps_pd(b[g + 2]), hi23 = _mm256_castps_pd(b[g + 3]);
    a[g] = _mm256_castpd_ps(_mm256_unpacklo_pd(lo01, lo23));
    a[g + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(lo01, lo23));
    a[g + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(hi01, hi23));
    a[g + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(hi01, hi23));
  }
  for (int j = 0; j < 4; ++j) {  // row 4 L + j of the result: lane L of both row groups
    b[j] = _mm256_permute2f128_ps(a[j], a[4 + j], 0x20);
    b[4 + j] = _mm256_permute2f128_ps(a[j], a[4 + j], 0x31);
  }
  for (int i = 0; i < 8; ++i) a[i] = b[i];
}

#else

using VecF = ArrVec<float, 8>;

#endif

#if FASTDL_VEC != 512
using VecF8 = VecF;
#endif

template <typename A>
struct VecOf {
  using type = VecF;
};
template <>
struct VecOf<double> {
  using type = ArrVec<double, 8>;
};
template <typename A>
using Vec = typename VecOf<A>::type;

// The accumulation type of a storage type: float for float and bf16, double for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using Acc = typename AccOf<T>::type;

template <typename T>
constexpr bool kIsBf16 = false;
template <>
constexpr bool kIsBf16<bf16> = true;

// ---------------------------------------------------------------- loop helpers

// On a kernel: every call in its body inlined, the lambdas it hands to the loop helpers
// included (see for_vectors). The Winograd output transform's outlined lambda had tested the
// vector length at each of its 52 loads and stores: 6% of an NCHW 3x3 forward.
#define FASTDL_FLATTEN __attribute__((flatten))

inline int64_t imin(int64_t a, int64_t b) {
  return a < b ? a : b;
}

// Full (len == W, constant after inlining) or partial vector load/store.
template <typename V, typename T>
inline V ld(const T* p, int64_t len) {
  return len == V::W ? V::load(p) : V::load(p, len);
}
template <typename V, typename T>
inline void st(T* p, V v, int64_t len) {
  if (len == V::W)
    v.store(p);
  else
    v.store(p, len);
}

// Calls f(i, len) for the vectors covering [begin, end); the last one may be partial.
// f is called from two places: GCC may then keep a large f out of line, where len is a run-time
// value tested at every ld and st. A kernel whose body is such an f takes FASTDL_FLATTEN.
template <int W, typename F>
inline void for_vectors(int64_t begin, int64_t end, F&& f) {
  int64_t i = begin;
  for (; i + W <= end; i += W) f(i, int64_t{W});
  if (i < end) f(i, end - i);
}

// Sum of f(i, len) over the vectors of [0, n), four independent accumulators for ILP; lanes of
// a partial vector beyond len are cleared, so f need not care.
template <typename V, typename F>
inline V reduce(int64_t n, F&& f) {
  constexpr int W = V::W;
  V a0 = V::zero(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    a0 = a0 + f(i, int64_t{W});
    a1 = a1 + f(i + W, int64_t{W});
    a2 = a2 + f(i + 2 * W, int64_t{W});
    a3 = a3 + f(i + 3 * W, int64_t{W});
  }
  for (; i + W <= n; i += W) a0 = a0 + f(i, int64_t{W});
  if (i < n) a1 = a1 + f(i, n - i).first(n - i);
  return (a0 + a1) + (a2 + a3);
}

struct StorePart {
  int64_t len;
  template <typename T, typename V>
  void operator()(T* p, V v) const {
    v.store(p, len);
  }
};
struct StoreFull {
  template <typename T, typename V>
  void operator()(T* p, V v) const {
    v.store(p);
  }
};
struct StoreStream {
  template <typename T, typename V>
  void operator()(T* p, V v) const {
    v.stream(p);
  }
};

// Calls f(i, len, store) over [0, n) of an output row `out`; store(ptr, v) writes one vector.
// With `stream`, full vectors are written non-temporally, aligned on `out` (other outputs
// written by f must share out's alignment modulo W * sizeof(T)); the caller fences.
template <typename V, typename T, typename F>
inline void store_row(T* out, int64_t n, bool stream, F&& f) {
  constexpr int W = V::W;
  int64_t i = 0;
  if (stream) {
    constexpr uintptr_t kAlign = W * sizeof(T);
    const uintptr_t mis = reinterpret_cast<uintptr_t>(out) % kAlign;
    const int64_t head = imin(n, static_cast<int64_t>((kAlign - mis) % kAlign / sizeof(T)));
    if (head > 0) f(int64_t{0}, head, StorePart{head});
    for (i = head; i + W <= n; i += W) f(i, int64_t{W}, StoreStream{});
  } else {
    for (; i + W <= n; i += W) f(i, int64_t{W}, StoreFull{});
  }
  if (i < n) f(i, n - i, StorePart{n - i});
}
