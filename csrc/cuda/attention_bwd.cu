// Attention backward on CUDA: FlashAttention-2 (Dao, 2023, Algorithm 2), deterministic. Two
// kernels recompute P from the saved log-sum-exp (and the dropout mask from its counter):
// - dK/dV: one block owns a key block of one (batch or sequence, key/value head) and loops over
//   the query heads of its GQA group and their query blocks, so dK and dV are summed in shared
//   memory in a fixed order and written once;
// - dQ: one block owns a query block of one query head and loops over the key blocks of its
//   band (the recomputation FlashAttention-2 trades for dQ atomics; here it buys bit-identical
//   gradients over runs, as the op's docstring promises).
#include <initializer_list>

#include "attention_common.cuh"

namespace fastdl::cuda::attn {
namespace {

constexpr size_t align16(size_t n) {
  return (n + 15) / 16 * 16;
}

// Shared memory: K, V (BN x D, T); the dK, dV accumulators (BN x D, float; the dQ kernel's
// BM x D accumulator in their place, BM <= 2 BN); Q, dO (BM x D, T); P and dP (BM x BN, float);
// the dropped P and dS as mma operands (BM x BN, T); lse and delta.
struct BwdSmem {
  size_t k, v, dk, dv, q, dO, s, dp, p, ds, stats, bytes;
};

constexpr BwdSmem bwd_smem(size_t esize, int d, int bm, int bn) {
  BwdSmem m{};
  const size_t kv = align16(bn * (d + 8) * esize), acc = align16(bn * (d + 4) * 4);
  const size_t qd = align16(bm * (d + 8) * esize), sf = align16(bm * (bn + 4) * 4);
  const size_t st = align16(bm * (bn + 8) * esize);
  m.k = 0;
  m.v = m.k + kv;
  m.dk = m.v + kv;
  m.dv = m.dk + acc;
  m.q = m.dv + acc;
  m.dO = m.q + qd;
  m.s = m.dO + qd;
  m.dp = m.s + sf;
  m.p = m.dp + sf;
  m.ds = m.p + st;
  m.stats = m.ds + st;
  m.bytes = m.stats + 2 * bm * 4;
  return m;
}

constexpr bool bwd_fits(size_t esize, int d, int bm, int bn) {
  return bwd_smem(esize, d, bm, bn).bytes <= kSmemBudget;
}

// Tile shape: the largest of 64x64, 32x64, 32x32, 32x16 (query rows x keys) that fits.
template <class T, int kD>
struct BwdCfg {
  static constexpr size_t E = sizeof(T);
  static constexpr int BM = bwd_fits(E, kD, 64, 64) ? 64 : 32;
  static constexpr int BN = bwd_fits(E, kD, BM, 64) ? 64 : bwd_fits(E, kD, BM, 32) ? 32 : 16;
  static constexpr BwdSmem smem = bwd_smem(E, kD, BM, BN);
  static_assert(smem.bytes <= kSmemBudget, "attention backward tile does not fit");
  static_assert(BM <= 2 * BN, "the dQ accumulator takes the place of dK and dV");
};

// The shared-memory tiles of both kernels.
template <class T, int kD>
struct Tiles {
  using Cfg = BwdCfg<T, kD>;
  static constexpr int BM = Cfg::BM, BN = Cfg::BN, LDT = ld_t<kD>(), LDO = ld_f<kD>();
  static constexpr int LDS = BN + 4, LDP = BN + 8;
  T *k, *v, *q, *dO, *p, *ds;
  float *dk, *dv, *s, *dp, *lse, *delta;

