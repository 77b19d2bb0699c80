// CPU implementations of the norm ops (schemas in csrc/ops.cpp): input checks, allocation,
// threading with at::parallel_for, and the choice of the kernel table for the CPU's ISA. The
// kernels themselves (csrc/cpu/norm_kernels.h) see raw pointers only.
//
// Determinism: every reduction is cut into blocks fixed by the shapes alone (never by the
// thread count) and the blocks are merged in a fixed order, so results are bit-identical from
// run to run and for any number of threads.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/isa.h"
#include "cpu/norm_params.h"
#include "cpu/output.h"

// ATen's at::parallel_for is an inline OpenMP region: compiled without -fopenmp it silently runs
// on one thread. (The extension then shares torch's own libgomp.so.1, loaded by soname.)
#ifndef _OPENMP
#warning "fastdl: build csrc/cpu with -fopenmp, or at::parallel_for runs the kernels serially"
#endif

namespace fastdl::cpu {
namespace {

constexpr std::initializer_list<c10::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kBFloat16};
// Elements per parallel task below which threading costs more than it saves.
constexpr int64_t kGrainElems = 32768;
// Rows per dweight/dbias partial-sum block in the LayerNorm/RMSNorm backward (at least), and
// the most blocks: their partial sums cost 2 * n per block against 3 * n * rows of traffic.
constexpr int64_t kMinBlockRows = 64;
constexpr int64_t kMaxBlocks = 512;

const NormKernels& kernels() {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::kAvx512:
      return norm_kernels_avx512();
    case Isa::kAvx2:
      return norm_kernels_avx2();
#endif
    default:
      return norm_kernels_scalar();
  }
}

NormDtype dtype_index(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kDouble:
      return kF64;
    case at::kBFloat16:
      return kBF16;
    default:
      return kF32;
  }
}

// The statistics (and kernel accumulation) dtype.
at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A parameter as a contiguous (numel,) tensor of the accumulation dtype; `fill` stands in for a
// missing one.
at::Tensor param_acc(const std::optional<at::Tensor>& p, const at::Tensor& x, int64_t numel,
                     double fill) {
  if (!p.has_value()) return at::full({numel}, fill, x.options().dtype(acc_type(x)));
  return p->reshape({numel}).to(acc_type(x)).contiguous();
}

// A flat parameter gradient, or an empty (0,) tensor when it is masked off.
at::Tensor param_grad(const at::Tensor& x, int64_t numel, bool wanted) {
  return at::empty({wanted ? numel : 0}, x.options().dtype(acc_type(x)));
}

bool stream_stores(int64_t bytes, std::initializer_list<const at::Tensor*> outs) {
  if (bytes < kStreamBytes) return false;
  // Outputs written side by side must share their alignment (fresh allocations are 64-byte
  // aligned; anything else just uses ordinary stores).
  for (const at::Tensor* t : outs)
    if (t->defined() && t->numel() > 0 && reinterpret_cast<uintptr_t>(t->data_ptr()) % 64 != 0)
      return false;
  return true;
}

void check_stat(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& x,
                int64_t numel) {
  checks::same_device(op, arg, t, x);
  TORCH_CHECK(t.numel() == numel, op, ": ", arg, " must have ", numel, " elements, got shape ",
              t.sizes());
  checks::dtype(op, arg, t, {acc_type(x)});
}

void check_like(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& x) {
  checks::same_device(op, arg, t, x);
  checks::same_shape(op, arg, t, x);
  checks::dtype(op, arg, t, {x.scalar_type()});
}

// ---------------------------------------------------------------- LayerNorm / RMSNorm

