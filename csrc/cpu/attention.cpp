// CPU implementations of the attention ops (schemas in csrc/ops.cpp, rules in
// csrc/common/attention.h and attention_math.h): FlashAttention-2 (Dao, 2023) tiled over query
// and key blocks with an online softmax, so the Sq x Sk scores are never materialized.
//
// The GEMM-shaped inner loops (S = Q K^T, O += P V and the backward's four products on one
// block) run cpu/gemm.h (fastdl's own for float32 and, where two bfloat16 inputs meet, for
// bfloat16; the BLAS torch links for float64); the fusion
// around them -- masks, band skipping, online softmax (vectorized exp in attention_kernels.h,
// chosen per ISA), dropout, scheduling -- is ours. Forward: one task per (sequence, query head,
// query block); only the key blocks that intersect the causal/window band are visited, so a
// causal problem costs half a full one. Backward: one task per (sequence, key/value head), which
// owns its dK/dV and the dQ of its query heads: no atomics, bit-identical for any thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/attention.h"
#include "common/isa.h"
#include "cpu/attention_params.h"
#include "cpu/gemm.h"
#include "cpu/parallel.h"
#include "cpu/output.h"

// MKL's per-thread thread count, C interface (torch's x86 builds link MKL); weak, so that builds
// against another BLAS still link.
extern "C" int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));

namespace fastdl::cpu {
namespace {

constexpr std::initializer_list<c10::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kBFloat16};
// Query rows x key columns per score block: 64 x 256 floats (64 KiB) stay in L2 with the K/V
// block (256 x D) they are multiplied with. The backward's key blocks are narrower: its dK/dV
// accumulators, P and dP of a block stay closer to L1, and a causal band's diagonal blocks mask
// fewer keys (it has no edge chunks). On Zen 4 (8 x 16 x 1024 x 64 and 2 x 8 x 2048 x 128,
// causal or not, 2026-12-05), 128 against 256 ran the backward 3-30% faster; 64 was mixed, and
// 512 against 256 in the forward no faster.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kFwdBlockK = 256;
constexpr int64_t kBwdBlockK = 128;
// Query rows per piece of a block that the band's upper edge crosses (a multiple of the GEMM's
// 6-row micro-tile).
constexpr int64_t kEdgeRows = 18;

const AttentionKernels& kernels() {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::kAvx512:
      return attention_kernels_avx512();
    case Isa::kAvx2:
      return attention_kernels_avx2();
#endif
    default:
      return attention_kernels_scalar();
  }
}

// Keeps the BLAS (the float64 GEMMs) on the calling thread for a task's lifetime. MKL may
// otherwise thread a GEMM called from a parallel region once torch.set_num_threads changed its
// settings, and its threaded kernels sum in a different order: results would no longer be
// bit-identical.
class SequentialBlas {
 public:
  SequentialBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }

 private:
  int previous_;
};

// The options every block of one call shares.
struct Opts {
  int64_t D;
  double scale;
  int64_t left, right;
  bool bottom_right;
  double p;  // dropout probability
  uint64_t seed;
  uint32_t threshold;
};

// One (sequence, query head) problem, pointers at its first row; rows of q/k/v/o/grad_out are
// D contiguous elements `ld*` apart. The dropout counter of (i, j) is ctr + i * ctr_ld + j.
// qb/kb/vb: the bfloat16 inputs themselves (their bits), set where the CPU multiplies bfloat16
// natively: the products of two inputs (S = Q K^T, the backward's dP = dO V^T) then run on
// gemm_bf16 (exact products, float sums: the same precision at twice the rate), the others in
// float32 on the widened copies q/k/v.
template <typename T>
struct Head {
  const T *q, *k, *v;
  int64_t ldq, ldk, ldv;
  const uint16_t *qb, *kb, *vb;
  int64_t ldqb, ldkb, ldvb;
  const T* mask;  // additive, (i, j) at mask[i * msi + j * msj]; null without
  int64_t msi, msj;
  int64_t Sq, Sk;
  uint64_t ctr, ctr_ld;
};

// The keys' K^T as the scores read it: float (kt) or, with h.kb, bfloat16 (ktb).
template <typename T>
struct KeysT {
  PackedB<T> kt;
  PackedBBf16 ktb;

  void pack(const Head<T>& h, int64_t D, int64_t j0, int64_t n) {
    if (h.kb != nullptr)
      ktb.pack(true, D, n, h.kb + j0 * h.ldkb, h.ldkb);
    else
      kt.pack(true, D, n, h.k + j0 * h.ldk, h.ldk);
  }
};

