// TORCH_LIBRARY_IMPL(fastdl, CUDA) for the rnn family (schemas in csrc/ops.cpp, block "rnn"):
// the checks of csrc/common/rnn.h (the CPU's messages), allocation (shapes and dtypes as the
// fake kernels), device and stream, the GEMMs on cuBLAS (at::mm on the current stream) and the
// launchers of rnn.cuh.
//
// Forward: the input projection of all steps is one GEMM with float32 output (16-bit operands on
// tensor cores); then either the persistent kernel (W_hh on chip for the whole sequence) or, per
// step, the recurrent GEMM h W_hh^T and the fused pointwise kernel. Backward: BPTT the same two
// ways (the stepwise GEMMs in float32: gradients are not rounded between steps), then dx, dW_ih,
// dW_hh (and dW_hr) as single GEMMs over all steps (K = T * B). States and every sum stay float32
// across steps; outputs are rounded to x's dtype once.
#include <array>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/rnn.h"
#include "cuda/rnn.cuh"

namespace fastdl {
namespace {

using OptTensor = std::optional<at::Tensor>;
using cuda::Cell;

constexpr std::initializer_list<c10::ScalarType> kDtypes = {at::kFloat, at::kHalf, at::kBFloat16};
constexpr const char* kLstm = "fastdl.lstm";
constexpr const char* kGru = "fastdl.gru";

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      return cuda::DType::kFloat32;
  }
}

cudaStream_t stream() {
  return c10::cuda::getCurrentCUDAStream();
}

// A float32 contiguous copy (always a new tensor: the kernels update states in place).
at::Tensor f32_copy(const at::Tensor& t) {
  return t.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
}
at::Tensor f32(const at::Tensor& t) {
  return t.to(at::kFloat).contiguous();
}
const float* fptr(const OptTensor& t) {
  return t ? t->data_ptr<float>() : nullptr;
}

// a @ b with a float32 result; 16-bit operands stay 16-bit (tensor cores, fp32 accumulation).
at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? at::mm(a, b) : at::mm(a, b, at::kFloat);
}

// A (T, B, D) buffer; zeros when sequences may end early, since the kernels skip the positions
// past a sequence's end (which must read as zero) and the backward GEMMs sum over all of them.
at::Tensor seq_buffer(const OptTensor& lengths, at::IntArrayRef sizes,
                      const at::TensorOptions& opts) {
  return lengths ? at::zeros(sizes, opts) : at::empty(sizes, opts);
}

cuda::RnnSchedule schedule(const OptTensor& lengths, const rnn::Dims& d, bool reverse) {
  return {lengths ? lengths->data_ptr<int64_t>() : nullptr, d.T, d.B, reverse};
}

// The state before each position (T, B, D) as float32, from a saved sequence and its initial
// value (rnn.cuh, rnn_prev_states).
at::Tensor prev_states(const at::Tensor& seq, const at::Tensor& init, const cuda::RnnSchedule& sch,
                       int64_t D) {
  const at::Tensor s = seq.contiguous(), i = f32(init);
  at::Tensor out = at::empty({sch.T, sch.B, D}, s.options().dtype(at::kFloat));
  cuda::RnnPrevParams p;
  p.dtype = dtype_of(s);
  p.seq_float = s.scalar_type() == at::kFloat;
  p.sch = sch;
  p.D = D;
  p.seq = s.data_ptr();
  p.init = i.data_ptr<float>();
  p.out = out.data_ptr<float>();
  C10_CUDA_CHECK(cuda::rnn_prev_states(p, stream()));
  return out;
}

at::Tensor none(const at::Tensor& x) {
  return at::empty({0}, x.options());
}

