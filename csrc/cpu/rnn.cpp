// CPU implementations of the rnn ops (schemas and semantics in csrc/ops.cpp): one LSTM/GRU layer
// in one direction over a whole sequence, forward and backpropagation through time.
//
// Forward: the input projection of every step is one large GEMM (or the caller's x, without
// w_ih; its biases added by the pointwise kernels as they read it); then per step the recurrent
// GEMM h W_hh^T and one fused pointwise pass (csrc/cpu/rnn_kernels.h) that applies the gates,
// updates the state and writes the output and what BPTT needs. Backward: per step the fused
// pointwise pass gives the gate gradients and dh_{t-1} = dgates W_hh; the weight gradients and dx
// are single large GEMMs over all steps after the loop (K = T * B instead of T GEMMs with K = B).
// Kernels compute in the accumulation type (float for float32 and bfloat16, double for float64):
// bfloat16 tensors are widened once on entry, so states and sums stay in float across steps, and
// outputs are rounded once. The sequence-sized GEMMs of a bfloat16 layer multiply bfloat16
// operands where the CPU has AVX512-BF16 (mm_dtype), summing in float, and so do the per-step
// recurrent products of the fused forward and backward loops (h, resp. the gate gradients,
// rounded to bfloat16 for them); the small-batch sequence kernels read its bfloat16 w_hh as is.
//
// Deterministic: the same fixed sequence of GEMMs and row-parallel pointwise passes (each row
// written by one thread) every run.
#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <omp.h>
#include <torch/library.h>

#include "common/isa.h"
#include "common/rnn.h"
#include "cpu/gemm.h"
#include "cpu/output.h"
#include "cpu/rnn_params.h"

namespace fastdl::cpu {
namespace {

constexpr std::initializer_list<c10::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kBFloat16};
// Pointwise elements per parallel task below which threading costs more than it saves.
constexpr int64_t kGrainElems = 16384;
// Batches up to this size run the forward as one parallel region over the whole sequence (the
// seq kernels of rnn_kernels.h): per step a GEMV of a few rows, where a BLAS call and a
// parallel_for per step would cost more than the arithmetic.
constexpr int64_t kSeqMaxBatch = 4;

const RnnKernels& kernels() {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::kAvx512:
      return rnn_kernels_avx512();
    case Isa::kAvx2:
      return rnn_kernels_avx2();
#endif
    default:
      return rnn_kernels_scalar();
  }
}

// Which position each row of the batch is at in processing step s (see csrc/ops.cpp).
class Schedule {
 public:
  Schedule(const std::optional<at::Tensor>& lengths, int64_t T, int64_t B, bool reverse)
      : T_(T), reverse_(reverse), pos_(B) {
    if (lengths.has_value() && B > 0) {
      const at::Tensor l = lengths->contiguous();
      len_.assign(l.const_data_ptr<int64_t>(), l.const_data_ptr<int64_t>() + B);
      min_len_ = *std::min_element(len_.begin(), len_.end());
    }
  }
  int64_t len(int64_t b) const { return len_.empty() ? T_ : len_[b]; }
  bool masked() const { return !len_.empty(); }
  const int64_t* lengths() const { return len_.empty() ? nullptr : len_.data(); }
  // Every row takes a step at s (no sequence has ended).
  bool all_active(int64_t s) const { return len_.empty() || s < min_len_; }
  // Every active row of step s is at the same position (then its rows of a sequence tensor are
  // one contiguous (B, width) slice): always true going forward, and without lengths.
  std::optional<int64_t> shared_position(int64_t s) const {
    if (!reverse_) return s;
    if (len_.empty()) return T_ - 1 - s;
    return std::nullopt;
  }
  // Row b's position in step s, -1 once its sequence has ended.
  int64_t position(int64_t s, int64_t b) const {
    const int64_t L = len(b);
    return s >= L ? -1 : (reverse_ ? L - 1 - s : s);
  }
  // Fills the positions of step s; returns them (valid until the next call).
  const int64_t* step(int64_t s) {
    for (size_t b = 0; b < pos_.size(); ++b) pos_[b] = position(s, static_cast<int64_t>(b));
    return pos_.data();
  }

 private:
  int64_t T_;
  bool reverse_;
  std::vector<int64_t> len_;
  int64_t min_len_ = 0;
  std::vector<int64_t> pos_;
};

at::Tensor acc(const at::Tensor& t) {
  return t.to(rnn::acc_type(t)).contiguous();
}

// A (T, B, D) buffer (large ones from new_output's cache: no page faults); zeros when some
// sequences end early, since the kernels skip those positions and the backward GEMMs sum over all
// of them.
at::Tensor seq_buffer(const Schedule& sch, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = new_output(sizes, opts);
  return sch.masked() ? t.zero_() : t;
}

// The state before each position, (T, B, D): seq shifted by one step against the processing
// direction, init at each sequence's first processed position.
at::Tensor prev_states(const at::Tensor& seq, const at::Tensor& init, const Schedule& sch,
                       bool reverse) {
  const int64_t T = seq.size(0), B = seq.size(1);
  if (T == 0) return seq.clone();
  const at::Tensor first = init.unsqueeze(0);
  at::Tensor prev = new_output(seq.sizes(), seq.options());
  at::cat_out(prev, reverse ? at::TensorList{seq.narrow(0, 1, T - 1), first}
                            : at::TensorList{first, seq.narrow(0, 0, T - 1)});
  if (!reverse) return prev;
  if (sch.masked())
    for (int64_t b = 0; b < B; ++b) prev[sch.len(b) - 1][b].copy_(init[b]);
  return prev;
}

