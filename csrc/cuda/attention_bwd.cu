// Attention backward on CUDA: FlashAttention-2 (Dao, 2023, Algorithm 2). One block owns a key
// block of one (batch or sequence, key/value head) and loops over the query heads of its GQA
// group and their query blocks, so dK and dV are summed in shared memory and written once
// (no atomics); dQ is accumulated with float32 atomics into the caller's zeroed buffer.
// P is recomputed from the saved log-sum-exp; the dropout mask from its counter.
#include "attention_common.cuh"

namespace fastdl::cuda::attn {
namespace {

constexpr size_t align16(size_t n) {
  return (n + 15) / 16 * 16;
}

// Shared memory: K, V (BN x D, T); the dK, dV accumulators (BN x D, float); Q, dO (BM x D, T);
// P and dP (BM x BN, float); the dropped P and dS as mma operands (BM x BN, T); lse and delta.
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
};

// Per query block of a query head: S = Q K^T; P = exp(s - lse) (0 outside the band/mask and
// for rows without an allowed key, lse = -inf); dV += (P o Z)^T dO and dP = dO V^T; dS = P o
// (dP o Z - delta); dK += dS^T Q; dQ += dS K (atomics). Z is the scaled dropout mask.
template <class T, int kD>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_kernel(const AttnBwdParams p) {
  using Cfg = BwdCfg<T, kD>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, LDT = ld_t<kD>(), LDO = ld_f<kD>();
  constexpr int LDS = BN + 4, LDP = BN + 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem + Cfg::smem.k);
  T* sV = reinterpret_cast<T*>(smem + Cfg::smem.v);
  float* sdK = reinterpret_cast<float*>(smem + Cfg::smem.dk);
  float* sdV = reinterpret_cast<float*>(smem + Cfg::smem.dv);
  T* sQ = reinterpret_cast<T*>(smem + Cfg::smem.q);
  T* sdO = reinterpret_cast<T*>(smem + Cfg::smem.dO);
  float* sS = reinterpret_cast<float*>(smem + Cfg::smem.s);
  float* sdP = reinterpret_cast<float*>(smem + Cfg::smem.dp);
  T* sP = reinterpret_cast<T*>(smem + Cfg::smem.p);
  T* sdS = reinterpret_cast<T*>(smem + Cfg::smem.ds);
  float* sLse = reinterpret_cast<float*>(smem + Cfg::smem.stats);
  float* sDelta = sLse + BM;

  const int64_t nkb = (p.Sk + BN - 1) / BN;
  const int64_t kb = blockIdx.x % nkb, bhk = blockIdx.x / nkb;
  const int64_t hk = bhk % p.Hkv, b = bhk / p.Hkv, group = p.Hq / p.Hkv;
  const Seq s0 = make_seq(p, b, hk * group);
  const int64_t j0 = kb * BN;
  if (j0 >= s0.sk) return;  // varlen: this sequence is shorter than max_seqlen_k
  const int64_t keys = s0.sk - j0 < BN ? s0.sk - j0 : BN;

  load_tile<T, BN, kD>(
      sK, LDT, static_cast<const T*>(p.k) + b * p.sk.b + hk * p.sk.h + (s0.k0 + j0) * p.sk.r,
      p.sk.r, p.sk.d, keys, p.D);
  load_tile<T, BN, kD>(
      sV, LDT, static_cast<const T*>(p.v) + b * p.sv.b + hk * p.sv.h + (s0.k0 + j0) * p.sv.r,
      p.sv.r, p.sv.d, keys, p.D);
  for (int e = threadIdx.x; e < BN * LDO; e += kThreads) sdK[e] = sdV[e] = 0.f;