// Stepwise forward loop shared by both cells (LSTM with projection included). 16-bit layers run
// the recurrent GEMM on tensor cores from a rounded copy of h (as torch's own 16-bit RNNs round
// h every step), float32 out; the state the cells update stays float32.
void step_forward(cuda::RnnStepParams sp, const at::Tensor& h, const at::Tensor& w_hh,
                  const OptTensor& w_hr, const at::Tensor& y) {
  const int64_t B = sp.sch.B, G = w_hh.size(0);
  const bool lo = w_hh.scalar_type() != at::kFloat;
  const at::Tensor h_lo = lo ? h.to(w_hh.scalar_type()) : h;
  const at::Tensor whh = lo ? w_hh.t() : f32(w_hh).t();
  sp.h_lo = lo ? h_lo.data_ptr() : nullptr;
  at::Tensor gh = at::empty({B, G}, h.options());
  sp.gh = gh.data_ptr<float>();
  at::Tensor r, hp, whr;
  cuda::RnnProjParams pj;
  if (w_hr) {
    whr = f32(*w_hr).t();
    r = at::empty({B, sp.H}, h.options());
    hp = at::empty({B, sp.P}, h.options());
    sp.r = r.data_ptr<float>();
    sp.h = nullptr;
    sp.h_lo = nullptr;
    sp.y = nullptr;
    pj = {sp.dtype,
          sp.sch,
          0,
          sp.P,
          hp.data_ptr<float>(),
          h.data_ptr<float>(),
          lo ? h_lo.data_ptr() : nullptr,
          y.data_ptr()};
  }
  for (int64_t s = 0; s < sp.sch.T; ++s) {
    if (lo)
      at::mm_out(gh, h_lo, whh, at::kFloat);
    else
      at::mm_out(gh, h, whh);
    sp.step = s;
    C10_CUDA_CHECK(cuda::rnn_step_fwd(sp, stream()));
    if (!w_hr) continue;
    at::mm_out(hp, r, whr);
    pj.step = s;
    C10_CUDA_CHECK(cuda::rnn_proj_fwd(pj, stream()));
  }
}

// Stepwise BPTT loop shared by both cells: leaves dL/dh0 in dh (and dL/dc0 in sp.dc).
void step_backward(cuda::RnnStepParams sp, at::Tensor& dh, const at::Tensor& w_hh,
                   const OptTensor& w_hr, const OptTensor& grad_y, const at::Tensor& dhp) {
  const int64_t B = sp.sch.B, G = w_hh.size(0);
  const auto f = dh.options();
  const at::Tensor whh = f32(w_hh);
  at::Tensor dg_step = at::empty({B, G}, f), dh_base = at::empty({B, sp.P}, f);
  sp.dg_step = dg_step.data_ptr<float>();
  sp.dh_base = dh_base.data_ptr<float>();
  sp.dh_keep = dh.data_ptr<float>();
  sp.dh = dh.data_ptr<float>();
  sp.gy = grad_y ? grad_y->data_ptr() : nullptr;
  at::Tensor whr, dr, dhp_step;
  cuda::RnnProjParams pj;
  if (w_hr) {  // the pointwise kernel then sees dr = (dh + gy) W_hr and no gy
    whr = f32(*w_hr);
    dr = at::empty({B, sp.H}, f);
    dhp_step = at::empty({B, sp.P}, f);
    sp.dh = dr.data_ptr<float>();
    sp.gy = nullptr;
    pj.dtype = sp.dtype;
    pj.sch = sp.sch;
    pj.P = sp.P;
    pj.dh = dh.data_ptr<float>();
    pj.gy = grad_y ? grad_y->data_ptr() : nullptr;
    pj.dhp_step = dhp_step.data_ptr<float>();
    pj.dhp_seq = dhp.data_ptr<float>();
  }
  for (int64_t s = sp.sch.T - 1; s >= 0; --s) {
    if (w_hr) {
      pj.step = s;
      C10_CUDA_CHECK(cuda::rnn_proj_bwd(pj, stream()));
      at::mm_out(dr, dhp_step, whr);
    }
    sp.step = s;
    C10_CUDA_CHECK(cuda::rnn_step_bwd(sp, stream()));
    at::addmm_out(dh, dh_base, dg_step, whh);
  }
}

cuda::RnnPersistParams persist_params(Cell cell, const at::Tensor& x, const cuda::RnnSchedule& sch,
                                      int64_t H, const at::Tensor& w_hh) {
  cuda::RnnPersistParams pp;
  pp.cell = cell;
  pp.dtype = dtype_of(x);
  pp.sch = sch;
  pp.H = H;
  pp.w_hh = w_hh.data_ptr();
  return pp;
}

// ---------------------------------------------------------------- forward

