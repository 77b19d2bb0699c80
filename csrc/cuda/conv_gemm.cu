// Implicit-GEMM convolution (the im2col GEMM of Chellapilla et al. 2006 without materializing
// im2col, as in cuDNN's IMPLICIT_GEMM and CUTLASS's conv2d fprop/dgrad/wgrad iterators); contract
// in conv.cuh. Per group, each pass is a GEMM C = A * B whose operands are gathered from NHWC
// activations on the fly, the reduction index being a filter tap (r, s) and a channel:
// - fprop: C[(n, p, q)][k] = sum over (r, s, c) of x at (p * stride - pad + r * dil, ...) times
//   weight[k][(r, s, c)];
// - dgrad: C[(n, h, w)][c] = sum over (r, s, k) of grad at ((h + pad - r * dil) / stride, ...),
//   zero where that does not divide exactly, times weight[c][(r, s, k)];
// - wgrad: C[k][(r, s, c)] = sum over output pixels (n, p, q) of grad[.][k] times the x patch;
//   the long reduction is split in fixed chunks (float32 partials summed in a fixed order).
// Block tile 128 x 64, 4 warps of 64 x 32, 64-byte reduction slices double-buffered in shared
// memory: the next slice's global loads are in flight while the current one is multiplied
// (register staging, one barrier per slice). Every load is one 16-byte vector when the channel
// counts and pointers allow it (C / G, K / G multiples of 8 halves / 4 floats), else per element.
// float16/bfloat16 multiply on tensor cores (mma.sync m16n8k16, float32 accumulation); float32
// uses FMA on the same tiles (8 x 8 outputs per thread) to stay within 1e-5 of float64 (TF32
// would not). The epilogue (bias, residual, activation, strided NCHW or NHWC stores) is applied to
// the accumulators before they leave registers.
#include "conv_common.cuh"

namespace fastdl::cuda {
namespace {

using namespace conv_detail;
using detail::Vec;

constexpr int kThreads = 128;
constexpr int kBM = 128, kBN = 64;       // block tile
constexpr int kWarpM = 64, kWarpN = 32;  // warp tile: 2 x 2 warps

template <typename T>
struct Tile {
  static constexpr int L = 16 / int(sizeof(T));   // elements of one 16-byte vector
  static constexpr int BK = 64 / int(sizeof(T));  // reduction slice: 4 vectors per row
  // 80-byte rows keep vectors aligned and make the fragment reads of 8 rows x 4 lanes hit 32
  // distinct banks (row * 20 + lane words mod 32).
  static constexpr int PITCH = BK + L;
  static constexpr int A_VECS = kBM * BK / L / kThreads;  // 4
  static constexpr int B_VECS = kBN * BK / L / kThreads;  // 2
};

enum class Mode { kFprop, kDgrad, kWgrad };

// ConvShape in int (the bind layer checks that every size fits), with the group sizes.
struct Geo {
  int64_t N;
  int C, H, W, K, R, S, P, Q, sh, sw, ph, pw, dh, dw, G, cg, kg;
};

struct GemmArgs {
  Geo g;
  int64_t m_size, k_size;  // GEMM rows; reduction length per group
  int64_t chunk;           // reduction elements per split (a multiple of BK)
  int64_t m_tiles, tiles;  // tiles: m_tiles * n_tiles * groups * splits
  int n_size, n_tiles;     // GEMM columns per group
  bool vec_a, vec_b;       // 16-byte loads of A / B are valid
  ConvFpropParams fp;
  ConvDgradParams dp;
  ConvWgradParams wp;
  float* partial;
};

template <typename T>
__device__ __forceinline__ Vec<T> zero_vec() {
  Vec<T> v;
#pragma unroll
  for (int e = 0; e < Vec<T>::N; ++e) v.v[e] = from_float<T>(0.f);
  return v;
}

template <typename T>
__device__ __forceinline__ Vec<T> ld_vec(const T* p) {
  return *reinterpret_cast<const Vec<T>*>(p);
}

// A filter tap (r, s) and channel of reduction index kk = (r * S + s) * cpt + c.
struct Tap {
  int r, s, c;
};

__device__ __forceinline__ Tap tap(int64_t kk, int cpt, int S) {
  const int rs = int(kk) / cpt;
  const int r = rs / S;
  return {r, rs - r * S, int(kk) - rs * cpt};
}

// Rows of a dense row-major matrix (rows of length k_size): the weight operand of fprop/dgrad.
template <typename T, int NV>
struct DenseRows {
  const T* base[NV];  // null past the last row
  __device__ __forceinline__ void init(const T* w, int64_t row0, int64_t rows, int64_t len) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int64_t row = row0 + threadIdx.x / 4 + 32 * i;
      base[i] = row < rows ? w + row * len : nullptr;
    }
  }
  __device__ __forceinline__ void load(int64_t kk, int64_t len, bool vec, Vec<T> (&r)[NV]) const {
    constexpr int L = Vec<T>::N;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      r[i] = zero_vec<T>();
      if (base[i] == nullptr) continue;
      if (vec) {
        if (kk < len) r[i] = ld_vec(base[i] + kk);
      } else {
#pragma unroll
        for (int e = 0; e < L; ++e)
          if (kk + e < len) r[i].v[e] = base[i][kk + e];
      }
    }
  }
};

