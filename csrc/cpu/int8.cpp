// CPU implementations of the int8 ops (schemas in csrc/ops.cpp): input checks, allocation, the
// A-buffer first pass (int8 copy or fused per-token quantization), the tiling of the GEMM over
// threads and the LLM.int8 outlier correction. The kernels (csrc/cpu/int8_kernels.h) see raw
// pointers only. Every op is deterministic: integer accumulation, and each output element is
// computed by one thread in a fixed order.
#include <algorithm>
#include <chrono>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/isa.h"
#include "cpu/int8_params.h"
#include "cpu/output.h"
#include "cpu/parallel.h"

namespace fastdl::cpu {
namespace {

constexpr std::initializer_list<c10::ScalarType> kFloatDtypes = {at::kFloat, at::kBFloat16,
                                                                 at::kHalf};
constexpr std::initializer_list<c10::ScalarType> kOutDtypes = {at::kInt, at::kFloat, at::kBFloat16,
                                                               at::kHalf};
// Rows per parallel task of the row passes (quantization, A copy).
constexpr int64_t kRowGrain = 16;

// AVX-512 without VNNI (Skylake-X) runs the AVX2 kernels: vpmaddwd is exact, and AVX-512's
// vpmaddubsw would saturate like AVX2's.
const Int8Kernels& kernels() {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::kAvx512:
      if (cpu_has_avx512_vnni()) return int8_kernels_avx512();
      return int8_kernels_avx2();
    case Isa::kAvx2:
      return int8_kernels_avx2();
#endif
    default:
      return int8_kernels_scalar();
  }
}

Int8In in_index(c10::ScalarType t) {
  switch (t) {
    case at::kBFloat16:
      return kInBF16;
    case at::kHalf:
      return kInF16;
    case at::kChar:
      return kInI8;
    default:
      return kInF32;
  }
}

Int8Out out_index(c10::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kOutF32;
    case at::kBFloat16:
      return kOutBF16;
    case at::kHalf:
      return kOutF16;
    default:
      return kOutI32;
  }
}

// (rows, K) with unit column stride (a copy only when the view has none).
at::Tensor rows_view(const at::Tensor& x) {
  // Rows counted explicitly: reshape(-1, 0) is ambiguous for K = 0.
  const int64_t rows = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  at::Tensor r = x.reshape({rows, x.size(-1)});
  return r.stride(-1) == 1 ? r : r.contiguous();
}

std::optional<at::Tensor> as_float(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  if (t->scalar_type() == at::kFloat && t->is_contiguous()) return t;  // used as it is: (n) values
  return t->reshape({-1}).to(at::kFloat).contiguous();
}

const float* ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// The GEMM's A operand: rows of int8 values. int8 rows of a whole number of k groups are read
// where they lie (no pass over A at all); others are copied (K padded with zeros to a multiple
// of 4) or, floats, quantized per row into `scale` (columns marked in `skip` left out).
struct AOperand {
  at::Tensor rows;  // x's own or the copy
  int64_t lda;
};

AOperand first_pass(const Int8Kernels& t, const at::Tensor& x2, float* scale, const uint8_t* skip) {
  const int64_t M = x2.size(0), K = x2.size(1);
  if (x2.scalar_type() == at::kChar && K % 4 == 0) return {x2, x2.stride(0)};
  // Rows padded to whole cache lines; the extra line keeps rows off one L1 set at K = 2^n.
  AOperand a{at::Tensor(), (int8_k4(K) * 4 + 63) / 64 * 64 + 64};
  a.rows = new_output({std::max<int64_t>(M * a.lda, 1)}, x2.options().dtype(at::kChar));
  QuantRows q{x2.data_ptr(), x2.stride(0), a.rows.data_ptr<int8_t>(), a.lda, scale, skip, K,
              int8_k4(K) * 4};
  const QuantFn fn = t.quantize[in_index(x2.scalar_type())];
  at::parallel_for(0, M, kRowGrain, [&](int64_t r0, int64_t r1) { fn(q, r0, r1); });
  return a;
}