// Both cells: y (T, B, P), hn (B, P), cn (B, H) (LSTM; undefined for the GRU), gates, cs.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_fwd(
    Cell cell, const rnn::Dims& d, const at::Tensor& x_, const at::Tensor& h0, const at::Tensor* c0,
    const OptTensor& w_ih, const at::Tensor& w_hh_, const OptTensor& b_ih, const OptTensor& b_hh,
    const OptTensor& w_hr, const OptTensor& lengths_, bool reverse, const OptTensor& index) {
  const auto [T, B, I, H, P, G, S] = d;
  const auto dt = x_.scalar_type();
  const auto f = x_.options().dtype(at::kFloat);
  const OptTensor lengths = lengths_ ? OptTensor(lengths_->contiguous()) : std::nullopt;
  at::Tensor y = seq_buffer(lengths, {T, B, P}, x_.options());
  at::Tensor gates = seq_buffer(lengths, {T, B, S}, f);
  at::Tensor cs = cell == Cell::kLstm ? seq_buffer(lengths, {T, B, H}, f) : at::Tensor();
  at::Tensor h = f32_copy(h0), c = c0 ? f32_copy(*c0) : at::Tensor();
  auto result = [&](const at::Tensor& hn) {
    return std::tuple{y, hn.to(dt, false, true), c0 ? c.to(dt, false, true) : at::Tensor(), gates,
                      cs};
  };
  if (T == 0 || B == 0) return result(h);

  // Contiguous operands: cuBLAS picks its kernel (and so its rounding) by layout, so a strided x
  // or transposed weight gives the very bits of the contiguous call.
  const at::Tensor x = x_.contiguous(), w_hh = w_hh_.contiguous();
  // Without w_ih x is the projection already (float32 for the kernels, which only read it), or
  // the table whose rows index picks.
  at::Tensor gx;
  if (index) {
    gx = at::empty({T * B, G}, f);
    rnn::gather_rows(gx, f32(x), *index);
  } else {
    gx = w_ih ? mm_f32(x.view({T * B, I}), w_ih->contiguous().t()) : f32(x).view({T * B, G});
  }
  // LSTM: both biases fold into the input side; GRU: b_hh stays apart (n scales it by r).
  OptTensor bias_x, bias_h;
  if (cell == Cell::kLstm && (b_ih || b_hh)) {
    bias_x = at::zeros({G}, f);
    if (b_ih) bias_x->add_(*b_ih);
    if (b_hh) bias_x->add_(*b_hh);
  } else if (cell == Cell::kGru) {
    if (b_ih) bias_x = f32(*b_ih);
    if (b_hh) bias_h = f32(*b_hh);
  }
  const cuda::RnnSchedule sch = schedule(lengths, d, reverse);

  cuda::RnnPersistParams pp = persist_params(cell, x, sch, H, w_hh);
  if (!w_hr && cuda::rnn_persist_plan(pp, false) > 0) {
    at::Tensor hb = at::empty({2, B, H}, f);
    hb[0].copy_(h);
    pp.gx = gx.data_ptr<float>();
    pp.bias_x = fptr(bias_x);
    pp.bias_h = fptr(bias_h);
    pp.h = hb.data_ptr<float>();
    pp.c = c0 ? c.data_ptr<float>() : nullptr;
    pp.y = y.data_ptr();
    pp.gates = gates.data_ptr<float>();
    pp.cs = c0 ? cs.data_ptr<float>() : nullptr;
    C10_CUDA_CHECK(cuda::rnn_persist_fwd(pp, stream()));
    return result(hb[T % 2]);
  }
  cuda::RnnStepParams sp;
  sp.cell = cell;
  sp.dtype = dtype_of(x);
  sp.sch = sch;
  sp.H = H;
  sp.P = P;
  sp.gx = gx.data_ptr<float>();
  sp.bias_x = fptr(bias_x);
  sp.bias_h = fptr(bias_h);
  sp.c = c0 ? c.data_ptr<float>() : nullptr;
  sp.h = h.data_ptr<float>();
  sp.y = y.data_ptr();
  sp.gates = gates.data_ptr<float>();
  sp.cs = c0 ? cs.data_ptr<float>() : nullptr;
  step_forward(sp, h, w_hh, w_hr, y);
  return result(h);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const OptTensor& w_ih,
    const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
    const OptTensor& lengths, bool reverse, const OptTensor& index) {
  const rnn::Dims d =
      rnn::check_layer(kLstm, kDtypes, 4, x, h0, &c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, index);
  const c10::cuda::CUDAGuard guard(x.device());
  return layer_fwd(Cell::kLstm, d, x, h0, &c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                   index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_fwd(
    const at::Tensor& x, const at::Tensor& h0, const OptTensor& w_ih, const at::Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& lengths, bool reverse,
    const OptTensor& index) {
  const rnn::Dims d = rnn::check_layer(kGru, kDtypes, 3, x, h0, nullptr, w_ih, w_hh, b_ih, b_hh,
                                       std::nullopt, lengths, index);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [y, hn, cn, gates, cs] = layer_fwd(Cell::kGru, d, x, h0, nullptr, w_ih, w_hh, b_ih, b_hh,
                                          std::nullopt, lengths, reverse, index);
  return {y, hn, gates};
}

// ---------------------------------------------------------------- backward

struct LayerGrads {
  at::Tensor gx, gh0, gc0, gw_ih, gw_hh, gb_ih, gb_hh, gw_hr;
};

LayerGrads layer_bwd(Cell cell, const rnn::Dims& d, const OptTensor& grad_y_,
                     const OptTensor& grad_hn, const OptTensor& grad_cn, const at::Tensor& x_,
                     const at::Tensor& h0, const at::Tensor* c0, const OptTensor& w_ih,
                     const at::Tensor& w_hh_, const OptTensor& w_hr, const OptTensor& lengths_,
                     bool reverse, const at::Tensor& y, const at::Tensor& gates_,
                     const at::Tensor* cs_, std::array<bool, 2> mask, const OptTensor& index) {
  const auto [T, B, I, H, P, G, S] = d;
  const auto dt = x_.scalar_type();
  const auto f = x_.options().dtype(at::kFloat);
  const bool lstm = cell == Cell::kLstm;
  const OptTensor lengths = lengths_ ? OptTensor(lengths_->contiguous()) : std::nullopt;
  const cuda::RnnSchedule sch = schedule(lengths, d, reverse);
  at::Tensor dh = grad_hn ? f32_copy(*grad_hn) : at::zeros({B, P}, f);
  at::Tensor dc = lstm ? (grad_cn ? f32_copy(*grad_cn) : at::zeros({B, H}, f)) : at::Tensor();
  at::Tensor dg = seq_buffer(lengths, {T, B, S}, f);
  at::Tensor dhp = w_hr ? seq_buffer(lengths, {T, B, P}, f) : at::Tensor();
  const at::Tensor gates = gates_.contiguous();
  const at::Tensor cs = lstm ? cs_->contiguous() : at::Tensor();
  // h_{t-1} per position: the GRU's pointwise needs it, dW_hh too.
  at::Tensor hprev;
  if (!lstm || mask[1]) hprev = prev_states(y, h0, sch, P);
  if (T > 0 && B > 0) {
    const OptTensor grad_y = grad_y_ ? OptTensor(grad_y_->contiguous()) : std::nullopt;
    const at::Tensor w_hh = w_hh_.contiguous();
    const at::Tensor prev = lstm ? prev_states(cs, *c0, sch, H) : hprev;
    at::Tensor direct = lstm ? at::Tensor() : at::empty({B, H}, f);
    cuda::RnnPersistParams pp = persist_params(cell, x_, sch, H, w_hh);
    pp.gates = gates.data_ptr<float>();
    pp.cs = lstm ? cs.data_ptr<float>() : nullptr;
    pp.gy = grad_y ? grad_y->data_ptr() : nullptr;
    pp.prev = prev.data_ptr<float>();
    pp.dgates = dg.data_ptr<float>();
    pp.dh = dh.data_ptr<float>();
    pp.dc = lstm ? dc.data_ptr<float>() : nullptr;
    pp.direct = lstm ? nullptr : direct.data_ptr<float>();
    if (!w_hr && cuda::rnn_persist_plan(pp, true) > 0) {
      C10_CUDA_CHECK(cuda::rnn_persist_bwd(pp, stream()));
    } else {
      cuda::RnnStepParams sp;
      sp.cell = cell;
      sp.dtype = dtype_of(x_);
      sp.sch = sch;
      sp.H = H;
      sp.P = P;
      sp.gates = gates.data_ptr<float>();
      sp.cs = lstm ? cs.data_ptr<float>() : nullptr;
      sp.prev = prev.data_ptr<float>();
      sp.dgates = dg.data_ptr<float>();
      sp.dc = lstm ? dc.data_ptr<float>() : nullptr;
      step_backward(sp, dh, w_hh, w_hr, grad_y, dhp);
    }
  }

  LayerGrads g{none(x_), dh.to(dt), lstm ? dc.to(dt) : at::Tensor(), none(x_), none(x_), none(x_),
               none(x_), none(x_)};
  const at::Tensor dg2 = dg.view({T * B, S});
  // The gate gradients as they multiply w_ih (rows [0, G)) and w_hh: the LSTM's are dg2 itself;
  // the GRU's [dr, dz, dghn, dn] use [dr, dz, dn] for w_ih and [dr, dz, dghn] for w_hh.
  const at::Tensor dgx =
      lstm ? dg2 : at::cat({dg2.narrow(1, 0, 2 * H), dg2.narrow(1, 3 * H, H)}, 1);
  if (mask[0] && index)
    g.gx = rnn::table_grad(dgx, *index, x_.size(0)).to(dt);
  else if (mask[0])
    g.gx = (w_ih ? at::mm(dgx, f32(*w_ih)) : dgx).view({T, B, I}).to(dt);
  if (mask[1]) {
    if (w_ih) g.gw_ih = at::mm(dgx.t(), f32(x_).view({T * B, I})).to(dt);
    g.gw_hh = at::mm(dg2.narrow(1, 0, G).t(), hprev.view({T * B, P})).to(dt);
    const at::Tensor db = dgx.sum(0);
    g.gb_ih = db.to(dt, false, true);
    g.gb_hh = lstm ? db.to(dt, false, true) : dg2.narrow(1, 0, G).sum(0).to(dt);
    if (w_hr) {
      const at::Tensor r = gates.narrow(2, 3 * H, H) * at::tanh(cs);
      g.gw_hr = at::mm(dhp.view({T * B, P}).t(), r.reshape({T * B, H})).to(dt);
    }
  }
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
lstm_layer_bwd(const OptTensor& grad_y, const OptTensor& grad_hn, const OptTensor& grad_cn,
               const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
               const OptTensor& w_ih, const at::Tensor& w_hh, const OptTensor& w_hr,
               const OptTensor& lengths, bool reverse, const at::Tensor& y, const at::Tensor& gates,
               const at::Tensor& cs, std::array<bool, 2> mask, const OptTensor& index) {
  const rnn::Dims d = rnn::check_layer(kLstm, kDtypes, 4, x, h0, &c0, w_ih, w_hh, std::nullopt,
                                       std::nullopt, w_hr, lengths, index);
  rnn::check_saved(kLstm, d, x, grad_y, grad_hn, grad_cn, y, gates, &cs);
  const c10::cuda::CUDAGuard guard(x.device());
  const LayerGrads g = layer_bwd(Cell::kLstm, d, grad_y, grad_hn, grad_cn, x, h0, &c0, w_ih, w_hh,
                                 w_hr, lengths, reverse, y, gates, &cs, mask, index);
  return {g.gx, g.gh0, g.gc0, g.gw_ih, g.gw_hh, g.gb_ih, g.gb_hh, g.gw_hr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_layer_bwd(
    const OptTensor& grad_y, const OptTensor& grad_hn, const at::Tensor& x, const at::Tensor& h0,
    const OptTensor& w_ih, const at::Tensor& w_hh, const OptTensor& lengths, bool reverse,
    const at::Tensor& y, const at::Tensor& gates, std::array<bool, 2> mask,
    const OptTensor& index) {
  const rnn::Dims d = rnn::check_layer(kGru, kDtypes, 3, x, h0, nullptr, w_ih, w_hh, std::nullopt,
                                       std::nullopt, std::nullopt, lengths, index);
  rnn::check_saved(kGru, d, x, grad_y, grad_hn, std::nullopt, y, gates, nullptr);
  const c10::cuda::CUDAGuard guard(x.device());
  const LayerGrads g =
      layer_bwd(Cell::kGru, d, grad_y, grad_hn, std::nullopt, x, h0, nullptr, w_ih, w_hh,
                std::nullopt, lengths, reverse, y, gates, nullptr, mask, index);
  return {g.gx, g.gh0, g.gw_ih, g.gw_hh, g.gb_ih, g.gb_hh};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("lstm_layer_fwd", &lstm_layer_fwd);
  m.impl("lstm_layer_bwd", &lstm_layer_bwd);
  m.impl("gru_layer_fwd", &gru_layer_fwd);
  m.impl("gru_layer_bwd", &gru_layer_bwd);
}

}  // namespace fastdl