  __device__ explicit Tiles(unsigned char* smem)
      : k(reinterpret_cast<T*>(smem + Cfg::smem.k)),
        v(reinterpret_cast<T*>(smem + Cfg::smem.v)),
        q(reinterpret_cast<T*>(smem + Cfg::smem.q)),
        dO(reinterpret_cast<T*>(smem + Cfg::smem.dO)),
        p(reinterpret_cast<T*>(smem + Cfg::smem.p)),
        ds(reinterpret_cast<T*>(smem + Cfg::smem.ds)),
        dk(reinterpret_cast<float*>(smem + Cfg::smem.dk)),
        dv(reinterpret_cast<float*>(smem + Cfg::smem.dv)),
        s(reinterpret_cast<float*>(smem + Cfg::smem.s)),
        dp(reinterpret_cast<float*>(smem + Cfg::smem.dp)),
        lse(reinterpret_cast<float*>(smem + Cfg::smem.stats)),
        delta(lse + BM) {}
};

// Loads the rows [i0, i0 + rows) of query head h: Q, dO, lse (-inf past the rows: P = 0 there)
// and delta.
template <class T, int kD>
__device__ __forceinline__ void load_rows(const AttnBwdParams& p, const Tiles<T, kD>& t,
                                          const Seq& s, int64_t b, int64_t h, int64_t i0,
                                          int64_t rows) {
  constexpr int BM = Tiles<T, kD>::BM, LDT = Tiles<T, kD>::LDT;
  const int64_t r0 = s.q0 + i0;
  load_tile<T, BM, kD>(t.q, LDT, static_cast<const T*>(p.q) + b * p.sq.b + h * p.sq.h + r0 * p.sq.r,
                       p.sq.r, p.sq.d, rows, p.D);
  load_tile<T, BM, kD>(t.dO, LDT,
                       static_cast<const T*>(p.grad_out) + b * p.sdo.b + h * p.sdo.h + r0 * p.sdo.r,
                       p.sdo.r, p.sdo.d, rows, p.D);
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    t.lse[r] = r < rows ? p.lse[s.row_base + i0 + r] : -INFINITY;
    t.delta[r] = r < rows ? p.delta[s.row_base + i0 + r] : 0.f;
  }
}

// Loads the keys [j0, j0 + keys) of key/value head hk: K and V.
template <class T, int kD>
__device__ __forceinline__ void load_keys(const AttnBwdParams& p, const Tiles<T, kD>& t,
                                          const Seq& s, int64_t b, int64_t hk, int64_t j0,
                                          int64_t keys) {
  constexpr int BN = Tiles<T, kD>::BN, LDT = Tiles<T, kD>::LDT;
  const int64_t r0 = s.k0 + j0;
  load_tile<T, BN, kD>(t.k, LDT,
                       static_cast<const T*>(p.k) + b * p.sk.b + hk * p.sk.h + r0 * p.sk.r, p.sk.r,
                       p.sk.d, keys, p.D);
  load_tile<T, BN, kD>(t.v, LDT,
                       static_cast<const T*>(p.v) + b * p.sv.b + hk * p.sv.h + r0 * p.sv.r, p.sv.r,
                       p.sv.d, keys, p.D);
}

// For loaded (and synced) Q, dO, K, V tiles: S = Q K^T; P = exp(s - lse) (0 outside the band
// or mask and for rows without an allowed key, lse = -inf); dP = dO V^T; dS = P o (dP o Z -
// delta) into t.ds, with Z the scaled dropout mask. kDkDv: also dV += (P o Z)^T dO and the
// mask gradient. Ends synced.
template <class T, int kD, bool kDkDv>
__device__ __forceinline__ void grad_scores(const AttnBwdParams& p, const Tiles<T, kD>& t,
                                            const Seq& s, int64_t b, int64_t h, int64_t i0,
                                            int64_t j0, int64_t rows, int64_t keys) {
  using Tl = Tiles<T, kD>;
  constexpr int BM = Tl::BM, BN = Tl::BN, LDT = Tl::LDT, LDS = Tl::LDS, LDP = Tl::LDP;
  const auto zero = [](int, int) { return 0.f; };
  block_gemm<T, BM, BN, kD>(t.q, LDT, 1, t.k, 1, LDT, zero,
                            [&](int r, int c, float x) { t.s[r * LDS + c] = x; });
  __syncthreads();
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int r = e / BN, c = e % BN;
    const float bias = score_bias(p, s, b, h, i0 + r, j0 + c);
    const float lse = t.lse[r];
    const float pr = bias == -INFINITY || lse == -INFINITY
                         ? 0.f
                         : __expf(t.s[r * LDS + c] * p.scale + bias - lse);
    t.s[r * LDS + c] = pr;
    if constexpr (kDkDv) {
      float kept = pr;
      if (p.dropout)
        kept = !p.drop_all && dropout_keep(p, s, i0 + r, j0 + c) ? pr * p.keep_scale : 0.f;
      t.p[r * LDP + c] = from_float<T>(kept);
    }
  }
  __syncthreads();
  if constexpr (kDkDv)  // dV += P_dropped^T dO (A = P transposed)
    block_gemm<T, BN, kD, BM>(
        t.p, 1, LDP, t.dO, LDT, 1, [&](int r, int c) { return t.dv[r * Tl::LDO + c]; },
        [&](int r, int c, float x) { t.dv[r * Tl::LDO + c] = x; });
  block_gemm<T, BM, BN, kD>(t.dO, LDT, 1, t.v, 1, LDT, zero,
                            [&](int r, int c, float x) { t.dp[r * LDS + c] = x; });
  __syncthreads();
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int r = e / BN, c = e % BN;
    float dp = t.dp[r * LDS + c];
    if (p.dropout) dp = !p.drop_all && dropout_keep(p, s, i0 + r, j0 + c) ? dp * p.keep_scale : 0.f;
    const float ds = t.s[r * LDS + c] * (dp - t.delta[r]);
    t.ds[r * LDP + c] = from_float<T>(ds);
    if (kDkDv && p.dmask != nullptr && r < rows && c < keys)
      p.dmask[(s.row_base + i0 + r) * s.sk + j0 + c] = ds;
  }
  __syncthreads();
}

