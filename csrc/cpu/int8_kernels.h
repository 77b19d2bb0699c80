// The int8 kernels: per-row quantization, B packing and the GEMM with its dequantization
// epilogue, for the layouts of cpu/int8_params.h. Included inside an ISA namespace by
// csrc/cpu/isa/*.cpp after common/vec.h (see there for the rules); FASTDL_VEC picks the
// micro-kernel:
//   512: AVX512-VNNI vpdpbusd, 6 rows x 64 columns of int32 accumulators (24 zmm), A's bytes
//        broadcast 4 at a time and made unsigned (XOR 0x80: a + 128) against one 64-byte load of
//        the signed B per 16 columns, the offset compensated through B's column sums.
//   256: AVX2, exact: bytes widened to int16 and multiplied by vpmaddwd (vpmaddubsw would
//        saturate at 2 x 255 x 128), 2 rows x 16 columns, the pair sums folded at the end.
//   0:   portable loops.
// The epilogue runs once per micro-tile from an int32 tile in L1.

#if FASTDL_VEC == 512
#pragma GCC push_options
#pragma GCC target("avx512vnni")
#endif

// ---------------------------------------------------------------- scalar conversions

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int e = 113;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --e;
    }
    bits = sign | (static_cast<uint32_t>(e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

// float -> IEEE half, round to nearest even, overflow to inf, NaN stays NaN (as c10::Half).
inline uint16_t float_to_f16(float f) {
  uint32_t x;
  __builtin_memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: inf
  if (x < 0x38800000u) {                        // below the smallest normal half: subnormal
    float a;
    __builtin_memcpy(&a, &x, sizeof a);
    // Adding 0.5 rounds the mantissa to half's subnormal step (2^-24) in float's own RNE.
    a += 0.5f;
    uint32_t r;
    __builtin_memcpy(&r, &a, sizeof r);
    return sign | static_cast<uint16_t>(r - 0x3f000000u);
  }
  const uint32_t odd = (x >> 13) & 1u;
  x += 0xc8000fffu + odd;  // rebias exponent (-112 << 23) and round to 10 mantissa bits
  return sign | static_cast<uint16_t>(x >> 13);
}

struct f16 {
  uint16_t bits;
};
inline float load_float(const float* p) {
  return *p;
}
inline float load_float(const bf16* p) {
  return widen(*p);
}
inline float load_float(const f16* p) {
  return f16_to_float(p->bits);
}

// ---------------------------------------------------------------- quantization

// Struct fields are copied to locals first: stores through q could alias them otherwise, and
// the loops would not vectorize.
template <typename T>
void quantize_rows(const QuantRows& p, int64_t r0, int64_t r1) {
  const int64_t K = p.K, kpad = p.kpad;
  const uint8_t* skip = p.skip;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(p.x) + r * p.ldx;
    int8_t* q = p.q + r * p.ldq;
    float amax = 0.f;
    bool nan = false;
    for (int64_t k = 0; k < K; ++k) {
      const float a = __builtin_fabsf(load_float(x + k));
      const float kept = skip == nullptr || !skip[k] ? a : 0.f;
      amax = kept > amax ? kept : amax;
      nan |= kept != kept;
    }
    // A row with NaN gets a NaN scale (NaN propagates); an all-zero row any scale: 1.
    const float scale = nan ? __builtin_nanf("") : amax == 0.f ? 1.f : amax / 127.f;
    p.scale[r] = scale;
    for (int64_t k = 0; k < K; ++k) {
      float v = __builtin_rintf(load_float(x + k) / scale);  // rint: half to even
      v = v < -127.f ? -127.f : (v > 127.f ? 127.f : v);
      if (v != v || (skip != nullptr && skip[k])) v = 0.f;
      q[k] = static_cast<int8_t>(v);
    }
    for (int64_t k = K; k < kpad; ++k) q[k] = 0;
  }
}

// The sum of K signed bytes (a column of a (N, K) B).
inline int32_t row_sum_i8(const int8_t* x, int64_t K) {
  int32_t sum = 0;
  int64_t k = 0;
#if FASTDL_VEC == 512
  // vpdpbusd against unsigned ones: the sum of each 4 signed bytes into an int32 lane.
  __m512i acc = _mm512_setzero_si512();
  for (; k + 64 <= K; k += 64)
    acc = _mm512_dpbusd_epi32(acc, _mm512_set1_epi8(1), _mm512_loadu_si512(x + k));
  sum = _mm512_reduce_add_epi32(acc);
#endif
  for (; k < K; ++k) sum += x[k];
  return sum;
}

inline void copy_rows_i8(const QuantRows& p, int64_t r0, int64_t r1) {
  const int64_t K = p.K, kpad = p.kpad;
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* x = static_cast<const int8_t*>(p.x) + r * p.ldx;
    int8_t* q = p.q + r * p.ldq;
    for (int64_t k = 0; k < K; ++k) q[k] = x[k];
    for (int64_t k = K; k < kpad; ++k) q[k] = 0;
  }
}