// Rows of a (T, B, D) sequence at this step's positions, as a (B, D) matrix: a view when they
// share a position, else gathered into `buf` (rows of ended sequences: any valid row).
at::Tensor step_rows(const at::Tensor& seq, Schedule& sch, int64_t s, const int64_t* pos,
                     at::Tensor& buf) {
  if (auto p = sch.shared_position(s)) return seq[*p];
  const int64_t B = seq.size(1);
  std::vector<int64_t> idx(B);
  for (int64_t b = 0; b < B; ++b) idx[b] = std::max<int64_t>(pos[b], 0) * B + b;
  const at::Tensor index = at::from_blob(idx.data(), {B}, at::kLong);
  return at::index_select_out(buf, seq.view({-1, seq.size(2)}), 0, index);
}

// dst[row(b)] = src[b] for the active rows b (row(b) = pos[b] * B + b when dst is a sequence).
void copy_active(const at::Tensor& src, at::Tensor& dst, const int64_t* pos, bool sequence) {
  const int64_t B = src.size(0), bytes = src.size(1) * src.element_size();
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  for (int64_t b = 0; b < B; ++b)
    if (pos[b] >= 0) std::memcpy(d + (sequence ? pos[b] * B + b : b) * bytes, s + b * bytes, bytes);
}

// dst[b] = a[b] + (b_rows ? b_rows[pos[b]][b] : 0) for the active rows: the gradient reaching a
// step's output from later steps and from y.
void add_active(const at::Tensor& a, const std::optional<at::Tensor>& seq, at::Tensor& dst,
                const int64_t* pos) {
  const int64_t B = a.size(0);
  for (int64_t b = 0; b < B; ++b) {
    if (pos[b] < 0) continue;
    at::Tensor out = dst[pos[b]][b];
    if (seq.has_value())
      at::add_out(out, a[b], (*seq)[pos[b]][b]);
    else
      out.copy_(a[b]);
  }
}

void run_rows(RnnStepFn fn, const RnnStep& p, int64_t width) {
  at::parallel_for(0, p.B, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(width, 1)),
                   [&](int64_t b0, int64_t b1) { fn(p, b0, b1); });
}

// Runs the small-batch sequence kernel: threads own blocks of hidden units for the whole
// sequence and meet at one barrier per step (h is double-buffered, so the barrier is all the
// ordering needed). Returns the buffer holding the final h.
void* run_sequence(RnnSeqStepFn fn, const RnnSeqFwd& p) {
  const int64_t blocks = (p.H + kSeqUnits - 1) / kSeqUnits;
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), blocks));
#pragma omp parallel num_threads(threads)
  {
    const int64_t n = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t j0 = std::min(p.H, blocks * t / n * kSeqUnits);
    const int64_t j1 = std::min(p.H, blocks * (t + 1) / n * kSeqUnits);
    for (int64_t s = 0; s < p.T; ++s) {
      fn(p, s, j0, j1);
#pragma omp barrier
    }
  }
  return p.h[p.T & 1];
}

// Hidden-unit blocks of the fused sequence loops below: block t is units [bound[t], bound[t + 1]),
// split in kSeqUnits, one block per thread.
std::vector<int64_t> unit_blocks(int64_t H) {
  const int64_t units = (H + kSeqUnits - 1) / kSeqUnits;
  const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), units));
  std::vector<int64_t> bound(nb + 1);
  for (int64_t t = 0; t <= nb; ++t) bound[t] = std::min(H, units * t / nb * kSeqUnits);
  return bound;
}

// w_hh ((k * H, H), k gates) as the sequence kernels read it (RnnSeqFwd::wp): per block of
// kSeqUnits units, per k, the k gates' weights of the block's units side by side, zeros past H.
// A step's GEMV then streams each block's weights in order (the rows of w_hh^T it read before
// were four strided streams: ~1.7x slower at batch 1).
at::Tensor seq_weights(const at::Tensor& w_hh, int64_t k) {
  const int64_t H = w_hh.size(1), blocks = (H + kSeqUnits - 1) / kSeqUnits;
  at::Tensor w = at::zeros({k, blocks * kSeqUnits, H}, w_hh.options());
  w.narrow(1, 0, H).copy_(w_hh.reshape({k, H, H}));
  return as_output(w.view({k, blocks, kSeqUnits, H}).permute({1, 3, 0, 2}), w.scalar_type(),
                   at::MemoryFormat::Contiguous);
}

// The weights the sequence kernels stream: a bfloat16 layer's own (half the bytes of the widened
// copy, which they widen exactly as they read them), else w_hh in the accumulation dtype.
const at::Tensor& seq_weight_source(const at::Tensor& w_hh_, const at::Tensor& w_hh) {
  return w_hh_.scalar_type() == at::kBFloat16 ? w_hh_ : w_hh;
}

// The sequence kernels' table index for packed weights wp (RnnKernels::lstm_seq_fwd).
int seq_kind(const at::Tensor& wp) {
  return wp.scalar_type() == at::kDouble ? 1 : wp.scalar_type() == at::kBFloat16 ? 2 : 0;
}

// One 2-D operand as the GEMM reads it: rows or columns unit-stride (`trans` for the latter),
// copied only when neither is.
struct Operand {
  at::Tensor t;
  bool trans;
  int64_t ld;
};

Operand operand(const at::Tensor& t) {
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(t.size(1), 1))
    return {t, false, std::max<int64_t>(t.stride(0), 1)};
  if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(t.size(0), 1))
    return {t, true, std::max<int64_t>(t.stride(1), 1)};
  const at::Tensor c = t.contiguous();
  return {c, false, std::max<int64_t>(c.size(1), 1)};
}

// The dtype of the sequence-sized GEMMs' operands (input projection, weight and input
// gradients): a bfloat16 layer keeps bfloat16 where the CPU multiplies it natively (AVX512-BF16,
// twice the float32 rate; a float32 operand, such as the gate gradients, is rounded to bfloat16
// first, as every tensor of torch's bfloat16 layers is), else the accumulation dtype.
at::ScalarType mm_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 && gemm_bf16_native() ? at::kBFloat16 : rnn::acc_type(x);
}