  const auto zero = [](int, int) { return 0.f; };
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const Seq s = make_seq(p, b, h);
    const T* q = static_cast<const T*>(p.q) + b * p.sq.b + h * p.sq.h + s.q0 * p.sq.r;
    const T* dO = static_cast<const T*>(p.grad_out) + b * p.sdo.b + h * p.sdo.h + s.q0 * p.sdo.r;
    float* dq = p.dq_acc + b * p.so.b + h * p.so.h + s.q0 * p.so.r;
    for (int64_t i0 = 0; i0 < s.sq; i0 += BM) {
      const int64_t rows = s.sq - i0 < BM ? s.sq - i0 : BM;
      // Skip query blocks whose band misses this key block (the band is monotone in i).
      if (fastdl_band_hi(i0 + rows - 1, s.sq, s.sk, p.window_right, p.bottom_right) <= j0 ||
          fastdl_band_lo(i0, s.sq, s.sk, p.window_left, p.bottom_right) >= j0 + keys)
        continue;
      __syncthreads();  // the previous query block's readers are done
      load_tile<T, BM, kD>(sQ, LDT, q + i0 * p.sq.r, p.sq.r, p.sq.d, rows, p.D);
      load_tile<T, BM, kD>(sdO, LDT, dO + i0 * p.sdo.r, p.sdo.r, p.sdo.d, rows, p.D);
      for (int r = threadIdx.x; r < BM; r += kThreads) {
        sLse[r] = r < rows ? p.lse[s.row_base + i0 + r] : -INFINITY;
        sDelta[r] = r < rows ? p.delta[s.row_base + i0 + r] : 0.f;
      }
      __syncthreads();
      block_gemm<T, BM, BN, kD>(sQ, LDT, 1, sK, 1, LDT, zero,
                                [&](int r, int c, float x) { sS[r * LDS + c] = x; });
      __syncthreads();
      for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
        const int r = e / BN, c = e % BN;
        const float bias = score_bias(p, s, b, h, i0 + r, j0 + c);
        const float lse = sLse[r];
        const float pr = bias == -INFINITY || lse == -INFINITY
                             ? 0.f
                             : __expf(sS[r * LDS + c] * p.scale + bias - lse);
        float kept = pr;
        if (p.dropout)
          kept = !p.drop_all && dropout_keep(p, s, i0 + r, j0 + c) ? pr * p.keep_scale : 0.f;
        sS[r * LDS + c] = pr;
        sP[r * LDP + c] = from_float<T>(kept);
      }
      __syncthreads();
      // dV += P_dropped^T dO (A = sP transposed) and dP = dO V^T.
      block_gemm<T, BN, kD, BM>(
          sP, 1, LDP, sdO, LDT, 1, [&](int r, int c) { return sdV[r * LDO + c]; },
          [&](int r, int c, float x) { sdV[r * LDO + c] = x; });
      block_gemm<T, BM, BN, kD>(sdO, LDT, 1, sV, 1, LDT, zero,
                                [&](int r, int c, float x) { sdP[r * LDS + c] = x; });
      __syncthreads();
      for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
        const int r = e / BN, c = e % BN;
        const float pr = sS[r * LDS + c];
        float dp = sdP[r * LDS + c];
        if (p.dropout)
          dp = !p.drop_all && dropout_keep(p, s, i0 + r, j0 + c) ? dp * p.keep_scale : 0.f;
        const float ds = pr * (dp - sDelta[r]);
        sdS[r * LDP + c] = from_float<T>(ds);
        if (p.dmask != nullptr && r < rows && c < keys)
          p.dmask[(s.row_base + i0 + r) * s.sk + j0 + c] = ds;
      }
      __syncthreads();
      // dK += dS^T Q (A = sdS transposed); dQ += scale * dS K straight into the float buffer.
      block_gemm<T, BN, kD, BM>(
          sdS, 1, LDP, sQ, LDT, 1, [&](int r, int c) { return sdK[r * LDO + c]; },
          [&](int r, int c, float x) { sdK[r * LDO + c] = x; });
      block_gemm<T, BM, kD, BN>(sdS, LDP, 1, sK, LDT, 1, zero, [&](int r, int c, float x) {
        if (r < rows && c < p.D) atomicAdd(dq + (i0 + r) * p.so.r + c, x * p.scale);
      });
    }
  }
  __syncthreads();
  T* dk = static_cast<T*>(p.dk) + b * p.sdk.b + hk * p.sdk.h + (s0.k0 + j0) * p.sdk.r;
  T* dv = static_cast<T*>(p.dv) + b * p.sdk.b + hk * p.sdk.h + (s0.k0 + j0) * p.sdk.r;
  for (int e = threadIdx.x; e < keys * kD; e += kThreads) {
    const int r = e / kD, c = e % kD;
    if (c >= p.D) continue;
    dk[r * p.sdk.r + c] = from_float<T>(sdK[r * LDO + c] * p.scale);
    dv[r * p.sdk.r + c] = from_float<T>(sdV[r * LDO + c]);
  }
}

template <class T, int kD>
cudaError_t launch(const AttnBwdParams& p, cudaStream_t stream) {
  using Cfg = BwdCfg<T, kD>;
  const auto kernel = attention_bwd_kernel<T, kD>;
  const int bytes = static_cast<int>(Cfg::smem.bytes);
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  const int64_t blocks = (p.Sk + Cfg::BN - 1) / Cfg::BN * p.Hkv * p.B;
  kernel<<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(p);
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
  if (p.B == 0 || p.Hkv == 0 || p.Sk == 0 || p.D == 0) return cudaSuccess;
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