// 4 bytes of A made unsigned, each a + kAOffset (XOR 0x80): the unsigned operand of the products.
inline int32_t a_unsigned(int32_t word) {
  static_assert(kAOffset == 0x80);
  return static_cast<int32_t>(static_cast<uint32_t>(word) ^ 0x80808080u);
}

// ---------------------------------------------------------------- packing B

#if FASTDL_VEC == 512
// 64 columns of 4 rows of a (K, N) B to their 64 words (byte j of a word from row j): bytes
// interleaved within 128-bit lanes (unpack), then the lanes transposed so that vector v holds
// columns 16v .. 16v + 15. The words' byte sums are added to the columns' sums in `sum`.
inline void pack_words_64(const int8_t* b0, const int8_t* b1, const int8_t* b2, const int8_t* b3,
                          uint32_t* d, int32_t* sum) {
  const __m512i r0 = _mm512_loadu_si512(b0), r1 = _mm512_loadu_si512(b1);
  const __m512i r2 = _mm512_loadu_si512(b2), r3 = _mm512_loadu_si512(b3);
  const __m512i t0 = _mm512_unpacklo_epi8(r0, r1), t1 = _mm512_unpackhi_epi8(r0, r1);
  const __m512i t2 = _mm512_unpacklo_epi8(r2, r3), t3 = _mm512_unpackhi_epi8(r2, r3);
  // Lane l of w_j: the words of columns 16l + 4j .. 16l + 4j + 3.
  const __m512i w0 = _mm512_unpacklo_epi16(t0, t2), w1 = _mm512_unpackhi_epi16(t0, t2);
  const __m512i w2 = _mm512_unpacklo_epi16(t1, t3), w3 = _mm512_unpackhi_epi16(t1, t3);
  const __m512i lo01 = _mm512_shuffle_i32x4(w0, w1, 0x44),
                lo23 = _mm512_shuffle_i32x4(w2, w3, 0x44);
  const __m512i hi01 = _mm512_shuffle_i32x4(w0, w1, 0xee),
                hi23 = _mm512_shuffle_i32x4(w2, w3, 0xee);
  const __m512i words[4] = {
      _mm512_shuffle_i32x4(lo01, lo23, 0x88), _mm512_shuffle_i32x4(lo01, lo23, 0xdd),
      _mm512_shuffle_i32x4(hi01, hi23, 0x88), _mm512_shuffle_i32x4(hi01, hi23, 0xdd)};
  const __m512i ones = _mm512_set1_epi8(1);
  for (int v = 0; v < 4; ++v) {
    _mm512_storeu_si512(d + 16 * v, words[v]);
    int32_t* s = sum + 16 * v;
    _mm512_storeu_si512(s, _mm512_dpbusd_epi32(_mm512_loadu_si512(s), ones, words[v]));
  }
}
#endif

// k groups ahead whose rows of a (K, N) B are prefetched while packing: the rows are N bytes
// apart, a stride the hardware prefetchers follow poorly (with the micro-kernel below, 2048^3
// ~4% faster).
constexpr int64_t kPackAhead = 8;