// w_hh as the fused loops' per-step products read it: the layer's own bfloat16 weights where
// mm_dtype says bfloat16, else w_hh in the accumulation dtype.
const at::Tensor& step_weights(const at::Tensor& w_hh_, const at::Tensor& w_hh) {
  return mm_dtype(w_hh_) == at::kBFloat16 ? w_hh_ : w_hh;
}

// t as a GEMM operand of dtype dt, contiguous.
at::Tensor mm_operand(const at::Tensor& t, at::ScalarType dt) {
  return t.to(dt).contiguous();
}

// a (m x k) @ b (k x n), 2-D views of any strides, in the accumulation dtype: float32 on
// fastdl's GEMM over row blocks in parallel (the MKL sgemm torch links runs these sequence-sized
// products at ~60 GFLOP/s on AMD CPUs), bfloat16 operands on its bfloat16 GEMM (float32 out),
// float64 through at::mm. Each element sums over k in one fixed order, whatever the thread
// count: deterministic.
at::Tensor rnn_mm(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kDouble) return at::mm(a, b);
  TORCH_INTERNAL_ASSERT(b.scalar_type() == a.scalar_type());
  const bool bf16 = a.scalar_type() == at::kBFloat16;
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  at::Tensor c = new_output({m, n}, a.options().dtype(at::kFloat));
  const Operand oa = operand(a), ob = operand(b);
  const char* pa = static_cast<const char*>(oa.t.const_data_ptr());
  const void* pb = ob.t.const_data_ptr();
  float* pc = c.mutable_data_ptr<float>();
  const int64_t rs = (oa.trans ? 1 : oa.ld) * a.element_size();  // bytes from row to row of A
  // One row block per thread (each packs all of b once), in multiples of the micro-tile's rows.
  const int64_t threads = at::get_num_threads();
  const int64_t grain = std::max<int64_t>(1, ((m + threads - 1) / threads + 5) / 6 * 6);
  at::parallel_for(0, m, grain, [&](int64_t r0, int64_t r1) {
    if (bf16)
      gemm_bf16(oa.trans, ob.trans, r1 - r0, n, k, reinterpret_cast<const uint16_t*>(pa + r0 * rs),
                oa.ld, static_cast<const uint16_t*>(pb), ob.ld, 0.f, pc + r0 * n, n);
    else
      gemm<float>(oa.trans, ob.trans, r1 - r0, n, k, reinterpret_cast<const float*>(pa + r0 * rs),
                  oa.ld, static_cast<const float*>(pb), ob.ld, 0.f, pc + r0 * n, n);
  });
  return c;
}

// The bias the forward kernels add to the input projection as they read it (RnnStep::bx):
// b_ih (+ b_hh), or zeros.
at::Tensor input_bias(const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                      int64_t G, const at::TensorOptions& opts) {
  at::Tensor bx = at::zeros({G}, opts);
  if (b_ih.has_value()) bx.add_(acc(*b_ih));
  if (b_hh.has_value()) bx.add_(acc(*b_hh));
  return bx;
}

// out (rows x n, ld ldo) = a (rows x w's k, ld lda) * w, plus `init`'s rows (ld ldi, 0: one row
// for all) when given: a step's recurrent product on one thread's block of units, w packed once
// for the sequence (fastdl's GEMM: the MKL sgemm torch links is slow on AMD CPUs).
// With PackedBBf16, a bfloat16 (its bits) and T float; for other T it does nothing (never called).
template <typename W, typename A, typename T>
void step_gemm(const W& w, int64_t rows, int64_t n, int64_t k, const A* a, int64_t lda,
               const T* init, int64_t ldi, T* out, int64_t ldo) {
  if (init != nullptr)
    for (int64_t r = 0; r < rows; ++r) std::copy_n(init + r * ldi, n, out + r * ldo);
  const T beta = init != nullptr ? T(1) : T(0);
  if constexpr (!std::is_same_v<W, PackedBBf16>)
    w.gemm(false, rows, n, k, a, lda, beta, out, ldo);
  else if constexpr (std::is_same_v<T, float>)
    w.gemm(rows, n, k, a, lda, beta, out, ldo);
}