// Per-thread gather state of one pass. A/B slots follow the smem store order of store_tile.
template <typename T, Mode MODE>
struct Operands;

template <typename T>
struct Operands<T, Mode::kFprop> {
  static constexpr int L = Tile<T>::L, NA = Tile<T>::A_VECS, NB = Tile<T>::B_VECS;
  const T* a_base[NA];  // x at this row's image and group; null past the last row
  int a_y0[NA], a_x0[NA];
  DenseRows<T, NB> b;

  __device__ __forceinline__ void init(const GemmArgs& a, int64_t m0, int64_t n0, int grp) {
    const Geo& g = a.g;
    const T* x = static_cast<const T*>(a.fp.x);
#pragma unroll
    for (int i = 0; i < NA; ++i) {
      const int64_t m = m0 + threadIdx.x / 4 + 32 * i;
      const Pixel px = pixel(m, g.P, g.Q);
      a_base[i] = m < a.m_size ? x + px.n * g.H * g.W * g.C + int64_t(grp) * g.cg : nullptr;
      a_y0[i] = px.y * g.sh - g.ph;
      a_x0[i] = px.x * g.sw - g.pw;
    }
    b.init(static_cast<const T*>(a.fp.weight) + int64_t(grp) * g.kg * a.k_size, n0, g.kg, a.k_size);
  }

  __device__ __forceinline__ T elem(const Geo& g, int i, const Tap& t) const {
    const int h = a_y0[i] + t.r * g.dh, w = a_x0[i] + t.s * g.dw;
    if (a_base[i] == nullptr || unsigned(h) >= unsigned(g.H) || unsigned(w) >= unsigned(g.W))
      return from_float<T>(0.f);
    return a_base[i][(int64_t(h) * g.W + w) * g.C + t.c];
  }

  __device__ __forceinline__ void load(const GemmArgs& a, int64_t k0, Vec<T> (&ra)[NA],
                                       Vec<T> (&rb)[NB]) const {
    const Geo& g = a.g;
    const int64_t kk = k0 + int(threadIdx.x % 4) * L;
    if (a.vec_a) {  // C / G % L == 0: the L channels share one tap and one aligned vector
      const Tap t = tap(kk, g.cg, g.S);
#pragma unroll
      for (int i = 0; i < NA; ++i) {
        const int h = a_y0[i] + t.r * g.dh, w = a_x0[i] + t.s * g.dw;
        const bool ok = kk < a.k_size && a_base[i] != nullptr && unsigned(h) < unsigned(g.H) &&
                        unsigned(w) < unsigned(g.W);
        ra[i] = ok ? ld_vec(a_base[i] + (int64_t(h) * g.W + w) * g.C + t.c) : zero_vec<T>();
      }
    } else {
#pragma unroll
      for (int i = 0; i < NA; ++i) ra[i] = zero_vec<T>();
      for (int e = 0; e < L && kk + e < a.k_size; ++e) {
        const Tap t = tap(kk + e, g.cg, g.S);
#pragma unroll
        for (int i = 0; i < NA; ++i) ra[i].v[e] = elem(g, i, t);
      }
    }
    b.load(kk, a.k_size, a.vec_b, rb);
  }
};

