// Attention forward on CUDA: FlashAttention-2 (Dao, 2023, Algorithm 1) with the score and
// probability tiles staged through shared memory, plus the split-K decode path of
// Flash-Decoding (Dao et al., 2023): for few query rows and many keys, the key blocks of one
// query block are split across thread blocks that write normalized partial outputs and their
// log-sum-exp, and a combine kernel merges them (out = sum_s exp(lse_s - lse) * out_s).
#include <algorithm>

#include "attention_common.cuh"

namespace fastdl::cuda::attn {
namespace {

constexpr size_t align16(size_t n) {
  return (n + 15) / 16 * 16;
}

// Shared memory of the forward block: Q (BM x D), K and V (BN x D) in T; scores S (BM x BN,
// float); probabilities P (BM x BN, T: the A operand of P V); the output accumulator O (BM x D,
// float) and the row statistics m, l and the rescale factor alpha.
struct FwdSmem {
  size_t q, k, v, s, p, o, stats, bytes;
};

constexpr FwdSmem fwd_smem(size_t esize, int d, int bm, int bn) {
  FwdSmem m{};
  m.q = 0;
  m.k = m.q + align16(bm * (d + 8) * esize);
  m.v = m.k + align16(bn * (d + 8) * esize);
  m.s = m.v + align16(bn * (d + 8) * esize);
  m.p = m.s + align16(bm * (bn + 4) * 4);
  m.o = m.p + align16(bm * (bn + 8) * esize);
  m.stats = m.o + align16(bm * (d + 4) * 4);
  m.bytes = m.stats + 3 * bm * 4;
  return m;
}

constexpr bool fwd_fits(size_t esize, int d, int bm, int bn) {
  return fwd_smem(esize, d, bm, bn).bytes <= kSmemBudget;
}

// Tile shape: 64 query rows (16 for the decode path), as many keys (64, 32, 16) as fit.
template <class T, int kD, bool kDecode>
struct FwdCfg {
  static constexpr int BM = kDecode ? 16 : (fwd_fits(sizeof(T), kD, 64, 32) ? 64 : 32);
  static constexpr int BN = fwd_fits(sizeof(T), kD, BM, 64)   ? 64
                            : fwd_fits(sizeof(T), kD, BM, 32) ? 32
                                                              : 16;
  static constexpr FwdSmem smem = fwd_smem(sizeof(T), kD, BM, BN);
  static_assert(smem.bytes <= kSmemBudget, "attention forward tile does not fit");
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// One block: BM query rows of one (batch or sequence, query head), the key blocks
// [kb_begin, kb_end) of its band (a 1/splits share of them on the decode path). Per key block:
// S = Q K^T (tensor cores), then one warp per row updates the running max m and sum l (online
// softmax), writes P = exp(s - m) (dropped and rescaled: the dropout mask acts on O only) and
// alpha = exp(m_old - m), and O = alpha * O + P V (tensor cores). Rows with no allowed key keep
// l = 0 and end as out = 0, lse = -inf.
template <class T, int kD, bool kDecode>
__global__ void __launch_bounds__(kThreads, 1)
    attention_fwd_kernel(const AttnFwdParams p, int splits) {
  using Cfg = FwdCfg<T, kD, kDecode>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, LDT = ld_t<kD>(), LDO = ld_f<kD>();
  constexpr int LDS = BN + 4, LDP = BN + 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem + Cfg::smem.q);
  T* sK = reinterpret_cast<T*>(smem + Cfg::smem.k);
  T* sV = reinterpret_cast<T*>(smem + Cfg::smem.v);
  float* sS = reinterpret_cast<float*>(smem + Cfg::smem.s);
  T* sP = reinterpret_cast<T*>(smem + Cfg::smem.p);
  float* sO = reinterpret_cast<float*>(smem + Cfg::smem.o);
  float* sM = reinterpret_cast<float*>(smem + Cfg::smem.stats);
  float* sL = sM + BM;
  float* sA = sL + BM;

  const int64_t nqb = (p.Sq + BM - 1) / BM;
  int64_t idx = blockIdx.x;
  const int64_t qb = idx % nqb;
  idx /= nqb;
  const int split = static_cast<int>(idx % splits);
  idx /= splits;
  const int64_t h = idx % p.Hq, b = idx / p.Hq;
  const int64_t hk = h / (p.Hq / p.Hkv);
  const Seq s = make_seq(p, b, h);
  const int64_t i0 = qb * BM;
  if (i0 >= s.sq) return;  // varlen: this sequence is shorter than max_seqlen_q
  const int64_t rows = s.sq - i0 < BM ? s.sq - i0 : BM;

