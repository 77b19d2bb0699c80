// A dense stride-1 conv of bfloat16 x (NHWC or NCHW) on AMX tiles, no im2col (csrc/cpu/isa/amx.cpp
// compiles it for CPUs with AMX-BF16; the driver is conv_direct.cpp's amx_forward, which also runs
// the input gradient through it as the adjoint's forward). Included inside an ISA namespace after
// common/vec.h and cpu/gemm_kernels.h (gemm_amx's tile configuration).
//
// A band of output rows [p0, p1) of image n copies the input rows it reads, zero-padded, into
// `pad` as the blocks reach them (the next rows fetched into L2 meanwhile; an NCHW x's rows
// transposed on the way): rows of Wp = W + 2 pad_w pixels of C channels. Output pixel (p,
// q) of the band is flat position f = (p - p0) Wp + q, and its tap (r, s) reads padded pixel f + r
// dil_h Wp + s dil_w: 16 consecutive flat positions at a tap are 16 consecutive padded pixels, one
// A tile (16 rows of 32 channels, C apart) loaded straight from the copy. The positions with q >= Q
// (the row's last Wp - Q) are computed and dropped. Blocks of 32 positions x 32 output channels are
// four 16 x 16 float tiles, each step of 32 input channels at a tap two A and two B tiles for four
// TDPBF16PS; B is the weight packed by amx_weight: per 32 output channels, tap and 32 input
// channels two B tiles (16 pairs of channels x 16 output channels, a word each) of 1 KiB. The tiles
// are stored into `ring` (rows of K floats, flat position f at row f % amx_ring_positions), and
// each output row, once its blocks are done, goes through the conv's epilogue as the GEMM rows of
// its Q pixels.
#if defined(FASTDL_AMX)
namespace conv_amx {

// The epilogues of a bfloat16 out with at most a bias, residual and ReLU, of this kernel's own
// rather than conv_kernels.h's (store_pixels_lean, nchw_block_lean: float32 out, and compiled in
// the AVX-512 table, which this file does not include): rounded by AVX512-BF16's conversions,
// called a position at a time between the tile steps.
//
// One output pixel (see band): its K accumulators plus the bias (float) and the residual
// (bfloat16, as out), ReLU'd where asked, stored as bfloat16 at element o of out, 32 channels (a
// cache line) at a time, streamed when e.stream and aligned.
inline void store_position(const ConvArgs& a, const ConvEpilogue& e, const float* acc, int64_t o) {
  const float* bias = static_cast<const float*>(e.bias);
  const uint16_t* res = static_cast<const uint16_t*>(e.residual);
  uint16_t* out = static_cast<uint16_t*>(e.out) + o;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t k = 0; k < a.K; k += 32) {
    __m512 lo = _mm512_loadu_ps(acc + k), hi = _mm512_loadu_ps(acc + k + 16);
    if (bias != nullptr) {
      lo = _mm512_add_ps(lo, _mm512_loadu_ps(bias + k));
      hi = _mm512_add_ps(hi, _mm512_loadu_ps(bias + k + 16));
    }
    if (res != nullptr) {
      const __m512i r = _mm512_loadu_si512(res + o + k);
      lo = _mm512_add_ps(lo, VecF::from_bf16(_mm512_castsi512_si256(r)));
      hi = _mm512_add_ps(hi, VecF::from_bf16(_mm512_extracti64x4_epi64(r, 1)));
    }
    if (a.activation == kRelu) {
      lo = _mm512_max_ps(lo, zero);
      hi = _mm512_max_ps(hi, zero);
    }
    const __m512i y = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
    check_store(out + k, 64);
    if (e.stream && reinterpret_cast<uintptr_t>(out + k) % 64 == 0)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(out + k), y);
    else
      _mm512_storeu_si512(out + k, y);
  }
}

// A 32 x 32 block of bfloat16 transposed: dst row j (j < cols, ldd apart) = column j of the 32
// rows at src (lds apart, their first `cols` elements read). As 16 x 16 words (pairs of columns)
// twice, each pair then split into its two columns' rows.
inline void transpose32(const uint16_t* src, int64_t lds, int64_t cols, uint16_t* dst,
                        int64_t ldd) {
  alignas(64) static constexpr uint16_t kEven[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20,
                                                     22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42,
                                                     44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
  const __m512i even = _mm512_load_si512(kEven);
  const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
  const __mmask32 mask = static_cast<__mmask32>((uint64_t{1} << cols) - 1);
  __m512 lo[16], hi[16];
  for (int i = 0; i < 16; ++i) {
    lo[i] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mask, src + i * lds));
    hi[i] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mask, src + (16 + i) * lds));
  }
  transpose16(lo);  // lo[j]: columns 2j and 2j + 1 of rows 0-15, a word a row
  transpose16(hi);
  for (int64_t j = 0; 2 * j < cols; ++j) {
    const __m512i l = _mm512_castps_si512(lo[j]), h = _mm512_castps_si512(hi[j]);
    check_store(dst + 2 * j * ldd, 64);
    _mm512_storeu_si512(dst + 2 * j * ldd, _mm512_permutex2var_epi16(l, even, h));
    if (2 * j + 1 == cols) break;
    check_store(dst + (2 * j + 1) * ldd, 64);
    _mm512_storeu_si512(dst + (2 * j + 1) * ldd, _mm512_permutex2var_epi16(l, odd, h));
  }
}