template <typename T>
struct Operands<T, Mode::kDgrad> {
  static constexpr int L = Tile<T>::L, NA = Tile<T>::A_VECS, NB = Tile<T>::B_VECS;
  const T* a_base[NA];     // grad at this pixel's image and group; null past the last row
  int a_y0[NA], a_x0[NA];  // h + pad, w + pad
  DenseRows<T, NB> b;

  __device__ __forceinline__ void init(const GemmArgs& a, int64_t m0, int64_t n0, int grp) {
    const Geo& g = a.g;
    const T* grad = static_cast<const T*>(a.dp.grad);
#pragma unroll
    for (int i = 0; i < NA; ++i) {
      const int64_t m = m0 + threadIdx.x / 4 + 32 * i;
      const Pixel px = pixel(m, g.H, g.W);
      a_base[i] = m < a.m_size ? grad + px.n * g.P * g.Q * g.K + int64_t(grp) * g.kg : nullptr;
      a_y0[i] = px.y + g.ph;
      a_x0[i] = px.x + g.pw;
    }
    b.init(static_cast<const T*>(a.dp.weight) + int64_t(grp) * g.cg * a.k_size, n0, g.cg, a.k_size);
  }

  // grad at the output pixel that tap t of input pixel i reads from, or 0 when the tap falls
  // between strides or outside the output.
  __device__ __forceinline__ int64_t offset(const Geo& g, int i, const Tap& t) const {
    int ty = a_y0[i] - t.r * g.dh, tx = a_x0[i] - t.s * g.dw;
    if (a_base[i] == nullptr || ty < 0 || tx < 0) return -1;
    if (g.sh > 1) {
      if (ty % g.sh != 0) return -1;
      ty /= g.sh;
    }
    if (g.sw > 1) {
      if (tx % g.sw != 0) return -1;
      tx /= g.sw;
    }
    if (ty >= g.P || tx >= g.Q) return -1;
    return (int64_t(ty) * g.Q + tx) * g.K + t.c;
  }

  __device__ __forceinline__ void load(const GemmArgs& a, int64_t k0, Vec<T> (&ra)[NA],
                                       Vec<T> (&rb)[NB]) const {
    const Geo& g = a.g;
    const int64_t kk = k0 + int(threadIdx.x % 4) * L;
    if (a.vec_a) {  // K / G % L == 0
      const Tap t = tap(kk, g.kg, g.S);
#pragma unroll
      for (int i = 0; i < NA; ++i) {
        const int64_t o = kk < a.k_size ? offset(g, i, t) : -1;
        ra[i] = o >= 0 ? ld_vec(a_base[i] + o) : zero_vec<T>();
      }
    } else {
#pragma unroll
      for (int i = 0; i < NA; ++i) ra[i] = zero_vec<T>();
      for (int e = 0; e < L && kk + e < a.k_size; ++e) {
        const Tap t = tap(kk + e, g.kg, g.S);
#pragma unroll
        for (int i = 0; i < NA; ++i) {
          const int64_t o = offset(g, i, t);
          if (o >= 0) ra[i].v[e] = a_base[i][o];
        }
      }
    }
    b.load(kk, a.k_size, a.vec_b, rb);
  }
};

// wgrad: rows k, columns j = (r, s, c), reduction over pixels m. Both operands are gathered as
// vectors along k / along c (contiguous in NHWC) and stored transposed into shared memory.
template <typename T>
struct Operands<T, Mode::kWgrad> {
  static constexpr int L = Tile<T>::L, BK = Tile<T>::BK;
  static constexpr int NA = Tile<T>::A_VECS, NB = Tile<T>::B_VECS;
  const T* a_base[NA];              // grad column k of this group; null past the last k
  int a_lim[NA];                    // valid k of the vector
  const T* xg;                      // x at this group's first channel
  int b_j[NB];                      // first column of the vector
  int b_c[NB], b_dy[NB], b_dx[NB];  // its channel and tap offsets (vector path)