// dK, dV of one key block of one key/value head: sums over the GQA group's query heads and
// their query blocks that the band lets reach the keys.
template <class T, int kD>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_dkdv_kernel(const AttnBwdParams p) {
  using Tl = Tiles<T, kD>;
  constexpr int BM = Tl::BM, BN = Tl::BN, LDT = Tl::LDT, LDO = Tl::LDO, LDP = Tl::LDP;
  extern __shared__ __align__(16) unsigned char smem[];
  const Tl t(smem);

  const int64_t nkb = (p.Sk + BN - 1) / BN;
  const int64_t kb = blockIdx.x % nkb, bhk = blockIdx.x / nkb;
  const int64_t hk = bhk % p.Hkv, b = bhk / p.Hkv, group = p.Hq / p.Hkv;
  const Seq s0 = make_seq(p, b, hk * group);
  const int64_t j0 = kb * BN;
  if (j0 >= s0.sk) return;  // varlen: this sequence is shorter than max_seqlen_k
  const int64_t keys = s0.sk - j0 < BN ? s0.sk - j0 : BN;
  load_keys(p, t, s0, b, hk, j0, keys);
  for (int e = threadIdx.x; e < BN * LDO; e += kThreads) t.dk[e] = t.dv[e] = 0.f;

  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const Seq s = make_seq(p, b, h);
    for (int64_t i0 = 0; i0 < s.sq; i0 += BM) {
      const int64_t rows = s.sq - i0 < BM ? s.sq - i0 : BM;
      // Skip query blocks whose band misses this key block (the band is monotone in i).
      if (fastdl_band_hi(i0 + rows - 1, s.sq, s.sk, p.window_right, p.bottom_right) <= j0 ||
          fastdl_band_lo(i0, s.sq, s.sk, p.window_left, p.bottom_right) >= j0 + keys)
        continue;
      __syncthreads();  // the previous query block's readers are done
      load_rows(p, t, s, b, h, i0, rows);
      __syncthreads();
      grad_scores<T, kD, true>(p, t, s, b, h, i0, j0, rows, keys);
      // dK += dS^T Q (A = dS transposed); scaled at the end.
      block_gemm<T, BN, kD, BM>(
          t.ds, 1, LDP, t.q, LDT, 1, [&](int r, int c) { return t.dk[r * LDO + c]; },
          [&](int r, int c, float x) { t.dk[r * LDO + c] = x; });
    }
  }
  __syncthreads();
  T* dk = static_cast<T*>(p.dk) + b * p.sdk.b + hk * p.sdk.h + (s0.k0 + j0) * p.sdk.r;
  T* dv = static_cast<T*>(p.dv) + b * p.sdk.b + hk * p.sdk.h + (s0.k0 + j0) * p.sdk.r;
  for (int e = threadIdx.x; e < keys * kD; e += kThreads) {
    const int r = e / kD, c = e % kD;
    if (c >= p.D) continue;
    dk[r * p.sdk.r + c] = from_float<T>(t.dk[r * LDO + c] * p.scale);
    dv[r * p.sdk.r + c] = from_float<T>(t.dv[r * LDO + c]);
  }
}