  const T* q = static_cast<const T*>(p.q) + b * p.sq.b + h * p.sq.h + (s.q0 + i0) * p.sq.r;
  const T* k = static_cast<const T*>(p.k) + b * p.sk.b + hk * p.sk.h + s.k0 * p.sk.r;
  const T* v = static_cast<const T*>(p.v) + b * p.sv.b + hk * p.sv.h + s.k0 * p.sv.r;
  load_tile<T, BM, kD>(sQ, LDT, q, p.sq.r, p.sq.d, rows, p.D);
  for (int e = threadIdx.x; e < BM * LDO; e += kThreads) sO[e] = 0.f;
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    sM[r] = -INFINITY;
    sL[r] = 0.f;
  }

  // The key blocks any row of this block may attend (the band is monotone in i).
  const int64_t lo = fastdl_band_lo(i0, s.sq, s.sk, p.window_left, p.bottom_right);
  const int64_t hi = fastdl_band_hi(i0 + rows - 1, s.sq, s.sk, p.window_right, p.bottom_right);
  int64_t kb_begin = lo / BN, kb_end = hi > lo ? (hi + BN - 1) / BN : kb_begin;
  if (splits > 1) {
    const int64_t chunk = (kb_end - kb_begin + splits - 1) / splits;
    kb_begin = min(kb_end, kb_begin + split * chunk);
    kb_end = min(kb_end, kb_begin + chunk);
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int kCols = (BN + 31) / 32;
  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int64_t j0 = kb * BN;
    __syncthreads();  // the previous block's readers of sK, sV, sP are done
    load_tile<T, BN, kD>(sK, LDT, k + j0 * p.sk.r, p.sk.r, p.sk.d, s.sk - j0, p.D);
    load_tile<T, BN, kD>(sV, LDT, v + j0 * p.sv.r, p.sv.r, p.sv.d, s.sk - j0, p.D);
    __syncthreads();
    block_gemm<T, BM, BN, kD>(
        sQ, LDT, 1, sK, 1, LDT, [](int, int) { return 0.f; },
        [&](int r, int c, float x) { sS[r * LDS + c] = x; });
    __syncthreads();
    for (int r = warp; r < BM; r += kWarps) {
      const int64_t i = i0 + r;
      float x[kCols];
      float mx = -INFINITY;
#pragma unroll
      for (int u = 0; u < kCols; ++u) {
        const int c = lane + 32 * u;
        x[u] = -INFINITY;
        if (c < BN) {
          const float bias = score_bias(p, s, b, h, i, j0 + c);
          if (bias != -INFINITY) x[u] = sS[r * LDS + c] * p.scale + bias;
        }
        mx = fmaxf(mx, x[u]);
      }
      const float m_old = sM[r];
      const float m_new = fmaxf(m_old, warp_max(mx));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no (-inf) - (-inf)
      float sum = 0.f;
#pragma unroll
      for (int u = 0; u < kCols; ++u) {
        const int c = lane + 32 * u;
        const float e = __expf(x[u] - m_use);
        sum += e;
        if (c < BN) {
          float kept = e;
          if (p.dropout)
            kept = !p.drop_all && dropout_keep(p, s, i, j0 + c) ? e * p.keep_scale : 0.f;
          sP[r * LDP + c] = from_float<T>(kept);
        }
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float alpha = __expf(m_old - m_use);
        sM[r] = m_new;
        sL[r] = sL[r] * alpha + sum;
        sA[r] = alpha;
      }
    }
    __syncthreads();
    block_gemm<T, BM, kD, BN>(
        sP, LDP, 1, sV, LDT, 1, [&](int r, int c) { return sO[r * LDO + c] * sA[r]; },
        [&](int r, int c, float x) { sO[r * LDO + c] = x; });
  }
  __syncthreads();

  // Epilogue: out = O / l, lse = m + log(l); on the decode path the normalized partials.
  const int64_t R = p.cu_q != nullptr ? p.Hq * p.Tq : p.B * p.Hq * p.Sq;
  float* ws_o = static_cast<float*>(p.workspace);
  float* ws_lse = ws_o + static_cast<int64_t>(splits) * R * p.D;
  T* out = static_cast<T*>(p.out) + b * p.so.b + h * p.so.h + (s.q0 + i0) * p.so.r;
  for (int e = threadIdx.x; e < rows * kD; e += kThreads) {
    const int r = e / kD, c = e % kD;
    if (c >= p.D) continue;
    const float l = sL[r];
    const float o = l > 0.f ? sO[r * LDO + c] / l : 0.f;
    if (splits > 1)
      ws_o[(split * R + s.row_base + i0 + r) * p.D + c] = o;
    else
      out[r * p.so.r + c] = from_float<T>(o);
  }
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    const float l = sL[r];
    const float lse = l > 0.f ? sM[r] + logf(l) : -INFINITY;
    if (splits > 1)
      ws_lse[split * R + s.row_base + i0 + r] = lse;
    else
      p.lse[s.row_base + i0 + r] = lse;
  }
}