  __device__ __forceinline__ void init(const GemmArgs& a, int64_t m0, int64_t n0, int grp) {
    const Geo& g = a.g;
    const T* grad = static_cast<const T*>(a.wp.grad);
    xg = static_cast<const T*>(a.wp.x) + int64_t(grp) * g.cg;
#pragma unroll
    for (int i = 0; i < NA; ++i) {
      const int k = int(m0) + (int(threadIdx.x) / BK + i * (kThreads / BK)) * L;
      a_base[i] = k < g.kg ? grad + int64_t(grp) * g.kg + k : nullptr;
      a_lim[i] = g.kg - k;
    }
#pragma unroll
    for (int i = 0; i < NB; ++i) {
      b_j[i] = int(n0) + (int(threadIdx.x) / BK + i * (kThreads / BK)) * L;
      const Tap t = tap(b_j[i], g.cg, g.S);
      b_c[i] = t.c;
      b_dy[i] = t.r * g.dh - g.ph;
      b_dx[i] = t.s * g.dw - g.pw;
    }
  }

  __device__ __forceinline__ void load(const GemmArgs& a, int64_t k0, Vec<T> (&ra)[NA],
                                       Vec<T> (&rb)[NB]) const {
    const Geo& g = a.g;
    const int64_t m = k0 + int(threadIdx.x) % BK;
#pragma unroll
    for (int i = 0; i < NA; ++i) ra[i] = zero_vec<T>();
#pragma unroll
    for (int i = 0; i < NB; ++i) rb[i] = zero_vec<T>();
    if (m >= a.k_size) return;
#pragma unroll
    for (int i = 0; i < NA; ++i) {
      if (a_base[i] == nullptr) continue;
      const T* p = a_base[i] + m * g.K;
      if (a.vec_a) {  // K / G % L == 0: all L columns valid
        ra[i] = ld_vec(p);
      } else {
#pragma unroll
        for (int e = 0; e < L; ++e)
          if (e < a_lim[i]) ra[i].v[e] = p[e];
      }
    }
    const Pixel px = pixel(m, g.P, g.Q);
    const int y0 = px.y * g.sh, x0 = px.x * g.sw;
    const T* img = xg + px.n * g.H * g.W * g.C;
#pragma unroll
    for (int i = 0; i < NB; ++i) {
      if (b_j[i] >= a.n_size) continue;
      if (a.vec_b) {  // C / G % L == 0: one tap, L channels
        const int h = y0 + b_dy[i], w = x0 + b_dx[i];
        if (unsigned(h) < unsigned(g.H) && unsigned(w) < unsigned(g.W))
          rb[i] = ld_vec(img + (int64_t(h) * g.W + w) * g.C + b_c[i]);
        continue;
      }
      for (int e = 0; e < L && b_j[i] + e < a.n_size; ++e) {
        const Tap t = tap(b_j[i] + e, g.cg, g.S);
        const int h = y0 + t.r * g.dh - g.ph, w = x0 + t.s * g.dw - g.pw;
        if (unsigned(h) < unsigned(g.H) && unsigned(w) < unsigned(g.W))
          rb[i].v[e] = img[(int64_t(h) * g.W + w) * g.C + t.c];
      }
    }
  }
};

// Stores staged vectors into a (ROWS x PITCH) shared tile. Along the reduction (fprop, dgrad):
// slot i is row tid / 4 + 32 i, columns (tid % 4) * L ... + L - 1, one 16-byte store. Transposed
// (wgrad): slot i covers rows (tid / BK + i * 128 / BK) * L ... + L - 1 of column tid % BK.
template <typename T, bool TRANS, int NV>
__device__ __forceinline__ void store_tile(T (*sm)[Tile<T>::PITCH], const Vec<T> (&r)[NV]) {
  constexpr int L = Tile<T>::L, BK = Tile<T>::BK;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    if constexpr (TRANS) {
      const int row = (int(threadIdx.x) / BK + i * (kThreads / BK)) * L, col = threadIdx.x % BK;
#pragma unroll
      for (int e = 0; e < L; ++e) sm[row + e][col] = r[i].v[e];
    } else {
      *reinterpret_cast<Vec<T>*>(&sm[threadIdx.x / 4 + 32 * i][(threadIdx.x % 4) * L]) = r[i];
    }
  }
}