// dQ of one query block of one query head: dQ = scale * sum over the band's key blocks of dS K.
template <class T, int kD>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_dq_kernel(const AttnBwdParams p) {
  using Tl = Tiles<T, kD>;
  constexpr int BM = Tl::BM, BN = Tl::BN, LDT = Tl::LDT, LDO = Tl::LDO, LDP = Tl::LDP;
  extern __shared__ __align__(16) unsigned char smem[];
  const Tl t(smem);
  float* dq_acc = t.dk;  // BM x D floats over the dK and dV accumulators

  const int64_t nqb = (p.Sq + BM - 1) / BM;
  const int64_t qb = blockIdx.x % nqb, bh = blockIdx.x / nqb;
  const int64_t h = bh % p.Hq, b = bh / p.Hq, hk = h / (p.Hq / p.Hkv);
  const Seq s = make_seq(p, b, h);
  const int64_t i0 = qb * BM;
  if (i0 >= s.sq) return;  // varlen: this sequence is shorter than max_seqlen_q
  const int64_t rows = s.sq - i0 < BM ? s.sq - i0 : BM;
  load_rows(p, t, s, b, h, i0, rows);
  for (int e = threadIdx.x; e < BM * LDO; e += kThreads) dq_acc[e] = 0.f;

  const int64_t lo = fastdl_band_lo(i0, s.sq, s.sk, p.window_left, p.bottom_right);
  const int64_t hi = fastdl_band_hi(i0 + rows - 1, s.sq, s.sk, p.window_right, p.bottom_right);
  const int64_t kb_end = hi > lo ? (hi + BN - 1) / BN : 0;
  for (int64_t kb = lo / BN; kb < kb_end; ++kb) {
    const int64_t j0 = kb * BN, keys = s.sk - j0 < BN ? s.sk - j0 : BN;
    __syncthreads();  // the previous key block's readers are done
    load_keys(p, t, s, b, hk, j0, keys);
    __syncthreads();
    grad_scores<T, kD, false>(p, t, s, b, h, i0, j0, rows, keys);
    block_gemm<T, BM, kD, BN>(
        t.ds, LDP, 1, t.k, LDT, 1, [&](int r, int c) { return dq_acc[r * LDO + c]; },
        [&](int r, int c, float x) { dq_acc[r * LDO + c] = x; });
  }
  __syncthreads();
  T* dq = static_cast<T*>(p.dq) + b * p.so.b + h * p.so.h + (s.q0 + i0) * p.so.r;
  for (int e = threadIdx.x; e < rows * kD; e += kThreads) {
    const int r = e / kD, c = e % kD;
    if (c < p.D) dq[r * p.so.r + c] = from_float<T>(dq_acc[r * LDO + c] * p.scale);
  }
}

template <class T, int kD>
cudaError_t launch(const AttnBwdParams& p, cudaStream_t stream) {
  using Cfg = BwdCfg<T, kD>;
  const int bytes = static_cast<int>(Cfg::smem.bytes);
  const auto dkdv = attention_bwd_dkdv_kernel<T, kD>;
  const auto dq = attention_bwd_dq_kernel<T, kD>;
  for (const auto kernel : {dkdv, dq}) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err != cudaSuccess) return err;
  }
  if (p.Sk > 0) {
    const int64_t blocks = (p.Sk + Cfg::BN - 1) / Cfg::BN * p.Hkv * p.B;
    dkdv<<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.Sq > 0) {
    const int64_t blocks = (p.Sq + Cfg::BM - 1) / Cfg::BM * p.Hq * p.B;
    dq<<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(p);
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t dispatch(const AttnBwdParams& p, cudaStream_t stream) {
  if (p.D <= 32) return launch<T, 32>(p, stream);
  if (p.D <= 64) return launch<T, 64>(p, stream);
  if (p.D <= 128) return launch<T, 128>(p, stream);
  return launch<T, 256>(p, stream);
}

}  // namespace

cudaError_t attention_bwd(const AttnBwdParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.Hq == 0 || p.D == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat16:
      return dispatch<__half>(p, stream);
    case DType::kBFloat16:
      return dispatch<__nv_bfloat16>(p, stream);
    default:
      return dispatch<float>(p, stream);
  }
}

}  // namespace fastdl::cuda::attn
