// CPU implementations of the graph ops (schemas in csrc/ops.cpp): input checks, allocation,
// row-balanced threading with at::parallel_for, and the choice of the kernel table for the
// CPU's ISA. The kernels themselves (csrc/cpu/graph_kernels.h) see raw pointers only.
//
// Memory safety: a CSR is checked here (rowptr starts at 0, never decreases, ends at nnz) before
// any kernel runs, and the kernels check every column/permutation index of a row before reading
// what it addresses; a bad index raises. Determinism: every output row (node or entry) has one
// writer, and gradients of gathered inputs run over the transpose, so results are bit-identical
// from run to run and for any number of threads.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/isa.h"
#include "cpu/graph_params.h"
#include "cpu/output.h"

namespace fastdl::cpu {
namespace {

// The transpose a forward op carries for its backward (unused by the forward).
using OptT = std::optional<at::Tensor>;

constexpr std::initializer_list<c10::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kBFloat16};
// Work (entries + rows, times features) per parallel task below which threading costs more than
// it saves; tasks per thread for load balance on skewed (power-law) degree distributions.
constexpr int64_t kGrainWork = 32768;
constexpr int64_t kTasksPerThread = 8;

const GraphKernels& kernels() {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::kAvx512:
      return graph_kernels_avx512();
    case Isa::kAvx2:
      return graph_kernels_avx2();
#endif
    default:
      return graph_kernels_scalar();
  }
}

GraphDtype dtype_index(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kDouble:
      return kGF64;
    case at::kBFloat16:
      return kGBF16;
    default:
      return kGF32;
  }
}

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A validated CSR (or transpose) and the tensors keeping its data alive.
struct Csr {
  at::Tensor rowptr, col, perm;
  CsrView view;
  int64_t rows() const { return rowptr.numel() - 1; }
  int64_t nnz() const { return col.numel(); }
};

at::Tensor index_tensor(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& x) {
  checks::same_device(op, arg, t, x);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", arg,
                   " must be an int64 index tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, op, ": ", arg, " must be 1-D, got shape ", t.sizes());
  return t.contiguous();
}

// rowptr[0] == 0, non-decreasing, rowptr[rows] == nnz; col (and perm) indices are checked by
// the kernels, row by row, against num_cols (perm against perm_size).
Csr csr(const char* op, const char* name, const at::Tensor& rowptr_, const at::Tensor& col_,
        const std::optional<at::Tensor>& perm_, int64_t num_cols, int64_t perm_size,
        const at::Tensor& x) {
  const std::string p(name);
  Csr c;
  c.rowptr = index_tensor(op, (p + "rowptr").c_str(), rowptr_, x);
  c.col = index_tensor(op, (p + "col").c_str(), col_, x);
  if (perm_.has_value()) {
    c.perm = index_tensor(op, (p + "perm").c_str(), *perm_, x);
    TORCH_CHECK(c.perm.numel() == c.col.numel(), op, ": ", p, "perm must have one entry per ", p,
                "col entry (", c.col.numel(), "), got ", c.perm.numel());
  }
  TORCH_CHECK(c.rowptr.numel() >= 1, op, ": ", p, "rowptr must have rows + 1 >= 1 entries");
  const int64_t* r = c.rowptr.const_data_ptr<int64_t>();
  const int64_t rows = c.rowptr.numel() - 1;
  TORCH_CHECK(r[0] == 0, op, ": malformed CSR: ", p, "rowptr[0] must be 0, got ", r[0]);
  for (int64_t i = 0; i < rows; ++i)
    TORCH_CHECK(r[i + 1] >= r[i], op, ": malformed CSR: ", p, "rowptr decreases at row ", i, " (",
                r[i], " > ", r[i + 1], ")");
  TORCH_CHECK(r[rows] == c.col.numel(), op, ": malformed CSR: ", p,
              "rowptr must end at the number of entries ", c.col.numel(), ", got ", r[rows]);
  c.view = {r, c.col.const_data_ptr<int64_t>(),
            c.perm.defined() ? c.perm.const_data_ptr<int64_t>() : nullptr, num_cols, perm_size};
  return c;
}