// Rows [from, to) of a band's zero-padded copy (see band): padded row i is input row
// p0 - pad_h + i of image n, zeros outside the image; only the W x C inside of each row is
// written. x is NHWC, or with x_nchw NCHW (each row's C x W values transposed 32 x 32 at a time,
// the row after next of every plane fetched meanwhile: 32x256x56x56 1x1, 13.1 -> 6.7 ms).
inline void fill_rows(const ConvArgs& a, const uint16_t* x, bool x_nchw, int64_t n, int64_t p0,
                      uint16_t* pad, int64_t from, int64_t to) {
  const int64_t Wp = amx_padded_width(a), hw = a.H * a.W, C = a.C;
  for (int64_t i = from; i < to; ++i) {
    const int64_t h = p0 - a.pad_h + i;
    uint16_t* dst = pad + (i * Wp + a.pad_w) * C;
    if (h < 0 || h >= a.H) {
      std::memset(dst, 0, a.W * C * 2);
    } else if (!x_nchw) {
      std::memcpy(dst, x + (n * hw + h * a.W) * C, a.W * C * 2);
    } else {
      if (h + 2 < a.H)  // the row after next, of every channel plane, fetched into L2
        for (int64_t c = 0; c < C; ++c)
          for (int64_t w0 = 0; w0 < a.W; w0 += 32)
            _mm_prefetch(reinterpret_cast<const char*>(x + (n * C + c) * hw + (h + 2) * a.W + w0),
                         _MM_HINT_T1);
      for (int64_t c0 = 0; c0 < C; c0 += 32)
        for (int64_t w0 = 0; w0 < a.W; w0 += 32)
          transpose32(x + (n * C + c0) * hw + h * a.W + w0, hw, imin(32, a.W - w0),
                      dst + w0 * C + c0, C);
    }
  }
}

// Output row p of image n into a bfloat16 NCHW out (see band): its Q
// positions' K accumulators (position q at ring row (start + q) % rp), 16 pixels x 16 channels
// at a time transposed in registers, plus the bias and the residual, ReLU'd where asked, each
// channel's 16 pixels stored at once.
inline void store_row_nchw(const ConvArgs& a, const ConvEpilogue& e, const float* ring, int64_t rp,
                           int64_t start, int64_t n, int64_t p) {
  const float* bias = static_cast<const float*>(e.bias);
  const uint16_t* res = static_cast<const uint16_t*>(e.residual);
  uint16_t* out = static_cast<uint16_t*>(e.out);
  for (int64_t q0 = 0; q0 < a.Q; q0 += 16) {
    const int64_t nq = imin(16, a.Q - q0);
    const __mmask16 mask = VecF::mask(nq);
    const int64_t o = n * a.out_sn + p * a.Q + q0;
    for (int64_t k0 = 0; k0 < a.K; k0 += 16) {
      __m512 r[16];
      for (int64_t i = 0; i < 16; ++i)
        r[i] = _mm512_loadu_ps(ring + (start + q0 + imin(i, nq - 1)) % rp * a.K + k0);
      transpose16(r);  // r[j]: channel k0 + j of the 16 pixels
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t ok = o + (k0 + j) * a.out_sk;
        __m512 v = r[j];
        if (bias != nullptr) v = _mm512_add_ps(v, _mm512_set1_ps(bias[k0 + j]));
        if (res != nullptr)
          v = _mm512_add_ps(v, VecF::from_bf16(_mm256_maskz_loadu_epi16(mask, res + ok)));
        if (a.activation == kRelu) v = _mm512_max_ps(v, _mm512_setzero_ps());
        check_store(out + ok, nq * 2);
        _mm256_mask_storeu_epi16(out + ok, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
      }
    }
  }
}

