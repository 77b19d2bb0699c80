// TORCH_LIBRARY_IMPL(fastdl, CUDA) for the graph family: input checks, CSR validation (on the
// device, with one host sync per structure: rowptr starts at 0, never decreases, ends at nnz,
// indices in range, before any kernel reads memory), allocation (as the fake kernels in
// fastdl/ops/graph.py), device and stream, then the launchers of graph.cuh on raw pointers.
#include <array>
#include <optional>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/graph.cuh"

namespace fastdl {
namespace {

using OptT = std::optional<at::Tensor>;
using Tensor2 = std::tuple<at::Tensor, at::Tensor>;

cuda::GraphDType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return cuda::GraphDType::kFloat16;
    case at::kBFloat16:
      return cuda::GraphDType::kBFloat16;
    default:
      return cuda::GraphDType::kFloat32;
  }
}

void check_dtype(const char* op, const char* arg, const at::Tensor& t) {
  checks::dtype(op, arg, t, {at::kFloat, at::kHalf, at::kBFloat16});
}

at::Tensor features(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& x) {
  checks::same_device(op, arg, t, x);
  checks::dtype(op, arg, t, {x.scalar_type()});
  TORCH_CHECK(t.dim() == 2, op, ": ", arg, " must be 2-D (nodes, features), got shape ", t.sizes());
  return t.contiguous();
}

at::Tensor index(const char* op, const std::string& arg, const at::Tensor& t, const at::Tensor& x) {
  checks::same_device(op, arg.c_str(), t, x);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", arg,
                   " must be an int64 index tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, op, ": ", arg, " must be 1-D, got shape ", t.sizes());
  return t.contiguous();
}

void in_range(const char* op, const std::string& arg, const at::Tensor& idx, int64_t n) {
  if (idx.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(idx);
  TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < n, op,
              ": graph index out of range: every ", arg, " entry must lie in [0, ", n, ")");
}

struct Csr {
  at::Tensor rowptr, col, perm;
  cuda::GraphCsr view() const {
    return {rowptr.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(),
            perm.defined() ? perm.const_data_ptr<int64_t>() : nullptr, rowptr.numel() - 1};
  }
  int64_t rows() const { return rowptr.numel() - 1; }
  int64_t nnz() const { return col.numel(); }
};

Csr csr(const char* op, const std::string& p, const at::Tensor& rowptr, const at::Tensor& col,
        const OptT& perm, int64_t num_cols, const at::Tensor& x) {
  Csr c{index(op, p + "rowptr", rowptr, x), index(op, p + "col", col, x), at::Tensor()};
  TORCH_CHECK(c.rowptr.numel() >= 1, op, ": ", p, "rowptr must have rows + 1 >= 1 entries");
  const at::Tensor bad =
      at::stack({c.rowptr[0] != 0, (at::diff(c.rowptr) < 0).any(), c.rowptr[-1] != c.nnz()}).cpu();
  const bool* b = bad.const_data_ptr<bool>();
  TORCH_CHECK(!b[0], op, ": malformed CSR: ", p, "rowptr[0] must be 0");
  TORCH_CHECK(!b[1], op, ": malformed CSR: ", p, "rowptr decreases");
  TORCH_CHECK(!b[2], op, ": malformed CSR: ", p, "rowptr must end at the number of entries ",
              c.nnz());
  in_range(op, p + "col", c.col, num_cols);
  if (perm.has_value()) {
    c.perm = index(op, p + "perm", *perm, x);
    TORCH_CHECK(c.perm.numel() == c.nnz(), op, ": ", p, "perm must have ", c.nnz(), " entries");
    in_range(op, p + "perm", c.perm, c.nnz());
  }
  return c;
}

at::Tensor scalars(const char* op, const char* arg, const OptT& w, const at::Tensor& x,
                   int64_t nnz) {
  if (!w.has_value()) return at::Tensor();
  checks::same_device(op, arg, *w, x);
  TORCH_CHECK(w->dim() == 1 && w->numel() == nnz, op, ": ", arg, " must have shape (", nnz,
              ",), got ", w->sizes());
  return w->to(at::kFloat).contiguous();
}