// Runs fn(r0, r1) over row ranges of about equal work (entries + rows), cut by the structure
// alone so a few hub rows of a power-law graph do not leave the other threads idle; raises if a
// kernel met an out-of-range index.
template <typename Fn>
void for_rows(const char* op, const Csr& c, int64_t width, Fn&& fn) {
  const int64_t rows = c.rows();
  if (rows == 0) return;
  const int64_t* r = c.view.rowptr;
  const int64_t work = (c.nnz() + rows) * std::max<int64_t>(width, 1);
  const int64_t tasks =
      std::clamp<int64_t>(work / kGrainWork, 1, at::get_num_threads() * kTasksPerThread);
  std::vector<int64_t> bounds(tasks + 1, rows);
  bounds[0] = 0;
  const int64_t total = r[rows] + rows;
  for (int64_t t = 1; t < tasks; ++t) {
    // First row whose cumulative work reaches t / tasks of the total.
    int64_t lo = bounds[t - 1], hi = rows;
    const int64_t target = total / tasks * t;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (r[mid] + mid < target)
        lo = mid + 1;
      else
        hi = mid;
    }
    bounds[t] = lo;
  }
  std::atomic<bool> ok{true};
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      if (!fn(bounds[t], bounds[t + 1])) ok.store(false, std::memory_order_relaxed);
  });
  TORCH_CHECK(ok.load(), op, ": graph index out of range: every column index must lie in [0, ",
              c.view.num_cols, ")", c.perm.defined() ? " and every perm entry in [0, nnz)" : "");
}

at::Tensor features(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& x) {
  checks::same_device(op, arg, t, x);
  checks::dtype(op, arg, t, {x.scalar_type()});
  TORCH_CHECK(t.dim() == 2, op, ": ", arg, " must be 2-D (nodes, features), got shape ", t.sizes());
  return t.contiguous();
}

// Per-entry scalars (edge weights) as a contiguous accumulation-dtype vector of nnz entries.
at::Tensor edge_scalars(const char* op, const char* arg, const std::optional<at::Tensor>& w,
                        const at::Tensor& x, int64_t nnz) {
  if (!w.has_value()) return at::Tensor();
  checks::same_device(op, arg, *w, x);
  TORCH_CHECK_TYPE(w->is_floating_point(), op, ": ", arg, " must be floating point, got ",
                   w->scalar_type());
  TORCH_CHECK(w->dim() == 1 && w->numel() == nnz, op, ": ", arg, " must have shape (", nnz,
              ",) (one value per edge), got ", w->sizes());
  return w->to(acc_type(x)).contiguous();
}

const void* ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr() : nullptr;
}

enum class Reduce { kSum, kMean, kMax, kMin };

Reduce parse_reduce(const char* op, const std::string& r) {
  if (r == "sum" || r == "add") return Reduce::kSum;
  if (r == "mean") return Reduce::kMean;
  if (r == "max" || r == "amax") return Reduce::kMax;
  if (r == "min" || r == "amin") return Reduce::kMin;
  TORCH_CHECK(false, op, ": reduce must be one of sum, mean, max, min, got '", r, "'");
}

// 1 / (entries of each row), 0 for empty rows (their sum is 0 anyway).
at::Tensor inv_count(const Csr& c, const at::Tensor& x) {
  return at::diff(c.rowptr).to(acc_type(x)).clamp_min(1).reciprocal();
}

// ---------------------------------------------------------------- spmm

// spmm_sum over all rows of c, in passes over windows of x's rows (SpmmArgs): the gathered rows
// are random, so a window that fits in the last-level cache is served from there instead of
// memory. At 100k x 64 float32 (25.6 MB, more than half of this machine's 32 MiB L3), two passes
// took ~15 ms against ~21 ms for one (~7 ms each, bound by the misses in flight; gathering all
// 2M entries from one half of x alone took ~9 ms). Only while x is at most kMaxPasses windows
// (each pass re-reads the entries and out); not for bfloat16 (out would round between passes).
constexpr int64_t kMaxPasses = 4;
// Graphs of a lower average degree run one pass: each pass also re-reads every output row,
// which only enough gathers per row repay.
constexpr int64_t kMinWindowDegree = 4;

