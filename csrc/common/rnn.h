// Family-level checks and shapes of the rnn ops (schemas in csrc/ops.cpp), shared by the CPU and
// CUDA bind layers so both answer bad input with the same message. Torch-facing; no kernels.
#pragma once

#include <initializer_list>
#include <optional>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common/checks.h"

namespace fastdl::rnn {

// Sizes of one layer in one direction: x (T, B, I), hidden H, output/recurrent width P (proj_size
// or H), G rows of w_ih / w_hh (4H LSTM, 3H GRU), S = width of the saved gates (4H for both).
struct Dims {
  int64_t T, B, I, H, P, G, S;
};

inline void shape(const char* op, const char* arg, const at::Tensor& t,
                  std::initializer_list<int64_t> want) {
  TORCH_CHECK(t.sizes().equals(want), op, ": ", arg, " must have shape ", c10::IntArrayRef(want),
              ", got ", t.sizes());
}

// A tensor beside x: same device, same dtype.
inline void like_x(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& x) {
  checks::same_device(op, arg, t, x);
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", arg, " has dtype ",
                   t.scalar_type(), " but x has dtype ", x.scalar_type(),
                   "; all tensors must have x's dtype");
}

// The accumulation dtype: what the saved tensors use and the kernels compute in.
inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// lengths: None, or int64 (B,) on x's device with 1 <= lengths[b] <= T. Reads the values (a
// device sync on CUDA): an unchecked length would index past the sequence.
inline void lengths(const char* op, const std::optional<at::Tensor>& len, const at::Tensor& x,
                    int64_t T, int64_t B) {
  if (!len.has_value()) return;
  checks::same_device(op, "lengths", *len, x);
  checks::dtype(op, "lengths", *len, {at::kLong});
  shape(op, "lengths", *len, {B});
  if (B == 0) return;
  const int64_t lo = len->min().item<int64_t>(), hi = len->max().item<int64_t>();
  TORCH_CHECK(lo >= 1, op, ": lengths must be >= 1, got a length of ", lo);
  TORCH_CHECK(hi <= T, op, ": lengths must be <= the sequence length ", T, ", got a length of ",
              hi);
}

// index: None, or int64 (T, B) on x's device with every entry a row of the (R, G) table x (w_ih
// None). Reads the values (a device sync on CUDA), as lengths.
inline void index(const char* op, const std::optional<at::Tensor>& idx,
                  const std::optional<at::Tensor>& w_ih, const at::Tensor& x) {
  if (!idx.has_value()) return;
  TORCH_CHECK(!w_ih.has_value(), op,
              ": index picks rows of a table of input projections: w_ih must be None with it");
  checks::same_device(op, "index", *idx, x);
  checks::dtype(op, "index", *idx, {at::kLong});
  TORCH_CHECK(idx->dim() == 2, op, ": index must be (T, B), got shape ", idx->sizes());
  TORCH_CHECK(x.dim() == 2, op, ": with index, x is the table of input projections (rows, ",
              "gates * hidden_size), got shape ", x.sizes());
  if (idx->numel() == 0) return;
  const int64_t lo = idx->min().item<int64_t>(), hi = idx->max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < x.size(0), op, ": index out of range for a table of ", x.size(0),
              " rows, got ", lo < 0 ? lo : hi);
}