// Scores of rows [i0, i0 + rows) x keys [j0, j0 + n) of h into s (ld `ld`): scale * q.k, plus
// the mask, -inf outside the band. kt: those keys' K^T (at least n columns).
template <typename T>
void scores(const Head<T>& h, const Opts& o, const KeysT<T>& kt, int64_t i0, int64_t rows,
            int64_t j0, int64_t n, T* s, int64_t ld) {
  if constexpr (std::is_same_v<T, float>) {
    if (h.qb != nullptr)
      kt.ktb.gemm(rows, n, o.D, h.qb + i0 * h.ldqb, h.ldqb, 0.f, s, ld, static_cast<T>(o.scale));
  }
  if (h.qb == nullptr)
    kt.kt.gemm(false, rows, n, o.D, h.q + i0 * h.ldq, h.ldq, T(0), s, ld, static_cast<T>(o.scale));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    T* row = s + r * ld;
    if (h.mask) {
      const T* m = h.mask + i * h.msi + j0 * h.msj;
      if (h.msj == 1)
        for (int64_t j = 0; j < n; ++j) row[j] += m[j];
      else
        for (int64_t j = 0; j < n; ++j) row[j] += m[j * h.msj];
    }
    const int64_t lo = fastdl_band_lo(i, h.Sq, h.Sk, o.left, o.bottom_right) - j0;
    const int64_t hi = fastdl_band_hi(i, h.Sq, h.Sk, o.right, o.bottom_right) - j0;
    std::fill(row, row + std::clamp<int64_t>(lo, 0, n), T(-INFINITY));
    std::fill(row + std::clamp<int64_t>(hi, 0, n), row + n, T(-INFINITY));
  }
}

// Dropout on a block (probabilities, or the backward's dP; ld `ld`): kept entries times
// 1 / (1 - p), the others 0.
template <typename T>
void dropout(const Head<T>& h, const Opts& o, int64_t i0, int64_t rows, int64_t j0, int64_t n, T* p,
             int64_t ld) {
  const T keep_scale = o.p >= 1.0 ? T(0) : static_cast<T>(1.0 / (1.0 - o.p));
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t c = h.ctr + (i0 + r) * h.ctr_ld + j0;
    T* row = p + r * ld;
    for (int64_t j = 0; j < n; ++j) {
      const bool keep = fastdl_dropout_keep(o.seed, c + j, o.threshold);
      row[j] = keep ? row[j] * keep_scale : T(0);
    }
  }
}

// The key range [lo, hi) some row of [i0, i1) may attend to.
template <typename T>
std::pair<int64_t, int64_t> key_range(const Head<T>& h, const Opts& o, int64_t i0, int64_t i1) {
  return {fastdl_band_lo(i0, h.Sq, h.Sk, o.left, o.bottom_right),
          fastdl_band_hi(i1 - 1, h.Sq, h.Sk, o.right, o.bottom_right)};
}