// The L3 a core shares, as Linux's sysfs reports it (glibc's sysconf can report the whole
// package's: 320 MiB on the 32 MiB-per-CCD EPYC this was tuned on); 32 MiB when unknown.
int64_t l3_bytes() {
  static const int64_t bytes = [] {
    for (int i = 0; i < 8; ++i) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
      std::ifstream level(dir + "level"), size(dir + "size");
      int lv = 0;
      int64_t kib = 0;
      char unit = 0;
      if (level >> lv && lv == 3 && size >> kib >> unit && unit == 'K' && kib > 0) return kib << 10;
    }
    return int64_t{32} << 20;
  }();
  return bytes;
}

// Bytes of x a pass gathers from: FASTDL_GATHER_WINDOW_KB, else half the L3.
int64_t window_bytes() {
  const char* env = std::getenv("FASTDL_GATHER_WINDOW_KB");
  const int64_t kib = env != nullptr ? std::atoll(env) : 0;
  return kib > 0 ? std::min<int64_t>(kib, int64_t{1} << 30) << 10 : l3_bytes() / 2;
}

void spmm_sum_rows(const char* op, const Csr& c, SpmmArgs p, const at::Tensor& x) {
  const SpmmFn fn = kernels().spmm_sum[dtype_index(x)];
  const int64_t cols = p.g.num_cols, window = window_bytes();
  int64_t passes = std::min(cols, (x.numel() * x.element_size() + window - 1) / window);
  if (passes > kMaxPasses || passes < 1 || x.scalar_type() == at::kBFloat16 ||
      c.nnz() < kMinWindowDegree * c.rows())
    passes = 1;
  for (int64_t s = 0; s < passes; ++s) {
    p.col_lo = cols * s / passes;
    p.col_hi = cols * (s + 1) / passes;
    for_rows(op, c, p.F, [&](int64_t r0, int64_t r1) { return fn(p, r0, r1); });
  }
}

std::tuple<at::Tensor, at::Tensor> spmm_fwd(const at::Tensor& rowptr, const at::Tensor& col,
                                            const std::optional<at::Tensor>& weight,
                                            const at::Tensor& x_, const std::string& reduce,
                                            const OptT&, const OptT&, const OptT&) {
  const char* op = "fastdl.spmm";
  checks::dtype(op, "x", x_, kDtypes);
  const Reduce red = parse_reduce(op, reduce);
  const at::Tensor x = features(op, "x", x_, x_);
  const Csr c = csr(op, "", rowptr, col, std::nullopt, x.size(0), 0, x);
  const at::Tensor w = edge_scalars(op, "edge_weight", weight, x, c.nnz());
  const int64_t F = x.size(1);
  at::Tensor out = new_output({c.rows(), F}, x.options());
  const bool maxmin = red == Reduce::kMax || red == Reduce::kMin;
  at::Tensor arg =
      new_output({maxmin ? c.rows() : 0, maxmin ? F : 0}, x.options().dtype(at::kLong));
  const at::Tensor rs = red == Reduce::kMean ? inv_count(c, x) : at::Tensor();
  const SpmmArgs p{.g = c.view,
                   .w = ptr(w),
                   .cs = nullptr,
                   .rs = ptr(rs),
                   .ds = nullptr,
                   .x = x.const_data_ptr(),
                   .xd = nullptr,
                   .arg = nullptr,
                   .out = out.data_ptr(),
                   .arg_out = maxmin ? arg.data_ptr<int64_t>() : nullptr,
                   .F = F};
  if (maxmin) {
    const SpmmFn fn = kernels().spmm_max[dtype_index(x)][red == Reduce::kMin];
    for_rows(op, c, F, [&](int64_t r0, int64_t r1) { return fn(p, r0, r1); });
  } else {
    spmm_sum_rows(op, c, p, x);
  }
  return {out, arg};
}