template <bool kRms>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_norm_fwd(
    const char* op, const at::Tensor& x_, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t n,
    double eps) {
  checks::dtype(op, "x", x_, kDtypes);
  checks::normalized_numel(op, x_, n);
  checks::positive_eps(op, eps);
  if (residual.has_value()) check_like(op, "residual", *residual, x_);
  checks::param(op, "weight", weight, x_, n);
  checks::param(op, "bias", bias, x_, n);

  const at::Tensor x = x_.contiguous();
  const int64_t rows = x.numel() / n;
  const auto stat = x.options().dtype(acc_type(x));
  at::Tensor out = new_output(x.sizes(), x.options());
  at::Tensor sum = residual.has_value() ? new_output(x.sizes(), x.options()) : x.new_empty({0});
  at::Tensor mean = kRms ? at::Tensor() : at::empty({rows}, stat);
  at::Tensor rstd = at::empty({rows}, stat);
  if (rows == 0) return {out, sum, mean, rstd};

  const at::Tensor res = residual.has_value() ? residual->contiguous() : at::Tensor();
  const at::Tensor w = param_acc(weight, x, n, 1.0);
  const at::Tensor b = kRms ? w : param_acc(bias, x, n, 0.0);
  const int64_t out_bytes = x.nbytes() * (residual.has_value() ? 2 : 1);
  const RowNormFwd p{
      .x = x.const_data_ptr(),
      .residual = res.defined() ? res.const_data_ptr() : nullptr,
      .weight = w.const_data_ptr(),
      .bias = b.const_data_ptr(),
      .out = out.data_ptr(),
      .sum = residual.has_value() ? sum.data_ptr() : nullptr,
      .mean = kRms ? nullptr : mean.data_ptr(),
      .rstd = rstd.data_ptr(),
      .n = n,
      .eps = eps,
      .stream = stream_stores(out_bytes, {&out, &sum}),
  };
  const auto& table = kRms ? kernels().rms_norm_fwd : kernels().layer_norm_fwd;
  const RowFwdFn fn = table[dtype_index(x)][residual.has_value()];
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / n),
                   [&](int64_t r0, int64_t r1) { fn(p, r0, r1); });
  return {out, sum, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t n,
    double eps) {
  return row_norm_fwd<false>("fastdl.layer_norm", x, residual, weight, bias, n, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, int64_t n, double eps) {
  auto [out, sum, mean, rstd] =
      row_norm_fwd<true>("fastdl.rms_norm", x, residual, weight, std::nullopt, n, eps);
  return {out, sum, rstd};
}

template <bool kRms>
std::tuple<at::Tensor, at::Tensor, at::Tensor> row_norm_bwd(
    const char* op, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_sum,
    const at::Tensor& input_, const std::optional<at::Tensor>& mean_, const at::Tensor& rstd_,
    const std::optional<at::Tensor>& weight, int64_t n, bool want_dx, bool want_dw, bool want_db) {
  checks::dtype(op, "input", input_, kDtypes);
  checks::normalized_numel(op, input_, n);
  check_like(op, "grad_out", grad_out, input_);
  if (grad_sum.has_value()) check_like(op, "grad_sum", *grad_sum, input_);
  const int64_t rows = input_.numel() / n;
  if (!kRms) check_stat(op, "mean", *mean_, input_, rows);
  check_stat(op, "rstd", rstd_, input_, rows);
  checks::param(op, "weight", weight, input_, n);

  const at::Tensor input = input_.contiguous();
  // The fake kernel gives grad_input input's shape even when it is masked off; zeros then, so
  // no memory contents leak.
  at::Tensor dx = new_output(input.sizes(), input.options());
  if (!want_dx) dx.zero_();
  at::Tensor dw = param_grad(input, n, want_dw);
  at::Tensor db = param_grad(input, n, want_db);
  const bool params = want_dw || (want_db && !kRms);
  if (rows == 0 || (!want_dx && !params)) {
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }

  const at::Tensor dy = grad_out.contiguous();
  const at::Tensor gs = grad_sum.has_value() ? grad_sum->contiguous() : at::Tensor();
  const at::Tensor mean = kRms ? at::Tensor() : mean_->contiguous();
  const at::Tensor rstd = rstd_.contiguous();
  const at::Tensor w = param_acc(weight, input, n, 1.0);
  const RowNormBwd p{
      .grad_out = dy.const_data_ptr(),
      .grad_sum = gs.defined() ? gs.const_data_ptr() : nullptr,
      .input = input.const_data_ptr(),
      .mean = kRms ? nullptr : mean.const_data_ptr(),
      .rstd = rstd.const_data_ptr(),
      .weight = w.const_data_ptr(),
      .grad_input = want_dx ? dx.data_ptr() : nullptr,
      .n = n,
      .stream = want_dx && stream_stores(dx.nbytes(), {&dx}),
  };
  const auto& table = kRms ? kernels().rms_norm_bwd : kernels().layer_norm_bwd;
  const RowBwdFn fn = table[dtype_index(input)][gs.defined()];
  if (!params) {
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / n),
                     [&](int64_t r0, int64_t r1) { fn(p, r0, r1, nullptr, nullptr); });
    return {dx, dw, db};
  }
  const int64_t block_rows = std::max(kMinBlockRows, (rows + kMaxBlocks - 1) / kMaxBlocks);
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  const auto acc = input.options().dtype(acc_type(input));
  at::Tensor part_w = at::empty({blocks, n}, acc);
  at::Tensor part_b = kRms ? part_w : at::empty({blocks, n}, acc);
  const int64_t elem = part_w.element_size();
  char* pw = static_cast<char*>(part_w.data_ptr());
  char* pb = static_cast<char*>(part_b.data_ptr());
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk)
      fn(p, blk * block_rows, std::min(rows, (blk + 1) * block_rows), pw + blk * n * elem,
         kRms ? nullptr : pb + blk * n * elem);
  });
  const SumBlocksFn sum = kernels().sum_blocks[acc_type(input) == at::kDouble];
  auto reduce_blocks = [&](const at::Tensor& part, at::Tensor& grad) {
    at::parallel_for(0, n, std::max<int64_t>(64, kGrainElems / blocks),
                     [&](int64_t j0, int64_t j1) {
                       sum(part.const_data_ptr(), blocks, n, grad.data_ptr(), j0, j1);
                     });
  };
  if (want_dw) reduce_blocks(part_w, dw);
  if (want_db && !kRms) reduce_blocks(part_b, db);
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_sum, const at::Tensor& input,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    int64_t n, std::array<bool, 3> mask) {
  return row_norm_bwd<false>("fastdl.layer_norm", grad_out, grad_sum, input, mean, rstd, weight, n,
                             mask[0], mask[1], mask[2]);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_out,
                                                const std::optional<at::Tensor>& grad_sum,
                                                const at::Tensor& input, const at::Tensor& rstd,
                                                const std::optional<at::Tensor>& weight, int64_t n,
                                                std::array<bool, 2> mask) {
  auto [dx, dw, db] = row_norm_bwd<true>("fastdl.rms_norm", grad_out, grad_sum, input, std::nullopt,
                                         rstd, weight, n, mask[0], mask[1], false);
  return {dx, dw};
}

