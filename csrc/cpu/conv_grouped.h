// The grouped conv kernels (csrc/cpu/conv_params.h, GroupedFwdFn and DirectParamsFn), included
// by conv_kernels.h inside an ISA namespace. Two families: groups of 2 or 4 channels in and out
// (ResNeXt's first stage), a vector spanning whole groups (GroupLanes); and groups of 8 to 32
// output channels (any input width), where a group's output channels are one to four vectors
// and each input channel a broadcast, as a GEMM micro-kernel whose rows are output pixels read
// from zero-padded copies of the group's input rows (no im2col: that moved R S copies of every
// input per group).

// The loads of the grouped kernels (kg channels a group, a vector spanning whole groups): at
// step t each lane k reads its group's channel t further on, wrapping, that is x[k + t] in the
// lanes where k % kg + t < kg and x[k + t - kg] in the others: one load of the vector's lanes
// (`in`, a mask of whole groups, limiting it), each group then rotated t lanes in registers. No
// channel of another group, Inf or NaN, enters a sum. (Two loads of disjoint lanes at x + t and
// x + t - kg, each split across two cache lines, had held a ResNeXt 128-channel layer's forward
// to ~13% of the FMA peak.)
template <typename V>
struct GroupLanes {
  typename V::Rotation rot[4];

  explicit GroupLanes(int64_t kg) {
    for (int64_t t = 0; t < kg; ++t)
      rot[t] = V::rotation(static_cast<int>(kg), static_cast<int>(t));
  }
  // The lanes of step t from v, a vector loaded at the group's channel 0.
  V rotated(V v, int64_t t) const { return t == 0 ? v : v.rotate(rot[t]); }
  template <typename T>
  V load(const T* x, int64_t t, uint32_t in) const {
    return rotated(V::load_lanes(x, in), t);
  }
};

// Grouped conv with as many output as input channels a group, kg in {2, 4} (ResNeXt's), on
// NHWC, output rows (n, p) in [r0, r1): SIMD over the output channels, a vector covering whole
// groups, tiles of kTile pixels (direct_tile); at the t-th of kg steps the lanes read GroupLanes'
// channels, against wt (R, S, kg, C) with wt[r][s][t][k] = w[k][(k % kg + t) % kg][r][s]. An
// im2col per group moved 9 copies of every input for 36 multiply-adds an output.
template <typename T>
FASTDL_FLATTEN void conv_grouped_fwd(const ConvArgs& a, const void* x_, const void* w_,
                                     const ConvEpilogue& e, int64_t r0, int64_t r1, void*) {
  using V = Vec<T>;
  constexpr int64_t kTile = 4;
  const T* x = static_cast<const T*>(x_);
  const T* wt = static_cast<const T*>(w_);
  const int64_t C = a.C, kg = C / a.groups;
  const GroupLanes<V> lanes(kg);
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t n = row / a.P, p = row % a.P;
    for (int64_t q0 = 0; q0 < a.Q; q0 += kTile) {
      const int64_t nq = imin(kTile, a.Q - q0);
      for_vectors<V::W>(0, C, [&](int64_t c0, int64_t len) {
        const uint32_t live = static_cast<uint32_t>((uint64_t{1} << len) - 1u);
        // The lanes of the input pixel of column wi (none outside the row) and its channel c0.
        const auto pixel = [&](const T* xrow, int64_t wi, uint32_t& on) {
          const bool in = wi >= 0 && wi < a.W;
          on = in ? live : 0u;
          return xrow + (in ? wi : 0) * C;
        };
        direct_tile<T, kTile>(
            a, x, e, n, p, q0, nq, c0, len, [&](V* acc, const T* xrow, int64_t r) {
              const T* wr = wt + r * a.S * kg * C + c0;
              if (a.S == 3 && a.stride_w == 1 && a.dil_w == 1) {
                // The kTile + 2 pixels the tile's three taps read, each loaded and rotated once a
                // step (not once for each tap that reads it): whole vectors by plain loads where
                // all of them lie inside the row (all but a row's first and last tiles), else
                // masked ones. The sums in registers meanwhile: acc, which a float load may
                // alias, had been stored back at every step.
                constexpr int64_t kIn = kTile + 2;
                const T* xp[kIn];
                uint32_t on[kIn];
                bool whole = len == V::W;
#pragma GCC unroll 8
                for (int64_t j = 0; j < kIn; ++j) {
                  xp[j] = pixel(xrow, q0 - a.pad_w + j, on[j]);
                  whole = whole && on[j] == live;
                }
                V sum[kTile];
#pragma GCC unroll 4
                for (int64_t j = 0; j < kTile; ++j) sum[j] = acc[j];
                const auto steps = [&](auto load) {
                  for (int64_t t = 0; t < kg; ++t) {
                    V xv[kIn];
#pragma GCC unroll 8
                    for (int64_t j = 0; j < kIn; ++j) xv[j] = load(j, t);
#pragma GCC unroll 3
                    for (int64_t s = 0; s < 3; ++s) {
                      const V wv = ld<V>(wr + (s * kg + t) * C, len);
#pragma GCC unroll 4
                      for (int64_t j = 0; j < kTile; ++j) sum[j] = fma(xv[j + s], wv, sum[j]);
                    }
                  }
                };
                if (whole)
                  steps([&](int64_t j, int64_t t) { return lanes.rotated(V::load(xp[j]), t); });
                else
                  steps([&](int64_t j, int64_t t) { return lanes.load(xp[j], t, on[j]); });
#pragma GCC unroll 4
                for (int64_t j = 0; j < kTile; ++j) acc[j] = sum[j];
                return;
              }
              for (int64_t s = 0; s < a.S; ++s) {
                // The tile's pixels that read inside the row (the others' lanes all off).
                const T* xp[kTile];
                uint32_t on[kTile];
#pragma GCC unroll 4
                for (int64_t j = 0; j < kTile; ++j) {
                  xp[j] = pixel(xrow, (q0 + j) * a.stride_w - a.pad_w + s * a.dil_w, on[j]);
                  if (j >= nq) on[j] = 0u;
                }
                for (int64_t t = 0; t < kg; ++t) {
                  const V wv = ld<V>(wr + (s * kg + t) * C, len);
#pragma GCC unroll 4
                  for (int64_t j = 0; j < kTile; ++j)
                    acc[j] = fma(lanes.load(xp[j], t, on[j]), wv, acc[j]);
                }
              }
            });
      });
    }
  }
  if (e.stream) V::fence();
}