std::tuple<at::Tensor, at::Tensor> spmm_bwd(const at::Tensor& grad_out_, const at::Tensor& rowptr,
                                            const at::Tensor& col,
                                            const std::optional<at::Tensor>& weight,
                                            const at::Tensor& x_, const at::Tensor& arg_,
                                            const at::Tensor& t_rowptr, const at::Tensor& t_col,
                                            const at::Tensor& t_perm, const std::string& reduce,
                                            std::array<bool, 2> mask) {
  const char* op = "fastdl.spmm_backward";
  checks::dtype(op, "x", x_, kDtypes);
  const Reduce red = parse_reduce(op, reduce);
  const at::Tensor x = features(op, "x", x_, x_);
  const Csr c = csr(op, "", rowptr, col, std::nullopt, x.size(0), 0, x);
  const Csr t = csr(op, "t_", t_rowptr, t_col, t_perm, c.rows(), c.nnz(), x);
  TORCH_CHECK(t.rows() == x.size(0) && t.nnz() == c.nnz(), op,
              ": the transpose does not match the CSR (", t.rows(), " rows and ", t.nnz(),
              " entries, expected ", x.size(0), " and ", c.nnz(), ")");
  const at::Tensor g = features(op, "grad_out", grad_out_, x);
  const int64_t F = x.size(1);
  TORCH_CHECK(g.size(0) == c.rows() && g.size(1) == F, op, ": grad_out must have shape (", c.rows(),
              ", ", F, "), got ", g.sizes());
  const at::Tensor w = edge_scalars(op, "edge_weight", weight, x, c.nnz());
  const bool maxmin = red == Reduce::kMax || red == Reduce::kMin;
  at::Tensor arg;
  if (maxmin) {
    arg = index_tensor(op, "arg", arg_.reshape(-1), x);
    TORCH_CHECK(arg.numel() == c.rows() * F, op, ": arg must have shape (", c.rows(), ", ", F,
                "), got ", arg_.sizes());
  }
  const at::Tensor rs = red == Reduce::kMean ? inv_count(c, x) : at::Tensor();
  const auto k = dtype_index(x);

  at::Tensor grad_x = new_output({mask[0] ? x.size(0) : 0, F}, x.options());
  if (mask[0]) {
    // Over the transpose: row j gathers the grad_out rows of the destinations it feeds.
    const SpmmArgs p{.g = t.view,
                     .w = ptr(w),
                     .cs = ptr(rs),
                     .rs = nullptr,
                     .ds = nullptr,
                     .x = g.const_data_ptr(),
                     .xd = nullptr,
                     .arg = maxmin ? arg.const_data_ptr<int64_t>() : nullptr,
                     .out = grad_x.data_ptr(),
                     .arg_out = nullptr,
                     .F = F};
    if (maxmin)
      for_rows(op, t, F,
               [&](int64_t r0, int64_t r1) { return kernels().spmm_max_bwd_x[k](p, r0, r1); });
    else
      spmm_sum_rows(op, t, p, g);
  }
  at::Tensor grad_w = new_output({mask[1] ? c.nnz() : 0}, x.options().dtype(acc_type(x)));
  if (mask[1]) {
    const EdgeDotArgs p{.g = c.view,
                        .a = g.const_data_ptr(),
                        .b = x.const_data_ptr(),
                        .rs = ptr(rs),
                        .cs = nullptr,
                        .arg = maxmin ? arg.const_data_ptr<int64_t>() : nullptr,
                        .out = grad_w.data_ptr(),
                        .F = F};
    const EdgeDotFn fn = kernels().edge_dot[k];
    for_rows(op, c, F, [&](int64_t r0, int64_t r1) { return fn(p, r0, r1); });
  }
  return {grad_x, grad_w};
}

// ---------------------------------------------------------------- GCN (Kipf & Welling, 2017)

// The sum of each row's weights, in order.
at::Tensor row_sums(const Csr& c, const at::Tensor& w) {
  at::Tensor out = new_output({c.rows()}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "row_sums", [&] {
    const scalar_t* pw = w.const_data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const int64_t* r = c.view.rowptr;
    at::parallel_for(0, c.rows(), 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t s = 0;
        for (int64_t e = r[i]; e < r[i + 1]; ++e) s += pw[e];
        po[i] = s;
      }
    });
  });
  return out;
}

// The self-loop coefficients fill * (1 + eps) * dinv^2 of each row.
at::Tensor gcn_diag(const at::Tensor& dinv, const std::optional<at::Tensor>& eps, double fill) {
  at::Tensor d = dinv.square() * fill;
  return eps.has_value() ? d * (eps->to(d.scalar_type()).reshape({}) + 1) : d;
}

void check_eps(const char* op, const std::optional<at::Tensor>& eps, const at::Tensor& x) {
  if (!eps.has_value()) return;
  checks::same_device(op, "eps", *eps, x);
  TORCH_CHECK(eps->numel() == 1, op, ": eps must have one element, got shape ", eps->sizes());
}