const float* fptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<float>() : nullptr;
}

std::string parse_reduce(const char* op, const std::string& r) {
  if (r == "sum" || r == "add") return "sum";
  if (r == "mean") return "mean";
  if (r == "max" || r == "amax") return "max";
  if (r == "min" || r == "amin") return "min";
  TORCH_CHECK(false, op, ": reduce must be one of sum, mean, max, min, got '", r, "'");
}

at::Tensor inv_count(const Csr& c) {
  return at::diff(c.rowptr).to(at::kFloat).clamp_min(1).reciprocal();
}

cudaStream_t stream() {
  return at::cuda::getCurrentCUDAStream();
}

Tensor2 spmm_fwd(const at::Tensor& rowptr, const at::Tensor& col, const OptT& weight,
                 const at::Tensor& x_, const std::string& reduce, const OptT&, const OptT&,
                 const OptT&) {
  const char* op = "fastdl.spmm";
  check_dtype(op, "x", x_);
  const std::string red = parse_reduce(op, reduce);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = features(op, "x", x_, x_);
  const Csr c = csr(op, "", rowptr, col, std::nullopt, x.size(0), x);
  const at::Tensor w = scalars(op, "edge_weight", weight, x, c.nnz());
  const int64_t F = x.size(1);
  const bool maxmin = red == "max" || red == "min";
  at::Tensor out = at::empty({c.rows(), F}, x.options());
  at::Tensor arg = at::empty({maxmin ? c.rows() : 0, maxmin ? F : 0}, x.options().dtype(at::kLong));
  const at::Tensor rs = red == "mean" ? inv_count(c) : at::Tensor();
  cuda::GraphSpmmParams p;
  p.g = c.view();
  p.w = fptr(w);
  p.rs = fptr(rs);
  p.x = x.const_data_ptr();
  p.out = out.data_ptr();
  p.arg_out = maxmin ? arg.data_ptr<int64_t>() : nullptr;
  p.F = F;
  p.dtype = dtype_of(x);
  C10_CUDA_CHECK(maxmin ? cuda::graph_spmm_max(p, red == "min", stream())
                        : cuda::graph_spmm_sum(p, stream()));
  return {out, arg};
}