// ---------------------------------------------------------------- BatchNorm

// x (N, C, *) in the layout the kernels read: channels_last is kept, anything else becomes
// contiguous NCHW. Both channels_last and (N, C) (HW == 1, BatchNorm1d) are rows of C channels
// in memory and take the row kernels.
struct BnLayout {
  bool channels_last;
  int64_t N, C, HW;
  at::MemoryFormat format() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
  bool rows_of_c() const { return channels_last || HW == 1; }
};

BnLayout bn_layout(const char* op, const at::Tensor& x) {
  checks::dtype(op, "x", x, kDtypes);
  TORCH_CHECK(x.dim() >= 2, op, ": x must be (N, C, *), got shape ", x.sizes());
  const bool cl =
      x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1);
  return {cl, N, C, N * C == 0 ? 0 : x.numel() / (N * C)};
}

// Rows per channels_last partial block: about 32 KiB of x (so the block is re-read from L1/L2),
// and at most a few thousand blocks.
int64_t bn_block_rows(const BnLayout& l) {
  const int64_t rows = l.N * l.HW;
  return std::max({int64_t{1}, 8192 / l.C, (rows + 4095) / 4096});
}

// The channels_last pass that follows a reduction pass over the same blocks: the same
// block-to-thread split (parallel_for over blocks, grain 1), each thread walking its blocks
// backwards, so it starts on the rows it read last, still in its L2 and the L3. x is too large
// for the cache as a whole, and the order saves part of the second read.
template <typename F>
void for_blocks_reversed(const BatchNormArgs& p, int64_t blocks, const F& f) {
  const int64_t rows = p.N * p.HW;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b1; b-- > b0;) f(b * p.block_rows, std::min(rows, (b + 1) * p.block_rows));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd(
    const at::Tensor& x_, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, bool relu) {
  const char* op = "fastdl.batch_norm";
  const BnLayout l = bn_layout(op, x_);
  checks::positive_eps(op, eps);
  checks::param(op, "weight", weight, x_, l.C);
  checks::param(op, "bias", bias, x_, l.C);
  checks::param(op, "running_mean", running_mean, x_, l.C);
  checks::param(op, "running_var", running_var, x_, l.C);
  const int64_t count = l.N * l.HW;
  TORCH_CHECK(!training || count != 1, op,
              ": expected more than 1 value per channel when training, got x of shape ",
              x_.sizes());
  TORCH_CHECK(training || (running_mean.has_value() && running_var.has_value()), op,
              ": running_mean and running_var are required in eval mode");

  const at::Tensor x = x_.contiguous(l.format());
  const auto stat = x.options().dtype(acc_type(x));
  at::Tensor out = new_output(x.sizes(), x.options(), l.format());
  at::Tensor mean, invstd;
  if (training) {
    // Written by the kernels; an empty batch normalizes as if its variance were 0.
    mean = count == 0 ? at::zeros({l.C}, stat) : at::empty({l.C}, stat);
    invstd = count == 0 ? at::full({l.C}, 1.0 / std::sqrt(eps), stat) : at::empty({l.C}, stat);
  } else {
    // A copy: an output must not alias the running_mean input (op schema).
    mean = running_mean->reshape({l.C})
               .to(acc_type(x), /*non_blocking=*/false, /*copy=*/true)
               .contiguous();
    invstd = (running_var->reshape({l.C}).to(acc_type(x)) + eps).rsqrt_().contiguous();
  }
  if (x.numel() == 0) return {out, mean, invstd};

  const at::Tensor w = param_acc(weight, x, l.C, 1.0);
  const at::Tensor b = param_acc(bias, x, l.C, 0.0);
  const BatchNormArgs p{
      .x = x.const_data_ptr(),
      .grad_out = nullptr,
      .weight = w.const_data_ptr(),
      .bias = b.const_data_ptr(),
      .mean = mean.data_ptr(),
      .invstd = invstd.data_ptr(),
      .out = out.data_ptr(),
      .grad_weight = nullptr,
      .grad_bias = nullptr,
      .N = l.N,
      .C = l.C,
      .HW = l.HW,
      .block_rows = bn_block_rows(l),
      .eps = eps,
      .training = training,
      .relu = relu,
      .stream = stream_stores(out.nbytes(), {&out}),
  };
  const NormKernels& k = kernels();
  const int dt = dtype_index(x);
  if (!l.rows_of_c()) {
    at::parallel_for(0, l.C, 1, [&](int64_t c0, int64_t c1) { k.bn_fwd_nchw[dt](p, c0, c1); });
    return {out, mean, invstd};
  }
  if (!training) {
    at::parallel_for(0, count, std::max<int64_t>(1, kGrainElems / l.C),
                     [&](int64_t r0, int64_t r1) { k.bn_fwd_cl[dt](p, r0, r1, nullptr); });
    return {out, mean, invstd};
  }
  const int64_t blocks = (count + p.block_rows - 1) / p.block_rows;
  at::Tensor part = at::empty({blocks, 2, l.C}, stat);
  at::parallel_for(0, blocks, 1,
                   [&](int64_t b0, int64_t b1) { k.bn_stats_cl[dt](p, b0, b1, part.data_ptr()); });
  k.bn_stats_cl_combine[dt == kF64](p, part.const_data_ptr(), blocks);
  for_blocks_reversed(p, blocks,
                      [&](int64_t r0, int64_t r1) { k.bn_fwd_cl[dt](p, r0, r1, nullptr); });
  return {out, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd(
    const at::Tensor& grad_out, const at::Tensor& x_, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, bool relu, std::array<bool, 3> mask) {
  const char* op = "fastdl.batch_norm";
  const BnLayout l = bn_layout(op, x_);
  check_like(op, "grad_out", grad_out, x_);
  checks::param(op, "weight", weight, x_, l.C);
  checks::param(op, "bias", bias, x_, l.C);
  check_stat(op, "save_mean", save_mean, x_, l.C);
  check_stat(op, "save_invstd", save_invstd, x_, l.C);

  const at::Tensor x = x_.contiguous(l.format());
  at::Tensor dx = new_output(x.sizes(), x.options(), l.format());
  if (!mask[0]) dx.zero_();  // shaped as the fake kernel says even when masked off
  at::Tensor dw = param_grad(x, l.C, mask[1]);
  at::Tensor db = param_grad(x, l.C, mask[2]);
  if (x.numel() == 0 || !(mask[0] || mask[1] || mask[2])) {
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }

  const at::Tensor dy = grad_out.contiguous(l.format());
  const at::Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
  const at::Tensor w = param_acc(weight, x, l.C, 1.0);
  const at::Tensor b = param_acc(bias, x, l.C, 0.0);
  const BatchNormArgs p{
      .x = x.const_data_ptr(),
      .grad_out = dy.const_data_ptr(),
      .weight = w.const_data_ptr(),
      .bias = b.const_data_ptr(),
      .mean = const_cast<void*>(mean.const_data_ptr()),
      .invstd = const_cast<void*>(invstd.const_data_ptr()),
      .out = mask[0] ? dx.data_ptr() : nullptr,
      .grad_weight = mask[1] ? dw.data_ptr() : nullptr,
      .grad_bias = mask[2] ? db.data_ptr() : nullptr,
      .N = l.N,
      .C = l.C,
      .HW = l.HW,
      .block_rows = bn_block_rows(l),
      .eps = 0,
      .training = training,
      .relu = relu,
      .stream = mask[0] && stream_stores(dx.nbytes(), {&dx}),
  };
  const NormKernels& k = kernels();
  const int dt = dtype_index(x);
  if (!l.rows_of_c()) {
    at::parallel_for(0, l.C, 1, [&](int64_t c0, int64_t c1) { k.bn_bwd_nchw[dt](p, c0, c1); });
    return {dx, dw, db};
  }
  const int64_t count = l.N * l.HW;
  const auto stat = x.options().dtype(acc_type(x));
  // [sum(g), sum(g * (x - mean))] per channel; the eval grad_input does not read them.
  at::Tensor sums = at::zeros({2 * l.C}, stat);
  if (training || mask[1] || mask[2]) {
    const int64_t blocks = (count + p.block_rows - 1) / p.block_rows;
    at::Tensor part = at::empty({blocks, 2 * l.C}, stat);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      k.bn_bwd_sums_cl[dt](p, b0, b1, part.data_ptr());
    });
    k.sum_blocks[dt == kF64](part.const_data_ptr(), blocks, 2 * l.C, sums.data_ptr(), 0, 2 * l.C);
    if (mask[1]) dw.copy_(sums.slice(0, l.C) * invstd);
    if (mask[2]) db.copy_(sums.slice(0, 0, l.C));
  }
  if (mask[0])
    for_blocks_reversed(p, (count + p.block_rows - 1) / p.block_rows, [&](int64_t r0, int64_t r1) {
      k.bn_bwd_dx_cl[dt](p, r0, r1, sums.const_data_ptr());
    });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("batch_norm_fwd", &batch_norm_fwd);
  m.impl("batch_norm_bwd", &batch_norm_bwd);
}

}  // namespace fastdl::cpu