__device__ __forceinline__ uint32_t lds32(const void* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

template <typename T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// Accumulators of a thread: 8 rows x 8 columns of its warp's 64 x 32 tile, acc[ri * 8 + ci].
// 16-bit types: the mma m16n8k16 layout (row gid (+8) of m-tile ri / 2, columns tig * 2 (+1) of
// n-tile ci / 2); float32: rows lr + 8 ri, columns lc + 4 ci.
template <typename T>
struct Frag {
  static constexpr bool kMma = sizeof(T) == 2;
  __device__ static int row(int ri) {
    const int lane = threadIdx.x % 32, wm0 = (int(threadIdx.x) / 32 % 2) * kWarpM;
    if constexpr (kMma) return wm0 + (ri >> 1) * 16 + (ri & 1) * 8 + lane / 4;
    return wm0 + lane / 4 + 8 * ri;
  }
  __device__ static int col(int ci) {
    const int lane = threadIdx.x % 32, wn0 = (int(threadIdx.x) / 64) * kWarpN;
    if constexpr (kMma) return wn0 + (ci >> 1) * 8 + (lane % 4) * 2 + (ci & 1);
    return wn0 + lane % 4 + 4 * ci;
  }
};

// acc += A_tile * B_tile^T for one BK slice (both tiles stored row-major along the reduction).
template <typename T>
__device__ __forceinline__ void multiply(const T (*sa)[Tile<T>::PITCH],
                                         const T (*sb)[Tile<T>::PITCH], float (&acc)[64]) {
  constexpr int BK = Tile<T>::BK;
  if constexpr (Frag<T>::kMma) {
    const int lane = threadIdx.x % 32, gid = lane / 4, k2 = (lane % 4) * 2;
    const int wm0 = Frag<T>::row(0) - gid, wn0 = (int(threadIdx.x) / 64) * kWarpN;
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      uint32_t b[4][2];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const T* p = &sb[wn0 + nt * 8 + gid][ks + k2];
        b[nt][0] = lds32(p);
        b[nt][1] = lds32(p + 8);
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const T* p = &sa[wm0 + mt * 16 + gid][ks + k2];
        const uint32_t a[4] = {lds32(p), lds32(p + 8 * Tile<T>::PITCH), lds32(p + 8),
                               lds32(p + 8 * Tile<T>::PITCH + 8)};
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          // Fragment (mt, nt) holds rows ri = 2 mt, 2 mt + 1 and columns ci = 2 nt, 2 nt + 1.
          float c[4] = {acc[(2 * mt) * 8 + 2 * nt], acc[(2 * mt) * 8 + 2 * nt + 1],
                        acc[(2 * mt + 1) * 8 + 2 * nt], acc[(2 * mt + 1) * 8 + 2 * nt + 1]};
          mma16816<T>(c, a, b[nt]);
          acc[(2 * mt) * 8 + 2 * nt] = c[0];
          acc[(2 * mt) * 8 + 2 * nt + 1] = c[1];
          acc[(2 * mt + 1) * 8 + 2 * nt] = c[2];
          acc[(2 * mt + 1) * 8 + 2 * nt + 1] = c[3];
        }
      }
    }
  } else {
    const int r0 = Frag<T>::row(0), c0 = Frag<T>::col(0);
#pragma unroll
    for (int k = 0; k < BK; k += 4) {
      float4 b[8];
#pragma unroll
      for (int ci = 0; ci < 8; ++ci) b[ci] = *reinterpret_cast<const float4*>(&sb[c0 + 4 * ci][k]);
#pragma unroll
      for (int ri = 0; ri < 8; ++ri) {
        const float4 a = *reinterpret_cast<const float4*>(&sa[r0 + 8 * ri][k]);
#pragma unroll
        for (int ci = 0; ci < 8; ++ci) {
          float& c = acc[ri * 8 + ci];
          c = fmaf(a.x, b[ci].x, c);
          c = fmaf(a.y, b[ci].y, c);
          c = fmaf(a.z, b[ci].z, c);
          c = fmaf(a.w, b[ci].w, c);
        }
      }
    }
  }
}