Tensor2 spmm_bwd(const at::Tensor& grad_out, const at::Tensor& rowptr, const at::Tensor& col,
                 const OptT& weight, const at::Tensor& x_, const at::Tensor& arg_,
                 const at::Tensor& t_rowptr, const at::Tensor& t_col, const at::Tensor& t_perm,
                 const std::string& reduce, std::array<bool, 2> mask) {
  const char* op = "fastdl.spmm_backward";
  check_dtype(op, "x", x_);
  const std::string red = parse_reduce(op, reduce);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = features(op, "x", x_, x_);
  const Csr c = csr(op, "", rowptr, col, std::nullopt, x.size(0), x);
  const Csr t = csr(op, "t_", t_rowptr, t_col, t_perm, c.rows(), x);
  TORCH_CHECK(t.rows() == x.size(0) && t.nnz() == c.nnz(), op,
              ": the transpose does not match the CSR");
  const at::Tensor g = features(op, "grad_out", grad_out, x);
  const int64_t F = x.size(1);
  TORCH_CHECK(g.size(0) == c.rows() && g.size(1) == F, op, ": grad_out must have shape (", c.rows(),
              ", ", F, ")");
  const at::Tensor w = scalars(op, "edge_weight", weight, x, c.nnz());
  const bool maxmin = red == "max" || red == "min";
  at::Tensor arg;
  if (maxmin) {
    arg = arg_.contiguous();
    TORCH_CHECK(arg.scalar_type() == at::kLong && arg.numel() == c.rows() * F, op,
                ": arg must be int64 of shape (", c.rows(), ", ", F, ")");
  }
  const at::Tensor rs = red == "mean" ? inv_count(c) : at::Tensor();
  at::Tensor grad_x = at::empty({mask[0] ? x.size(0) : 0, F}, x.options());
  if (mask[0]) {
    cuda::GraphSpmmParams p;
    p.g = t.view();
    p.w = fptr(w);
    p.cs = fptr(rs);
    p.x = g.const_data_ptr();
    p.arg = maxmin ? arg.const_data_ptr<int64_t>() : nullptr;
    p.out = grad_x.data_ptr();
    p.F = F;
    p.dtype = dtype_of(x);
    C10_CUDA_CHECK(maxmin ? cuda::graph_spmm_max_bwd(p, stream())
                          : cuda::graph_spmm_sum(p, stream()));
  }
  at::Tensor grad_w = at::empty({mask[1] ? c.nnz() : 0}, x.options().dtype(at::kFloat));
  if (mask[1]) {
    cuda::GraphEdgeDotParams p;
    p.g = c.view();
    p.a = g.const_data_ptr();
    p.b = x.const_data_ptr();
    p.rs = fptr(rs);
    p.arg = maxmin ? arg.const_data_ptr<int64_t>() : nullptr;
    p.dots = grad_w.data_ptr<float>();
    p.F = F;
    p.dtype = dtype_of(x);
    C10_CUDA_CHECK(cuda::graph_edge_dot(p, stream()));
  }
  return {grad_x, grad_w};
}

at::Tensor gcn_diag(const at::Tensor& dinv, const OptT& eps, double fill) {
  at::Tensor d = dinv.square() * fill;
  return eps.has_value() ? d * (eps->to(at::kFloat).reshape({}) + 1) : d;
}