// This thread's buffer for the B panels of one tile (4 x K x 64 bytes and their column sums),
// 64-byte aligned: the kernels' 64-byte loads of B must not straddle cache lines. Kept for the
// thread's life and grown as needed (1 MiB at K = 4096), rather than a fresh allocation per call:
// hundreds of KiB from mmap, a page fault and the zeroing of each page every call.
uint8_t* pack_workspace(int64_t bytes) {
  thread_local std::vector<uint8_t> work;
  if (work.size() < static_cast<size_t>(bytes + 63)) work.resize(bytes + 63);
  const uintptr_t p = reinterpret_cast<uintptr_t>(work.data());
  return reinterpret_cast<uint8_t*>((p + 63) / 64 * 64);
}

// C = A x B over tiles of rows x panels, claimed by the threads as they finish. A tile's B panels
// (at most 4 x K x 64 bytes) stay in L2 while the kernel walks its rows; rows are split only as
// far as needed to give every thread a few tiles, so that B is read from memory about once (M = 1
// splits over panels only: tiles of 4 panels, which its kernel reads side by side).
//
// `unpacked` (nullable): B is not packed yet. Each tile then packs its own panels into a buffer of
// its thread (which stays in L2, read right after) and runs on that window of columns: no packed
// copy of the whole of B is written to memory and read back. At 2048^3 that was ~4% of the time.
void run_gemm(const Int8Kernels& t, Gemm g, Int8Out out, const PackB* unpacked = nullptr) {
  if (g.M == 0 || g.N == 0) return;
  const int64_t esize = out == kOutI32 || out == kOutF32 ? 4 : 2;
  g.stream = g.M * g.N * esize >= kStreamBytes;
  const int64_t panels = int8_panels(g.N);
  const int64_t threads = at::get_num_threads();
  int64_t pb = 4;
  while (pb > 1 && (panels + pb - 1) / pb < 4 * threads) pb /= 2;
  const int64_t panel_tiles = (panels + pb - 1) / pb;
  const int64_t splits = std::max<int64_t>(1, (4 * threads + panel_tiles - 1) / panel_tiles);
  const int64_t mb =
      std::max<int64_t>(t.mr, ((g.M + splits - 1) / splits + t.mr - 1) / t.mr * t.mr);
  const int64_t row_tiles = (g.M + mb - 1) / mb;
  const GemmFn fn = t.gemm[out];
  parallel_claim(row_tiles * panel_tiles, 1, [&](const auto& claim) {
    uint8_t* local =
        unpacked != nullptr ? pack_workspace(int8_packed_bytes(unpacked->K, pb * kPanel)) : nullptr;
    for (int64_t i0, i1; claim(i0, i1);)
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t m0 = i / panel_tiles * mb, m1 = std::min(g.M, m0 + mb);
        const int64_t p0 = i % panel_tiles * pb, p1 = std::min(panels, p0 + pb);
        if (unpacked == nullptr) {
          fn(g, m0, m1, p0, p1);
          continue;
        }
        // Columns [c0, c0 + w) of B and C as a problem of their own.
        const int64_t c0 = p0 * kPanel, w = std::min(g.N, p1 * kPanel) - c0;
        PackB pw = *unpacked;
        pw.b += pw.nk ? c0 * pw.ld : c0;
        pw.N = w;
        pw.dst = local;
        t.pack_b(pw, 0, p1 - p0);
        Gemm gw = g;
        gw.b = pw.dst;
        gw.b_colsum = reinterpret_cast<const int32_t*>(pw.dst + int8_colsum_offset(pw.K, w));
        gw.N = w;
        gw.out = static_cast<char*>(g.out) + c0 * esize;
        if (g.b_scale != nullptr) gw.b_scale += c0;
        if (g.bias != nullptr) gw.bias += c0;
        fn(gw, m0, m1, 0, p1 - p0);
      }
  });
}

at::Tensor pack(const Int8Kernels& t, const at::Tensor& b, bool nk) {
  const int64_t K = nk ? b.size(1) : b.size(0), N = nk ? b.size(0) : b.size(1);
  at::Tensor packed = new_output({int8_packed_bytes(K, N)}, b.options().dtype(at::kByte));
  PackB p{b.data_ptr<int8_t>(), b.stride(0), nk, K, N, packed.data_ptr<uint8_t>()};
  at::parallel_for(0, int8_panels(N), 1, [&](int64_t p0, int64_t p1) { t.pack_b(p, p0, p1); });
  return packed;
}