// Checks the forward inputs of one layer and returns its sizes. `gates` is 4 (LSTM) or 3 (GRU);
// c0 and w_hr are LSTM-only (pass nullptr / nullopt for the GRU). Without w_ih, x is the input
// projection (T, B, G) and I = G; with index, x is a table of them (R, G) and (T, B) index's.
inline Dims check_layer(const char* op, std::initializer_list<c10::ScalarType> dtypes,
                        int64_t gates, const at::Tensor& x, const at::Tensor& h0,
                        const at::Tensor* c0, const std::optional<at::Tensor>& w_ih,
                        const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                        const std::optional<at::Tensor>& b_hh,
                        const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& len,
                        const std::optional<at::Tensor>& idx) {
  checks::dtype(op, "x", x, dtypes);
  index(op, idx, w_ih, x);
  TORCH_CHECK(idx || x.dim() == 3, op, ": x must be (T, B, input_size), got shape ", x.sizes());
  const char* rows = w_ih ? "w_ih" : "w_hh";
  const at::Tensor& w = w_ih ? *w_ih : w_hh;
  TORCH_CHECK(w.dim() == 2 && w.size(0) % gates == 0 && w.size(0) > 0, op, ": ", rows, " must be (",
              gates, " * hidden_size, ", w_ih ? "input_size" : "hidden_size or proj_size",
              "), got shape ", w.sizes());
  Dims d = idx ? Dims{idx->size(0), idx->size(1), x.size(1), w.size(0) / gates, 0, w.size(0), 0}
               : Dims{x.size(0), x.size(1), x.size(2), w.size(0) / gates, 0, w.size(0), 0};
  d.P = w_hr.has_value() ? w_hr->size(0) : d.H;
  d.S = 4 * d.H;
  if (w_ih) like_x(op, "w_ih", *w_ih, x);
  like_x(op, "w_hh", w_hh, x);
  like_x(op, "h0", h0, x);
  if (w_ih) {
    TORCH_CHECK(w_ih->size(1) == d.I, op, ": input size ", d.I,
                " of x does not match w_ih of shape ", w_ih->sizes(), " (expected (", d.G, ", ",
                d.I, "))");
  } else {
    TORCH_CHECK(d.I == d.G, op, ": without w_ih, x holds the input projection (",
                idx ? "rows" : "T, B", ", ", d.G, ") (", gates, " * hidden_size), got shape ",
                x.sizes());
  }
  if (w_hr.has_value()) {
    like_x(op, "w_hr", *w_hr, x);
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(1) == d.H && d.P >= 1 && d.P < d.H, op,
                ": w_hr must be (proj_size, hidden_size=", d.H,
                ") with 0 < proj_size < hidden_size, got shape ", w_hr->sizes());
  }
  shape(op, "w_hh", w_hh, {d.G, d.P});
  for (auto [name, b] : {std::pair{"b_ih", &b_ih}, std::pair{"b_hh", &b_hh}}) {
    if (!b->has_value()) continue;
    like_x(op, name, **b, x);
    shape(op, name, **b, {d.G});
  }
  shape(op, "h0", h0, {d.B, d.P});
  if (c0 != nullptr) {
    like_x(op, "c0", *c0, x);
    shape(op, "c0", *c0, {d.B, d.H});
  }
  lengths(op, len, x, d.T, d.B);
  return d;
}

// Index mode (see check_layer): the table rows each position reads, (T * B, G), into out.
inline void gather_rows(at::Tensor& out, const at::Tensor& table, const at::Tensor& idx) {
  at::index_select_out(out, table, 0, idx.reshape({-1}));
}

// Index mode: the (rows, G) table's gradient from its positions' (T * B, G): per row, the sum over
// the positions that read it, in a fixed order.
inline at::Tensor table_grad(const at::Tensor& grad, const at::Tensor& idx, int64_t rows) {
  return at::embedding_dense_backward(grad, idx.reshape({-1}), rows, /*padding_idx=*/-1,
                                      /*scale_grad_by_freq=*/false);
}

// Checks what a backward op gets beside the forward's inputs: the incoming gradients (each may
// be None) and the saved y / gates / cs (cs: LSTM only).
inline void check_saved(const char* op, const Dims& d, const at::Tensor& x,
                        const std::optional<at::Tensor>& grad_y,
                        const std::optional<at::Tensor>& grad_hn,
                        const std::optional<at::Tensor>& grad_cn, const at::Tensor& y,
                        const at::Tensor& gates, const at::Tensor* cs) {
  auto acc = [&](const char* arg, const at::Tensor& t) {
    checks::same_device(op, arg, t, x);
    checks::dtype(op, arg, t, {acc_type(x)});
  };
  like_x(op, "y", y, x);
  shape(op, "y", y, {d.T, d.B, d.P});
  acc("gates", gates);
  shape(op, "gates", gates, {d.T, d.B, d.S});
  if (cs != nullptr) {
    acc("cs", *cs);
    shape(op, "cs", *cs, {d.T, d.B, d.H});
  }
  if (grad_y.has_value()) {
    like_x(op, "grad_y", *grad_y, x);
    shape(op, "grad_y", *grad_y, {d.T, d.B, d.P});
  }
  if (grad_hn.has_value()) {
    like_x(op, "grad_hn", *grad_hn, x);
    shape(op, "grad_hn", *grad_hn, {d.B, d.P});
  }
  if (grad_cn.has_value()) {
    like_x(op, "grad_cn", *grad_cn, x);
    shape(op, "grad_cn", *grad_cn, {d.B, d.H});
  }
}

}  // namespace fastdl::rnn