// Each (k group, column) of a panel is one 32-bit word of 4 bytes: built from 4 rows of B read
// along n (a (K, N) B), or read whole from a row of a (N, K) B.
inline void pack_b(const PackB& p, int64_t p0, int64_t p1) {
  const int64_t K = p.K, K4 = int8_k4(K), ld = p.ld;
  uint32_t* out = reinterpret_cast<uint32_t*>(p.dst);
  int32_t* colsum = reinterpret_cast<int32_t*>(p.dst + int8_colsum_offset(K, p.N));
  const int64_t n_end = imin(p.N, p1 * kPanel);
  for (int64_t panel = p0; panel < p1; ++panel)
    if (panel * kPanel + kPanel > p.N)  // columns past N: zeros
      __builtin_memset(out + panel * K4 * kPanel, 0, K4 * kPanel * 4);
  __builtin_memset(colsum + p0 * kPanel, 0, (p1 - p0) * kPanel * 4);
  if (p.nk) {
    for (int64_t n = p0 * kPanel; n < n_end; ++n) {
      const int8_t* src = p.b + n * ld;
      uint32_t* dst = out + n / kPanel * K4 * kPanel + n % kPanel;
      const int64_t whole = K / 4;
      for (int64_t k4 = 0; k4 < whole; ++k4) __builtin_memcpy(dst + k4 * kPanel, src + 4 * k4, 4);
      if (whole < K4) {
        int8_t tail[4] = {};
        for (int64_t k = 4 * whole; k < K; ++k) tail[k - 4 * whole] = src[k];
        __builtin_memcpy(dst + whole * kPanel, tail, 4);
      }
      colsum[n] = row_sum_i8(src, K);
    }
    return;
  }
  // Rows of B are read in order (all panels of a k group before the next one).
  const int8_t zeros[kPanel] = {};
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    const int8_t* r[4];
    for (int j = 0; j < 4; ++j) r[j] = 4 * k4 + j < K ? p.b + (4 * k4 + j) * ld : nullptr;
    if (4 * (k4 + kPackAhead) + 3 < K)
      for (int j = 0; j < 4; ++j)
        for (int64_t c = p0 * kPanel; c < n_end; c += 64)
          __builtin_prefetch(r[j] + 4 * kPackAhead * ld + c);
    for (int64_t panel = p0; panel < p1; ++panel) {
      const int64_t n0 = panel * kPanel, cols = imin(kPanel, p.N - n0);
      uint32_t* __restrict d = out + (panel * K4 + k4) * kPanel;
      const int8_t* __restrict b0 = r[0] != nullptr ? r[0] + n0 : zeros;
      const int8_t* __restrict b1 = r[1] != nullptr ? r[1] + n0 : zeros;
      const int8_t* __restrict b2 = r[2] != nullptr ? r[2] + n0 : zeros;
      const int8_t* __restrict b3 = r[3] != nullptr ? r[3] + n0 : zeros;
      int32_t* sum = colsum + n0;
#if FASTDL_VEC == 512
      if (cols == kPanel) {
        pack_words_64(b0, b1, b2, b3, d, sum);
        continue;
      }
#endif
      for (int64_t c = 0; c < cols; ++c) {
        d[c] = static_cast<uint32_t>(static_cast<uint8_t>(b0[c])) |
               static_cast<uint32_t>(static_cast<uint8_t>(b1[c])) << 8 |
               static_cast<uint32_t>(static_cast<uint8_t>(b2[c])) << 16 |
               static_cast<uint32_t>(static_cast<uint8_t>(b3[c])) << 24;
        sum[c] += b0[c] + b1[c] + b2[c] + b3[c];
      }
    }
  }
}

// ---------------------------------------------------------------- epilogue

inline void store_out(float* p, float v) {
  *p = v;
}
inline void store_out(bf16* p, float v) {
  narrow(p, v);
}
inline void store_out(f16* p, float v) {
  p->bits = float_to_f16(v);
}

template <typename T>
constexpr bool kIsI32 = false;
template <>
constexpr bool kIsI32<int32_t> = true;
template <typename T>
constexpr bool kIsF32 = false;
template <>
constexpr bool kIsF32<float> = true;

#if FASTDL_VEC == 512
// kAOffset times 16 column sums: what the products of those columns carry beyond a x b.
inline __m512i offset_vec(const int32_t* colsum) {
  static_assert(kAOffset == 1 << 7);
  return _mm512_slli_epi32(_mm512_loadu_si512(colsum), 7);
}
#endif