namespace conv_detail {

// conv_grouped_bwd_params for kKg channels a group: per output row and vector of channels, each
// tap's kKg sums over the row's pixels that read inside x in registers, two pixels at a time in
// separate sums (2 kKg FMA chains), read from part and stored back once a row. The pixels a tap
// reads outside x are skipped: plain loads but for a last partial vector of channels.
template <typename T, int kKg>
void grouped_params_rows(const ConvArgs& a, const T* x, const T* gy, T* part, int64_t r0,
                         int64_t r1) {
  using V = Vec<T>;
  const int64_t C = a.C;
  T* gb = part + a.R * a.S * kKg * C;
  const GroupLanes<V> lanes(kKg);
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t n = row / a.P, p = row % a.P;
    const T* grow = gy + row * a.Q * C;
    for_vectors<V::W>(0, C, [&](int64_t c0, int64_t len) {
      const uint32_t live = static_cast<uint32_t>((uint64_t{1} << len) - 1u);
      V bias = V::zero();
      for (int64_t q = 0; q < a.Q; ++q) bias = bias + ld<V>(grow + q * C + c0, len);
      st(gb + c0, ld<V>(gb + c0, len) + bias, len);
      for (int64_t r = 0; x != nullptr && r < a.R; ++r) {
        const int64_t h = p * a.stride_h - a.pad_h + r * a.dil_h;
        if (h < 0 || h >= a.H) continue;
        const T* xrow = x + (n * a.H + h) * a.W * C + c0;
        for (int64_t s = 0; s < a.S; ++s) {
          // Output columns [q0, q1) read input columns q stride_w + off inside the row.
          const int64_t off = s * a.dil_w - a.pad_w;
          const int64_t q0 = off >= 0 ? 0 : (a.stride_w - 1 - off) / a.stride_w;
          const int64_t q1 = a.W - off <= 0 ? 0 : imin(a.Q, (a.W - off - 1) / a.stride_w + 1);
          const auto xv = [&](int64_t q) {
            const T* xp = xrow + (q * a.stride_w + off) * C;
            return len == V::W ? V::load(xp) : V::load_lanes(xp, live);
          };
          T* acc = part + (r * a.S + s) * kKg * C + c0;
          V even[kKg], odd[kKg];
#pragma GCC unroll 4
          for (int t = 0; t < kKg; ++t) {
            even[t] = ld<V>(acc + t * C, len);
            odd[t] = V::zero();
          }
          int64_t q = q0;
          for (; q + 1 < q1; q += 2) {
            const V g0 = ld<V>(grow + q * C + c0, len), g1 = ld<V>(grow + (q + 1) * C + c0, len);
            const V x0 = xv(q), x1 = xv(q + 1);
#pragma GCC unroll 4
            for (int t = 0; t < kKg; ++t) {
              even[t] = fma(g0, lanes.rotated(x0, t), even[t]);
              odd[t] = fma(g1, lanes.rotated(x1, t), odd[t]);
            }
          }
          if (q < q1) {
            const V g0 = ld<V>(grow + q * C + c0, len), x0 = xv(q);
#pragma GCC unroll 4
            for (int t = 0; t < kKg; ++t) even[t] = fma(g0, lanes.rotated(x0, t), even[t]);
          }
#pragma GCC unroll 4
          for (int t = 0; t < kKg; ++t) st(acc + t * C, even[t] + odd[t], len);
        }
      }
    });
  }
}

}  // namespace conv_detail

// Weight and bias gradients of conv_grouped_fwd's convs, output rows (n, p) in [r0, r1): part
// (R * S * kg + 1, C), row (r * S + s) * kg + t, lane k += gy[k] * (GroupLanes' step t) at the
// pixel tap (r, s) reads; the last row += gy. (Updating part in memory at every pixel, a load, an
// FMA and a store each, had taken 40% of a ResNeXt 128-channel layer's forward + backward.)
template <typename T>
void conv_grouped_bwd_params(const ConvArgs& a, const void* x_, const void* gy_, void* part_,
                             int64_t r0, int64_t r1, int64_t, int64_t, void*) {
  const T* x = static_cast<const T*>(x_);
  const T* gy = static_cast<const T*>(gy_);
  T* part = static_cast<T*>(part_);
  if (a.C / a.groups == 2)
    conv_detail::grouped_params_rows<T, 2>(a, x, gy, part, r0, r1);
  else
    conv_detail::grouped_params_rows<T, 4>(a, x, gy, part, r0, r1);
}

// ---------------------------------------------------------------- by broadcasts