// A zeroed buffer aligned to a cache line. BLAS results may depend on the alignment of their
// operands (MKL's peeling), so every GEMM operand fastdl allocates is aligned alike: results are
// then bit-identical from run to run.
template <typename T>
class Buf {
 public:
  explicit Buf(int64_t n) : p_(static_cast<T*>(std::aligned_alloc(64, bytes(n)))) {
    TORCH_CHECK(p_ || n == 0, "fastdl attention: out of memory for a ", n, "-element buffer");
    std::fill(p_, p_ + n, T(0));
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { std::free(p_); }
  T* data() { return p_; }
  T& operator[](int64_t i) { return p_[i]; }

 private:
  static size_t bytes(int64_t n) { return (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64; }
  T* p_;
};

// The forward's B operands of one key head's blocks, K^T (the scores') and V (the output's):
// packed when a task's query block first needs them, then reused by the task's next query blocks
// of that head (and by the other query heads of a GQA group). Blocks on the kFwdBlockK grid are
// kept, whole; one that starts elsewhere (a sliding window's first) is packed for one use.
template <typename T>
class KeyBlocks {
 public:
  // K^T and V of keys [j0, j0 + n) of h, or of more keys from j0.
  std::pair<const KeysT<T>*, const PackedB<T>*> get(const Head<T>& h, int64_t D, int64_t j0,
                                                    int64_t n) {
    // Heads that share K (kv heads or a batch expanded with stride 0) reuse the packed blocks,
    // as long as they share V and the key count too.
    const void* key = h.kb != nullptr ? static_cast<const void*>(h.kb) : h.k;
    if (key != key_k_ || h.v != key_v_ || h.Sk != key_sk_) {
      key_k_ = key;
      key_v_ = h.v;
      key_sk_ = h.Sk;
      std::fill(ready_.begin(), ready_.end(), 0);
    }
    if (j0 % kFwdBlockK != 0) {
      pack(h, D, j0, n, loose_kt_, loose_v_);
      return {&loose_kt_, &loose_v_};
    }
    const size_t b = static_cast<size_t>(j0 / kFwdBlockK);
    if (b >= ready_.size()) {
      kt_.resize(b + 1);
      v_.resize(b + 1);
      ready_.resize(b + 1, 0);
    }
    if (!ready_[b]) pack(h, D, j0, std::min(kFwdBlockK, h.Sk - j0), kt_[b], v_[b]);
    ready_[b] = 1;
    return {&kt_[b], &v_[b]};
  }

 private:
  static void pack(const Head<T>& h, int64_t D, int64_t j0, int64_t n, KeysT<T>& kt,
                   PackedB<T>& v) {
    kt.pack(h, D, j0, n);
    v.pack(false, n, D, h.v + j0 * h.ldv, h.ldv);
  }
  const void* key_k_ = nullptr;  // h.kb or h.k: what the scores read
  const T* key_v_ = nullptr;
  int64_t key_sk_ = -1;
  std::vector<KeysT<T>> kt_;
  std::vector<PackedB<T>> v_;
  std::vector<char> ready_;
  KeysT<T> loose_kt_;
  PackedB<T> loose_v_;
};

// The backward's B operands: per key block, K^T (the scores'), V^T (dP's; vtb with h.vb) and K
// (dQ's); per query block of the group's heads, Q (dK's) and dO (dV's), packed once per task.
template <typename T>
struct GradOperands {
  KeysT<T> kt;
  PackedB<T> vt, k;
  PackedBBf16 vtb;
  std::vector<PackedB<T>> q, dout;  // [head of the group][query block]
};

// Per-thread scratch of the forward and backward blocks.
template <typename T>
struct Scratch {
  static constexpr int64_t kFwdBlock = kBlockQ * kFwdBlockK, kBwdBlock = kBlockQ * kBwdBlockK;
  const int64_t acc_size;
  Buf<T> s, dp, pz, acc, m, l, corr;
  KeyBlocks<T> keys;    // forward
  GradOperands<T> ops;  // backward
  // acc: the forward's (kBlockQ, D) output accumulator, the backward's dK and dV blocks.
  Scratch(int64_t D, bool backward, bool dropout)
      : acc_size((backward ? 2 * kBwdBlockK : kBlockQ) * D),
        s(backward ? kBwdBlock : kFwdBlock),
        dp(backward ? kBwdBlock : 0),
        pz(backward && dropout ? kBwdBlock : 0),
        acc(acc_size),
        m(kBlockQ),
        l(kBlockQ),
        corr(kBlockQ) {}
};

template <typename T>
constexpr int kAcc = std::is_same_v<T, double>;  // index into the AttentionKernels tables

// Forward of query rows [i0, i1) of h: out rows (ld ldo) and their lse.
template <typename T>
void fwd_block(const Head<T>& h, const Opts& o, int64_t i0, int64_t i1, T* out, int64_t ldo, T* lse,
               Scratch<T>& w) {
  const auto& kern = kernels();
  const int64_t rows = i1 - i0, D = o.D;
  std::fill(w.m.data(), w.m.data() + kBlockQ, T(-INFINITY));
  std::fill(w.l.data(), w.l.data() + kBlockQ, T(0));
  std::fill(w.acc.data(), w.acc.data() + rows * D, T(0));
  // Rows [r0, r1) of the block against keys [j0, j0 + n).
  const auto step = [&](int64_t r0, int64_t r1, int64_t j0, int64_t n, const KeysT<T>& kt,
                        const PackedB<T>& vb) {
    T* s = w.s.data() + r0 * kFwdBlockK;
    scores(h, o, kt, i0 + r0, r1 - r0, j0, n, s, kFwdBlockK);
    kern.softmax_step[kAcc<T>](s, r1 - r0, n, kFwdBlockK, w.m.data() + r0, w.l.data() + r0,
                               w.corr.data() + r0);
    if (o.p > 0) dropout(h, o, i0 + r0, r1 - r0, j0, n, s, kFwdBlockK);
    for (int64_t r = r0; r < r1; ++r)
      if (w.corr[r] != T(1))
        for (int64_t d = 0; d < D; ++d) w.acc[r * D + d] *= w.corr[r];
    vb.gemm(false, r1 - r0, D, n, s, kFwdBlockK, T(1), w.acc.data() + r0 * D, D);
  };
  const auto [jlo, jhi] = key_range(h, o, i0, i1);
  for (int64_t j0 = jlo; j0 < jhi; j0 += kFwdBlockK) {
    const int64_t n = std::min(kFwdBlockK, jhi - j0);
    const auto [kt, vb] = w.keys.get(h, D, j0, n);
    if (fastdl_band_hi(i0, h.Sq, h.Sk, o.right, o.bottom_right) >= j0 + n) {
      step(0, rows, j0, n, *kt, *vb);
      continue;
    }
    // The band's upper edge (the causal diagonal) crosses this key block: chunks of rows stop
    // at their own last key rather than the block's, skipping most of the masked triangle.
    for (int64_t r0 = 0; r0 < rows; r0 += kEdgeRows) {
      const int64_t r1 = std::min(rows, r0 + kEdgeRows);
      const int64_t hi = fastdl_band_hi(i0 + r1 - 1, h.Sq, h.Sk, o.right, o.bottom_right);
      if (hi > j0) step(r0, r1, j0, std::min(n, hi - j0), *kt, *vb);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const bool none = w.l[r] == T(0);  // no allowed key: out 0, lse -inf
    const T inv = none ? T(0) : T(1) / w.l[r];
    for (int64_t d = 0; d < D; ++d) out[r * ldo + d] = w.acc[r * D + d] * inv;
    lse[r] = none ? T(-INFINITY) : w.m[r] + std::log(w.l[r]);
  }
}

// Backward pieces of one (sequence, query head) that the key-block loop reads.
template <typename T>
struct HeadGrad {
  const T* dout;
  int64_t lddo;
  const uint16_t* doutb;  // dO's bfloat16 bits, with Head::vb
  int64_t lddob;
  const T* lse;
  const T* delta;  // rowsum(dO * O)
  T* dq;           // (Sq, D) accumulator
  T* gmask;        // full (Sq, Sk) gradient of the mask (ld Sk), null when not wanted
};

// Adds the contributions of key rows [j0, j0 + n) x query rows [i0, i1) of h to the dK and dV
// blocks (w.acc, laid out [2][kBwdBlockK][D]) and to dQ (FlashAttention-2's backward, Alg. 2).
// qb, dob: the query block's packed Q and dO; w.ops: the key block's packed operands.
template <typename T>
void bwd_block(const Head<T>& h, const HeadGrad<T>& g, const Opts& o, int64_t i0, int64_t i1,
               int64_t j0, int64_t n, const PackedB<T>& qb, const PackedB<T>& dob, Scratch<T>& w) {
  const auto& kern = kernels();
  const int64_t rows = i1 - i0, D = o.D;
  T* dk = w.acc.data();
  T* dv = dk + kBwdBlockK * D;
  T* p = w.s.data();
  T* dp = w.dp.data();
  const T* dout = g.dout + i0 * g.lddo;
  scores(h, o, w.ops.kt, i0, rows, j0, n, p, kBwdBlockK);
  kern.exp_rows[kAcc<T>](p, rows, n, kBwdBlockK, g.lse + i0);
  if constexpr (std::is_same_v<T, float>) {
    if (h.vb != nullptr)
      w.ops.vtb.gemm(rows, n, D, g.doutb + i0 * g.lddob, g.lddob, 0.f, dp, kBwdBlockK);
  }
  if (h.vb == nullptr) w.ops.vt.gemm(false, rows, n, D, dout, g.lddo, T(0), dp, kBwdBlockK);
  // With dropout (mask Z, scaled), dV takes P * Z and dP is dropped the same way; dS =
  // P * (dP * Z - delta) uses the undropped P, as rowsum(P * Z * dP) = rowsum(dO * O) = delta.
  const T* pv = p;
  if (o.p > 0) {
    std::copy(p, p + rows * kBwdBlockK, w.pz.data());
    dropout(h, o, i0, rows, j0, n, w.pz.data(), kBwdBlockK);
    dropout(h, o, i0, rows, j0, n, dp, kBwdBlockK);
    pv = w.pz.data();
  }
  dob.gemm(true, n, D, rows, pv, kBwdBlockK, T(1), dv, D);
  kern.ds_rows[kAcc<T>](p, dp, rows, n, kBwdBlockK, g.delta + i0);
  if (g.gmask)
    for (int64_t r = 0; r < rows; ++r)
      std::copy(dp + r * kBwdBlockK, dp + r * kBwdBlockK + n, g.gmask + (i0 + r) * h.Sk + j0);
  const T sc = static_cast<T>(o.scale);
  qb.gemm(true, n, D, rows, dp, kBwdBlockK, T(1), dk, D, sc);
  w.ops.k.gemm(false, rows, D, n, dp, kBwdBlockK, T(1), g.dq + i0 * D, D, sc);
}

// t with unit stride in its last dim and rows at least D apart (what the GEMMs accept); copies
// only when it has not (e.g. a transposed head dim or rows expanded with stride 0).
at::Tensor gemm_ready(const at::Tensor& t, int64_t row_dim) {
  const bool ok = t.stride(-1) == 1 || t.size(-1) == 1;
  const bool rows_ok = t.size(row_dim) <= 1 || t.stride(row_dim) >= t.size(-1);
  return ok && rows_ok ? t : t.contiguous();
}

int64_t row_ld(const at::Tensor& t, int64_t row_dim) {
  return t.size(row_dim) <= 1 ? t.size(-1) : t.stride(row_dim);
}

Opts make_opts(int64_t D, std::optional<double> scale, double p, int64_t seed, int64_t left,
               int64_t right, bool bottom_right) {
  return {D,
          attention::scale_or_default(scale, D),
          left,
          right,
          bottom_right,
          p,
          static_cast<uint64_t>(seed),
          fastdl_dropout_threshold(p)};
}

// Backward of the query heads hs[0 .. group) that share one key/value head: dQ of each (into
// dq[g], ld lddq) and dK/dV of the shared head.
template <typename T>
void bwd_group(const Head<T>* hs, HeadGrad<T>* gs, const T* const* outs, const int64_t* ldo,
               int64_t group, const Opts& o, T* const* dq, int64_t lddq, T* dk, int64_t lddk, T* dv,
               int64_t lddv, Scratch<T>& w) {
  const int64_t Sq = hs[0].Sq, Sk = hs[0].Sk, D = o.D;
  Buf<T> delta(group * Sq), dqa(group * Sq * D);
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t i = 0; i < Sq; ++i) {
      const T* a = gs[g].dout + i * gs[g].lddo;
      const T* b = outs[g] + i * ldo[g];
      T acc = 0;
      for (int64_t d = 0; d < D; ++d) acc += a[d] * b[d];
      delta[g * Sq + i] = acc;
    }
    gs[g].delta = delta.data() + g * Sq;
    gs[g].dq = dqa.data() + g * Sq * D;
  }
  const int64_t nqb = (Sq + kBlockQ - 1) / kBlockQ;
  auto& ops = w.ops;
  if (static_cast<int64_t>(ops.q.size()) < group * nqb) {
    ops.q.resize(group * nqb);
    ops.dout.resize(group * nqb);
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t b = 0; b < nqb; ++b) {
      const int64_t i0 = b * kBlockQ, rows = std::min(kBlockQ, Sq - i0);
      ops.q[g * nqb + b].pack(false, rows, D, hs[g].q + i0 * hs[g].ldq, hs[g].ldq);
      ops.dout[g * nqb + b].pack(false, rows, D, gs[g].dout + i0 * gs[g].lddo, gs[g].lddo);
    }
  for (int64_t j0 = 0; j0 < Sk; j0 += kBwdBlockK) {
    const int64_t n = std::min(kBwdBlockK, Sk - j0);
    std::fill_n(w.acc.data(), n * D, T(0));  // dK, then dV, of the block's n keys
    std::fill_n(w.acc.data() + kBwdBlockK * D, n * D, T(0));
    const Head<T>& h = hs[0];  // the group's heads share K and V
    ops.kt.pack(h, D, j0, n);
    if (h.vb != nullptr)
      ops.vtb.pack(true, D, n, h.vb + j0 * h.ldvb, h.ldvb);
    else
      ops.vt.pack(true, D, n, h.v + j0 * h.ldv, h.ldv);
    ops.k.pack(false, n, D, h.k + j0 * h.ldk, h.ldk);
    for (int64_t g = 0; g < group; ++g)
      for (int64_t b = 0; b < nqb; ++b) {
        const int64_t i0 = b * kBlockQ, i1 = std::min(Sq, i0 + kBlockQ);
        const auto [lo, hi] = key_range(hs[g], o, i0, i1);
        if (hi > j0 && lo < j0 + n && lo < hi)
          bwd_block(hs[g], gs[g], o, i0, i1, j0, n, ops.q[g * nqb + b], ops.dout[g * nqb + b], w);
      }
    for (int64_t r = 0; r < n; ++r) {
      std::copy_n(w.acc.data() + r * D, D, dk + (j0 + r) * lddk);
      std::copy_n(w.acc.data() + (kBwdBlockK + r) * D, D, dv + (j0 + r) * lddv);
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < Sq; ++i)
      for (int64_t d = 0; d < D; ++d) dq[g][i * lddq + d] = dqa[(g * Sq + i) * D + d];
}

// ---------------------------------------------------------------- dense (B, H, S, D)

constexpr const char* kFwd = "fastdl::attention_fwd";
constexpr const char* kBwd = "fastdl::attention_bwd";

// The tensor the kernels read: bfloat16 is computed in float32 (converted once here; the GEMMs
// then run at the float rate and P is never rounded to bf16), with unit stride in its last dim.
at::Tensor compute_view(const at::Tensor& t, int64_t row_dim) {
  return gemm_ready(t.scalar_type() == at::kBFloat16 ? t.to(at::kFloat) : t, row_dim);
}

// The bfloat16 inputs as the products of two inputs read them (see Head), where the CPU
// multiplies bfloat16 natively; else all undefined. The forward reads q and k (v and go null),
// the backward all four (go: grad_out).
struct Bf16Inputs {
  at::Tensor q, k, v, go;
};

Bf16Inputs bf16_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v,
                       const at::Tensor* go, int64_t row_dim) {
  if (q.scalar_type() != at::kBFloat16 || !gemm_bf16_native()) return {};
  const auto ready = [&](const at::Tensor* t) {
    return t != nullptr ? gemm_ready(*t, row_dim) : at::Tensor();
  };
  return {ready(&q), ready(&k), ready(v), ready(go)};
}

// t widened for the float32 products (compute_view), unless its products all read the bfloat16
// bits (defined): undefined then.
at::Tensor widened_unless(const at::Tensor& t, const at::Tensor& bits, int64_t row_dim) {
  return bits.defined() ? at::Tensor() : compute_view(t, row_dim);
}

// Element (a, b, 0, ...) of t as E (bfloat16: its bits), null when t is undefined.
template <typename E>
const E* elem_at(const at::Tensor& t, int64_t a, int64_t b) {
  if (!t.defined()) return nullptr;
  return static_cast<const E*>(t.const_data_ptr()) + a * t.stride(0) + b * t.stride(1);
}

int64_t ld_or_0(const at::Tensor& t, int64_t row_dim) {
  return t.defined() ? row_ld(t, row_dim) : 0;
}

// Query head (a, hq) and key head (ak, hk) of the widened q/k/v and of lo's bits, rows along
// row_dim (dense: (B, H, S, D), varlen: (T, H, D)).
template <typename T>
void set_heads(Head<T>& r, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const Bf16Inputs& lo, int64_t a, int64_t hq, int64_t ak, int64_t hk,
               int64_t row_dim) {
  r.q = elem_at<T>(q, a, hq);
  r.k = elem_at<T>(k, ak, hk);
  r.v = elem_at<T>(v, ak, hk);
  r.ldq = ld_or_0(q, row_dim);
  r.ldk = ld_or_0(k, row_dim);
  r.ldv = ld_or_0(v, row_dim);
  r.qb = elem_at<uint16_t>(lo.q, a, hq);
  r.kb = elem_at<uint16_t>(lo.k, ak, hk);
  r.vb = elem_at<uint16_t>(lo.v, ak, hk);
  r.ldqb = ld_or_0(lo.q, row_dim);
  r.ldkb = ld_or_0(lo.k, row_dim);
  r.ldvb = ld_or_0(lo.v, row_dim);
}

// The Head of (b, h).
template <typename T>
Head<T> dense_head(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const Bf16Inputs& lo, const at::Tensor& mask, const attention::Dims& d,
                   int64_t b, int64_t h, int64_t offset) {
  const int64_t hk = h / (d.Hq / d.Hkv);
  Head<T> r{};
  set_heads(r, q, k, v, lo, b, h, b, hk, 2);
  if (mask.defined()) {
    r.mask = mask.const_data_ptr<T>() + b * mask.stride(0) + h * mask.stride(1);
    r.msi = mask.stride(2);
    r.msj = mask.stride(3);
  }
  r.Sq = d.Sq;
  r.Sk = d.Sk;
  r.ctr_ld = static_cast<uint64_t>(d.Sk);
  r.ctr = static_cast<uint64_t>(offset) + static_cast<uint64_t>((b * d.Hq + h) * d.Sq * d.Sk);
  return r;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_, const at::Tensor& k_,
                                                 const at::Tensor& v_,
                                                 const std::optional<at::Tensor>& attn_mask,
                                                 double p, int64_t seed, int64_t offset,
                                                 int64_t left, int64_t right, bool bottom_right,
                                                 std::optional<double> scale) {
  const auto d = attention::sdpa_dims(kFwd, q_, k_, v_, kDtypes);
  attention::dropout(kFwd, p);
  const at::Tensor mask = attention::additive_mask(kFwd, attn_mask, q_, d);
  auto [out, lse] = attention::sdpa_outputs(q_, d);
  if (out.numel() == 0) return {out, lse};
  const Bf16Inputs lo = bf16_inputs(q_, k_, nullptr, nullptr, 2);
  const at::Tensor q = widened_unless(q_, lo.q, 2), k = widened_unless(k_, lo.k, 2);
  const at::Tensor v = compute_view(v_, 2);
  at::Tensor out_c = out.scalar_type() == v.scalar_type() ? out : at::empty_like(out, v.options());
  const Opts o = make_opts(d.D, scale, p, seed, left, right, bottom_right);
  const int64_t nqb = (d.Sq + kBlockQ - 1) / kBlockQ;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "attention_fwd", [&] {
    using T = scalar_t;
    // A thread takes a whole head at a time (its key blocks packed once) when there are heads
    // enough to go round.
    const int64_t grain = d.B * d.Hq >= 8 * at::get_num_threads() ? nqb : 1;
    parallel_claim(d.B * d.Hq * nqb, grain, [&](const auto& claim) {
      const SequentialBlas sequential;
      Scratch<T> w(d.D, false, p > 0);
      for (int64_t begin, end; claim(begin, end);)
        for (int64_t t = begin; t < end; ++t) {
          const int64_t bh = t / nqb, i0 = (t % nqb) * kBlockQ;
          const int64_t i1 = std::min(d.Sq, i0 + kBlockQ);
          const auto h = dense_head<T>(q, k, v, lo, mask, d, bh / d.Hq, bh % d.Hq, offset);
          fwd_block(h, o, i0, i1, out_c.mutable_data_ptr<T>() + (bh * d.Sq + i0) * d.D, d.D,
                    lse.mutable_data_ptr<T>() + bh * d.Sq + i0, w);
        }
    });
  });
  if (!out_c.is_same(out)) out.copy_(out_c);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const std::optional<at::Tensor>& attn_mask, const at::Tensor& out_, const at::Tensor& lse_,
    double p, int64_t seed, int64_t offset, int64_t left, int64_t right, bool bottom_right,
    std::optional<double> scale, std::array<bool, 4> output_mask) {
  const auto d = attention::sdpa_dims(kBwd, q_, k_, v_, kDtypes);
  attention::dropout(kBwd, p);
  const at::Tensor mask = attention::additive_mask(kBwd, attn_mask, q_, d);
  attention::saved_outputs(kBwd, grad_out_, out_, lse_, q_, {d.B, d.Hq, d.Sq, d.D},
                           {d.B, d.Hq, d.Sq});
  const bool want_mask =
      output_mask[3] && attn_mask.has_value() && attn_mask->scalar_type() != at::kBool;
  const auto acc = attention::acc_type(q_.scalar_type());
  const auto copt = q_.options().dtype(acc);
  at::Tensor gq = new_output(q_.sizes(), copt).zero_(), gk = new_output(k_.sizes(), copt).zero_(),
             gv = new_output(v_.sizes(), copt).zero_();
  at::Tensor gm_full = want_mask ? new_output({d.B, d.Hq, d.Sq, d.Sk}, copt).zero_() : at::Tensor();
  if (q_.numel() > 0 && k_.numel() > 0) {
    const Bf16Inputs lo = bf16_inputs(q_, k_, &v_, &grad_out_, 2);
    const at::Tensor q = compute_view(q_, 2), k = compute_view(k_, 2);
    const at::Tensor v = widened_unless(v_, lo.v, 2);
    const at::Tensor go = compute_view(grad_out_, 2), out = compute_view(out_, 2);
    const at::Tensor lse = lse_.contiguous();
    const Opts o = make_opts(d.D, scale, p, seed, left, right, bottom_right);
    const int64_t group = d.Hq / d.Hkv;
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_bwd", [&] {
      using T = scalar_t;
      parallel_claim(d.B * d.Hkv, 1, [&](const auto& claim) {
        const SequentialBlas sequential;
        Scratch<T> w(d.D, true, p > 0);
        std::vector<Head<T>> hs(group);
        std::vector<HeadGrad<T>> gs(group);
        std::vector<const T*> outs(group);
        std::vector<int64_t> ldo(group, row_ld(out, 2));
        std::vector<T*> dq(group);
        for (int64_t begin, end; claim(begin, end);)
          for (int64_t t = begin; t < end; ++t) {
            const int64_t b = t / d.Hkv, hk = t % d.Hkv;
            for (int64_t g = 0; g < group; ++g) {
              const int64_t h = hk * group + g, bh = b * d.Hq + h;
              hs[g] = dense_head<T>(q, k, v, lo, mask, d, b, h, offset);
              gs[g] = {go.const_data_ptr<T>() + b * go.stride(0) + h * go.stride(1),
                       row_ld(go, 2),
                       elem_at<uint16_t>(lo.go, b, h),
                       ld_or_0(lo.go, 2),
                       lse.const_data_ptr<T>() + bh * d.Sq,
                       nullptr,
                       nullptr,
                       want_mask ? gm_full.mutable_data_ptr<T>() + bh * d.Sq * d.Sk : nullptr};
              outs[g] = out.const_data_ptr<T>() + b * out.stride(0) + h * out.stride(1);
              dq[g] = gq.mutable_data_ptr<T>() + bh * d.Sq * d.D;
            }
            const int64_t kv = (b * d.Hkv + hk) * d.Sk * d.D;
            bwd_group(hs.data(), gs.data(), outs.data(), ldo.data(), group, o, dq.data(), d.D,
                      gk.mutable_data_ptr<T>() + kv, d.D, gv.mutable_data_ptr<T>() + kv, d.D, w);
          }
      });
    });
  }
  const auto ret = [&](bool wanted, const at::Tensor& g) {
    return wanted ? g.to(q_.scalar_type()) : at::empty({0}, q_.options());
  };
  return {
      ret(output_mask[0], gq), ret(output_mask[1], gk), ret(output_mask[2], gv),
      want_mask ? attention::reduce_grad_mask(gm_full, *attn_mask) : at::empty({0}, q_.options())};
}