// One row of a micro-tile: acc (n values) to out row m, columns [n0, n0 + n).
template <typename O>
inline void epilogue_row(const Gemm& g, const int32_t* acc, int64_t m, int64_t n0, int64_t n) {
  // Locals: an int32 or float store through `out` could alias g's fields as far as the
  // compiler knows, and the loops would not vectorize.
  O* out = static_cast<O*>(g.out) + m * g.ldo + n0;
  const int32_t* colsum = g.b_colsum + n0;  // the products' offset: kAOffset * colsum
#if FASTDL_VEC == 512
  // Non-temporal stores: no read of the output's lines before they are written.
  const bool stream =
      sizeof(O) == 4 && g.stream && n == kPanel && (reinterpret_cast<uintptr_t>(out) & 63) == 0;
#endif
  if constexpr (kIsI32<O>) {
#if FASTDL_VEC == 512
    if (stream) {
      check_store(out, kPanel * 4);
      for (int64_t j = 0; j < kPanel; j += 16)
        _mm512_stream_si512(reinterpret_cast<__m512i*>(out + j),
                            _mm512_sub_epi32(_mm512_loadu_si512(acc + j), offset_vec(colsum + j)));
      return;
    }
#endif
    for (int64_t j = 0; j < n; ++j) out[j] = acc[j] - kAOffset * colsum[j];
  } else {
    const float as = g.a_scale != nullptr ? g.a_scale[m] : 1.f;
    const float* bs = g.b_scale + (g.b_scale != nullptr ? n0 : 0);
    const float* bias = g.bias + (g.bias != nullptr ? n0 : 0);
    float v[kPanel];
    for (int64_t j = 0; j < n; ++j) v[j] = static_cast<float>(acc[j] - kAOffset * colsum[j]) * as;
    if (g.b_scale != nullptr)
      for (int64_t j = 0; j < n; ++j) v[j] *= bs[j];
    if (g.bias != nullptr)
      for (int64_t j = 0; j < n; ++j) v[j] += bias[j];
#if FASTDL_VEC == 512
    if constexpr (sizeof(O) == 4) {
      if (stream) {
        check_store(out, kPanel * 4);
        for (int64_t j = 0; j < kPanel; j += 16)
          _mm512_stream_ps(reinterpret_cast<float*>(out + j), _mm512_loadu_ps(v + j));
        return;
      }
    }
    if constexpr (sizeof(O) == 2 && !kIsBf16<O>) {
      int64_t j = 0;
      for (; j + 16 <= n; j += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j),
                            _mm512_cvtps_ph(_mm512_loadu_ps(v + j), _MM_FROUND_TO_NEAREST_INT));
      for (; j < n; ++j) store_out(out + j, v[j]);
      return;
    }
#endif
    for (int64_t j = 0; j < n; ++j) store_out(out + j, v[j]);
  }
}

// ---------------------------------------------------------------- micro-kernels

constexpr int64_t kPrefetchB = 16384;  // bytes ahead: B from memory into L2 (AVX-512 kernels)

#if FASTDL_VEC == 512
constexpr int kMr = 6;
constexpr int kLanes = 16;             // int32 columns per vector
constexpr int64_t kPrefetchL1 = 2048;  // bytes ahead: B from L2 into L1 (8 k groups)

// Outputs the micro-kernel writes from its registers (a whole panel's last k block): int32 and
// float32; the others go through c and epilogue_row.
template <typename O>
constexpr bool kRegEpilogue = kIsI32<O> || kIsF32<O>;