template <typename T, Mode MODE>
__device__ __forceinline__ void epilogue(const GemmArgs& a, int64_t m0, int64_t n0, int grp,
                                         int64_t split, const float (&acc)[64]) {
  const Geo& g = a.g;
#pragma unroll
  for (int ri = 0; ri < 8; ++ri) {
    const int64_t m = m0 + Frag<T>::row(ri);
    if (m >= a.m_size) continue;
    if constexpr (MODE == Mode::kWgrad) {
      float* out = a.partial + ((split * g.G + grp) * g.kg + m) * a.n_size;
#pragma unroll
      for (int ci = 0; ci < 8; ++ci) {
        const int64_t j = n0 + Frag<T>::col(ci);
        if (j < a.n_size) out[j] = acc[ri * 8 + ci];
      }
    } else {
      const Pixel px = MODE == Mode::kFprop ? pixel(m, g.P, g.Q) : pixel(m, g.H, g.W);
#pragma unroll
      for (int ci = 0; ci < 8; ++ci) {
        const int64_t n = n0 + Frag<T>::col(ci);
        if (n >= a.n_size) continue;
        if constexpr (MODE == Mode::kFprop)
          fprop_epilogue<T>(a.fp, px, int64_t(grp) * g.kg + n, acc[ri * 8 + ci]);
        else
          dgrad_epilogue<T>(a.dp, px, int64_t(grp) * g.cg + n, acc[ri * 8 + ci]);
      }
    }
  }
}

template <typename T, Mode MODE>
__global__ void __launch_bounds__(kThreads) implicit_gemm_kernel(const GemmArgs a) {
  using TL = Tile<T>;
  constexpr bool kTrans = MODE == Mode::kWgrad;
  __shared__ alignas(16) T sa[2][kBM][TL::PITCH];
  __shared__ alignas(16) T sb[2][kBN][TL::PITCH];
  const int64_t per_split = a.m_tiles * a.n_tiles * a.g.G;
  for (int64_t tile = blockIdx.x; tile < a.tiles; tile += gridDim.x) {
    // m-tiles fastest: neighbouring blocks share the B tile (the weight, in fprop/dgrad) in L2.
    const int64_t split = tile / per_split;
    int64_t rest = tile - split * per_split;
    const int grp = int(rest / (a.m_tiles * a.n_tiles));
    rest -= int64_t(grp) * a.m_tiles * a.n_tiles;
    const int64_t tn = rest / a.m_tiles, tm = rest - tn * a.m_tiles;
    const int64_t m0 = tm * kBM, n0 = tn * kBN;
    const int64_t kbeg = split * a.chunk, kend = std::min(a.k_size, kbeg + a.chunk);

    Operands<T, MODE> ops;
    ops.init(a, m0, n0, grp);
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;
    Vec<T> ra[TL::A_VECS], rb[TL::B_VECS];
    if (kbeg < kend) {
      ops.load(a, kbeg, ra, rb);
      store_tile<T, kTrans>(sa[0], ra);
      store_tile<T, kTrans>(sb[0], rb);
    }
    __syncthreads();
    int buf = 0;
    for (int64_t k0 = kbeg; k0 < kend; k0 += TL::BK) {
      const bool more = k0 + TL::BK < kend;
      if (more) ops.load(a, k0 + TL::BK, ra, rb);  // in flight during the multiply
      multiply<T>(sa[buf], sb[buf], acc);
      if (more) {
        store_tile<T, kTrans>(sa[buf ^ 1], ra);
        store_tile<T, kTrans>(sb[buf ^ 1], rb);
      }
      __syncthreads();
      buf ^= 1;
    }
    epilogue<T, MODE>(a, m0, n0, grp, split, acc);
  }
}

Geo geo(const ConvShape& s) {
  return {s.N,
          int(s.C),
          int(s.H),
          int(s.W),
          int(s.K),
          int(s.R),
          int(s.S),
          int(s.P),
          int(s.Q),
          int(s.stride_h),
          int(s.stride_w),
          int(s.pad_h),
          int(s.pad_w),
          int(s.dil_h),
          int(s.dil_w),
          int(s.groups),
          int(s.C / s.groups),
          int(s.K / s.groups)};
}

