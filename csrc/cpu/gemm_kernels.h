// The float32 GEMM kernels for the layouts of cpu/gemm_params.h: B packing and the block
// kernel with its register-tiled micro-kernel. Included inside an ISA namespace by
// csrc/cpu/isa/*.cpp after common/vec.h (see there for the rules).
//
// The loop structure is Goto & van de Geijn's ("Anatomy of High-Performance Matrix
// Multiplication", 2008; BLIS), with the roles of A and B swapped for row-major C: B is packed
// into panels of nr columns and streamed one row of nr floats per k, A is broadcast one element
// per row and k. The micro-tile keeps MR x nr sums of C in registers:
//   512: 6 rows x 64 columns, 24 zmm accumulators (4 loads of B + 6 broadcasts per 24 FMAs)
//   256: 6 rows x 16 columns, 12 ymm accumulators
//   0:   4 rows x 16 columns of portable vectors.
// Rows of A are read where they are (MR unit-stride streams); a transposed A is packed (see
// kGemmMc), its MR elements per k then one contiguous run.

// Kern::run<rows, ceil(cols / W), kPackedA>(args...): the edge tiles compute no more rows or
// vectors than they store (Kern: each element type's micro-kernel).
template <class Kern, int MR, int NV, bool kPackedA, typename... Args>
inline void micro_any(int rows, int nv, Args... args) {
  if constexpr (MR > 1) {
    if (rows < MR) return micro_any<Kern, MR - 1, NV, kPackedA>(rows, nv, args...);
  }
  if constexpr (NV > 1) {
    if (nv < NV) return micro_any<Kern, MR, NV - 1, kPackedA>(rows, nv, args...);
  }
  Kern::template run<MR, NV, kPackedA>(args...);
}

// Software prefetch of the next row tile's A (MR rows lda apart, past this tile's) while this
// one runs: a line of one row per k, the rows in turn (an MR-th of a line's k apart, so no line is
// skipped). Rows of A read in place stream from memory once (a conv's input pixels), and the
// hardware prefetchers left the broadcasts waiting on them: a bfloat16 1x1 conv's GEMM on 2 Zen 4
// cores ran at 285 GFLOP/s without, 362 with. The next tile of the last is never read.
template <int MR, typename E>
struct NextTile {
  uintptr_t next;  // an address, not a pointer: past the last tile there is no array
  int64_t lda;
  int r = 0;

  NextTile(const E* a, int64_t ld)
      : next(reinterpret_cast<uintptr_t>(a) + MR * ld * sizeof(E)), lda(ld) {}
  void fetch(int64_t k) {
    __builtin_prefetch(reinterpret_cast<const void*>(next + (r * lda + k) * sizeof(E)));
    r = r + 1 == MR ? 0 : r + 1;
  }
};

// C tile (MR rows x the `cols` <= NV * W columns at c, ld ldc) = alpha * acc + beta * C; beta 0
// does not read C (it may hold NaN).
template <int MR, int NV>
inline void store_tile(const VecF (&acc)[MR][NV], float* c, int64_t ldc, int64_t cols, float alpha,
                       float beta) {
  constexpr int W = VecF::W;
  const VecF va = VecF::set1(alpha), vb = VecF::set1(beta);
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      float* p = c + r * ldc + v * W;
      const int64_t len = imin(W, cols - v * W);
      VecF o = acc[r][v] * va;
      if (beta != 0.f) o = fma(vb, ld<VecF>(p, len), o);
      st(p, o, len);
    }
}