Gemm gemm_args(const AOperand& a, const uint8_t* packed, int64_t M, int64_t N, int64_t K) {
  Gemm g{};
  g.a = a.rows.data_ptr<int8_t>();
  g.lda = a.lda;
  g.b = packed;
  if (packed != nullptr)
    g.b_colsum = reinterpret_cast<const int32_t*>(packed + int8_colsum_offset(K, N));
  g.M = M;
  g.N = N;
  g.K4 = int8_k4(K);
  return g;
}

// ---------------------------------------------------------------- ops

std::tuple<at::Tensor, at::Tensor> int8_quantize(const at::Tensor& x) {
  constexpr const char* op = "fastdl.int8_quantize";
  checks::dtype(op, "x", x, kFloatDtypes);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  const at::Tensor x2 = rows_view(x);
  at::Tensor q = new_output(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  if (x.numel() == 0) {
    scale.fill_(1.f);
    return {q, scale};
  }
  const Int8Kernels& t = kernels();
  QuantRows p{x2.data_ptr(),           x2.stride(0), q.data_ptr<int8_t>(), x.size(-1),
              scale.data_ptr<float>(), nullptr,      x.size(-1),           x.size(-1)};
  const QuantFn fn = t.quantize[in_index(x.scalar_type())];
  at::parallel_for(0, x2.size(0), kRowGrain, [&](int64_t r0, int64_t r1) { fn(p, r0, r1); });
  return {q, scale};
}

at::Tensor int8_pack_weight(const at::Tensor& w) {
  constexpr const char* op = "fastdl.int8_pack_weight";
  checks::dtype(op, "w", w, {at::kChar});
  TORCH_CHECK(w.dim() == 2, op, ": w must be (out_features, in_features), got shape ", w.sizes());
  const at::Tensor wc = w.stride(1) == 1 ? w : w.contiguous();
  return pack(kernels(), wc, /*nk=*/true);
}

at::Tensor int8_matmul(const at::Tensor& a, const at::Tensor& b,
                       const std::optional<at::Tensor>& a_scale,
                       const std::optional<at::Tensor>& b_scale,
                       const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  constexpr const char* op = "fastdl.int8_matmul";
  checks::dtype(op, "a", a, {at::kChar});
  checks::dtype(op, "b", b, {at::kChar});
  checks::same_device(op, "b", b, a);
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, op, ": a and b must be 2-D, got shapes ", a.sizes(),
              " and ", b.sizes());
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(b.size(0) == K, op, ": a (", M, ", ", K, ") and b ", b.sizes(),
              " do not match in K (a.shape[1] must equal b.shape[0])");
  TORCH_CHECK_TYPE(std::find(kOutDtypes.begin(), kOutDtypes.end(), out_dtype) != kOutDtypes.end(),
                   op, ": unsupported out_dtype ", out_dtype,
                   "; supported: ", checks::dtype_list(kOutDtypes));
  const bool scaled = a_scale.has_value() || b_scale.has_value() || bias.has_value();
  TORCH_CHECK_TYPE(!(scaled && out_dtype == at::kInt), op,
                   ": scales and bias need a floating out_dtype (Float, BFloat16 or Half), ",
                   "got out_dtype Int");
  if (a_scale.has_value()) checks::int8_scale(op, "a_scale", *a_scale, a, M, {M, 1});
  if (b_scale.has_value()) checks::int8_scale(op, "b_scale", *b_scale, a, N, {1, N});
  if (bias.has_value()) {
    checks::same_device(op, "bias", *bias, a);
    checks::dtype(op, "bias", *bias, kFloatDtypes);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N,
                ",), got ", bias->sizes());
  }
  at::Tensor out = new_output({M, N}, a.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  const Int8Kernels& t = kernels();
  // B as given, or (a transposed view) as the (N, K) rows it views: both pack without a copy.
  const bool nk = b.stride(0) == 1 && b.stride(1) != 1;
  const at::Tensor bc = nk ? b.t() : (b.stride(1) == 1 ? b : b.contiguous());
  const PackB unpacked{bc.data_ptr<int8_t>(), bc.stride(0), nk, K, N, nullptr};
  const AOperand ao = first_pass(t, rows_view(a), nullptr, nullptr);
  const auto as = as_float(a_scale), bs = as_float(b_scale), bi = as_float(bias);
  Gemm g = gemm_args(ao, nullptr, M, N, K);
  g.a_scale = ptr(as);
  g.b_scale = ptr(bs);
  g.bias = ptr(bi);
  g.out = out.data_ptr();
  g.ldo = N;
  run_gemm(t, g, out_index(out_dtype), &unpacked);
  return out;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_packed,
                       const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                       std::optional<double> outlier_threshold) {
  constexpr const char* op = "fastdl.int8_linear";
  checks::dtype(op, "x", x, kFloatDtypes);
  checks::dtype(op, "w", w, {at::kChar});
  checks::same_device(op, "w", w, x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(-1), op,
              ": w must be (out_features, in_features) with in_features = x.shape[-1] = ",
              x.size(-1), ", got shape ", w.sizes());
  const int64_t N = w.size(0), K = w.size(1);
  checks::int8_scale(op, "w_scale", w_scale, x, N, {N, 1});
  checks::same_device(op, "w_packed", w_packed, x);
  TORCH_CHECK(w_packed.scalar_type() == at::kByte && w_packed.dim() == 1 &&
                  w_packed.numel() == int8_packed_bytes(K, N),
              op, ": w_packed must be fastdl.int8_pack_weight(w) for w of shape ", w.sizes(),
              " (uint8, ", int8_packed_bytes(K, N), " bytes), got ", w_packed.scalar_type(),
              " of shape ", w_packed.sizes());
  if (bias.has_value()) checks::param(op, "bias", bias, x, N);
  if (outlier_threshold.has_value())
    TORCH_CHECK(*outlier_threshold > 0, op, ": outlier_threshold must be positive, got ",
                *outlier_threshold);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  const at::Tensor x2 = rows_view(x);
  const int64_t M = x2.size(0);
  if (M == 0 || N == 0) return at::empty(shape, x.options());

  // LLM.int8 (Dettmers et al., 2022): input columns with any |x| >= threshold stay in floating
  // point, multiplied by the dequantized weight columns; the rest goes through the int8 GEMM.
  at::Tensor skip, outliers;
  if (outlier_threshold.has_value() && K > 0) {
    const at::Tensor mask = x2.abs().amax(0).ge(*outlier_threshold);
    outliers = mask.nonzero().view(-1);
    if (outliers.numel() > 0) skip = mask.to(at::kByte).contiguous();
  }
  const bool split = skip.defined();
  const Int8Kernels& t = kernels();
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  const AOperand ao =
      first_pass(t, x2, scale.data_ptr<float>(), split ? skip.data_ptr<uint8_t>() : nullptr);
  const auto ws = as_float(w_scale), bi = as_float(bias);
  // With outliers, the int8 part is summed in float32 with the floating-point part, then rounded.
  at::Tensor out = new_output({M, N}, x.options().dtype(split ? at::kFloat : x.scalar_type()));
  Gemm g = gemm_args(ao, w_packed.data_ptr<uint8_t>(), M, N, K);
  g.a_scale = scale.data_ptr<float>();
  g.b_scale = ptr(ws);
  g.bias = ptr(bi);
  g.out = out.data_ptr();
  g.ldo = N;
  run_gemm(t, g, out_index(out.scalar_type()));
  if (split) {
    const at::Tensor w_out = w.index_select(1, outliers).to(at::kFloat).mul_(ws->view({N, 1}));
    out.addmm_(x2.index_select(1, outliers).to(at::kFloat), w_out.t());
    out = out.to(x.scalar_type());
  }
  return out.view(shape);
}

}  // namespace

double int8_peak_gops() {
  const PeakLoop peak = kernels().peak;
  if (peak.run == nullptr) return 0;
  constexpr int64_t kRounds = 1 << 20;  // ~7 ms of 24 vpdpbusd a round at ~3.5 GHz
  // Each thread times its own loops and keeps its best: on a shared machine one stalled core
  // then lowers that core's tries only, not every try's wall time.
  const int64_t threads = at::get_num_threads();
  std::vector<double> best(threads, 0.0);
  for (int trial = 0; trial < 15; ++trial)
    at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        peak.run(kRounds);
        const std::chrono::duration<double> s = std::chrono::steady_clock::now() - t0;
        best[i] = std::max(best[i], static_cast<double>(kRounds * peak.ops) / s.count() / 1e9);
      }
    });
  double sum = 0;
  for (const double r : best) sum += r;
  return sum;
}

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("int8_quantize", &int8_quantize);
  m.impl("int8_pack_weight", &int8_pack_weight);
  m.impl("int8_matmul", &int8_matmul);
  m.impl("int8_linear", &int8_linear);
}

}  // namespace fastdl::cpu