// The forward steps without projection, batches above kSeqMaxBatch (LSTM: k = 4 gates, GRU:
// k = 3 with b_hh inside the recurrent GEMM): one parallel region for the whole sequence. Each
// thread owns a block of hidden units and per step runs the recurrent GEMM of just its units' k
// gates (single-threaded, on its slice of a w_hh whose rows are regrouped per block, packed once)
// and at once the fused pointwise on that slice, while its gates are still in cache; h is
// double-buffered, so one barrier per step is all the ordering needed (instead of a GEMM
// fork/join and a parallel_for per step). A row whose sequence has ended carries its h over to
// the other buffer. Returns the buffer holding h_T. E: the element type. w_hh in E, or bfloat16
// (E float, see step_weights): the recurrent products then multiply bfloat16, each thread
// rounding h to bfloat16 per step.
template <typename E>
at::Tensor fused_fwd_region(RnnStepFn fn, RnnStep p, Schedule& sch, int64_t k,
                            const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
                            at::Tensor h, int64_t T) {
  const bool bf16 = w_hh.scalar_type() == at::kBFloat16;
  const int64_t B = p.B, H = p.H;
  const std::vector<int64_t> bound = unit_blocks(H);
  const int64_t nb = static_cast<int64_t>(bound.size()) - 1;
  std::vector<int64_t> rows;
  for (int64_t t = 0; t < nb; ++t)
    for (int64_t q = 0; q < k; ++q)
      for (int64_t j = bound[t]; j < bound[t + 1]; ++j) rows.push_back(q * H + j);
  const at::Tensor index = at::from_blob(rows.data(), {k * H}, at::kLong);
  const at::Tensor wperm = w_hh.index_select(0, index).contiguous();
  const std::optional<at::Tensor> bperm =
      b_hh ? std::optional<at::Tensor>(b_hh->index_select(0, index)) : std::nullopt;
  const at::Tensor gh = at::empty({B, k * H}, h.options());
  const at::Tensor hbuf[2] = {h.contiguous(), at::empty({B, H}, h.options())};
  p.gh = gh.const_data_ptr();
  const at::ThreadLocalState tls;
#pragma omp parallel num_threads(static_cast<int>(nb))
  {
    const at::ThreadLocalStateGuard guard(tls);
    const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
    std::vector<int64_t> pos(B);
    std::vector<PackedB<E>> w(bf16 ? 0 : nb);  // this thread's blocks of w_hh^T
    std::vector<PackedBBf16> wb(bf16 ? nb : 0);
    const at::Tensor hb = bf16 ? at::empty({B, H}, wperm.options()) : at::Tensor();
    for (int64_t t = tid; t < nb; t += nt) {
      const int64_t off = k * bound[t] * H, n = k * (bound[t + 1] - bound[t]);
      if (bf16)
        wb[t].pack(true, H, n, static_cast<const uint16_t*>(wperm.const_data_ptr()) + off, H);
      else
        w[t].pack(true, H, n, wperm.const_data_ptr<E>() + off, H);
    }
    for (int64_t s = 0; s < T; ++s) {
      for (int64_t b = 0; b < B; ++b) pos[b] = sch.position(s, b);
      if (bf16) hb.copy_(hbuf[s & 1]);
      for (int64_t t = tid; t < nb; t += nt) {
        const int64_t j0 = bound[t], n = bound[t + 1] - j0;
        if (n == 0) continue;
        const E* init = bperm ? bperm->const_data_ptr<E>() + k * j0 : nullptr;
        E* out = gh.mutable_data_ptr<E>() + k * j0;
        if (bf16)
          step_gemm(wb[t], B, k * n, H, static_cast<const uint16_t*>(hb.const_data_ptr()), H, init,
                    0, out, k * H);
        else
          step_gemm(w[t], B, k * n, H, hbuf[s & 1].const_data_ptr<E>(), H, init, 0, out, k * H);
        RnnStep q = p;
        q.pos = pos.data();
        q.h = hbuf[s & 1].data_ptr();
        q.out = hbuf[(s + 1) & 1].data_ptr();
        q.j0 = j0;
        q.j1 = j0 + n;
        fn(q, 0, B);
        for (int64_t b = 0; sch.masked() && b < B; ++b)
          if (pos[b] < 0)
            std::copy_n(hbuf[s & 1].const_data_ptr<E>() + b * H + j0, n,
                        hbuf[(s + 1) & 1].data_ptr<E>() + b * H + j0);
      }
#pragma omp barrier
    }
  }
  return hbuf[T & 1];
}

// The backward steps without projection, batches above kSeqMaxBatch: one parallel region for the
// whole sequence, as fused_fwd_steps. Each thread owns a block of hidden units: per step the
// fused pointwise of its units (their gate gradients; LSTM: dc), a barrier, then its columns of
// dh_{t-1} = dgates[:, :G] W_hh (GRU: + dh_direct), single-threaded on its column slice of
// w_hh, packed once. The next step's pointwise reads only those columns of dh, so one barrier
// per step orders everything (instead of a BLAS fork/join and a parallel_for per step). With
// lengths an ended row keeps its dh; when the rows of a step are at different positions
// (reversed with lengths), each thread also gathers its columns of the step's gate gradients
// into one of two (B, S) buffers before the barrier (zeros, only to keep the product finite,
// for ended rows). Each element is written by one thread in a fixed order: deterministic. w_hh
// in E, or bfloat16 (E float, see step_weights): the products then multiply bfloat16, each thread
// rounding the step's gate gradients.
template <typename E>
void fused_bwd_region(RnnStepFn fn, const RnnStep& p, Schedule& sch, const at::Tensor& w_hh,
                      at::Tensor& dh, const at::Tensor& dg, const at::Tensor* direct, int64_t T) {
  const bool bf16 = w_hh.scalar_type() == at::kBFloat16;
  const int64_t B = p.B, G = w_hh.size(0);
  const std::vector<int64_t> bound = unit_blocks(p.H);
  const int64_t nb = static_cast<int64_t>(bound.size()) - 1;
  const at::Tensor wc = w_hh.contiguous();
  const int64_t H = p.H, S = dg.size(2);  // S = 4H: 4 runs of H gate-gradient columns
  const bool masked = sch.masked();
  // Positions are shared by every step or by none (they differ only reversed with lengths).
  const bool gather = !sch.shared_position(0).has_value();
  const at::Tensor gathered = gather ? at::empty({2, B, S}, dg.options()) : at::Tensor();
  const at::ThreadLocalState tls;
#pragma omp parallel num_threads(static_cast<int>(nb))
  {
    const at::ThreadLocalStateGuard guard(tls);
    const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
    std::vector<int64_t> pos(B);
    std::vector<E> kept;  // with lengths: the ended rows' dh columns of this thread's block
    std::vector<PackedB<E>> w(bf16 ? 0 : nb);  // this thread's column blocks of w_hh
    std::vector<PackedBBf16> wb(bf16 ? nb : 0);
    const at::Tensor dgb = bf16 ? at::empty({B, G}, wc.options()) : at::Tensor();
    for (int64_t t = tid; t < nb; t += nt) {
      const int64_t n = bound[t + 1] - bound[t];
      if (bf16)
        wb[t].pack(false, G, n, static_cast<const uint16_t*>(wc.const_data_ptr()) + bound[t],
                   wc.stride(0));
      else
        w[t].pack(false, G, n, wc.const_data_ptr<E>() + bound[t], wc.stride(0));
    }
    for (int64_t s = T - 1; s >= 0; --s) {
      for (int64_t b = 0; b < B; ++b) pos[b] = sch.position(s, b);
      E* gs = gather ? gathered.data_ptr<E>() + (s & 1) * B * S : nullptr;
      for (int64_t t = tid; t < nb; t += nt) {
        const int64_t j0 = bound[t], n = bound[t + 1] - j0;
        if (n == 0) continue;
        RnnStep q = p;
        q.pos = pos.data();
        q.j0 = j0;
        q.j1 = j0 + n;
        fn(q, 0, B);
        for (int64_t b = 0; gather && b < B; ++b)
          for (int64_t c = j0; c < G; c += H) {  // the columns the product reads
            E* to = gs + b * S + c;
            if (pos[b] < 0)
              std::fill_n(to, n, E(0));
            else
              std::copy_n(dg.const_data_ptr<E>() + (pos[b] * B + b) * S + c, n, to);
          }
      }
#pragma omp barrier
      const E* dgs = gather ? gs : dg.const_data_ptr<E>() + *sch.shared_position(s) * B * S;
      if (bf16) dgb.copy_(at::from_blob(const_cast<E*>(dgs), {B, G}, {S, 1}, dg.options()));
      for (int64_t t = tid; t < nb; t += nt) {
        const int64_t j0 = bound[t], n = bound[t + 1] - j0;
        if (n == 0) continue;
        E* dht = dh.mutable_data_ptr<E>() + j0;
        kept.clear();
        for (int64_t b = 0; masked && b < B; ++b)
          if (pos[b] < 0) kept.insert(kept.end(), dht + b * H, dht + b * H + n);
        const E* init = direct != nullptr ? direct->const_data_ptr<E>() + j0 : nullptr;
        const int64_t ldi = direct != nullptr ? direct->stride(0) : 0;
        if (bf16)
          step_gemm(wb[t], B, n, G, static_cast<const uint16_t*>(dgb.const_data_ptr()), G, init,
                    ldi, dht, H);
        else
          step_gemm(w[t], B, n, G, dgs, S, init, ldi, dht, H);
        for (int64_t b = 0, i = 0; masked && b < B; ++b)
          if (pos[b] < 0) std::copy_n(kept.data() + n * i++, n, dht + b * H);
      }
    }
  }
}