// MR rows x 16 * NV columns of panel `panel`, rows from m: raw int32 sums into c ([MR][64]), or,
// with `to_out` (whole panels of kRegEpilogue outputs, the last k block), finished into C.
// Always inlined, as the micro_any / gemv dispatchers below (down to gemm_blocked and
// gemm_one_row): GCC otherwise may leave a piece out of line, where it keeps the accumulators on
// the stack and copies them around every k group (half the speed, seen in a standalone build). Rows
// are addressed from two pointers and lda (six row pointers and an index left the inlined loop
// short of registers: three reloaded from the stack every k group).
template <typename O, int MR, int NV, bool ToOut>
__attribute__((always_inline)) inline void micro(const Gemm& g, int64_t m, int64_t panel,
                                                 int64_t k0, int64_t k1, bool add, int64_t ahead,
                                                 int32_t* c) {
  __m512i acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = add ? _mm512_loadu_si512(c + r * kPanel + v * 16) : _mm512_setzero_si512();
  const int64_t lda = g.lda;
  const int8_t* a0 = g.a + m * lda + 4 * k0;      // rows 0-2
  const int8_t* a3 = MR > 3 ? a0 + 3 * lda : a0;  // rows 3-5
  const uint8_t* b = g.b + (panel * g.K4 + k0) * kPanel * 4;
  const uint8_t* const b_end = b + (k1 - k0) * kPanel * 4;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  // The next micro-tile's rows (the MR rows after these, one block of memory) fetched into L1
  // over this one's k groups, `step` bytes a group: the first panel of a row block reads A from
  // memory, 6 streams the hardware prefetchers kept up with poorly (2048^3 ~2% faster).
  const char* pf = reinterpret_cast<const char*>(a0 + MR * lda);
  const int64_t groups = k1 > k0 ? k1 - k0 : 1;  // K = 0: no group, nothing fetched
  const int64_t step = (MR * lda + groups - 1) / groups;
  const uint8_t* pb = b + ahead;
  for (; b != b_end; b += kPanel * 4, a0 += 4, a3 += 4, pf += step, pb += kPanel * 4) {
    _mm_prefetch(pf, _MM_HINT_T0);
    __m512i bv[NV];
    for (int v = 0; v < NV; ++v) {
      // B streams from L3 or memory on the first row tile of each k block: fetched into L2
      // `ahead` bytes ahead (see gemm_blocked). Every row tile reads B from L2 (a panel's k
      // block is larger than L1): fetched into L1 kPrefetchL1 bytes ahead, which made 2048^3
      // ~5% faster. A prefetch past the buffer's end never faults.
      _mm_prefetch(reinterpret_cast<const char*>(pb + v * 64), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchL1 + v * 64), _MM_HINT_T0);
      bv[v] = _mm512_loadu_si512(b + v * 64);
    }
    for (int r = 0; r < MR; ++r) {
      int32_t word;
      __builtin_memcpy(&word, (r < 3 ? a0 : a3) + (r % 3) * lda, 4);
      // a_unsigned after the broadcast: the XOR runs beside the vpdpbusd (a free vector port on
      // Zen 4) rather than on the scalar side.
      const __m512i av = _mm512_xor_si512(_mm512_set1_epi32(word), flip);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], av, bv[v]);
    }
  }
  if constexpr (ToOut) {
    // The finished tile from registers to C: epilogue_row's arithmetic (the sums less the
    // offset, times the scales, plus the bias; a multiply then an add, as there) without the
    // round trip through c. A template argument rather than a branch after the k loop: that
    // measured ~2% slower at 2048^3. Column vector by column vector, one offset vector live at a
    // time, and fully unrolled: GCC otherwise indexes the accumulators at run time here, keeping
    // them in memory throughout the k loop (half the speed).
    static_assert(kRegEpilogue<O> && NV == 4);
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      const int64_t n = panel * kPanel + 16 * v;
      const __m512i off = offset_vec(g.b_colsum + n);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        O* out = static_cast<O*>(g.out) + (m + r) * g.ldo + n;
        const bool stream = g.stream && (reinterpret_cast<uintptr_t>(out) & 63) == 0;
        if (stream) check_store(out, 64);
        const __m512i x = _mm512_sub_epi32(acc[r][v], off);
        if constexpr (kIsI32<O>) {
          if (stream)
            _mm512_stream_si512(reinterpret_cast<__m512i*>(out), x);
          else
            _mm512_storeu_si512(out, x);
        } else {
          const float as = g.a_scale != nullptr ? g.a_scale[m + r] : 1.f;
          __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(as));
          if (g.b_scale != nullptr) f = _mm512_mul_ps(f, _mm512_loadu_ps(g.b_scale + n));
          if (g.bias != nullptr) f = _mm512_add_ps(f, _mm512_loadu_ps(g.bias + n));
          if (stream)
            _mm512_stream_ps(out, f);
          else
            _mm512_storeu_ps(out, f);
        }
      }
    }
    return;
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_si512(c + r * kPanel + v * 16, acc[r][v]);
}

#elif FASTDL_VEC == 256
constexpr int kMr = 2;
constexpr int kLanes = 16;
template <typename O>
constexpr bool kRegEpilogue = false;