namespace conv_detail {

// A group's output channels as kNV vectors of V.
template <typename V_, int kNV_>
struct GroupShape {
  using V = V_;
  static constexpr int kNV = kNV_;
  // A forward tile: kSlice of the kNV vectors, kSlicePixels pixels a row, in pairs of rows where
  // a row fits in half a tile (kSlicePairs); kSlice x kSlicePixels accumulators, kSlice weights
  // and a broadcast in registers. One vector where all kNV would leave fewer than kGroupTile
  // pixels (AVX2's groups of 16 to 32 channels), except for AVX-512's eight-lane float vectors
  // (group_dispatch), whose 24-channel groups keep 3 x 9 tiles (a slice's 15 loads for 14 FMAs,
  // unmeasured there). Tiles of 2 pixels by 4 vectors (32 channels on AVX2) had read each weight
  // vector for two broadcasts, and the group's weight (36 KiB for 32 channels in) from L2 at
  // every tile; a slice's is a quarter of it, read for the block's rows.
  static constexpr int kFit = (kVecRegs - kNV - 1) / kNV;
  static constexpr bool kHalfWidth = std::is_same_v<V, VecF8> && VecF8::W != VecF::W;
  static constexpr int kSlice = kFit < kGroupTile && !kHalfWidth ? 1 : kNV;
  static constexpr int kSliceFit = (kVecRegs - kSlice - 1) / kSlice;
  static constexpr int kSlicePixels = kSliceFit < kGroupTile ? kSliceFit : int{kGroupTile};
  static constexpr bool kSlicePairs = (kSlicePixels + 1) / 2 * 2 <= kSliceFit;
  // A weight-gradient tile's vectors (kParamVectors of the kNV) and input channels (kChannels, a
  // power of 2: it divides the usual group widths): as many accumulators as both make, an
  // output-gradient vector each and a broadcast in registers. Four vectors by two channels
  // (AVX2's groups of 32) had GCC read each output-gradient vector from memory for both
  // channels, 10 loads for 8 FMAs; two by four, 1.5x faster (32 x 1024 x 7 x 7 on a Zen 3).
  static constexpr int kParamVectors = kNV == 4 ? 2 : kNV;
  static constexpr int kChannels = kParamVectors == 1   ? (kVecRegs == 32 ? 16 : 8)
                                   : kParamVectors <= 3 ? (kVecRegs == 32 ? 8 : 4)
                                                        : (kVecRegs == 32 ? 4 : 2);
};

// Whether AVX-512 takes a group of 16 output channels as two eight-lane vectors a broadcast
// rather than one of sixteen: on AMD (Zen 4 runs a 512-bit operation as two 256-bit halves)
// ~15% faster; Intel's server cores have two 512-bit FMA units, which eight-lane FMAs use at half
// their width (32 groups of 16 channels, 32 x 512 x 14 x 14 on the Xeon here: forward 6.4 ->
// 5.6 ms, forward + backward 23.5 -> 20.3 with one vector).
inline bool group16_halves() {
#if defined(__x86_64__)
  return __builtin_cpu_is("amd");
#else
  return false;
#endif
}

// Calls f(GroupShape) for a group of kg output channels (a multiple of 8 up to 32): whole
// vectors of Vec<T>, or on AVX-512 for 8 and 24 channels eight-lane ones, and for 16 where
// group16_halves.
template <typename T, typename F>
inline void group_dispatch(int64_t kg, F&& f) {
  using V = Vec<T>;
  if constexpr (sizeof(T) == 4 && VecF8::W != V::W) {
    if (kg % V::W != 0 || (kg == 16 && group16_halves())) {
      if (kg == 16) f(GroupShape<VecF8, 2>{});
      if (kg == 8) f(GroupShape<VecF8, 1>{});
      if (kg == 24) f(GroupShape<VecF8, 3>{});
      return;
    }
  }
  switch (kg / V::W) {
    case 1:
      return f(GroupShape<V, 1>{});
    case 2:
      return f(GroupShape<V, 2>{});
    case 3:
      return f(GroupShape<V, 3>{});
    case 4:
      return f(GroupShape<V, 4>{});
    default:
      return;
  }
}

// Whether tap row r of output row `row` reads inside x.
inline bool tap_row_inside(const ConvArgs& a, int64_t row, int64_t r) {
  const int64_t h = row % a.P * a.stride_h - a.pad_h + r * a.dil_h;
  return h >= 0 && h < a.H;
}

// The input rows that output rows [row0, row0 + nb) of one image read, for groups [g0, g1), into
// rows (conv_params.h), group g's group_rows_elems from (g - g0) times that on: row i holds input
// row h0 + i (h0 = p0 stride_h - pad_h, (n, p0) = row0), the group's channels of
// group_row_width(a) pixels from column -pad_w on, zero outside x (rows outside x too: a forward
// tile of two output rows reads them, where the others skip them by tap_row_inside). Tap row r of
// output row row0 + b is row b stride_h + r dil_h: each input row is copied once per block, not
// once per tap row. NCHW x (a.x_nchw): each group's channels of a row transposed (conv_transpose)
// from their planes; a copy of the whole x in NHWC first had been ~10% of a 32 x 256 x 28 x 28
// forward in 32 groups, NCHW (the Zen 3).
template <typename T>
void group_input_rows(const ConvArgs& a, const T* x, int64_t row0, int64_t nb, int64_t g0,
                      int64_t g1, T* rows) {
  using V = Vec<T>;
  const int64_t cg = a.C / a.groups, width = group_row_width(a);
  const int64_t per = group_rows_elems(a, sizeof(T));
  // The columns the output pixels read; those past them, read only by a forward tile's pixels
  // past the row (computed, never stored), are left as they are.
  const int64_t used = (a.Q - 1) * a.stride_w + (a.S - 1) * a.dil_w + 1;
  const int64_t n = row0 / a.P, h0 = row0 % a.P * a.stride_h - a.pad_h;
  for (int64_t i = 0; i < group_input_row_count(a, nb); ++i) {
    const int64_t h = h0 + i;
    if (h < 0 || h >= a.H) {
      for (int64_t g = 0; g < g1 - g0; ++g)
        std::fill_n(rows + g * per + i * width * cg, used * cg, T(0));
      continue;
    }
    T* dst = rows + i * width * cg;
    if (a.x_nchw) {
      // Columns [lead, lead + cols) from x, the others zero.
      const int64_t lead = imin(a.pad_w, used), cols = imin(a.W, used - lead), pq = a.H * a.W;
      for (int64_t g = 0; g < g1 - g0; ++g) {
        T* d = dst + g * per;
        std::fill_n(d, lead * cg, T(0));
        conv_transpose<T>(x + ((n * a.C + (g0 + g) * cg) * a.H + h) * a.W, pq, d + lead * cg, cg,
                          cg, cols);
        std::fill_n(d + (lead + cols) * cg, (used - lead - cols) * cg, T(0));
      }
      continue;
    }
    const T* src = x + (n * a.H + h) * a.W * a.C + g0 * cg;
    for (int64_t w = 0; w < used; ++w) {
      const int64_t wi = w - a.pad_w;
      const bool in = wi >= 0 && wi < a.W;
      const T* s = src + wi * a.C;
      T* d = dst + w * cg;
      if (cg % V::W == 0) {
        for (int64_t g = 0; g < g1 - g0; ++g, s += cg, d += per)
          for (int64_t c = 0; c < cg; c += V::W) (in ? V::load(s + c) : V::zero()).store(d + c);
        continue;
      }
      for (int64_t g = 0; g < g1 - g0; ++g)
        for_vectors<V::W>(0, cg, [&](int64_t c, int64_t len) {
          st(d + g * per + c, in ? ld<V>(s + g * cg + c, len) : V::zero(), len);
        });
    }
  }
}

// Blocks of up to `block` output rows in [r0, r1) that stay within one image, from row0 on: the
// end of the one at row0.
inline int64_t group_block_end(const ConvArgs& a, int64_t row0, int64_t r1, int64_t block) {
  return imin(imin(row0 + block, r1), (row0 / a.P + 1) * a.P);
}

// gb[k] += gy[m][k] for the output pixels m of rows [r0, r1), channels [k0, k1): the bias
// gradient of the groups a weight-gradient call takes.
template <typename T>
inline void group_bias_grad(const ConvArgs& a, const T* gy, int64_t r0, int64_t r1, int64_t k0,
                            int64_t k1, T* gb) {
  using V = Vec<T>;
  for (int64_t m = r0 * a.Q; m < r1 * a.Q; ++m)
    for_vectors<V::W>(k0, k1, [&](int64_t k, int64_t len) {
      st(gb + k, ld<V>(gb + k, len) + ld<V>(gy + m * a.K + k, len), len);
    });
}

// Prefetches (into L2) the lines of groups [g0, g1) in the input rows of the block of output
// rows [row0, row1) (group_input_rows' rows), and with gy (else null) the block's output
// gradient: the next block while this one computes. The kernels read x a group at a time, lines
// a pixel apart, which the hardware prefetchers do not follow across pages: the copies had waited
// on memory for a quarter of the time.
template <typename T>
inline void prefetch_block(const ConvArgs& a, const T* x, const T* gy, int64_t row0, int64_t row1,
                           int64_t g0, int64_t g1) {
  constexpr int64_t kLine = 64 / sizeof(T);
  if (row0 >= row1) return;
  const int64_t cg = a.C / a.groups, kg = a.K / a.groups;
  const auto lines = [&](const T* p, int64_t pixels, int64_t stride, int64_t c0, int64_t c1) {
    for (int64_t i = 0; i < pixels; ++i) {
      for (int64_t c = c0; c < c1; c += kLine) __builtin_prefetch(p + i * stride + c, 0, 2);
      __builtin_prefetch(p + i * stride + c1 - 1, 0, 2);
    }
  };
  const int64_t n = row0 / a.P, h0 = row0 % a.P * a.stride_h - a.pad_h;
  const int64_t nh = group_input_row_count(a, row1 - row0);
  if (a.x_nchw) {  // each channel's rows in one run
    const int64_t lo = h0 > 0 ? h0 : 0, hi = imin(h0 + nh, a.H);
    if (lo < hi)
      lines(x + ((n * a.C + g0 * cg) * a.H + lo) * a.W, (g1 - g0) * cg, a.H * a.W, 0,
            (hi - lo) * a.W);
  } else {
    for (int64_t i = 0; i < nh; ++i)
      if (h0 + i >= 0 && h0 + i < a.H)
        lines(x + (n * a.H + h0 + i) * a.W * a.C, a.W, a.C, g0 * cg, g1 * cg);
  }
  if (gy != nullptr) lines(gy + row0 * a.Q * a.K, (row1 - row0) * a.Q, a.K, g0 * kg, g1 * kg);
}

// kRows output rows from `row` (a pair where their tap rows are consecutive in `rows`), kP
// pixels each from column q0, of vectors [v0, v0 + kTV) of group g's output channels: the sums
// over the taps and the group's input channels of the broadcast input times the weight vectors
// (w (groups, kNV / kTV, R, S, cg, kTV W): each slice of kTV vectors apart, its weight in one
// run), from the rows' input rows (group_input_rows; rows: the first one's tap row 0). kLean
// (channels_last outputs of Vec<T>): stored from the registers; else the pixels inside the row
// into the group's block of outputs for the epilogue (group_forward_walk), `out` at the first
// one's channel 0 (kg channels a pixel, Q pixels a row). kXs: the distance between a row's pixels
// in the rows, stride_w cg, where it is kg (stride 1, as many channels in as out: ResNeXt's), else
// 0 (read at run time). The broadcasts then address one pointer a row at constant offsets: at run
// time each took a pointer of its own, and on AVX2 (16 general registers) 7 pixels' pointers were
// reloaded from the stack at every step (32 x 256 x 28 x 28 in 32 groups on a Zen 3, alternating
// processes: 13.5-15.1 -> 12.7-14.2 ms; 512 x 14 x 14: 12.0-13.4 -> 9.8-10.1).
template <typename T, typename G, int kTV, int kP, int kRows, int kXs, bool kLean>
inline void group_fwd_tile(const ConvArgs& a, const ConvEpilogue& e, const T* rows, const T* w,
                           int64_t row, int64_t q0, int64_t g, int64_t v0, T* out) {
  using V = typename G::V;
  constexpr int kW = V::W, kN = kRows * kP;
  constexpr int64_t kg = G::kNV * kW, kSW = kTV * kW;
  const int64_t cg = a.C / a.groups, width = group_row_width(a);
  const int64_t xs = kXs > 0 ? kXs : a.stride_w * cg, next = a.stride_h * width * cg;
  V acc[kTV][kN];
  // Unrolled: as a loop GCC made it a memset of acc in memory (rep stos, ~5% of the tile's time
  // out of line).
#pragma GCC unroll 32
  for (int i = 0; i < kN; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < kTV; ++v) acc[v][i] = V::zero();
  // Undilated, a tap row's S taps read S cg consecutive elements from each pixel's first: one
  // run of (s, c) (longer inner loops, the same pointers).
  const int64_t runs = a.dil_w == 1 ? 1 : a.S, len = a.dil_w == 1 ? a.S * cg : cg;
  for (int64_t r = 0; r < a.R; ++r) {
    if (kRows == 1 && !tap_row_inside(a, row, r)) continue;
    for (int64_t s = 0; s < runs; ++s) {
      const T* xb = rows + (r * a.dil_h * width + q0 * a.stride_w + s * a.dil_w) * cg;
      const T* wb = w + (((g * G::kNV + v0) / kTV * a.R + r) * a.S + s) * cg * kSW;
      for (int64_t j = 0; j < len; ++j) {
        V wv[kTV];
        for (int v = 0; v < kTV; ++v) wv[v] = V::load(wb + j * kSW + v * kW);
        for (int b = 0; b < kRows; ++b)
          for (int i = 0; i < kP; ++i) {
            const V xv = V::set1(xb[b * next + i * xs + j]);
            for (int v = 0; v < kTV; ++v) acc[v][b * kP + i] = fma(xv, wv[v], acc[v][b * kP + i]);
          }
      }
    }
  }
  // Channels_last: stored from the registers (through epilogue_rows, one call a tile, its
  // per-pixel work had been ~20% of a ResNeXt forward in groups of 8 channels on AVX2). Not for
  // AVX-512's eight-lane vectors, which have no epilogue of their own.
  const int64_t nq = imin(kP, a.Q - q0);
  if constexpr (kLean) {
    const T* bias = static_cast<const T*>(e.bias);
    for (int b = 0; b < kRows; ++b) {
      const int64_t base = OutPixel(a, (row + b) * a.Q + q0).out_offset(a);
      for (int v = 0; v < kTV; ++v) {
        // A copy: acc itself passed by address had been zeroed in memory (rep stos) per tile.
        V pixels[kP];
        for (int i = 0; i < kP; ++i) pixels[i] = acc[v][b * kP + i];
        const int64_t k = g * kg + (v0 + v) * kW;
        store_pixels<T>(a, e, pixels, nq, base, k, kW,
                        bias != nullptr ? V::load(bias + k) : V::zero());
      }
    }
  } else {
    for (int b = 0; b < kRows; ++b)
      for (int i = 0; i < nq; ++i)
        for (int v = 0; v < kTV; ++v)
          acc[v][b * kP + i].store(out + (b * a.Q + i) * kg + (v0 + v) * kW);
  }
}

// group_fwd_tile out of line, for the tiles of one of a group's several vectors: inlined in
// conv_grouped_bcast_fwd, GCC kept one of the 14 accumulators of 16-channel groups' tiles on the
// stack (a store-forwarded chain, half of the forward's samples). Their taps take S cg >= 48
// steps a tap row, against which the call is small; the 8-channel groups' tiles (24 steps) stay
// inline, ~10% faster than out of line.
template <typename T, typename G, int kTV, int kP, int kRows, int kXs, bool kLean>
__attribute__((noinline)) void group_fwd_tile_outlined(const ConvArgs& a, const ConvEpilogue& e,
                                                       const T* rows, const T* w, int64_t row,
                                                       int64_t q0, int64_t g, int64_t v0, T* out) {
  group_fwd_tile<T, G, kTV, kP, kRows, kXs, kLean>(a, e, rows, w, row, q0, g, v0, out);
}

// group_fwd_tile of G's kSlice vectors from v0 (out of line where fewer than kNV) for a tile of
// nr rows (2 only where kSlicePairs) and np pixels a row (kSlicePixels or half that), dense as
// its kXs.
template <typename T, typename G, bool kLean>
inline void group_fwd_tiles(const ConvArgs& a, const ConvEpilogue& e, const T* rows, const T* w,
                            int64_t row, int64_t nr, int64_t q0, int64_t np, int64_t g, int64_t v0,
                            bool dense, T* out) {
  constexpr int kTV = G::kSlice, kP = G::kSlicePixels, kH = (kP + 1) / 2;
  constexpr int kXs = G::kNV * G::V::W;
  const auto run = [&]<int kN, int kRows>() {
    if constexpr (kTV < G::kNV) {
      if (dense)
        return group_fwd_tile_outlined<T, G, kTV, kN, kRows, kXs, kLean>(a, e, rows, w, row, q0, g,
                                                                         v0, out);
      return group_fwd_tile_outlined<T, G, kTV, kN, kRows, 0, kLean>(a, e, rows, w, row, q0, g, v0,
                                                                     out);
    } else {
      if (dense)
        return group_fwd_tile<T, G, kTV, kN, kRows, kXs, kLean>(a, e, rows, w, row, q0, g, v0, out);
      return group_fwd_tile<T, G, kTV, kN, kRows, 0, kLean>(a, e, rows, w, row, q0, g, v0, out);
    }
  };
  if constexpr (G::kSlicePairs) {
    if (nr == 2) return run.template operator()<kH, 2>();
  }
  if (np == kP) return run.template operator()<kP, 1>();
  run.template operator()<kH, 1>();
}

// Rows [c0, c0 + kC), vectors [v0, v0 + kNV) of the weight gradient of group g at tap (r, s),
// part (groups, R, S, cg, kg) (DirectParamsFn): += x (broadcast, from the input rows of output
// rows [row0, row0 + nb), group_input_rows) times gy (the group's, group_gy_rows).
template <typename T, typename G, int kC, int kNV>
inline void group_params_tile(const ConvArgs& a, const T* rows, const T* gy, int64_t row0,
                              int64_t nb, int64_t g, int64_t r, int64_t s, int64_t c0, int64_t v0,
                              T* part) {
  using V = typename G::V;
  constexpr int kW = V::W;
  constexpr int64_t kg = G::kNV * kW;
  const int64_t cg = a.C / a.groups, width = group_row_width(a);
  const int64_t xs = a.stride_w * cg;
  T* pp = part + (((g * a.R + r) * a.S + s) * cg + c0) * kg + v0 * kW;
  V acc[kC][kNV];
  for (int i = 0; i < kC; ++i)
    for (int v = 0; v < kNV; ++v) acc[i][v] = V::load(pp + i * kg + v * kW);
  for (int64_t b = 0; b < nb; ++b) {
    if (!tap_row_inside(a, row0 + b, r)) continue;
    const T* xb = rows + ((b * a.stride_h + r * a.dil_h) * width + s * a.dil_w) * cg + c0;
    const T* gb = gy + b * a.Q * kg + v0 * kW;
    for (int64_t q = 0; q < a.Q; ++q) {
      V gv[kNV];
      for (int v = 0; v < kNV; ++v) gv[v] = V::load(gb + q * kg + v * kW);
      for (int i = 0; i < kC; ++i) {
        const V xv = V::set1(xb[q * xs + i]);
        for (int v = 0; v < kNV; ++v) acc[i][v] = fma(xv, gv[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < kC; ++i)
    for (int v = 0; v < kNV; ++v) acc[i][v].store(pp + i * kg + v * kW);
}

// Calls f(row0, row1, g0, g1) for the blocks [row0, row1) of group_block_rows output rows of
// one image in [r0, r1) and in each block for the chunks [g0, g1) of group_chunk groups in
// [c0, c1), in that order, each after prefetching into L2 the next one's input rows (and output
// gradient, gy not null): a chunk's lines a chunk ahead, rather than a whole block's a block
// ahead beside that block's input, output and copies (over half of a Zen 3's 512 KiB L2 for
// 256 channels of 28 x 28). On the Zen 3 neither prefetch measured any faster than none; the
// copies still spend ~15% of a ResNeXt forward (32 groups of 8 channels) waiting on their loads
// of x, about as much with x in L2 and L3 (one image) as from memory.
template <typename T, typename F>
inline void for_group_chunks(const ConvArgs& a, const T* x, const T* gy, int64_t r0, int64_t r1,
                             int64_t c0, int64_t c1, F&& f) {
  const int64_t block = group_block_rows(a, sizeof(T)), chunk = group_chunk(a, sizeof(T));
  for (int64_t row0 = r0, row1; row0 < r1; row0 = row1) {
    row1 = group_block_end(a, row0, r1, block);
    for (int64_t g0 = c0; g0 < c1; g0 += chunk) {
      const int64_t g1 = imin(c1, g0 + chunk);
      if (g1 < c1)
        prefetch_block<T>(a, x, gy, row0, row1, g1, imin(c1, g1 + chunk));
      else
        prefetch_block<T>(a, x, gy, row1, group_block_end(a, row1, r1, block), c0,
                          imin(c1, c0 + chunk));
      f(row0, row1, g0, g1);
    }
  }
}

// The forward walk of the broadcast kernels over output rows [r0, r1) by for_group_chunks: per
// chunk of groups the block's input rows copied zero-padded (group_input_rows), then per group,
// slice v of its output vectors (v < slices) and row tiles of np pixels: np = full, or half that
// for the row's last pixels where as few are left (a tile's n kNV accumulators are as many FMA
// chains, and fewer than 8 (4 cycles' latency x 2 FMA units) leave the units idle: full tiles
// with a short one at the end compute the fewest pixels past the row at little more than the
// cost of half tiles), in pairs of rows (nr = 2) where `pairs` and a row fits in half a tile.
// tile(row, nr, q0, np, g, v, row's tap row 0 in the group's copy, out) stores the tile (lean),
// else puts it at out in the group's block of outputs (Q kg a row, in the scratch after the
// rows, where the weight gradient copies gy), which then takes the epilogue at once: NCHW
// outputs transposed 16 pixels at a time, not a tile's 2 to 14 (the epilogue of 2-pixel tiles
// had been ~40% of a 32 x 1024 x 7 x 7 forward in 32 groups on a Zen 3).
template <typename T, typename Tile>
inline void group_forward_walk(const ConvArgs& a, const T* x, const ConvEpilogue& e, int64_t r0,
                               int64_t r1, int64_t full, int64_t slices, bool pairs, bool lean,
                               T* rows, Tile&& tile) {
  const int64_t kg = a.K / a.groups, row_elems = group_row_width(a) * (a.C / a.groups);
  const int64_t per = group_rows_elems(a, sizeof(T)), half = (full + 1) / 2;
  const int64_t step = pairs && a.Q <= half ? 2 : 1;
  T* block = rows + group_chunk(a, sizeof(T)) * per;
  ConvEpilogue eb = e;
  eb.acc = block;
  for_group_chunks<T>(
      a, x, nullptr, r0, r1, 0, a.groups, [&](int64_t row0, int64_t row1, int64_t g0, int64_t g1) {
        group_input_rows<T>(a, x, row0, row1 - row0, g0, g1, rows);
        for (int64_t g = g0; g < g1; ++g) {
          for (int64_t v = 0; v < slices; ++v)
            for (int64_t row = row0, nr; row < row1; row += nr) {
              nr = imin(step, row1 - row);
              const T* taps = rows + (g - g0) * per + (row - row0) * a.stride_h * row_elems;
              for (int64_t q0 = 0, np; q0 < a.Q; q0 += np) {
                np = a.Q - q0 <= half ? half : full;
                tile(row, nr, q0, np, g, v, taps, block + ((row - row0) * a.Q + q0) * kg);
              }
            }
          if (!lean) epilogue_rows<T>(a, eb, row0 * a.Q, (row1 - row0) * a.Q, g);
        }
      });
}

// The output gradient of output rows [row0, row0 + nb) for groups [g0, g1) into dst, group g's
// group_gy_elems from (g - g0) times that on, (nb Q, kg).
template <typename T>
void group_gy_rows(const ConvArgs& a, const T* gy, int64_t row0, int64_t nb, int64_t g0, int64_t g1,
                   T* dst) {
  using V = Vec<T>;
  const int64_t kg = a.K / a.groups, per = group_gy_elems(a, sizeof(T));
  for (int64_t m = 0; m < nb * a.Q; ++m) {
    const T* s = gy + (row0 * a.Q + m) * a.K + g0 * kg;
    T* d = dst + m * kg;
    for (int64_t g = 0; g < g1 - g0; ++g, s += kg, d += per)
      for_vectors<V::W>(0, kg, [&](int64_t k, int64_t len) { st(d + k, ld<V>(s + k, len), len); });
  }
}

// The weight-gradient walk over output rows [r0, r1) and groups [g0, g1) by for_group_chunks:
// per chunk of groups the block's input rows (group_input_rows) and output gradient
// (group_gy_rows, after the rows in `rows`: read straight from gy, a group's vectors of a
// block's pixels, K elements apart, fell in few of L1's sets), then per group tap(row0, nb, g,
// the group's input rows, its output gradient, r, s) for every tap.
template <typename T, typename Tap>
inline void group_params_walk(const ConvArgs& a, const T* x, const T* gy, int64_t r0, int64_t r1,
                              int64_t g0, int64_t g1, T* rows, Tap&& tap) {
  const int64_t per = group_rows_elems(a, sizeof(T)), gper = group_gy_elems(a, sizeof(T));
  T* gys = rows + group_chunk(a, sizeof(T)) * per;
  for_group_chunks<T>(
      a, x, gy, r0, r1, g0, g1, [&](int64_t row0, int64_t row1, int64_t c0, int64_t c1) {
        group_input_rows<T>(a, x, row0, row1 - row0, c0, c1, rows);
        group_gy_rows<T>(a, gy, row0, row1 - row0, c0, c1, gys);
        for (int64_t g = c0; g < c1; ++g)
          for (int64_t r = 0; r < a.R; ++r)
            for (int64_t s = 0; s < a.S; ++s)
              tap(row0, row1 - row0, g, rows + (g - c0) * per, gys + (g - c0) * gper, r, s);
      });
}

#if FASTDL_VEC == 512
// Pairs of groups of 8 channels in and out (AVX-512, float32): a vector spans groups 2h and
// 2h + 1 (lanes 0-7 the first's output channels, 8-15 the second's), and input channel c
// reaches its lanes by a permute of the pixel's 16 input channels (VecF::spread_halves: lanes
// 0-7 take channel c, 8-15 channel 8 + c), so no channel of the other group enters a sum. The
// plain kernel spent a broadcast load on every 8-lane FMA, at ~a quarter of the FMA peak. a2:
// the conv with groups / 2 (pairs) groups; w (pairs, R, S, 8, 16); the pixels inside the row to
// out, 16 floats apart.
template <int kP>
inline void pair_fwd_tile(const ConvArgs& a2, const float* rows, const float* w, int64_t row,
                          int64_t q0, int64_t h, float* out) {
  const int64_t width = group_row_width(a2), xs = a2.stride_w * 16;
  VecF acc[kP];
  for (int i = 0; i < kP; ++i) acc[i] = VecF::zero();
  for (int64_t r = 0; r < a2.R; ++r) {
    if (!tap_row_inside(a2, row, r)) continue;
    for (int64_t s = 0; s < a2.S; ++s) {
      const float* xb = rows + (r * a2.dil_h * width + q0 * a2.stride_w + s * a2.dil_w) * 16;
      const float* wb = w + ((h * a2.R + r) * a2.S + s) * 8 * 16;
      VecF xv[kP];
      for (int i = 0; i < kP; ++i) xv[i] = VecF::load(xb + i * xs);
      for (int c = 0; c < 8; ++c) {
        const VecF wv = VecF::load(wb + c * 16);
        for (int i = 0; i < kP; ++i) acc[i] = fma(xv[i].spread_halves(c), wv, acc[i]);
      }
    }
  }
  // A test in the unrolled loop, not a run-time bound: GCC had kept acc in memory for it.
  const int64_t nq = imin(kP, a2.Q - q0);
#pragma GCC unroll 16
  for (int i = 0; i < kP; ++i)
    if (i < nq) acc[i].store(out + i * 16);
}

// The pairs' weight gradient at tap (r, s): part (pairs, R, S, 8, 16) += the spread inputs
// times gy (the pair's, group_gy_rows) over the input rows of output rows [row0, row0 + nb)
// (group_input_rows).
inline void pair_params_tap(const ConvArgs& a2, const float* rows, const float* gy, int64_t row0,
                            int64_t nb, int64_t h, int64_t r, int64_t s, float* part) {
  const int64_t width = group_row_width(a2), xs = a2.stride_w * 16;
  float* pp = part + ((h * a2.R + r) * a2.S + s) * 8 * 16;
  VecF acc[8];
  for (int c = 0; c < 8; ++c) acc[c] = VecF::load(pp + c * 16);
  for (int64_t b = 0; b < nb; ++b) {
    if (!tap_row_inside(a2, row0 + b, r)) continue;
    const float* xb = rows + ((b * a2.stride_h + r * a2.dil_h) * width + s * a2.dil_w) * 16;
    const float* gb = gy + b * a2.Q * 16;
    for (int64_t q = 0; q < a2.Q; ++q) {
      const VecF gv = VecF::load(gb + q * 16), xv = VecF::load(xb + q * xs);
      for (int c = 0; c < 8; ++c) acc[c] = fma(xv.spread_halves(c), gv, acc[c]);
    }
  }
  for (int c = 0; c < 8; ++c) acc[c].store(pp + c * 16);
}
#endif

}  // namespace conv_detail

#if FASTDL_VEC == 512
// conv_grouped_bcast_fwd's convs with groups of 8 in and 8 out, an even number of them, in pairs
// (pair_fwd_tile); float32, AVX-512 only (elsewhere the table holds null). The weight as
// (groups / 2, R, S, 8, 16): [h][r][s][c][8 j + k] = w[(2 h + j) 8 + k][c][r][s].
void conv_grouped_pairs_fwd(const ConvArgs& a, const void* x_, const void* w_,
                            const ConvEpilogue& e_, int64_t r0, int64_t r1, void* scratch) {
  constexpr int kP = 14;
  const float* w = static_cast<const float*>(w_);
  ConvArgs a2 = a;
  a2.groups = a.groups / 2;
  ConvEpilogue et = e_;
  et.stream = e_.stream && a.out_sk == 1 && !e_.bf16;  // whole lines of 16 floats
  float* rows = static_cast<float*>(scratch);
  conv_detail::group_forward_walk<float>(
      a2, static_cast<const float*>(x_), et, r0, r1, kP, 1, false, false, rows,
      [&](int64_t row, int64_t, int64_t q0, int64_t np, int64_t h, int64_t, const float* taps,
          float* out) {
        if (np == kP)
          conv_detail::pair_fwd_tile<kP>(a2, taps, w, row, q0, h, out);
        else
          conv_detail::pair_fwd_tile<(kP + 1) / 2>(a2, taps, w, row, q0, h, out);
      });
  if (et.stream) VecF::fence();
}

// Weight and bias gradients of conv_grouped_pairs_fwd's convs: part (groups / 2, R, S, 8, 16)
// as its weight, and the bias row (K), as DirectParamsFn.
void conv_grouped_pairs_bwd_params(const ConvArgs& a, const void* x_, const void* gy_, void* part_,
                                   int64_t r0, int64_t r1, int64_t h0, int64_t h1, void* scratch) {
  const float* gy = static_cast<const float*>(gy_);
  float* part = static_cast<float*>(part_);
  float* rows = static_cast<float*>(scratch);
  ConvArgs a2 = a;
  a2.groups = a.groups / 2;
  conv_detail::group_bias_grad<float>(a, gy, r0, r1, h0 * 16, h1 * 16, part + a.R * a.S * 8 * a.K);
  if (x_ == nullptr) return;
  conv_detail::group_params_walk<float>(
      a2, static_cast<const float*>(x_), gy, r0, r1, h0, h1, rows,
      [&](int64_t row0, int64_t nb, int64_t h, const float* taps, const float* gys, int64_t r,
          int64_t s) { conv_detail::pair_params_tap(a2, taps, gys, row0, nb, h, r, s, part); });
}
constexpr GroupedFwdFn kGroupedPairsFwd = conv_grouped_pairs_fwd;
constexpr DirectParamsFn kGroupedPairsBwdParams = conv_grouped_pairs_bwd_params;
#else
constexpr GroupedFwdFn kGroupedPairsFwd = nullptr;
constexpr DirectParamsFn kGroupedPairsBwdParams = nullptr;
#endif

// The output channels of conv_grouped_bcast_fwd's tiles for groups of kg output channels
// (GroupedSliceFn): its weight's sw, GroupShape's kSlice vectors. A slice's weight in one run: the
// 32-channel groups' slices of 8 (AVX2) had read a 32-byte quarter of every 128-byte weight row,
// ~8% slower (32 x 1024 x 7 x 7 on a Zen 3).
template <typename T>
int64_t conv_grouped_bcast_slice(int64_t kg) {
  int64_t sw = kg;
  conv_detail::group_dispatch<T>(sw, [&](auto shape) {
    using G = decltype(shape);
    sw = G::kSlice * G::V::W;
  });
  return sw;
}

// Grouped conv whose groups have kg = K / groups output channels, a multiple of 8 up to 32 (any
// input width cg), on NHWC x (NCHW: a.x_nchw), output rows (n, p) in [r0, r1) by
// group_forward_walk: tiles of GroupShape's kSlice vectors by group_fwd_tile, stored from the
// registers where the output is channels_last of vectors of Vec<T>, else through the epilogue a
// block at a time. Each weight load serves a tile's pixels, each broadcast one to four vectors
// of output channels.
template <typename T>
void conv_grouped_bcast_fwd(const ConvArgs& a, const void* x_, const void* w_,
                            const ConvEpilogue& e_, int64_t r0, int64_t r1, void* scratch) {
  const T* x = static_cast<const T*>(x_);
  const T* w = static_cast<const T*>(w_);
  T* rows = static_cast<T*>(scratch);
  const int64_t kg = a.K / a.groups;
  // Streamed only where a group's outputs fill whole lines of channels_last (the other writes
  // of a line come groups later).
  ConvEpilogue et = e_;
  et.stream = e_.stream && a.out_sk == 1 && kg * (e_.bf16 ? 2 : int64_t(sizeof(T))) % 64 == 0;
  conv_detail::group_dispatch<T>(kg, [&](auto shape) {
    using G = decltype(shape);
    const bool dense = a.stride_w * (a.C / a.groups) == G::kNV * G::V::W;
    const auto walk = [&]<bool kLean>() {
      conv_detail::group_forward_walk<T>(
          a, x, et, r0, r1, G::kSlicePixels, G::kNV / G::kSlice, G::kSlicePairs, kLean, rows,
          [&](int64_t row, int64_t nr, int64_t q0, int64_t np, int64_t g, int64_t v, const T* taps,
              T* out) {
            conv_detail::group_fwd_tiles<T, G, kLean>(a, et, taps, w, row, nr, q0, np, g,
                                                      v * G::kSlice, dense, out);
          });
    };
    // Stored from the registers: channels_last, vectors of Vec<T> (store_pixels').
    if constexpr (G::V::W == Vec<T>::W) {
      if (a.out_sk == 1) return walk.template operator()<true>();
    }
    walk.template operator()<false>();
  });
  if (et.stream) Vec<T>::fence();
}

// Weight and bias gradients of conv_grouped_bcast_fwd's convs, output rows (n, p) in [r0, r1):
// part (groups, R, S, cg, kg) and the bias row (K) as DirectParamsFn; blocks of
// group_block_rows rows by group_params_walk, per tap and kParamVectors of the group's output
// vectors tiles of kChannels input channels (then one at a time for the rest) summed over the
// block's pixels.
template <typename T>
void conv_grouped_bcast_bwd_params(const ConvArgs& a, const void* x_, const void* gy_, void* part_,
                                   int64_t r0, int64_t r1, int64_t g0, int64_t g1, void* scratch) {
  const T* gy = static_cast<const T*>(gy_);
  T* part = static_cast<T*>(part_);
  T* rows = static_cast<T*>(scratch);
  const int64_t cg = a.C / a.groups, kg = a.K / a.groups;
  conv_detail::group_bias_grad<T>(a, gy, r0, r1, g0 * kg, g1 * kg, part + a.R * a.S * cg * a.K);
  if (x_ == nullptr) return;
  conv_detail::group_dispatch<T>(kg, [&](auto shape) {
    using G = decltype(shape);
    conv_detail::group_params_walk<T>(a, static_cast<const T*>(x_), gy, r0, r1, g0, g1, rows,
                                      [&](int64_t row0, int64_t nb, int64_t g, const T* taps,
                                          const T* gys, int64_t r, int64_t s) {
                                        constexpr int kC = G::kChannels, kTV = G::kParamVectors;
                                        for (int64_t v0 = 0; v0 < G::kNV; v0 += kTV) {
                                          int64_t c = 0;
                                          for (; c + kC <= cg; c += kC)
                                            conv_detail::group_params_tile<T, G, kC, kTV>(
                                                a, taps, gys, row0, nb, g, r, s, c, v0, part);
                                          for (; c < cg; ++c)
                                            conv_detail::group_params_tile<T, G, 1, kTV>(
                                                a, taps, gys, row0, nb, g, r, s, c, v0, part);
                                        }
                                      });
  });
}