std::tuple<at::Tensor, at::Tensor> gcn_fwd(const at::Tensor& rowptr, const at::Tensor& col,
                                           const std::optional<at::Tensor>& weight,
                                           const at::Tensor& x_,
                                           const std::optional<at::Tensor>& eps, double fill,
                                           const OptT&, const OptT&, const OptT&) {
  const char* op = "fastdl.gcn_aggregate";
  checks::dtype(op, "x", x_, kDtypes);
  check_eps(op, eps, x_);
  const at::Tensor x = features(op, "x", x_, x_);
  const Csr c = csr(op, "", rowptr, col, std::nullopt, x.size(0), 0, x);
  TORCH_CHECK(c.rows() == x.size(0), op, ": a GCN graph is square: rowptr has ", c.rows(),
              " rows but x has ", x.size(0));
  const at::Tensor w = edge_scalars(op, "edge_weight", weight, x, c.nnz());
  // Degrees with the self loop, D^-1/2 (0 where the degree is 0, as torch_geometric's gcn_norm).
  const at::Tensor deg = w.defined() ? row_sums(c, w) : at::diff(c.rowptr).to(acc_type(x));
  at::Tensor dinv = (deg + fill).pow(-0.5);
  dinv.masked_fill_(deg + fill <= 0, 0);
  const at::Tensor ds = gcn_diag(dinv, eps, fill);
  const int64_t F = x.size(1);
  at::Tensor out = new_output({c.rows(), F}, x.options());
  const SpmmArgs p{.g = c.view,
                   .w = ptr(w),
                   .cs = ptr(dinv),
                   .rs = ptr(dinv),
                   .ds = ptr(ds),
                   .x = x.const_data_ptr(),
                   .xd = x.const_data_ptr(),
                   .arg = nullptr,
                   .out = out.data_ptr(),
                   .arg_out = nullptr,
                   .F = F};
  spmm_sum_rows(op, c, p, x);
  return {out, dinv};
}

std::tuple<at::Tensor, at::Tensor> gcn_bwd(
    const at::Tensor& grad_out_, const std::optional<at::Tensor>& weight, const at::Tensor& x_,
    const at::Tensor& dinv_, const std::optional<at::Tensor>& eps, const at::Tensor& t_rowptr,
    const at::Tensor& t_col, const at::Tensor& t_perm, double fill, std::array<bool, 2> mask) {
  const char* op = "fastdl.gcn_aggregate_backward";
  checks::dtype(op, "x", x_, kDtypes);
  check_eps(op, eps, x_);
  const at::Tensor x = features(op, "x", x_, x_);
  const int64_t N = x.size(0), F = x.size(1);
  const at::Tensor g = features(op, "grad_out", grad_out_, x);
  TORCH_CHECK(g.sizes() == x.sizes(), op, ": grad_out must have the shape of x ", x.sizes(),
              ", got ", g.sizes());
  checks::same_device(op, "dinv", dinv_, x);
  checks::dtype(op, "dinv", dinv_, {acc_type(x)});
  TORCH_CHECK(dinv_.numel() == N, op, ": dinv must have ", N, " elements, got ", dinv_.sizes());
  const at::Tensor dinv = dinv_.contiguous();
  const Csr t = csr(op, "t_", t_rowptr, t_col, t_perm, N, t_col.numel(), x);
  TORCH_CHECK(t.rows() == N, op, ": t_rowptr must have ", N + 1, " entries, got ", t.rows() + 1);
  const at::Tensor w = edge_scalars(op, "edge_weight", weight, x, t.nnz());
  const at::Tensor ds = gcn_diag(dinv, eps, fill);
  at::Tensor grad_x = new_output({mask[0] ? N : 0, F}, x.options());
  if (mask[0]) {
    // The normalized adjacency is applied transposed: same scalars, rows and columns swapped.
    const SpmmArgs p{.g = t.view,
                     .w = ptr(w),
                     .cs = ptr(dinv),
                     .rs = ptr(dinv),
                     .ds = ptr(ds),
                     .x = g.const_data_ptr(),
                     .xd = g.const_data_ptr(),
                     .arg = nullptr,
                     .out = grad_x.data_ptr(),
                     .arg_out = nullptr,
                     .F = F};
    spmm_sum_rows(op, t, p, g);
  }
  at::Tensor grad_eps = new_output({mask[1] ? 1 : 0}, x.options().dtype(acc_type(x)));
  if (mask[1]) {
    // d out_i / d eps = fill * dinv_i^2 * x_i.
    const auto acc = acc_type(x);
    const at::Tensor rowdot = (g.to(acc) * x.to(acc)).sum(1);
    grad_eps.copy_((rowdot * dinv.square()).sum().reshape({1}) * fill);
  }
  return {grad_x, grad_eps};
}