template <typename O, int MR, int NV, bool ToOut>
inline void micro(const Gemm& g, int64_t m, int64_t panel, int64_t k0, int64_t k1, bool add,
                  int64_t /*ahead*/, int32_t* c) {
  // acc[r][v][q]: columns 16v + 4q .. +3, each as two int32 lanes (k pairs 0-1 and 2-3).
  __m256i acc[MR][NV][4];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v)
      for (int q = 0; q < 4; ++q) acc[r][v][q] = _mm256_setzero_si256();
  const int8_t* a = g.a + m * g.lda;
  const uint8_t* b = g.b + (panel * g.K4 + k0) * kPanel * 4;
  for (int64_t k4 = k0; k4 < k1; ++k4, b += kPanel * 4) {
    __m256i av[MR];
    for (int r = 0; r < MR; ++r) {
      int32_t word;
      __builtin_memcpy(&word, a + r * g.lda + 4 * k4, 4);
      // The 4 bytes + 128 (XOR 0x80) as int16, repeated: lanes pair up with the 4 k of each
      // column in B (the same sums as the VNNI kernel's).
      const __m128i w16 = _mm_cvtepu8_epi16(_mm_cvtsi32_si128(a_unsigned(word)));
      av[r] = _mm256_broadcastq_epi64(w16);
    }
    for (int v = 0; v < NV; ++v)
      for (int q = 0; q < 4; ++q) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + v * 64 + q * 16));
        const __m256i bw = _mm256_cvtepi8_epi16(raw);
        for (int r = 0; r < MR; ++r)
          acc[r][v][q] = _mm256_add_epi32(acc[r][v][q], _mm256_madd_epi16(av[r], bw));
      }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v)
      for (int q = 0; q < 4; q += 2) {
        // hadd pairs within 128-bit lanes gives columns (0,1,4,5 | 2,3,6,7): reorder.
        const __m256i s = _mm256_hadd_epi32(acc[r][v][q], acc[r][v][q + 1]);
        __m256i o = _mm256_permute4x64_epi64(s, 0xd8);
        __m256i* dst = reinterpret_cast<__m256i*>(c + r * kPanel + v * 16 + q * 4);
        if (add) o = _mm256_add_epi32(o, _mm256_loadu_si256(dst));
        _mm256_storeu_si256(dst, o);
      }
}

#else
constexpr int kMr = 4;
constexpr int kLanes = 16;
template <typename O>
constexpr bool kRegEpilogue = false;

template <typename O, int MR, int NV, bool ToOut>
inline void micro(const Gemm& g, int64_t m, int64_t panel, int64_t k0, int64_t k1, bool add,
                  int64_t /*ahead*/, int32_t* c) {
  int32_t acc[MR][NV * 16] = {};
  const int8_t* a = g.a + m * g.lda;
  const int8_t* b = reinterpret_cast<const int8_t*>(g.b) + (panel * g.K4 + k0) * kPanel * 4;
  for (int64_t k4 = k0; k4 < k1; ++k4, b += kPanel * 4)
    for (int r = 0; r < MR; ++r) {
      const int8_t* ar = a + r * g.lda + 4 * k4;
      int32_t au[4];  // a + kAOffset: the VNNI kernel's sums
      for (int i = 0; i < 4; ++i) au[i] = ar[i] + kAOffset;
      for (int j = 0; j < NV * 16; ++j)
        acc[r][j] +=
            au[0] * b[j * 4] + au[1] * b[j * 4 + 1] + au[2] * b[j * 4 + 2] + au[3] * b[j * 4 + 3];
    }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV * 16; ++j) c[r * kPanel + j] = (add ? c[r * kPanel + j] : 0) + acc[r][j];
}
#endif

template <typename O, int MR, int NV>
__attribute__((always_inline)) inline void micro_any_rows(const Gemm& g, int64_t m, int rows,
                                                          int64_t panel, int64_t k0, int64_t k1,
                                                          bool add, int64_t ahead, bool to_out,
                                                          int32_t* c) {
  if constexpr (MR > 1) {
    if (rows < MR)
      return micro_any_rows<O, MR - 1, NV>(g, m, rows, panel, k0, k1, add, ahead, to_out, c);
  }
  if constexpr (kRegEpilogue<O> && NV == 4) {
    if (to_out) return micro<O, MR, NV, true>(g, m, panel, k0, k1, add, ahead, c);
  }
  micro<O, MR, NV, false>(g, m, panel, k0, k1, add, ahead, c);
}