// ---------------------------------------------------------------- varlen (T, H, D)

constexpr const char* kVFwd = "fastdl::varlen_attention_fwd";
constexpr const char* kVBwd = "fastdl::varlen_attention_bwd";

// cu_seqlens as checked CPU int64.
at::Tensor seqlens(const char* op, const char* name, const at::Tensor& cu, int64_t total,
                   int64_t max_len) {
  at::Tensor c = cu.to(at::kLong).contiguous();
  attention::cu_seqlens_values(op, name, c, total, max_len);
  return c;
}

// The Head of query head h in sequence n; q/k/v rows are tokens (row dim 0).
template <typename T>
Head<T> varlen_head(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const Bf16Inputs& lo, const attention::VarlenDims& d, const int64_t* cq,
                    const int64_t* ck, int64_t n, int64_t h, int64_t offset) {
  const int64_t hk = h / (d.Hq / d.Hkv);
  Head<T> r{};
  set_heads(r, q, k, v, lo, cq[n], h, ck[n], hk, 0);
  r.Sq = cq[n + 1] - cq[n];
  r.Sk = ck[n + 1] - ck[n];
  r.ctr_ld = static_cast<uint64_t>(d.Tk);
  r.ctr = static_cast<uint64_t>(offset) + static_cast<uint64_t>((h * d.Tq + cq[n]) * d.Tk + ck[n]);
  return r;
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& cu_q_,
    const at::Tensor& cu_k_, int64_t max_q, int64_t max_k, double p, int64_t seed, int64_t offset,
    int64_t left, int64_t right, bool bottom_right, std::optional<double> scale) {
  const auto d = attention::varlen_dims(kVFwd, q_, k_, v_, cu_q_, cu_k_, max_q, max_k, kDtypes);
  attention::dropout(kVFwd, p);
  const at::Tensor cu_q = seqlens(kVFwd, "cu_seqlens_q", cu_q_, d.Tq, max_q);
  const at::Tensor cu_k = seqlens(kVFwd, "cu_seqlens_k", cu_k_, d.Tk, max_k);
  at::Tensor out = new_output({d.Tq, d.Hq, d.D}, q_.options());
  at::Tensor lse =
      new_output({d.Hq, d.Tq}, q_.options().dtype(attention::acc_type(q_.scalar_type())));
  const Bf16Inputs lo = bf16_inputs(q_, k_, nullptr, nullptr, 0);
  const at::Tensor q = widened_unless(q_, lo.q, 0), k = widened_unless(k_, lo.k, 0);
  const at::Tensor v = compute_view(v_, 0);
  at::Tensor out_c = out.scalar_type() == v.scalar_type() ? out : at::empty_like(out, v.options());
  const int64_t* cq = cu_q.const_data_ptr<int64_t>();
  const int64_t* ck = cu_k.const_data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (sequence, first query row)
  for (int64_t n = 0; n < d.N; ++n)
    for (int64_t i0 = 0; i0 < cq[n + 1] - cq[n]; i0 += kBlockQ) blocks.emplace_back(n, i0);
  const int64_t nb = static_cast<int64_t>(blocks.size());
  const Opts o = make_opts(d.D, scale, p, seed, left, right, bottom_right);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "varlen_attention_fwd", [&] {
    using T = scalar_t;
    parallel_claim(d.Hq * nb, 1, [&](const auto& claim) {
      const SequentialBlas sequential;
      Scratch<T> w(d.D, false, p > 0);
      for (int64_t begin, end; claim(begin, end);)
        for (int64_t t = begin; t < end; ++t) {
          const int64_t h = t / nb;
          const auto [n, i0] = blocks[t % nb];
          const auto hd = varlen_head<T>(q, k, v, lo, d, cq, ck, n, h, offset);
          const int64_t i1 = std::min(hd.Sq, i0 + kBlockQ), row = cq[n] + i0;
          fwd_block(hd, o, i0, i1, out_c.mutable_data_ptr<T>() + (row * d.Hq + h) * d.D, d.Hq * d.D,
                    lse.mutable_data_ptr<T>() + h * d.Tq + row, w);
        }
    });
  });
  if (!out_c.is_same(out)) out.copy_(out_c);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& cu_q_, const at::Tensor& cu_k_, int64_t max_q, int64_t max_k,
    const at::Tensor& out_, const at::Tensor& lse_, double p, int64_t seed, int64_t offset,
    int64_t left, int64_t right, bool bottom_right, std::optional<double> scale,
    std::array<bool, 3> output_mask) {
  const auto d = attention::varlen_dims(kVBwd, q_, k_, v_, cu_q_, cu_k_, max_q, max_k, kDtypes);
  attention::dropout(kVBwd, p);
  attention::saved_outputs(kVBwd, grad_out_, out_, lse_, q_, {d.Tq, d.Hq, d.D}, {d.Hq, d.Tq});
  const at::Tensor cu_q = seqlens(kVBwd, "cu_seqlens_q", cu_q_, d.Tq, max_q);
  const at::Tensor cu_k = seqlens(kVBwd, "cu_seqlens_k", cu_k_, d.Tk, max_k);
  const auto copt = q_.options().dtype(attention::acc_type(q_.scalar_type()));
  at::Tensor gq = new_output(q_.sizes(), copt).zero_(), gk = new_output(k_.sizes(), copt).zero_(),
             gv = new_output(v_.sizes(), copt).zero_();
  const Bf16Inputs lo = bf16_inputs(q_, k_, &v_, &grad_out_, 0);
  const at::Tensor q = compute_view(q_, 0), k = compute_view(k_, 0);
  const at::Tensor v = widened_unless(v_, lo.v, 0);
  const at::Tensor go = compute_view(grad_out_, 0), out = compute_view(out_, 0);
  const at::Tensor lse = lse_.contiguous();
  const int64_t* cq = cu_q.const_data_ptr<int64_t>();
  const int64_t* ck = cu_k.const_data_ptr<int64_t>();
  const Opts o = make_opts(d.D, scale, p, seed, left, right, bottom_right);
  const int64_t group = d.Hkv ? d.Hq / d.Hkv : 0;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "varlen_attention_bwd", [&] {
    using T = scalar_t;
    parallel_claim(d.Hkv * d.N, 1, [&](const auto& claim) {
      const SequentialBlas sequential;
      Scratch<T> w(d.D, true, p > 0);
      std::vector<Head<T>> hs(group);
      std::vector<HeadGrad<T>> gs(group);
      std::vector<const T*> outs(group);
      std::vector<int64_t> ldo(group, row_ld(out, 0));
      std::vector<T*> dq(group);
      for (int64_t begin, end; claim(begin, end);)
        for (int64_t t = begin; t < end; ++t) {
          const int64_t hk = t / d.N, n = t % d.N;
          for (int64_t g = 0; g < group; ++g) {
            const int64_t h = hk * group + g;
            hs[g] = varlen_head<T>(q, k, v, lo, d, cq, ck, n, h, offset);
            gs[g] = {go.const_data_ptr<T>() + cq[n] * go.stride(0) + h * go.stride(1),
                     row_ld(go, 0),
                     elem_at<uint16_t>(lo.go, cq[n], h),
                     ld_or_0(lo.go, 0),
                     lse.const_data_ptr<T>() + h * d.Tq + cq[n],
                     nullptr,
                     nullptr,
                     nullptr};
            outs[g] = out.const_data_ptr<T>() + cq[n] * out.stride(0) + h * out.stride(1);
            dq[g] = gq.mutable_data_ptr<T>() + (cq[n] * d.Hq + h) * d.D;
          }
          bwd_group(hs.data(), gs.data(), outs.data(), ldo.data(), group, o, dq.data(), d.Hq * d.D,
                    gk.mutable_data_ptr<T>() + (ck[n] * d.Hkv + hk) * d.D, d.Hkv * d.D,
                    gv.mutable_data_ptr<T>() + (ck[n] * d.Hkv + hk) * d.D, d.Hkv * d.D, w);
        }
    });
  });
  const auto ret = [&](bool wanted, const at::Tensor& g) {
    return wanted ? g.to(q_.scalar_type()) : at::empty({0}, q_.options());
  };
  return {ret(output_mask[0], gq), ret(output_mask[1], gk), ret(output_mask[2], gv)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("varlen_attention_fwd", &varlen_attention_fwd);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd);
}

}  // namespace fastdl::cpu