Tensor2 gcn_fwd(const at::Tensor& rowptr, const at::Tensor& col, const OptT& weight,
                const at::Tensor& x_, const OptT& eps, double fill, const OptT&, const OptT&,
                const OptT&) {
  const char* op = "fastdl.gcn_aggregate";
  check_dtype(op, "x", x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = features(op, "x", x_, x_);
  const Csr c = csr(op, "", rowptr, col, std::nullopt, x.size(0), x);
  TORCH_CHECK(c.rows() == x.size(0), op, ": a GCN graph is square: rowptr has ", c.rows(),
              " rows but x has ", x.size(0));
  const at::Tensor w = scalars(op, "edge_weight", weight, x, c.nnz());
  // Weighted degrees by a segmented reduction over the rows (deterministic, unlike index_add_).
  at::Tensor deg =
      w.defined() ? at::segment_reduce(w, "sum", std::nullopt, std::nullopt, c.rowptr, 0, true, 0)
                  : at::diff(c.rowptr).to(at::kFloat);
  deg = deg + fill;
  const at::Tensor dinv = at::where(deg > 0, deg.clamp_min(1e-30).rsqrt(), 0.0);
  const at::Tensor ds = gcn_diag(dinv, eps, fill);
  at::Tensor out = at::empty_like(x);
  cuda::GraphSpmmParams p;
  p.g = c.view();
  p.w = fptr(w);
  p.cs = fptr(dinv);
  p.rs = fptr(dinv);
  p.ds = fptr(ds);
  p.x = x.const_data_ptr();
  p.xd = x.const_data_ptr();
  p.out = out.data_ptr();
  p.F = x.size(1);
  p.dtype = dtype_of(x);
  C10_CUDA_CHECK(cuda::graph_spmm_sum(p, stream()));
  return {out, dinv};
}

Tensor2 gcn_bwd(const at::Tensor& grad_out, const OptT& weight, const at::Tensor& x_,
                const at::Tensor& dinv_, const OptT& eps, const at::Tensor& t_rowptr,
                const at::Tensor& t_col, const at::Tensor& t_perm, double fill,
                std::array<bool, 2> mask) {
  const char* op = "fastdl.gcn_aggregate_backward";
  check_dtype(op, "x", x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = features(op, "x", x_, x_);
  const at::Tensor g = features(op, "grad_out", grad_out, x);
  const int64_t N = x.size(0);
  TORCH_CHECK(dinv_.numel() == N && dinv_.scalar_type() == at::kFloat, op,
              ": dinv must be float32 with ", N, " elements");
  const at::Tensor dinv = dinv_.contiguous();
  const Csr t = csr(op, "t_", t_rowptr, t_col, t_perm, N, x);
  TORCH_CHECK(t.rows() == N, op, ": t_rowptr must have ", N + 1, " entries");
  const at::Tensor w = scalars(op, "edge_weight", weight, x, t.nnz());
  const at::Tensor ds = gcn_diag(dinv, eps, fill);
  at::Tensor grad_x = at::empty({mask[0] ? N : 0, x.size(1)}, x.options());
  if (mask[0]) {
    cuda::GraphSpmmParams p;
    p.g = t.view();
    p.w = fptr(w);
    p.cs = fptr(dinv);
    p.rs = fptr(dinv);
    p.ds = fptr(ds);
    p.x = g.const_data_ptr();
    p.xd = g.const_data_ptr();
    p.out = grad_x.data_ptr();
    p.F = x.size(1);
    p.dtype = dtype_of(x);
    C10_CUDA_CHECK(cuda::graph_spmm_sum(p, stream()));
  }
  at::Tensor grad_eps = at::empty({mask[1] ? 1 : 0}, x.options().dtype(at::kFloat));
  if (mask[1])
    grad_eps.copy_(
        ((g.to(at::kFloat) * x.to(at::kFloat)).sum(1) * dinv.square()).sum().reshape({1}) * fill);
  return {grad_x, grad_eps};
}

at::Tensor sddmm_fwd(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& a_,
                     const at::Tensor& b_, const OptT&, const OptT&, const OptT&) {
  const char* op = "fastdl.sddmm";
  check_dtype(op, "a", a_);
  const c10::cuda::CUDAGuard guard(a_.device());
  const at::Tensor a = features(op, "a", a_, a_), b = features(op, "b", b_, a_);
  TORCH_CHECK(a.size(1) == b.size(1), op, ": a and b must have the same number of features");
  const Csr c = csr(op, "", rowptr, col, std::nullopt, a.size(0), a);
  TORCH_CHECK(c.rows() == b.size(0), op, ": b must have one row per destination node");
  at::Tensor out = at::empty({c.nnz()}, a.options().dtype(at::kFloat));
  cuda::GraphEdgeDotParams p;
  p.g = c.view();
  p.a = b.const_data_ptr();
  p.b = a.const_data_ptr();
  p.dots = out.data_ptr<float>();
  p.F = a.size(1);
  p.dtype = dtype_of(a);
  C10_CUDA_CHECK(cuda::graph_edge_dot(p, stream()));
  return out.to(a.scalar_type());
}

Tensor2 sddmm_bwd(const at::Tensor& grad_out, const at::Tensor& rowptr, const at::Tensor& col,
                  const at::Tensor& a_, const at::Tensor& b_, const at::Tensor& t_rowptr,
                  const at::Tensor& t_col, const at::Tensor& t_perm, std::array<bool, 2> mask) {
  const char* op = "fastdl.sddmm_backward";
  check_dtype(op, "a", a_);
  const c10::cuda::CUDAGuard guard(a_.device());
  const at::Tensor a = features(op, "a", a_, a_), b = features(op, "b", b_, a_);
  TORCH_CHECK(a.size(1) == b.size(1), op, ": a and b must have the same number of features");
  const Csr c = csr(op, "", rowptr, col, std::nullopt, a.size(0), a);
  const Csr t = csr(op, "t_", t_rowptr, t_col, t_perm, b.size(0), a);
  TORCH_CHECK(c.rows() == b.size(0) && t.rows() == a.size(0) && t.nnz() == c.nnz(), op,
              ": the transpose does not match the CSR");
  const at::Tensor w = scalars(op, "grad_out", grad_out, a, c.nnz());
  std::array<at::Tensor, 2> grads;
  const std::array<const Csr*, 2> graphs = {&t, &c};
  const std::array<const at::Tensor*, 2> gathered = {&b, &a};
  for (int k = 0; k < 2; ++k) {
    const at::Tensor& like = k == 0 ? a : b;
    grads[k] = at::empty({mask[k] ? like.size(0) : 0, a.size(1)}, a.options());
    if (!mask[k]) continue;
    cuda::GraphSpmmParams p;
    p.g = graphs[k]->view();
    p.w = fptr(w);
    p.x = gathered[k]->const_data_ptr();
    p.out = grads[k].data_ptr();
    p.F = a.size(1);
    p.dtype = dtype_of(a);
    C10_CUDA_CHECK(cuda::graph_spmm_sum(p, stream()));
  }
  return {grads[0], grads[1]};
}

struct Gat {
  at::Tensor h, att_src, att_dst, drop;
};

Gat gat_inputs(const char* op, const at::Tensor& h, const at::Tensor& s, const at::Tensor& d,
               const OptT& drop, int64_t nnz) {
  check_dtype(op, "h", h);
  TORCH_CHECK(h.dim() == 3, op, ": h must be 3-D (nodes, heads, features), got ", h.sizes());
  const int64_t hf = h.size(1) * h.size(2);
  Gat g{h.contiguous(), at::Tensor(), at::Tensor(), at::Tensor()};
  checks::same_device(op, "att_src", s, h);
  checks::same_device(op, "att_dst", d, h);
  TORCH_CHECK(s.numel() == hf && d.numel() == hf, op,
              ": att_src and att_dst must have heads * features = ", hf, " elements");
  g.att_src = s.to(at::kFloat).contiguous();
  g.att_dst = d.to(at::kFloat).contiguous();
  if (drop.has_value()) {
    checks::same_device(op, "dropout_mask", *drop, h);
    TORCH_CHECK(drop->numel() == nnz * h.size(1), op, ": dropout_mask must have (", nnz, ", ",
                h.size(1), ") elements");
    g.drop = drop->to(at::kFloat).contiguous();
  }
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gat_fwd(
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& h_, const at::Tensor& s,
    const at::Tensor& d, double slope, const OptT& drop, const OptT&, const OptT&, const OptT&) {
  const char* op = "fastdl.gat_aggregate";
  const c10::cuda::CUDAGuard guard(h_.device());
  const Gat in = gat_inputs(op, h_, s, d, drop, col.numel());
  const int64_t N = in.h.size(0), H = in.h.size(1), F = in.h.size(2);
  const Csr c = csr(op, "", rowptr, col, std::nullopt, N, in.h);
  TORCH_CHECK(c.rows() == N, op, ": the graph has ", c.rows(), " rows but h has ", N);
  const auto f32 = in.h.options().dtype(at::kFloat);
  at::Tensor out = at::empty_like(in.h), alpha = at::empty({c.nnz(), H}, f32);
  at::Tensor a_src = at::empty({N, H}, f32), a_dst = at::empty({N, H}, f32);
  cuda::GraphGatParams p;
  p.g = c.view();
  p.h = in.h.const_data_ptr();
  p.att_src = fptr(in.att_src);
  p.att_dst = fptr(in.att_dst);
  p.drop = fptr(in.drop);
  p.a_src = a_src.data_ptr<float>();
  p.a_dst = a_dst.data_ptr<float>();
  p.alpha = alpha.data_ptr<float>();
  p.out = out.data_ptr();
  p.N = N, p.H = H, p.F = F;
  p.slope = static_cast<float>(slope);
  p.dtype = dtype_of(in.h);
  C10_CUDA_CHECK(cuda::graph_gat_fwd(p, stream()));
  return {out, alpha, a_src, a_dst};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gat_bwd(
    const at::Tensor& grad_out, const at::Tensor& rowptr, const at::Tensor& col,
    const at::Tensor& h_, const at::Tensor& s, const at::Tensor& d, const at::Tensor& alpha,
    const at::Tensor& a_src, const at::Tensor& a_dst, const OptT& drop, const at::Tensor& t_rowptr,
    const at::Tensor& t_col, const at::Tensor& t_perm, double slope) {
  const char* op = "fastdl.gat_aggregate_backward";
  const c10::cuda::CUDAGuard guard(h_.device());
  const Gat in = gat_inputs(op, h_, s, d, drop, col.numel());
  const int64_t N = in.h.size(0), H = in.h.size(1), F = in.h.size(2);
  const Csr c = csr(op, "", rowptr, col, std::nullopt, N, in.h);
  const Csr t = csr(op, "t_", t_rowptr, t_col, t_perm, N, in.h);
  TORCH_CHECK(c.rows() == N && t.rows() == N && t.nnz() == c.nnz(), op,
              ": the graph, its transpose and h do not match");
  const at::Tensor g = grad_out.contiguous();
  TORCH_CHECK(g.sizes() == in.h.sizes() && g.scalar_type() == in.h.scalar_type(), op,
              ": grad_out must match h");
  for (const at::Tensor* v : {&alpha, &a_src, &a_dst})
    TORCH_CHECK(v->scalar_type() == at::kFloat && v->is_contiguous(), op,
                ": saved attention scalars must be contiguous float32");
  TORCH_CHECK(alpha.numel() == c.nnz() * H && a_src.numel() == N * H && a_dst.numel() == N * H, op,
              ": saved attention scalars have the wrong size");
  const auto f32 = in.h.options().dtype(at::kFloat);
  at::Tensor dz = at::empty({c.nnz(), H}, f32);
  at::Tensor g_src = at::zeros({N, H}, f32), g_dst = at::zeros({N, H}, f32);
  at::Tensor grad_h = at::empty_like(in.h);
  cuda::GraphGatParams p;
  p.g = c.view();
  p.h = in.h.const_data_ptr();
  p.att_src = fptr(in.att_src);
  p.att_dst = fptr(in.att_dst);
  p.drop = fptr(in.drop);
  p.grad = g.const_data_ptr();
  p.a_src = const_cast<float*>(a_src.const_data_ptr<float>());
  p.a_dst = const_cast<float*>(a_dst.const_data_ptr<float>());
  p.alpha = const_cast<float*>(alpha.const_data_ptr<float>());
  p.dz = dz.data_ptr<float>();
  p.g_src = g_src.data_ptr<float>();
  p.g_dst = g_dst.data_ptr<float>();
  p.out = grad_h.data_ptr();
  p.N = N, p.H = H, p.F = F;
  p.slope = static_cast<float>(slope);
  p.dtype = dtype_of(in.h);
  C10_CUDA_CHECK(cuda::graph_gat_bwd(p, t.view(), stream()));
  const at::Tensor hh = in.h.to(at::kFloat);
  return {grad_h, (g_src.unsqueeze(-1) * hh).sum(0).reshape(s.sizes()),
          (g_dst.unsqueeze(-1) * hh).sum(0).reshape(d.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("spmm_fwd", &spmm_fwd);
  m.impl("spmm_bwd", &spmm_bwd);
  m.impl("gcn_fwd", &gcn_fwd);
  m.impl("gcn_bwd", &gcn_bwd);
  m.impl("sddmm_fwd", &sddmm_fwd);
  m.impl("sddmm_bwd", &sddmm_bwd);
  m.impl("gat_fwd", &gat_fwd);
  m.impl("gat_bwd", &gat_bwd);
}

}  // namespace fastdl