template <typename O, int NV>
__attribute__((always_inline)) inline void micro_any(const Gemm& g, int64_t m, int rows, int nv,
                                                     int64_t panel, int64_t k0, int64_t k1,
                                                     bool add, int64_t ahead, bool to_out,
                                                     int32_t* c) {
  if constexpr (NV > 1) {
    if (nv < NV) return micro_any<O, NV - 1>(g, m, rows, nv, panel, k0, k1, add, ahead, to_out, c);
  }
  micro_any_rows<O, kMr, NV>(g, m, rows, panel, k0, k1, add, ahead, to_out, c);
}

#if FASTDL_VEC == 512
// One row against NP whole panels at once, all of K in one pass (a GEMV: each byte of B is used
// once, nothing to block for): raw int32 sums into c ([NP][64]). B streams from memory, and NP
// panels read side by side are NP streams the prefetchers follow at once: at 4096 x 4096, 4
// streams a core read the weight ~10% faster than one.
template <int NP>
__attribute__((always_inline)) inline void gemv(const Gemm& g, int64_t m, int64_t panel,
                                                int32_t* c) {
  __m512i acc[NP][4];
  for (int p = 0; p < NP; ++p)
    for (int v = 0; v < 4; ++v) acc[p][v] = _mm512_setzero_si512();
  const int8_t* a = g.a + m * g.lda;
  const uint8_t* b = g.b + panel * g.K4 * kPanel * 4;
  const int64_t ps = g.K4 * kPanel * 4;  // bytes between panels
  for (int64_t k4 = 0; k4 < g.K4; ++k4, b += kPanel * 4) {
    int32_t word;
    __builtin_memcpy(&word, a + 4 * k4, 4);
    const __m512i av = _mm512_set1_epi32(a_unsigned(word));
    for (int p = 0; p < NP; ++p)
      for (int v = 0; v < 4; ++v) {
        _mm_prefetch(reinterpret_cast<const char*>(b + p * ps + kPrefetchB + v * 64), _MM_HINT_T1);
        acc[p][v] = _mm512_dpbusd_epi32(acc[p][v], av, _mm512_loadu_si512(b + p * ps + v * 64));
      }
  }
  for (int p = 0; p < NP; ++p)
    for (int v = 0; v < 4; ++v) _mm512_storeu_si512(c + p * kPanel + v * 16, acc[p][v]);
}

constexpr int kGemvPanels = 4;

template <int NP>
__attribute__((always_inline)) inline void gemv_any(const Gemm& g, int64_t m, int np, int64_t panel,
                                                    int32_t* c) {
  if constexpr (NP > 1) {
    if (np < NP) return gemv_any<NP - 1>(g, m, np, panel, c);
  }
  gemv<NP>(g, m, panel, c);
}
#endif

// Groups of 4 k per cache block: the block of a panel (kKc x 256 bytes, 128 KiB) stays in L2
// while every micro-tile of the rows streams it (4 loads per 24 vpdpbusd, well within L2's
// bandwidth); the int32 partial sums wait in `acc` between blocks. On Zen 4 at 2048^3, blocks of
// 64 / 96 / 128 / 256 groups (the smaller ones L1-sized on paper, but A's rows and `acc` share
// L1) measured 4% / 2% / 2% / 1% slower; 4096x4096 layers were indifferent.
constexpr int64_t kKc = 512;
constexpr int64_t kMaxRows = 16 * kMr;  // rows per call: int8.cpp's row tiles are at most this