// Merges the decode path's partials of one row: lse = log sum_s exp(lse_s), out = sum_s
// exp(lse_s - lse) * out_s (rows no split saw: out = 0, lse = -inf).
template <class T>
__global__ void __launch_bounds__(128) attention_combine_kernel(const AttnFwdParams p, int splits) {
  const int64_t row = blockIdx.x;
  const bool varlen = p.cu_q != nullptr;
  const int64_t R = varlen ? p.Hq * p.Tq : p.B * p.Hq * p.Sq;
  const float* ws_o = static_cast<const float*>(p.workspace);
  const float* ws_lse = ws_o + static_cast<int64_t>(splits) * R * p.D;
  float mx = -INFINITY;
  for (int sp = 0; sp < splits; ++sp) mx = fmaxf(mx, ws_lse[sp * R + row]);
  float total = 0.f;
  if (mx != -INFINITY)
    for (int sp = 0; sp < splits; ++sp) total += __expf(ws_lse[sp * R + row] - mx);
  const float lse = mx == -INFINITY ? -INFINITY : mx + logf(total);
  int64_t b, h, i;
  if (varlen) {
    b = 0, h = row / p.Tq, i = row % p.Tq;
  } else {
    i = row % p.Sq, h = (row / p.Sq) % p.Hq, b = row / (p.Sq * p.Hq);
  }
  T* out = static_cast<T*>(p.out) + b * p.so.b + h * p.so.h + i * p.so.r;
  for (int64_t c = threadIdx.x; c < p.D; c += blockDim.x) {
    float acc = 0.f;
    if (mx != -INFINITY)
      for (int sp = 0; sp < splits; ++sp) {
        const float w = __expf(ws_lse[sp * R + row] - lse);
        if (w > 0.f) acc += w * ws_o[(sp * R + row) * p.D + c];
      }
    out[c] = from_float<T>(acc);
  }
  if (threadIdx.x == 0) p.lse[row] = lse;
}

int64_t rows_total(const AttnFwdParams& p) {
  return p.cu_q != nullptr ? p.Hq * p.Tq : p.B * p.Hq * p.Sq;
}

template <class T, int kD, bool kDecode>
cudaError_t launch(const AttnFwdParams& p, int splits, cudaStream_t stream) {
  using Cfg = FwdCfg<T, kD, kDecode>;
  const auto kernel = attention_fwd_kernel<T, kD, kDecode>;
  const int bytes = static_cast<int>(Cfg::smem.bytes);
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  const int64_t nqb = (p.Sq + Cfg::BM - 1) / Cfg::BM;
  const int64_t blocks = nqb * p.Hq * p.B * splits;
  kernel<<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(p, splits);
  if (splits > 1) {
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    attention_combine_kernel<T>
        <<<static_cast<unsigned>(rows_total(p)), 128, 0, stream>>>(p, splits);
  }
  return cudaGetLastError();
}

template <class T, bool kDecode>
cudaError_t dispatch_d(const AttnFwdParams& p, int splits, cudaStream_t stream) {
  if (p.D <= 32) return launch<T, 32, kDecode>(p, splits, stream);
  if (p.D <= 64) return launch<T, 64, kDecode>(p, splits, stream);
  if (p.D <= 128) return launch<T, 128, kDecode>(p, splits, stream);
  return launch<T, 256, kDecode>(p, splits, stream);
}

template <class T>
cudaError_t dispatch(const AttnFwdParams& p, int splits, cudaStream_t stream) {
  return splits > 1 ? dispatch_d<T, true>(p, splits, stream)
                    : dispatch_d<T, false>(p, splits, stream);
}

}  // namespace

int attention_fwd_splits(const AttnFwdParams& p, int device) {
  // Decode: one query block of at most 16 rows, too few blocks to fill the GPU, many keys.
  constexpr int kDecodeRows = 16, kMinKeysPerSplit = 128, kMaxSplits = 64;
  if (p.Sq > kDecodeRows || p.Sk < 2 * kMinKeysPerSplit) return 1;
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 1;
  const int64_t blocks = p.B * p.Hq;
  if (blocks >= sms) return 1;
  const int64_t want = (2 * sms + blocks - 1) / blocks;
  return static_cast<int>(std::min<int64_t>({want, p.Sk / kMinKeysPerSplit, kMaxSplits}));
}

size_t attention_fwd_workspace_bytes(const AttnFwdParams& p, int splits) {
  if (splits <= 1) return 0;
  return static_cast<size_t>(splits) * rows_total(p) * (p.D + 1) * sizeof(float);
}

cudaError_t attention_fwd(const AttnFwdParams& p, int splits, cudaStream_t stream) {
  if (p.B == 0 || p.Hq == 0 || p.Sq == 0 || p.D == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat16:
      return dispatch<__half>(p, splits, stream);
    case DType::kBFloat16:
      return dispatch<__nv_bfloat16>(p, splits, stream);
    default:
      return dispatch<float>(p, splits, stream);
  }
}

}  // namespace fastdl::cuda::attn