// The band's tiles and epilogue (see above); `pad` holds amx_pad_rows(a, p1 - p0) rows, its
// padding columns zero (the caller zeroes it once, this writes only the W x C inside of each row),
// `ring` amx_ring_positions(a) rows of K floats.
inline void band(const ConvArgs& a, const uint16_t* x, bool x_nchw, const uint32_t* wp, int64_t n,
                 int64_t p0, int64_t p1, uint16_t* pad, float* ring, const ConvEpilogue& e,
                 EpilogueFn epi) {
  const int64_t C = a.C, K = a.K, Wp = amx_padded_width(a), rows = amx_pad_rows(a, p1 - p0);
  const int64_t nf = (p1 - p0) * Wp, steps = a.R * a.S * (C / 32), rp = amx_ring_positions(a);
  const int64_t sa = C * 2, sc = K * 4, row_bytes = a.W * C * 2;
  int64_t copied = 0;
  auto fill = [&](int64_t upto) {
    fill_rows(a, x, x_nchw, n, p0, pad, copied, imin(upto, rows));
    copied = std::max(copied, imin(upto, rows));
  };
  // An NHWC x's lines fetched ahead into L2, two a step, from the first row not copied yet to two
  // rows past it (an NCHW x's rows are C planes apart: left to the hardware's prefetchers).
  const char* const image = reinterpret_cast<const char*>(x + n * a.H * a.W * C);
  auto row_at = [&](int64_t h) {
    return image + (x_nchw ? 0 : std::clamp<int64_t>(h, 0, a.H) * row_bytes);
  };
  const char* ahead = row_at(p0 - a.pad_h);
  // A bfloat16 out with at most a bias, residual and ReLU (the common case) takes a lean epilogue
  // of its own: NHWC a few positions of the previous block after each step of this one's tiles
  // (vector work in the shadow of the tile products; after a block, as whole rows through `epi`,
  // it had cost ~30% of the tiles' time), NCHW each row once done (store_row_nchw). The others go
  // through epi row by row.
  const bool simple = e.bf16 && e.pre == nullptr && (a.activation == 0 || a.activation == kRelu);
  const bool own_nhwc = simple && a.out_sk == 1, own_nchw = simple && a.out_spq == 1;
  const int64_t per_step = (kAmxBlock + K / 32 * steps - 1) / (K / 32 * steps);
  int64_t done = 0, ready = 0;  // own_nhwc: positions [done, ready) are in the ring, not stored
  auto store_ready = [&](int64_t count) {
    for (const int64_t end = imin(ready, done + count); done < end; ++done) {
      const int64_t i = done / Wp, q = done - i * Wp;
      if (q >= a.Q) continue;
      store_position(a, e, ring + done % rp * K, n * a.out_sn + ((p0 + i) * a.Q + q) * a.out_spq);
    }
  };
  int64_t next = 0;  // not own_nhwc: the first output row of the band not stored yet
  gemm_amx::configure();
  for (int64_t f0 = 0; f0 < nf; f0 += kAmxBlock) {
    fill(amx_rows_read(a, f0 + kAmxBlock));
    const int64_t h_next = p0 - a.pad_h + copied;
    ahead = std::max(ahead, row_at(h_next));
    const char* const limit = row_at(h_next + 2);
    float* c = ring + f0 % rp * K;
    for (int64_t nh = 0; nh < K; nh += 32) {
      const uint32_t* b = wp + nh / 32 * steps * 512;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t r = 0; r < a.R; ++r)
        for (int64_t s = 0; s < a.S; ++s) {
          const uint16_t* tap = pad + (f0 + r * a.dil_h * Wp + s * a.dil_w) * C;
          for (int64_t cc = 0; cc < C; cc += 32, b += 512) {
            _tile_loadd(4, tap + cc, sa);
            _tile_loadd(6, b, 64);
            _tile_loadd(7, b + 256, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_loadd(5, tap + 16 * C + cc, sa);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
            if (ahead < limit) {
              _mm_prefetch(ahead, _MM_HINT_T1);
              _mm_prefetch(ahead + 64, _MM_HINT_T1);
              ahead = std::min(ahead + 128, limit);
            }
            if (own_nhwc) store_ready(per_step);
          }
        }
      for (int64_t i = 0; i < kAmxBlock; ++i) check_store(c + i * K + nh, 32 * 4);
      _tile_stored(0, c + nh, sc);
      _tile_stored(1, c + nh + 16, sc);
      _tile_stored(2, c + 16 * K + nh, sc);
      _tile_stored(3, c + 16 * K + nh + 16, sc);
    }
    ready = imin(nf, f0 + kAmxBlock);
    // The rows whose Q pixels this block completed, through the epilogue (in two runs where a
    // row wraps around the ring's end).
    for (; !own_nhwc && next < p1 - p0 && next * Wp + a.Q <= f0 + kAmxBlock; ++next) {
      const int64_t start = next * Wp % rp;
      if (own_nchw) {
        store_row_nchw(a, e, ring, rp, start, n, p0 + next);
        continue;
      }
      const int64_t first = imin(a.Q, rp - start), m0 = (n * a.P + p0 + next) * a.Q;
      ConvEpilogue eb = e;
      eb.acc = ring + start * K;
      epi(a, eb, m0, first, 0);
      if (first < a.Q) {
        eb.acc = ring;
        epi(a, eb, m0 + first, a.Q - first, 0);
      }
    }
  }
  if (own_nhwc) {
    store_ready(ready - done);
    if (e.stream) _mm_sfence();
  }
  _tile_release();
}

}  // namespace conv_amx
#endif  // FASTDL_AMX