// ---------------------------------------------------------------- SDDMM

// out[e] = <a[src e], b[dst e]>, entries in CSR order (row = dst, col = src).
at::Tensor sddmm_fwd(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& a_,
                     const at::Tensor& b_, const OptT&, const OptT&, const OptT&) {
  const char* op = "fastdl.sddmm";
  checks::dtype(op, "a", a_, kDtypes);
  const at::Tensor a = features(op, "a", a_, a_);
  const at::Tensor b = features(op, "b", b_, a);
  TORCH_CHECK(a.size(1) == b.size(1), op, ": a and b must have the same number of features, got ",
              a.sizes(), " and ", b.sizes());
  const Csr c = csr(op, "", rowptr, col, std::nullopt, a.size(0), 0, a);
  TORCH_CHECK(c.rows() == b.size(0), op, ": b has ", b.size(0), " rows but the graph has ",
              c.rows(), " destination nodes");
  at::Tensor out = new_output({c.nnz()}, a.options().dtype(acc_type(a)));
  const EdgeDotArgs p{.g = c.view,
                      .a = b.const_data_ptr(),
                      .b = a.const_data_ptr(),
                      .rs = nullptr,
                      .cs = nullptr,
                      .arg = nullptr,
                      .out = out.data_ptr(),
                      .F = a.size(1)};
  const EdgeDotFn fn = kernels().edge_dot[dtype_index(a)];
  for_rows(op, c, a.size(1), [&](int64_t r0, int64_t r1) { return fn(p, r0, r1); });
  return out.to(a.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> sddmm_bwd(const at::Tensor& grad_out, const at::Tensor& rowptr,
                                             const at::Tensor& col, const at::Tensor& a_,
                                             const at::Tensor& b_, const at::Tensor& t_rowptr,
                                             const at::Tensor& t_col, const at::Tensor& t_perm,
                                             std::array<bool, 2> mask) {
  const char* op = "fastdl.sddmm_backward";
  checks::dtype(op, "a", a_, kDtypes);
  const at::Tensor a = features(op, "a", a_, a_);
  const at::Tensor b = features(op, "b", b_, a);
  TORCH_CHECK(a.size(1) == b.size(1), op, ": a and b must have the same number of features, got ",
              a.sizes(), " and ", b.sizes());
  const Csr c = csr(op, "", rowptr, col, std::nullopt, a.size(0), 0, a);
  const Csr t = csr(op, "t_", t_rowptr, t_col, t_perm, b.size(0), c.nnz(), a);
  TORCH_CHECK(c.rows() == b.size(0) && t.rows() == a.size(0) && t.nnz() == c.nnz(), op,
              ": the transpose does not match the CSR");
  const at::Tensor w = edge_scalars(op, "grad_out", grad_out, a, c.nnz());
  const int64_t F = a.size(1);
  at::Tensor grad_a = new_output({mask[0] ? a.size(0) : 0, F}, a.options());
  if (mask[0]) {
    const SpmmArgs p{.g = t.view,
                     .w = ptr(w),
                     .cs = nullptr,
                     .rs = nullptr,
                     .ds = nullptr,
                     .x = b.const_data_ptr(),
                     .xd = nullptr,
                     .arg = nullptr,
                     .out = grad_a.data_ptr(),
                     .arg_out = nullptr,
                     .F = F};
    spmm_sum_rows(op, t, p, b);
  }
  at::Tensor grad_b = new_output({mask[1] ? b.size(0) : 0, F}, a.options());
  if (mask[1]) {
    const SpmmArgs p{.g = c.view,
                     .w = ptr(w),
                     .cs = nullptr,
                     .rs = nullptr,
                     .ds = nullptr,
                     .x = a.const_data_ptr(),
                     .xd = nullptr,
                     .arg = nullptr,
                     .out = grad_b.data_ptr(),
                     .arg_out = nullptr,
                     .F = F};
    spmm_sum_rows(op, c, p, a);
  }
  return {grad_a, grad_b};
}

// ---------------------------------------------------------------- GAT (Velickovic et al., 2018)

struct GatInputs {
  at::Tensor h, att_src, att_dst, drop;
  int64_t N, H, F;
};

GatInputs gat_inputs(const char* op, const at::Tensor& h_, const at::Tensor& att_src,
                     const at::Tensor& att_dst, const std::optional<at::Tensor>& drop,
                     int64_t nnz) {
  checks::dtype(op, "h", h_, kDtypes);
  TORCH_CHECK(h_.dim() == 3, op, ": h must be 3-D (nodes, heads, features), got shape ",
              h_.sizes());
  GatInputs in{.h = h_.contiguous(), .N = h_.size(0), .H = h_.size(1), .F = h_.size(2)};
  const auto acc = acc_type(h_);
  for (auto [name, t, dst] : {std::tuple{"att_src", &att_src, &in.att_src},
                              std::tuple{"att_dst", &att_dst, &in.att_dst}}) {
    checks::same_device(op, name, *t, h_);
    TORCH_CHECK(t->numel() == in.H * in.F, op, ": ", name,
                " must have heads * features = ", in.H * in.F, " elements, got shape ", t->sizes());
    *dst = t->to(acc).contiguous();
  }
  if (drop.has_value()) {
    checks::same_device(op, "dropout_mask", *drop, h_);
    TORCH_CHECK(drop->numel() == nnz * in.H, op, ": dropout_mask must have (edges, heads) = (", nnz,
                ", ", in.H, ") elements, got shape ", drop->sizes());
    in.drop = drop->to(acc).contiguous();
  }
  return in;
}

at::Tensor node_scalars(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& h,
                        int64_t numel) {
  checks::same_device(op, arg, t, h);
  checks::dtype(op, arg, t, {acc_type(h)});
  TORCH_CHECK(t.numel() == numel, op, ": ", arg, " must have ", numel, " elements, got shape ",
              t.sizes());
  return t.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gat_fwd(
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& h_,
    const at::Tensor& att_src_, const at::Tensor& att_dst_, double negative_slope,
    const std::optional<at::Tensor>& dropout_mask, const OptT&, const OptT&, const OptT&) {
  const char* op = "fastdl.gat_aggregate";
  const GatInputs in = gat_inputs(op, h_, att_src_, att_dst_, dropout_mask, col.numel());
  const Csr c = csr(op, "", rowptr, col, std::nullopt, in.N, 0, in.h);
  TORCH_CHECK(c.rows() == in.N, op, ": the graph has ", c.rows(), " destination nodes but h has ",
              in.N, " rows");
  const auto acc = in.h.options().dtype(acc_type(in.h));
  at::Tensor out = new_output({in.N, in.H, in.F}, in.h.options());
  at::Tensor alpha = new_output({c.nnz(), in.H}, acc);
  at::Tensor a_src = new_output({in.N, in.H}, acc), a_dst = new_output({in.N, in.H}, acc);
  const GatArgs p{.g = c.view,
                  .h = in.h.const_data_ptr(),
                  .att_src = ptr(in.att_src),
                  .att_dst = ptr(in.att_dst),
                  .drop = ptr(in.drop),
                  .grad = nullptr,
                  .a_src = a_src.data_ptr(),
                  .a_dst = a_dst.data_ptr(),
                  .alpha = alpha.data_ptr(),
                  .dz = nullptr,
                  .g_src = nullptr,
                  .g_dst = nullptr,
                  .out = out.data_ptr(),
                  .H = in.H,
                  .F = in.F,
                  .slope = negative_slope};
  const auto k = dtype_index(in.h);
  at::parallel_for(0, in.N, std::max<int64_t>(1, kGrainWork / (in.H * in.F + 1)),
                   [&](int64_t n0, int64_t n1) { kernels().gat_scores[k](p, n0, n1); });
  for_rows(op, c, in.H * in.F,
           [&](int64_t r0, int64_t r1) { return kernels().gat_fwd[k](p, r0, r1); });
  return {out, alpha, a_src, a_dst};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gat_bwd(
    const at::Tensor& grad_out_, const at::Tensor& rowptr, const at::Tensor& col,
    const at::Tensor& h_, const at::Tensor& att_src_, const at::Tensor& att_dst_,
    const at::Tensor& alpha_, const at::Tensor& a_src_, const at::Tensor& a_dst_,
    const std::optional<at::Tensor>& dropout_mask, const at::Tensor& t_rowptr,
    const at::Tensor& t_col, const at::Tensor& t_perm, double negative_slope) {
  const char* op = "fastdl.gat_aggregate_backward";
  const GatInputs in = gat_inputs(op, h_, att_src_, att_dst_, dropout_mask, col.numel());
  const Csr c = csr(op, "", rowptr, col, std::nullopt, in.N, 0, in.h);
  const Csr t = csr(op, "t_", t_rowptr, t_col, t_perm, in.N, c.nnz(), in.h);
  TORCH_CHECK(c.rows() == in.N && t.rows() == in.N && t.nnz() == c.nnz(), op,
              ": the graph, its transpose and h do not match");
  const at::Tensor g = grad_out_.contiguous();
  checks::same_device(op, "grad_out", g, in.h);
  checks::dtype(op, "grad_out", g, {in.h.scalar_type()});
  TORCH_CHECK(g.sizes() == in.h.sizes(), op, ": grad_out must have the shape of h ", in.h.sizes(),
              ", got ", g.sizes());
  const at::Tensor alpha = node_scalars(op, "alpha", alpha_, in.h, c.nnz() * in.H);
  const at::Tensor a_src = node_scalars(op, "a_src", a_src_, in.h, in.N * in.H);
  const at::Tensor a_dst = node_scalars(op, "a_dst", a_dst_, in.h, in.N * in.H);
  const auto acc = in.h.options().dtype(acc_type(in.h));
  at::Tensor dz = new_output({c.nnz(), in.H}, acc);
  at::Tensor g_src = new_output({in.N, in.H}, acc), g_dst = new_output({in.N, in.H}, acc);
  at::Tensor grad_h = new_output({in.N, in.H, in.F}, in.h.options());
  GatArgs p{.g = c.view,
            .h = in.h.const_data_ptr(),
            .att_src = ptr(in.att_src),
            .att_dst = ptr(in.att_dst),
            .drop = ptr(in.drop),
            .grad = g.const_data_ptr(),
            .a_src = const_cast<void*>(a_src.const_data_ptr()),
            .a_dst = const_cast<void*>(a_dst.const_data_ptr()),
            .alpha = const_cast<void*>(alpha.const_data_ptr()),
            .dz = dz.data_ptr(),
            .g_src = g_src.data_ptr(),
            .g_dst = g_dst.data_ptr(),
            .out = grad_h.data_ptr(),
            .H = in.H,
            .F = in.F,
            .slope = negative_slope};
  const auto k = dtype_index(in.h);
  for_rows(op, c, in.H * in.F,
           [&](int64_t r0, int64_t r1) { return kernels().gat_bwd_rows[k](p, r0, r1); });
  p.g = t.view;
  for_rows(op, t, in.H * in.F,
           [&](int64_t r0, int64_t r1) { return kernels().gat_bwd_nodes[k](p, r0, r1); });
  // d att_src[k, f] = sum_n g_src[n, k] h[n, k, f] (and att_dst alike): a reduction over nodes,
  // in the accumulation dtype, by torch's deterministic CPU reduction.
  const at::Tensor hh = in.h.to(acc_type(in.h));
  const at::Tensor grad_src = (g_src.unsqueeze(-1) * hh).sum(0).reshape(att_src_.sizes());
  const at::Tensor grad_dst = (g_dst.unsqueeze(-1) * hh).sum(0).reshape(att_dst_.sizes());
  return {grad_h, grad_src, grad_dst};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("spmm_fwd", &spmm_fwd);
  m.impl("spmm_bwd", &spmm_bwd);
  m.impl("gcn_fwd", &gcn_fwd);
  m.impl("gcn_bwd", &gcn_bwd);
  m.impl("sddmm_fwd", &sddmm_fwd);
  m.impl("sddmm_bwd", &sddmm_bwd);
  m.impl("gat_fwd", &gat_fwd);
  m.impl("gat_bwd", &gat_bwd);
}

}  // namespace fastdl::cpu