// fused_fwd_region / fused_bwd_region for the element type of the tensors.
at::Tensor fused_fwd_steps(RnnStepFn fn, const RnnStep& p, Schedule& sch, int64_t k,
                           const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
                           const at::Tensor& h, int64_t T) {
  if (h.scalar_type() == at::kDouble)
    return fused_fwd_region<double>(fn, p, sch, k, w_hh, b_hh, h, T);
  return fused_fwd_region<float>(fn, p, sch, k, w_hh, b_hh, h, T);
}

void fused_bwd_steps(RnnStepFn fn, const RnnStep& p, Schedule& sch, const at::Tensor& w_hh,
                     at::Tensor& dh, const at::Tensor& dg, const at::Tensor* direct, int64_t T) {
  if (dh.scalar_type() == at::kDouble)
    fused_bwd_region<double>(fn, p, sch, w_hh, dh, dg, direct, T);
  else
    fused_bwd_region<float>(fn, p, sch, w_hh, dh, dg, direct, T);
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr() : nullptr;
}

std::optional<at::Tensor> acc_opt(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(acc(*t)) : std::nullopt;
}

// The input projection of every position, (T * B, G), in the accumulation dtype: x W_ih^T (its
// operands as mm_dtype says), or x itself when the caller passed it projected (no w_ih), or the
// rows of the table x that index picks.
at::Tensor input_projection(const at::Tensor& x, const std::optional<at::Tensor>& w_ih,
                            const std::optional<at::Tensor>& index, const rnn::Dims& d) {
  if (index) {
    at::Tensor rows = new_output({d.T * d.B, d.G}, x.options().dtype(rnn::acc_type(x)));
    rnn::gather_rows(rows, acc(x), *index);
    return rows;
  }
  if (!w_ih) return acc(x).view({d.T * d.B, d.I});
  const at::ScalarType mt = mm_dtype(x);
  return rnn_mm(mm_operand(x, mt).view({d.T * d.B, d.I}), mm_operand(*w_ih, mt).t());
}

// grad_x from the gradient of the input projection dgx (T * B, G; as the GEMMs read it, see
// mm_dtype): through w_ih, or dgx itself as (T, B, G), or the gradient of index's table (dgx in
// the accumulation dtype then); in x's dtype.
at::Tensor input_grad(const at::Tensor& dgx, const at::Tensor& x,
                      const std::optional<at::Tensor>& w_ih, const std::optional<at::Tensor>& index,
                      const rnn::Dims& d) {
  if (index) return rnn::table_grad(dgx, *index, x.size(0)).to(x.scalar_type());
  const at::Tensor g = w_ih ? rnn_mm(dgx, mm_operand(*w_ih, dgx.scalar_type())) : dgx;
  return g.view({d.T, d.B, d.I}).to(x.scalar_type());
}

at::Tensor state_grad(const std::optional<at::Tensor>& g, int64_t B, int64_t D,
                      const at::TensorOptions& opts) {
  return g.has_value() ? acc(*g).clone() : at::zeros({B, D}, opts);
}

at::Tensor none(const at::Tensor& x) {
  return at::empty({0}, x.options());
}

