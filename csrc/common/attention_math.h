// Rules of the attention family shared by every backend (C++, CUDA; kernels/attention_jit.py
// repeats them in Triton): which keys a query may attend to (causal/window band) and the
// counter-based dropout RNG. No torch or std headers: CUDA .cu files include it as is.
//
// Band: with off = 0 (top_left alignment, torch's is_causal) or Sk - Sq (bottom_right), query i
// may attend to key j iff i + off - left <= j <= i + off + right; a negative left/right is
// unbounded. is_causal is right = 0. fastdl_band_lo/hi give the allowed j as [lo, hi) clamped to
// [0, Sk] (lo >= hi: none).
//
// Dropout: forward and backward, and every backend, draw the same mask from (seed, counter)
// without storing it (the counter-based idea of Salmon et al., SC 2011, with a cheaper mixer).
//
// mix32 is the "lowbias32" integer hash (C. Wellons, 2018: xor-shift / multiply rounds found by
// search for low avalanche bias). A draw hashes the 64-bit counter and 64-bit seed in two rounds:
//   x = mix32(lo32(counter) ^ lo32(seed));  x = mix32(x ^ hi32(counter) ^ hi32(seed))
// and the element is kept when x >= threshold(p) = min(floor(p * 2^32), 2^32 - 1), except that
// p >= 1 keeps nothing. Kept elements are scaled by 1 / (1 - p).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define FASTDL_HD __host__ __device__ __forceinline__
#else
#define FASTDL_HD inline
#endif

FASTDL_HD uint32_t fastdl_mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

FASTDL_HD uint32_t fastdl_dropout_bits(uint64_t seed, uint64_t counter) {
  uint32_t x = fastdl_mix32(static_cast<uint32_t>(counter) ^ static_cast<uint32_t>(seed));
  return fastdl_mix32(x ^ static_cast<uint32_t>(counter >> 32) ^ static_cast<uint32_t>(seed >> 32));
}

// The keep threshold for drop probability p in [0, 1); callers handle p >= 1 (nothing kept).
FASTDL_HD uint32_t fastdl_dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(t);
}

FASTDL_HD bool fastdl_dropout_keep(uint64_t seed, uint64_t counter, uint32_t threshold) {
  return fastdl_dropout_bits(seed, counter) >= threshold;
}

FASTDL_HD int64_t fastdl_band_lo(int64_t i, int64_t Sq, int64_t Sk, int64_t left,
                                 bool bottom_right) {
  if (left < 0) return 0;
  const int64_t lo = i + (bottom_right ? Sk - Sq : 0) - left;
  return lo < 0 ? 0 : (lo > Sk ? Sk : lo);
}

FASTDL_HD int64_t fastdl_band_hi(int64_t i, int64_t Sq, int64_t Sk, int64_t right,
                                 bool bottom_right) {
  if (right < 0) return Sk;
  const int64_t hi = i + (bottom_right ? Sk - Sq : 0) + right + 1;
  return hi < 0 ? 0 : (hi > Sk ? Sk : hi);
}