namespace gemm_f32 {

#if FASTDL_VEC == 512
constexpr int kMr = 6, kNv = 4;
#elif FASTDL_VEC == 256
constexpr int kMr = 6, kNv = 2;
#else
constexpr int kMr = 4, kNv = 2;
#endif
constexpr int64_t kNr = kNv * VecF::W;
// Rows of the B panel ahead of the one read that are fetched into L1: a panel's kc rows come from
// L2 on every row tile (they outgrow L1); the hardware prefetchers alone left FMAs waiting.
constexpr int64_t kPrefetchRows = 8;

// C tile (MR rows x the `cols` <= NV * W columns at c) = alpha * A-rows * bp + beta * C over kc
// values of k. A element (r, k) is a[k * kMr + r] when packed, else a[r * lda + k].
template <int MR, int NV, bool kPackedA>
inline void micro(const float* a, int64_t lda, const float* bp, int64_t kc, float* c, int64_t ldc,
                  int64_t cols, float alpha, float beta) {
  constexpr int W = VecF::W;
  VecF acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = VecF::zero();
  NextTile<MR, float> next{a, lda};
  for (int64_t k = 0; k < kc; ++k, bp += kNr) {
    for (int64_t l = 0; l < kNr * 4 / 64; ++l)
      __builtin_prefetch(bp + kPrefetchRows * kNr + l * 16);
    if (!kPackedA) next.fetch(k);
    VecF b[NV];
    for (int v = 0; v < NV; ++v) b[v] = VecF::load(bp + v * W);
    for (int r = 0; r < MR; ++r) {
      const VecF x = VecF::set1(kPackedA ? a[k * kMr + r] : a[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = fma(x, b[v], acc[r][v]);
    }
  }
  store_tile(acc, c, ldc, cols, alpha, beta);
}

struct Micro {
  template <int MR, int NV, bool kPackedA, typename... Args>
  static void run(Args... args) {
    micro<MR, NV, kPackedA>(args...);
  }
};

inline void pack(const PackBF32& p, int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* dst) {
  const int64_t kc = k1 - k0, ldb = p.ldb;
  for (int64_t j0 = n0; j0 < n1; j0 += kNr, dst += kc * kNr) {
    const int64_t cols = imin(kNr, n1 - j0);
    if (p.tb) {
      // B^T: column j of the panel is row j of B. Sliced by 16 k so that the 16 lines written
      // per column stay in L1 until the next columns fill them.
      if (cols < kNr)
        for (int64_t i = 0; i < kc * kNr; ++i) dst[i] = 0.f;
      for (int64_t ks = 0; ks < kc; ks += 16) {
        const int64_t ke = imin(kc, ks + 16);
        for (int64_t j = 0; j < cols; ++j) {
          const float* __restrict src = p.b + (j0 + j) * ldb + k0;
          float* __restrict d = dst + j;
          for (int64_t k = ks; k < ke; ++k) d[k * kNr] = src[k];
        }
      }
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = p.b + (k0 + k) * ldb + j0;
        float* d = dst + k * kNr;
        for (int64_t j = 0; j < kNr; j += VecF::W) {
          const int64_t len = imin(VecF::W, cols - j);
          (len > 0 ? ld<VecF>(src + j, len) : VecF::zero()).store(d + j);
        }
      }
    }
  }
}

// Rows [m0, m1) of block's C; `a` is the first tile's A (row m0 from column k0, or its packed
// [k][kMr] tile, the next tiles kMr * kc floats on); B's panels kp rows apart.
template <bool kPackedA>
inline void row_tiles(const GemmF32& g, const float* a, int64_t m0, int64_t m1, const float* bp,
                      int64_t kc, int64_t kp, int64_t n0, int64_t n1, float beta) {
  for (int64_t m = m0; m < m1; m += kMr, a += kPackedA ? kMr * kc : kMr * g.lda) {
    const int rows = static_cast<int>(imin(kMr, m1 - m));
    const float* b = bp;
    for (int64_t j = n0; j < n1; j += kNr, b += kp * kNr) {
      const int64_t cols = imin(kNr, n1 - j);
      const int nv = static_cast<int>((cols + VecF::W - 1) / VecF::W);
      micro_any<Micro, kMr, kNv, kPackedA>(rows, nv, a, g.lda, b, kc, g.c + m * g.ldc + j, g.ldc,
                                           cols, g.alpha, beta);
    }
  }
}

inline void block(const GemmF32& g, const float* bp, int64_t k0, int64_t k1, int64_t n0, int64_t n1,
                  float beta, int64_t kp) {
  const int64_t kc = k1 - k0;
  if (!g.ta) return row_tiles<false>(g, g.a + k0, 0, g.m, bp, kc, kp, n0, n1, beta);
  for (int64_t m0 = 0; m0 < g.m; m0 += kGemmMc) {
    const int64_t m1 = imin(g.m, m0 + kGemmMc);
    // Panel by panel, its kc rows of kMr in turn: the stores run along the panel (k outermost
    // had scattered them kMr kc floats apart: a 1x1 conv of 256 channels taking its NCHW x as
    // A^T, 25 -> 21.6 ms), the kMr-element loads of the next panel hit the lines in L1.
    float* dst = g.apack;
    for (int64_t m = m0; m < m1; m += kMr) {
      const int64_t rows = imin(kMr, m1 - m);
      const float* src = g.a + k0 * g.lda + m;
      for (int64_t k = 0; k < kc; ++k, dst += kMr) st(dst, ld<VecF>(src + k * g.lda, rows), rows);
    }
    row_tiles<true>(g, g.apack, m0, m1, bp, kc, kp, n0, n1, beta);
  }
}

}  // namespace gemm_f32

#if FASTDL_VEC == 512
#pragma GCC push_options
#pragma GCC target("avx512bf16")
// bfloat16 operands on AVX512-BF16: the same micro-tile (6 rows x 64 columns, 24 zmm
// accumulators), each vdpbf16ps adding two k at once to 16 float sums: a broadcast word of A
// (its row's k and k + 1) against a panel row of B's words. Products of two bfloat16 values are
// exact in float32; the instruction reads subnormal inputs as zero.
namespace gemm_bf16 {

constexpr int kMr = 6, kNv = 4;
constexpr int64_t kNr = kNv * 16;
constexpr int64_t kPrefetchRows = 8;

inline uint32_t word(uint16_t lo, uint16_t hi) {
  return lo | static_cast<uint32_t>(hi) << 16;
}

inline uint32_t pair_at(const uint16_t* p) {
  uint32_t w;
  __builtin_memcpy(&w, p, sizeof w);
  return w;
}

inline __m512 dot(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

// As gemm_f32::micro over kc values of k: A's word for pair q of row r is a[q * kMr + r] when
// packed (kc rounded up to pairs), else read from row r at 2q (an odd last k alone).
template <int MR, int NV, bool kPackedA>
inline void micro(const uint16_t* a, int64_t lda, const uint32_t* bp, int64_t kc, float* c,
                  int64_t ldc, int64_t cols, float alpha, float beta) {
  VecF acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = VecF::zero();
  const uint32_t* aw = reinterpret_cast<const uint32_t*>(a);
  const int64_t pairs = kPackedA ? (kc + 1) / 2 : kc / 2;
  NextTile<MR, uint16_t> next{a, lda};
  for (int64_t q = 0; q < pairs; ++q, bp += kNr) {
    for (int64_t l = 0; l < kNr * 4 / 64; ++l)
      __builtin_prefetch(bp + kPrefetchRows * kNr + l * 16);
    if (!kPackedA) next.fetch(2 * q);
    __m512i b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_load_si512(bp + v * 16);
    for (int r = 0; r < MR; ++r) {
      const uint32_t w = kPackedA ? aw[q * kMr + r] : pair_at(a + r * lda + 2 * q);
      const __m512i x = _mm512_set1_epi32(static_cast<int>(w));
      for (int v = 0; v < NV; ++v) acc[r][v].v = dot(acc[r][v].v, x, b[v]);
    }
  }
  if (!kPackedA && kc % 2 != 0) {  // the last k: A's high half zero, as the panel's
    __m512i b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_load_si512(bp + v * 16);
    for (int r = 0; r < MR; ++r) {
      const __m512i x = _mm512_set1_epi32(static_cast<int>(a[r * lda + kc - 1]));
      for (int v = 0; v < NV; ++v) acc[r][v].v = dot(acc[r][v].v, x, b[v]);
    }
  }
  store_tile(acc, c, ldc, cols, alpha, beta);
}

struct Micro {
  template <int MR, int NV, bool kPackedA, typename... Args>
  static void run(Args... args) {
    micro<MR, NV, kPackedA>(args...);
  }
};

inline void pack(const PackBBf16& p, int64_t k0, int64_t k1, int64_t n0, int64_t n1,
                 uint32_t* dst) {
  const int64_t kc = k1 - k0, kq = (kc + 1) / 2, ldb = p.ldb;
  for (int64_t j0 = n0; j0 < n1; j0 += kNr, dst += kq * kNr) {
    const int64_t cols = imin(kNr, n1 - j0);
    if (p.tb) {
      // Column j of the panel is row j of B, its k pairs one 32-bit load each; sliced by 16
      // pairs as gemm_f32::pack.
      if (cols < kNr)
        for (int64_t i = 0; i < kq * kNr; ++i) dst[i] = 0;
      for (int64_t qs = 0; qs < kq; qs += 16) {
        const int64_t qe = imin(kc / 2, qs + 16);
        for (int64_t j = 0; j < cols; ++j) {
          const uint16_t* __restrict src = p.b + (j0 + j) * ldb + k0;
          uint32_t* __restrict d = dst + j;
          for (int64_t q = qs; q < qe; ++q) d[q * kNr] = pair_at(src + 2 * q);
        }
      }
      if (kc % 2 != 0)  // the last k alone, its high half zero
        for (int64_t j = 0; j < cols; ++j) dst[(kq - 1) * kNr + j] = p.b[(j0 + j) * ldb + k1 - 1];
    } else {
      // Rows k and k + 1, 16 columns at a time, widened to words and merged.
      for (int64_t q = 0; q < kq; ++q) {
        const uint16_t* s0 = p.b + (k0 + 2 * q) * ldb + j0;
        const bool both = 2 * q + 1 < kc;
        uint32_t* d = dst + q * kNr;
        for (int64_t j = 0; j < kNr; j += 16) {
          const int64_t len = imin(16, cols - j);
          __m512i w = _mm512_setzero_si512();
          if (len > 0) {
            const __mmask16 m = VecF::mask(len);
            w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s0 + j));
            if (both) {
              const __m256i hi = _mm256_maskz_loadu_epi16(m, s0 + ldb + j);
              w = _mm512_or_si512(w, _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
            }
          }
          _mm512_store_si512(d + j, w);
        }
      }
    }
  }
}

template <bool kPackedA>
inline void row_tiles(const GemmBf16& g, const uint16_t* a, int64_t m0, int64_t m1,
                      const uint32_t* bp, int64_t kc, int64_t kp, int64_t n0, int64_t n1,
                      float beta) {
  const int64_t tile = kPackedA ? 2 * kMr * ((kc + 1) / 2) : kMr * g.lda;  // in uint16_t
  for (int64_t m = m0; m < m1; m += kMr, a += tile) {
    const int rows = static_cast<int>(imin(kMr, m1 - m));
    const uint32_t* b = bp;
    for (int64_t j = n0; j < n1; j += kNr, b += kp * kNr) {
      const int64_t cols = imin(kNr, n1 - j);
      const int nv = static_cast<int>((cols + 15) / 16);
      micro_any<Micro, kMr, kNv, kPackedA>(rows, nv, a, g.lda, b, kc, g.c + m * g.ldc + j, g.ldc,
                                           cols, g.alpha, beta);
    }
  }
}

inline void block(const GemmBf16& g, const uint32_t* bp, int64_t k0, int64_t k1, int64_t n0,
                  int64_t n1, float beta, int64_t kp) {
  const int64_t kc = k1 - k0, kq = (kc + 1) / 2;
  if (!g.ta) return row_tiles<false>(g, g.a + k0, 0, g.m, bp, kc, kp, n0, n1, beta);
  for (int64_t m0 = 0; m0 < g.m; m0 += kGemmMc) {
    const int64_t m1 = imin(g.m, m0 + kGemmMc);
    for (int64_t q = 0; q < kq; ++q) {
      const uint16_t* s0 = g.a + (k0 + 2 * q) * g.lda;
      const uint16_t* s1 = 2 * q + 1 < kc ? s0 + g.lda : nullptr;
      uint32_t* dst = g.apack + q * kMr;
      for (int64_t m = m0; m < m1; m += kMr, dst += kMr * kq)
        for (int64_t r = 0; r < kMr; ++r)
          dst[r] = m + r < m1 ? word(s0[m + r], s1 != nullptr ? s1[m + r] : 0) : 0;
    }
    row_tiles<true>(g, reinterpret_cast<const uint16_t*>(g.apack), m0, m1, bp, kc, kp, n0, n1,
                    beta);
  }
}

}  // namespace gemm_bf16

#if defined(FASTDL_AMX)
// bfloat16 products on AMX tiles (csrc/cpu/isa/amx.cpp compiles this table for CPUs with
// AMX-BF16): B's packed panels as gemm_bf16's (a panel's 16 pairs x 16 columns is one B tile,
// rows kNr words apart), A's rows read in place (16 rows x 32 k a tile; a transposed A packed
// into rows first). C is cut into 32 x 32 blocks, four 16 x 16 float tiles, each step of 32 k
// loading two A and two B tiles for four TDPBF16PS (16 x 16 x 32 products each). Rows past the
// last whole 16 and k past the last whole 32 run gemm_bf16's micro-tiles.
namespace gemm_amx {

constexpr int64_t kTileRows = 16, kStepK = 32, kNr = gemm_bf16::kNr;

// Tiles 0-3 hold C (rows 16 apart, columns 16 apart), 4-5 A, 6-7 B: 16 rows of 64 bytes each.
struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// A constant in memory: GCC does not count _tile_loadconfig as a read of its operand, and a
// configuration built in a local had its stores dropped once inlined (SIGILL at the first tile
// instruction, seen in a standalone test of conv_amx.h's loop).
inline constexpr TileConfig kTileConfig = {
    1,
    0,
    {},
    {64, 64, 64, 64, 64, 64, 64, 64},
    {kTileRows, kTileRows, kTileRows, kTileRows, kTileRows, kTileRows, kTileRows, kTileRows}};

inline void configure() {
  _tile_loadconfig(&kTileConfig);
}

// C rows [0, 16 kTr) x columns [0, cols) at c (cols <= 32) = alpha * A B + beta * C over the
// first kt (a multiple of 32) values of k: a is row 0 of A (lda apart), b the panel's words from
// this block's first column on. With alpha 1, beta 0 or 1 and whole columns the tiles start from
// C (or zero) and store into it; otherwise they go through `tmp` (beta 0 reads no C).
template <int kTr>
inline void tile_block(const uint16_t* a, int64_t lda, const uint32_t* b, int64_t kt, float* c,
                       int64_t ldc, int64_t cols, float alpha, float beta) {
  const bool direct = alpha == 1.f && (beta == 0.f || beta == 1.f) && cols == 32;
  const int64_t sc = ldc * 4, sa = lda * 2, sb = kNr * 4;
  if (direct && beta == 1.f) {
    _tile_loadd(0, c, sc);
    _tile_loadd(1, c + 16, sc);
    if constexpr (kTr == 2) {
      _tile_loadd(2, c + 16 * ldc, sc);
      _tile_loadd(3, c + 16 * ldc + 16, sc);
    }
  } else {
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (kTr == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
  }
  for (int64_t k = 0; k < kt; k += kStepK) {
    const uint32_t* bk = b + k / 2 * kNr;
    _tile_loadd(4, a + k, sa);
    _tile_loadd(6, bk, sb);
    _tile_loadd(7, bk + 16, sb);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (kTr == 2) {
      _tile_loadd(5, a + 16 * lda + k, sa);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  alignas(64) float tmp[2 * kTileRows * 32];
  float* out = direct ? c : tmp;
  const int64_t ldo = direct ? ldc : 32;
  for (int r = 0; r < kTr * 16; ++r) check_store(out + r * ldo, 32 * 4);
  _tile_stored(0, out, ldo * 4);
  _tile_stored(1, out + 16, ldo * 4);
  if constexpr (kTr == 2) {
    _tile_stored(2, out + 16 * ldo, ldo * 4);
    _tile_stored(3, out + 16 * ldo + 16, ldo * 4);
  }
  if (direct) return;
  const VecF va = VecF::set1(alpha), vb = VecF::set1(beta);
  for (int64_t r = 0; r < kTr * kTileRows; ++r)
    for (int64_t v = 0; v * 16 < cols; ++v) {
      float* p = c + r * ldc + v * 16;
      const int64_t len = imin(16, cols - v * 16);
      VecF o = VecF::load(tmp + r * 32 + v * 16) * va;
      if (beta != 0.f) o = fma(vb, ld<VecF>(p, len), o);
      st(p, o, len);
    }
}

// Rows [m0, m1) of the block's C from A's rows a (row m0 at column k0, lda apart): whole 16s of
// rows on the tiles for the first kt of the kc values of k, the rest on gemm_bf16's micro-tiles.
inline void row_tiles(const GemmBf16& g, const uint16_t* a, int64_t lda, int64_t m0, int64_t m1,
                      const uint32_t* bp, int64_t kc, int64_t kp, int64_t n0, int64_t n1,
                      float beta) {
  const int64_t kt = kc / kStepK * kStepK, tiled = m0 + (m1 - m0) / kTileRows * kTileRows;
  for (int64_t m = m0; m < tiled; m += 2 * kTileRows) {
    const uint16_t* am = a + (m - m0) * lda;
    const uint32_t* b = bp;
    for (int64_t j = n0; j < n1; j += kNr, b += kp * kNr)
      for (int64_t h = j; h < imin(n1, j + kNr); h += 32) {
        float* c = g.c + m * g.ldc + h;
        const int64_t cols = imin(32, n1 - h);
        if (m + 2 * kTileRows <= tiled)
          tile_block<2>(am, lda, b + (h - j), kt, c, g.ldc, cols, g.alpha, beta);
        else
          tile_block<1>(am, lda, b + (h - j), kt, c, g.ldc, cols, g.alpha, beta);
      }
  }
  GemmBf16 rest = g;
  rest.lda = lda;
  if (kt < kc)  // the last k of the tiled rows, added to what the tiles stored
    gemm_bf16::row_tiles<false>(rest, a + kt, m0, tiled, bp + kt / 2 * kNr, kc - kt, kp, n0, n1,
                                1.f);
  if (tiled < m1)
    gemm_bf16::row_tiles<false>(rest, a + (tiled - m0) * lda, tiled, m1, bp, kc, kp, n0, n1, beta);
}

// A^T's rows [m0, m1) x k [k0, k0 + kc) (A stored k x m, lda apart) into dst as rows of kc
// (rounded up to a pair; the odd last k's partner zero), 16 x 16 words at a time: 16 pairs of
// A's rows merged into words of 16 columns each, then transposed in registers.
inline void pack_rows(const GemmBf16& g, int64_t k0, int64_t kc, int64_t m0, int64_t m1,
                      uint16_t* dst, int64_t ldd) {
  const int64_t kq = (kc + 1) / 2;
  float* dw = reinterpret_cast<float*>(dst);
  const int64_t ldw = ldd / 2;
  for (int64_t m = m0; m < m1; m += 16) {
    const int64_t rows = imin(16, m1 - m);
    const __mmask16 mask = VecF::mask(rows);
    for (int64_t q0 = 0; q0 < kq; q0 += 16) {
      __m512 w[16];
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t q = q0 + i;
        __m512i v = _mm512_setzero_si512();
        if (q < kq) {
          const uint16_t* s0 = g.a + (k0 + 2 * q) * g.lda + m;
          v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, s0));
          if (2 * q + 1 < kc) {
            const __m256i hi = _mm256_maskz_loadu_epi16(mask, s0 + g.lda);
            v = _mm512_or_si512(v, _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
          }
        }
        w[i] = _mm512_castsi512_ps(v);
      }
      transpose16(w);  // row r: words of A^T's row m + r
      const __mmask16 qm = VecF::mask(imin(16, kq - q0));
      for (int64_t r = 0; r < rows; ++r) {
        check_store(dw + (m - m0 + r) * ldw + q0, imin(16, kq - q0) * 4);
        _mm512_mask_storeu_ps(dw + (m - m0 + r) * ldw + q0, qm, w[r]);
      }
    }
  }
}

inline void block(const GemmBf16& g, const uint32_t* bp, int64_t k0, int64_t k1, int64_t n0,
                  int64_t n1, float beta, int64_t kp) {
  const int64_t kc = k1 - k0;
  if (kc < kStepK || g.m < kTileRows) return gemm_bf16::block(g, bp, k0, k1, n0, n1, beta, kp);
  configure();
  if (!g.ta) {
    row_tiles(g, g.a + k0, g.lda, 0, g.m, bp, kc, kp, n0, n1, beta);
  } else {
    // gemm_bf16's workspace for a transposed A (kGemmMc x (kc + 1) / 2 words) holds as many
    // rows of kc bfloat16 values rounded up to a pair.
    uint16_t* rows = reinterpret_cast<uint16_t*>(g.apack);
    const int64_t ld = (kc + 1) / 2 * 2;
    for (int64_t m0 = 0; m0 < g.m; m0 += kGemmMc) {
      const int64_t m1 = imin(g.m, m0 + kGemmMc);
      pack_rows(g, k0, kc, m0, m1, rows, ld);
      row_tiles(g, rows, ld, m0, m1, bp, kc, kp, n0, n1, beta);
    }
  }
  _tile_release();
}

}  // namespace gemm_amx
#endif  // FASTDL_AMX
#pragma GCC pop_options
#endif

const GemmKernels kGemmKernels = {
    .pack = &gemm_f32::pack,
    .block = &gemm_f32::block,
    .nr = gemm_f32::kNr,
#if defined(FASTDL_AMX)
    .pack_bf16 = &gemm_bf16::pack,
    .block_bf16 = &gemm_amx::block,
#elif FASTDL_VEC == 512
    .pack_bf16 = &gemm_bf16::pack,
    .block_bf16 = &gemm_bf16::block,
#else
    .pack_bf16 = nullptr,
    .block_bf16 = nullptr,
#endif
};