// ---------------------------------------------------------------- LSTM

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd(
    const at::Tensor& x_, const at::Tensor& h0_, const at::Tensor& c0_,
    const std::optional<at::Tensor>& w_ih_, const at::Tensor& w_hh_,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr_, const std::optional<at::Tensor>& lengths, bool reverse,
    const std::optional<at::Tensor>& index) {
  const rnn::Dims d = rnn::check_layer("fastdl.lstm", kDtypes, 4, x_, h0_, &c0_, w_ih_, w_hh_, b_ih,
                                       b_hh, w_hr_, lengths, index);
  const auto [T, B, I, H, P, G, S] = d;
  Schedule sch(lengths, T, B, reverse);
  const at::Tensor w_hh = acc(w_hh_);
  const std::optional<at::Tensor> w_hr = acc_opt(w_hr_);
  const auto opts = w_hh.options();
  at::Tensor h = acc(h0_).clone(), c = acc(c0_).clone();
  at::Tensor y = seq_buffer(sch, {T, B, P}, opts);
  at::Tensor gates = seq_buffer(sch, {T, B, S}, opts);
  at::Tensor cs = seq_buffer(sch, {T, B, H}, opts);
  if (T > 0 && B > 0) {
    const at::Tensor gx = input_projection(x_, w_ih_, index, d);
    const at::Tensor bx = input_bias(b_ih, b_hh, G, opts);
    const bool dbl = w_hh.scalar_type() == at::kDouble;
    if (!w_hr && B <= kSeqMaxBatch) {
      at::Tensor h2 = at::empty_like(h);
      const at::Tensor wp = seq_weights(seq_weight_source(w_hh_, w_hh), 4);
      const RnnSeqFwd p{.gx = gx.const_data_ptr(),
                        .bx = bx.const_data_ptr(),
                        .wp = wp.const_data_ptr(),
                        .len = sch.lengths(),
                        .h = {h.data_ptr(), h2.data_ptr()},
                        .c = c.data_ptr(),
                        .y = y.data_ptr(),
                        .gates = gates.data_ptr(),
                        .cs = cs.data_ptr(),
                        .T = T,
                        .B = B,
                        .H = H,
                        .reverse = reverse};
      if (run_sequence(kernels().lstm_seq_fwd[seq_kind(wp)], p) != h.data_ptr()) h = h2;
      const auto dtype = x_.scalar_type();
      return {y.to(dtype), h.to(dtype), c.to(dtype), gates, cs};
    }
    if (!w_hr) {
      const RnnStep p{.B = B,
                      .H = H,
                      .gx = gx.const_data_ptr(),
                      .bx = bx.const_data_ptr(),
                      .c = c.data_ptr(),
                      .y = y.data_ptr(),
                      .gates = gates.data_ptr(),
                      .cs = cs.data_ptr()};
      h = fused_fwd_steps(kernels().lstm_fwd[dbl], p, sch, 4, step_weights(w_hh_, w_hh),
                          std::nullopt, h, T);
      const auto dtype = x_.scalar_type();
      return {y.to(dtype), h.to(dtype), c.to(dtype), gates, cs};
    }
    at::Tensor gh = at::empty({B, G}, opts);
    at::Tensor r = w_hr ? at::empty({B, H}, opts) : h;
    at::Tensor hp = at::empty({B, P}, opts);
    RnnStep p{.B = B,
              .H = H,
              .gx = gx.const_data_ptr(),
              .bx = bx.const_data_ptr(),
              .gh = gh.const_data_ptr(),
              .c = c.data_ptr(),
              .out = r.data_ptr(),
              .y = w_hr ? nullptr : y.data_ptr(),
              .gates = gates.data_ptr(),
              .cs = cs.data_ptr()};
    const RnnStepFn fn = kernels().lstm_fwd[dbl];
    for (int64_t s = 0; s < T; ++s) {
      p.pos = sch.step(s);
      at::mm_out(gh, h, w_hh.t());
      run_rows(fn, p, G);
      if (!w_hr) continue;
      at::mm_out(hp, r, w_hr->t());
      copy_active(hp, h, p.pos, false);
      copy_active(hp, y, p.pos, true);
    }
  }
  const auto dtype = x_.scalar_type();
  return {y.to(dtype), h.to(dtype), c.to(dtype), gates, cs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
lstm_layer_bwd(const std::optional<at::Tensor>& grad_y_, const std::optional<at::Tensor>& grad_hn,
               const std::optional<at::Tensor>& grad_cn, const at::Tensor& x_,
               const at::Tensor& h0_, const at::Tensor& c0_, const std::optional<at::Tensor>& w_ih_,
               const at::Tensor& w_hh_, const std::optional<at::Tensor>& w_hr_,
               const std::optional<at::Tensor>& lengths, bool reverse, const at::Tensor& y_,
               const at::Tensor& gates_, const at::Tensor& cs_, std::array<bool, 2> mask,
               const std::optional<at::Tensor>& index) {
  const char* op = "fastdl.lstm";
  const rnn::Dims d = rnn::check_layer(op, kDtypes, 4, x_, h0_, &c0_, w_ih_, w_hh_, std::nullopt,
                                       std::nullopt, w_hr_, lengths, index);
  rnn::check_saved(op, d, x_, grad_y_, grad_hn, grad_cn, y_, gates_, &cs_);
  const auto [T, B, I, H, P, G, S] = d;
  Schedule sch(lengths, T, B, reverse);
  // x itself only for dw_ih: without w_ih it is the caller's projection, which the backward
  // never reads (the autograd formula passes a stride-0 stand-in of its shape).
  const at::Tensor w_hh = acc(w_hh_);
  const at::Tensor gates = gates_.contiguous(), cs = cs_.contiguous();
  const std::optional<at::Tensor> w_hr = acc_opt(w_hr_), grad_y = acc_opt(grad_y_);
  const auto opts = w_hh.options();
  at::Tensor dh = state_grad(grad_hn, B, P, opts), dc = state_grad(grad_cn, B, H, opts);
  at::Tensor dg = seq_buffer(sch, {T, B, S}, opts);
  // With a projection, the gradient of each step's projected output (T, B, P), for dw_hr.
  at::Tensor dhp = w_hr ? seq_buffer(sch, {T, B, P}, opts) : at::Tensor();
  if (T > 0 && B > 0) {
    const at::Tensor c0 = acc(c0_);
    const at::Tensor cprev = prev_states(cs, c0, sch, reverse);
    at::Tensor dr = w_hr ? at::empty({B, H}, opts) : dh;
    at::Tensor rows_g = at::empty({B, S}, opts), rows_p = at::empty({B, P}, opts);
    at::Tensor dh_new = at::empty({B, P}, opts);
    RnnStep p{.B = B,
              .H = H,
              .gates = const_cast<void*>(gates.const_data_ptr()),
              .cs = const_cast<void*>(cs.const_data_ptr()),
              .dh = dr.const_data_ptr(),
              .gy = w_hr ? nullptr : ptr_or_null(grad_y),
              .prev = cprev.const_data_ptr(),
              .dgates = dg.data_ptr(),
              .dc = dc.data_ptr()};
    const RnnStepFn fn = kernels().lstm_bwd[w_hh.scalar_type() == at::kDouble];
    const bool fused = !w_hr && B > kSeqMaxBatch;
    if (fused) fused_bwd_steps(fn, p, sch, step_weights(w_hh_, w_hh), dh, dg, nullptr, T);
    for (int64_t s = fused ? -1 : T - 1; s >= 0; --s) {
      p.pos = sch.step(s);
      if (w_hr) {
        add_active(dh, grad_y, dhp, p.pos);
        at::mm_out(dr, step_rows(dhp, sch, s, p.pos, rows_p), *w_hr);
      }
      run_rows(fn, p, G);
      const at::Tensor dgs = step_rows(dg, sch, s, p.pos, rows_g);
      if (sch.all_active(s)) {
        at::mm_out(dh, dgs, w_hh);
      } else {
        at::mm_out(dh_new, dgs, w_hh);
        copy_active(dh_new, dh, p.pos, false);
      }
    }
  }
  const auto dtype = x_.scalar_type();
  const at::ScalarType mt = mm_dtype(x_);
  const at::Tensor dg2 = dg.view({T * B, S});
  const at::Tensor dgm = dg2.to(mt);  // as the GEMMs read it
  at::Tensor gx = mask[0] ? input_grad(index ? dg2 : dgm, x_, w_ih_, index, d) : none(x_);
  at::Tensor gw_ih = none(x_), gw_hh = none(x_), gb_ih = none(x_), gb_hh = none(x_);
  at::Tensor gw_hr = none(x_);
  if (mask[1]) {
    const at::Tensor hprev = prev_states(mm_operand(y_, mt), mm_operand(h0_, mt), sch, reverse);
    if (w_ih_) gw_ih = rnn_mm(dgm.t(), mm_operand(x_, mt).view({T * B, I})).to(dtype);
    gw_hh = rnn_mm(dgm.t(), hprev.view({T * B, P})).to(dtype);
    const at::Tensor db = dg2.sum(0);
    gb_ih = db.to(dtype);
    gb_hh = db.to(dtype).clone();
    if (w_hr) {
      const at::Tensor r = gates.narrow(2, 3 * H, H) * at::tanh(cs);
      gw_hr = rnn_mm(dhp.view({T * B, P}).t(), r.view({T * B, H})).to(dtype);
    }
  }
  return {gx, dh.to(dtype), dc.to(dtype), gw_ih, gw_hh, gb_ih, gb_hh, gw_hr};
}

// ---------------------------------------------------------------- GRU

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_fwd(
    const at::Tensor& x_, const at::Tensor& h0_, const std::optional<at::Tensor>& w_ih_,
    const at::Tensor& w_hh_, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& lengths, bool reverse,
    const std::optional<at::Tensor>& index) {
  const rnn::Dims d = rnn::check_layer("fastdl.gru", kDtypes, 3, x_, h0_, nullptr, w_ih_, w_hh_,
                                       b_ih, b_hh, std::nullopt, lengths, index);
  const auto [T, B, I, H, P, G, S] = d;
  Schedule sch(lengths, T, B, reverse);
  const at::Tensor w_hh = acc(w_hh_);
  const auto opts = w_hh.options();
  at::Tensor h = acc(h0_).clone();
  at::Tensor y = seq_buffer(sch, {T, B, H}, opts);
  at::Tensor gates = seq_buffer(sch, {T, B, S}, opts);
  if (T > 0 && B > 0) {
    const at::Tensor gx = input_projection(x_, w_ih_, index, d);
    const at::Tensor bx = input_bias(b_ih, std::nullopt, G, opts);
    const std::optional<at::Tensor> bh = acc_opt(b_hh);
    const bool dbl = w_hh.scalar_type() == at::kDouble;
    if (B <= kSeqMaxBatch) {
      at::Tensor h2 = at::empty_like(h);
      const at::Tensor wp = seq_weights(seq_weight_source(w_hh_, w_hh), 3);
      const RnnSeqFwd p{.gx = gx.const_data_ptr(),
                        .bx = bx.const_data_ptr(),
                        .wp = wp.const_data_ptr(),
                        .bh = bh ? bh->const_data_ptr() : nullptr,
                        .len = sch.lengths(),
                        .h = {h.data_ptr(), h2.data_ptr()},
                        .y = y.data_ptr(),
                        .gates = gates.data_ptr(),
                        .T = T,
                        .B = B,
                        .H = H,
                        .reverse = reverse};
      if (run_sequence(kernels().gru_seq_fwd[seq_kind(wp)], p) != h.data_ptr()) h = h2;
      const auto dtype = x_.scalar_type();
      return {y.to(dtype), h.to(dtype), gates};
    }
    const RnnStep p{.B = B,
                    .H = H,
                    .gx = gx.const_data_ptr(),
                    .bx = bx.const_data_ptr(),
                    .y = y.data_ptr(),
                    .gates = gates.data_ptr()};
    h = fused_fwd_steps(kernels().gru_fwd[dbl], p, sch, 3, step_weights(w_hh_, w_hh), bh, h, T);
  }
  const auto dtype = x_.scalar_type();
  return {y.to(dtype), h.to(dtype), gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_layer_bwd(
    const std::optional<at::Tensor>& grad_y_, const std::optional<at::Tensor>& grad_hn,
    const at::Tensor& x_, const at::Tensor& h0_, const std::optional<at::Tensor>& w_ih_,
    const at::Tensor& w_hh_, const std::optional<at::Tensor>& lengths, bool reverse,
    const at::Tensor& y_, const at::Tensor& gates_, std::array<bool, 2> mask,
    const std::optional<at::Tensor>& index) {
  const char* op = "fastdl.gru";
  const rnn::Dims d = rnn::check_layer(op, kDtypes, 3, x_, h0_, nullptr, w_ih_, w_hh_, std::nullopt,
                                       std::nullopt, std::nullopt, lengths, index);
  rnn::check_saved(op, d, x_, grad_y_, grad_hn, std::nullopt, y_, gates_, nullptr);
  const auto [T, B, I, H, P, G, S] = d;
  Schedule sch(lengths, T, B, reverse);
  const at::Tensor w_hh = acc(w_hh_);  // x only for dw_ih, as in lstm_layer_bwd
  const at::Tensor gates = gates_.contiguous();
  const std::optional<at::Tensor> grad_y = acc_opt(grad_y_);
  const auto opts = w_hh.options();
  at::Tensor dh = state_grad(grad_hn, B, H, opts);
  at::Tensor dg = seq_buffer(sch, {T, B, S}, opts);
  const at::Tensor hprev = prev_states(acc(y_), acc(h0_), sch, reverse);
  if (T > 0 && B > 0) {
    at::Tensor direct = at::empty({B, H}, opts), dh_new = at::empty({B, H}, opts);
    at::Tensor rows = at::empty({B, S}, opts);
    RnnStep p{.B = B,
              .H = H,
              .gates = const_cast<void*>(gates.const_data_ptr()),
              .dh = dh.const_data_ptr(),
              .gy = ptr_or_null(grad_y),
              .prev = hprev.const_data_ptr(),
              .dgates = dg.data_ptr(),
              .dh_direct = direct.data_ptr()};
    const RnnStepFn fn = kernels().gru_bwd[w_hh.scalar_type() == at::kDouble];
    const bool fused = B > kSeqMaxBatch;
    if (fused) fused_bwd_steps(fn, p, sch, step_weights(w_hh_, w_hh), dh, dg, &direct, T);
    for (int64_t s = fused ? -1 : T - 1; s >= 0; --s) {
      p.pos = sch.step(s);
      run_rows(fn, p, S);
      const at::Tensor dgs = step_rows(dg, sch, s, p.pos, rows).narrow(1, 0, G);
      if (sch.all_active(s)) {
        at::addmm_out(dh, direct, dgs, w_hh);
      } else {
        at::addmm_out(dh_new, direct, dgs, w_hh);
        copy_active(dh_new, dh, p.pos, false);
      }
    }
  }
  // dgates columns: [r, z] and n_pre multiply w_ih (its rows [0, 2H) and [2H, 3H)); [r, z] and
  // W_hn h + b_hn multiply w_hh (columns [0, 3H)).
  const auto dtype = x_.scalar_type();
  const at::ScalarType mt = mm_dtype(x_);
  const at::Tensor dg2 = dg.view({T * B, S});
  const at::Tensor dgm = dg2.to(mt);  // as the GEMMs read it
  const at::Tensor d_rz = dgm.narrow(1, 0, 2 * H), d_n = dgm.narrow(1, 3 * H, H);
  at::Tensor gx = none(x_);
  if (mask[0] && w_ih_) {
    const at::Tensor w_ih = mm_operand(*w_ih_, mt);
    gx = rnn_mm(d_rz, w_ih.narrow(0, 0, 2 * H))
             .add_(rnn_mm(d_n, w_ih.narrow(0, 2 * H, H)))
             .view({T, B, I})
             .to(dtype);
  } else if (mask[0]) {
    const at::Tensor g = index ? dg2 : dgm;
    gx =
        input_grad(at::cat({g.narrow(1, 0, 2 * H), g.narrow(1, 3 * H, H)}, 1), x_, w_ih_, index, d);
  }
  at::Tensor gw_ih = none(x_), gw_hh = none(x_), gb_ih = none(x_), gb_hh = none(x_);
  if (mask[1]) {
    if (w_ih_) {
      const at::Tensor x2 = mm_operand(x_, mt).view({T * B, I});
      gw_ih = at::cat({rnn_mm(d_rz.t(), x2), rnn_mm(d_n.t(), x2)}).to(dtype);
    }
    gw_hh = rnn_mm(dgm.narrow(1, 0, G).t(), hprev.to(mt).view({T * B, H})).to(dtype);
    const at::Tensor db = dg2.sum(0);
    gb_ih = at::cat({db.narrow(0, 0, 2 * H), db.narrow(0, 3 * H, H)}).to(dtype);
    gb_hh = db.narrow(0, 0, G).to(dtype).clone();
  }
  return {gx, dh.to(dtype), gw_ih, gw_hh, gb_ih, gb_hh};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("lstm_layer_fwd", &lstm_layer_fwd);
  m.impl("lstm_layer_bwd", &lstm_layer_bwd);
  m.impl("gru_layer_fwd", &gru_layer_fwd);
  m.impl("gru_layer_bwd", &gru_layer_bwd);
}

}  // namespace fastdl::cpu