// Rows [m0, m1) x panels [p0, p1), blocked as above; acc holds kMaxRows x kPanel sums.
template <typename O>
void gemm_blocked(const Gemm& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1, int32_t* acc) {
  for (int64_t mb = m0; mb < m1; mb += kMaxRows) {
    const int64_t me = imin(m1, mb + kMaxRows);
    for (int64_t panel = p0; panel < p1; ++panel) {
      const int64_t n0 = panel * kPanel;
      const int64_t n = imin(kPanel, g.N - n0);
      const int nv = static_cast<int>((n + kLanes - 1) / kLanes);
      for (int64_t k0 = 0; k0 < g.K4 || k0 == 0; k0 += kKc) {
        const int64_t k1 = imin(g.K4, k0 + kKc);
        const bool to_out = kRegEpilogue<O> && n == kPanel && k1 == g.K4;
        for (int64_t m = mb; m < me; m += kMr) {
          const int rows = static_cast<int>(imin(kMr, me - m));
          int32_t* c = acc + (m - mb) * kPanel;
          // B's L2 prefetch: the first row tile of a block streams it kPrefetchB bytes ahead; the
          // later ones (B in L2 by then) fetch the next block, which follows this one in memory,
          // so that its first row tile finds it there too: with few rows (M = 16) the stream
          // from memory otherwise stalls one row tile in each block.
          const int64_t ahead = m == mb ? kPrefetchB : (k1 - k0) * kPanel * 4;
          micro_any<O, kPanel / kLanes>(g, m, rows, nv, panel, k0, k1, k0 > 0, ahead, to_out, c);
          // The finished tile out while it is in L1, its stores spread among the products.
          if (k1 == g.K4 && !to_out)
            for (int r = 0; r < rows; ++r) epilogue_row<O>(g, c + r * kPanel, m + r, n0, n);
        }
      }
    }
  }
}

#if FASTDL_VEC == 512
// Row m x panels [p0, p1), kGemvPanels at a time.
template <typename O>
void gemm_one_row(const Gemm& g, int64_t m, int64_t p0, int64_t p1, int32_t* acc) {
  for (int64_t panel = p0; panel < p1; panel += kGemvPanels) {
    const int np = static_cast<int>(imin(kGemvPanels, p1 - panel));
    gemv_any<kGemvPanels>(g, m, np, panel, acc);
    for (int p = 0; p < np; ++p) {
      const int64_t n0 = (panel + p) * kPanel;
      epilogue_row<O>(g, acc + p * kPanel, m, n0, imin(kPanel, g.N - n0));
    }
  }
}
#endif

template <typename O>
void gemm(const Gemm& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  alignas(64) int32_t acc[kMaxRows * kPanel];
#if FASTDL_VEC == 512
  if (m1 - m0 == 1)
    gemm_one_row<O>(g, m0, p0, p1, acc);
  else
#endif
    gemm_blocked<O>(g, m0, m1, p0, p1, acc);
#if FASTDL_VEC == 512
  if (g.stream) _mm_sfence();  // the streamed stores done before the caller's threads join
#endif
}

#if FASTDL_VEC == 512
// The VNNI peak (what bench/ reports the int8 rates against): 24 independent vpdpbusd chains
// in zmm8-31, `iters` rounds, register operands only (asm: the compiler neither drops nor
// reorders them).
constexpr int64_t kPeakOps = 24 * 16 * 4 * 2;  // per round: chains x lanes x bytes x (mul, add)

inline int64_t peak_loop(int64_t iters) {
  const __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
  for (int64_t it = 0; it < iters; ++it)
    __asm__ volatile(
#define FASTDL_DP(r) "vpdpbusd %[b], %[a], %%zmm" #r "\n\t"
        FASTDL_DP(8) FASTDL_DP(9) FASTDL_DP(10) FASTDL_DP(11) FASTDL_DP(12) FASTDL_DP(13)
            FASTDL_DP(14) FASTDL_DP(15) FASTDL_DP(16) FASTDL_DP(17) FASTDL_DP(18) FASTDL_DP(19)
                FASTDL_DP(20) FASTDL_DP(21) FASTDL_DP(22) FASTDL_DP(23) FASTDL_DP(24) FASTDL_DP(25)
                    FASTDL_DP(26) FASTDL_DP(27) FASTDL_DP(28) FASTDL_DP(29) FASTDL_DP(30)
                        FASTDL_DP(31)
#undef FASTDL_DP
        :
        : [a] "v"(a), [b] "v"(b)
        : "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17",
          "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27",
          "xmm28", "xmm29", "xmm30", "xmm31");
  return iters;
}
#endif

const Int8Kernels kInt8Kernels = {
    .quantize = {&quantize_rows<float>, &quantize_rows<bf16>, &quantize_rows<f16>, &copy_rows_i8},
    .pack_b = &pack_b,
    .gemm = {&gemm<int32_t>, &gemm<float>, &gemm<bf16>, &gemm<f16>},
    .mr = kMr,
#if FASTDL_VEC == 512
    .peak = {&peak_loop, kPeakOps},
#else
    .peak = {nullptr, 0},
#endif
};

#if FASTDL_VEC == 512
#pragma GCC pop_options
#endif