template <Mode MODE>
cudaError_t launch(GemmArgs a, DType dtype, const void* a_ptr, const void* b_ptr, int a_div,
                   cudaStream_t stream) {
  detail::dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int L = Tile<T>::L;
    a.vec_a = a_div % L == 0 && detail::all_aligned({a_ptr});
    // wgrad's B is gathered like fprop's A (channels); fprop/dgrad's B is a dense weight row.
    a.vec_b = (MODE == Mode::kWgrad ? a.g.cg % L == 0 : a.k_size % L == 0) &&
              detail::all_aligned({b_ptr});
    a.m_tiles = (a.m_size + kBM - 1) / kBM;
    a.n_tiles = int((a.n_size + kBN - 1) / kBN);
    const int64_t splits = MODE == Mode::kWgrad ? (a.k_size + a.chunk - 1) / a.chunk : 1;
    a.tiles = a.m_tiles * a.n_tiles * a.g.G * splits;
    const unsigned grid = unsigned(std::min<int64_t>(a.tiles, kMaxGrid));
    implicit_gemm_kernel<T, MODE><<<grid, kThreads, 0, stream>>>(a);
  });
  return cudaGetLastError();
}

// Blocks of one split of the weight gradient (wgrad_split's `blocks`).
int64_t wgrad_blocks(const ConvShape& s) {
  if (use_direct(s)) return (s.K + kDepthwiseWgradCols - 1) / kDepthwiseWgradCols * s.R * s.S;
  const int64_t kg = s.K / s.groups, cols = s.R * s.S * (s.C / s.groups);
  return (kg + kBM - 1) / kBM * ((cols + kBN - 1) / kBN) * s.groups;
}

}  // namespace

cudaError_t conv_fprop(const ConvFpropParams& p, cudaStream_t stream) {
  const ConvShape& s = p.g;
  if (s.N * s.K * s.P * s.Q == 0) return cudaSuccess;
  if (use_direct(s)) return depthwise_fprop(p, stream);
  GemmArgs a{};
  a.g = geo(s);
  a.fp = p;
  a.m_size = s.N * s.P * s.Q;
  a.n_size = a.g.kg;
  a.k_size = s.R * s.S * a.g.cg;
  a.chunk = std::max<int64_t>(a.k_size, 1);
  return launch<Mode::kFprop>(a, p.dtype, p.x, p.weight, a.g.cg, stream);
}

cudaError_t conv_dgrad(const ConvDgradParams& p, cudaStream_t stream) {
  const ConvShape& s = p.g;
  if (s.N * s.C * s.H * s.W == 0) return cudaSuccess;
  if (use_direct(s)) return depthwise_dgrad(p, stream);
  GemmArgs a{};
  a.g = geo(s);
  a.dp = p;
  a.m_size = s.N * s.H * s.W;
  a.n_size = a.g.cg;
  a.k_size = s.R * s.S * a.g.kg;
  a.chunk = std::max<int64_t>(a.k_size, 1);
  return launch<Mode::kDgrad>(a, p.dtype, p.grad, p.weight, a.g.kg, stream);
}

size_t conv_wgrad_workspace_bytes(const ConvWgradParams& p) {
  const ConvShape& s = p.g;
  const int64_t wnumel = s.K * (s.C / s.groups) * s.R * s.S;
  if (wnumel == 0 || s.N * s.P * s.Q == 0) return 0;
  return size_t(wgrad_split(s, wgrad_blocks(s)).splits * wnumel) * sizeof(float);
}

cudaError_t conv_wgrad(const ConvWgradParams& p, cudaStream_t stream) {
  const ConvShape& s = p.g;
  const int64_t wnumel = s.K * (s.C / s.groups) * s.R * s.S;
  if (wnumel == 0) return cudaSuccess;
  if (s.N * s.P * s.Q == 0) {  // an empty sum
    const size_t elem = p.dtype == DType::kFloat32 ? 4 : 2;
    return cudaMemsetAsync(p.grad_weight, 0, size_t(wnumel) * elem, stream);
  }
  const WgradSplit sp = wgrad_split(s, wgrad_blocks(s));
  float* partial = static_cast<float*>(p.workspace);
  cudaError_t err;
  if (use_direct(s)) {
    err = depthwise_wgrad(p, sp, partial, stream);
  } else {
    GemmArgs a{};
    a.g = geo(s);
    a.wp = p;
    a.partial = partial;
    a.m_size = a.g.kg;
    a.n_size = int(s.R * s.S * a.g.cg);
    a.k_size = s.N * s.P * s.Q;
    a.chunk = sp.chunk;
    err = launch<Mode::kWgrad>(a, p.dtype, p.grad, p.x, a.g.kg, stream);
  }
  if (err != cudaSuccess) return err;
  return wgrad_reduce(p, sp, partial, stream);
}

}  // namespace fastdl::cuda
