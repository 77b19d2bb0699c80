// The convs that run direct kernels (conv_kernels.h, conv_grouped.h) instead of GEMMs:
// depthwise (groups == C == K > 1: R * S multiply-adds an output, bound by memory), grouped ones
// with 2 or 4 channels a group in and out (ResNeXt's first stage) and grouped ones with 8 to 32
// output channels a group (its later stages; channel multipliers of 8 to 32): a GEMM per
// group would have a fraction of one vector or one micro-tile of columns, and an im2col per
// group read every pixel once per group. Forward, input gradient (stride 1: the adjoint's
// forward, unless padded beyond the taps' reach; else a depthwise conv's gathered per input pixel)
// and the weight and bias gradients,
// summed over chunks of output rows fixed by the shapes and merged in order (deterministic). All on
// NHWC in the compute dtype (bfloat16 widened), but for depthwise convs with unit column stride on
// NCHW planes (and both gradients of flat ones, depthwise_plane_grads); the forward's epilogue
// writes any layout and dtype. Also the forward of dense convs of few input channels
// (plane_forward: conv_plane.h; NCHW or NHWC), whose gradients are the implicit GEMM's, and the
// forward and input gradient of dense stride-1 bfloat16 convs on AMX tiles (amx_forward:
// conv_amx.h).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common/isa.h"
#include "cpu/conv.h"
#include "cpu/output.h"

namespace fastdl::cpu::conv_impl {
namespace {

bool depthwise(const ConvArgs& a) {
  return a.groups == a.C && a.K == a.C && a.C > 1;
}

// The grouped convs of conv_grouped_fwd: as many output as input channels a group, 2 or 4.
bool grouped(const ConvArgs& a) {
  const int64_t kg = a.K / std::max<int64_t>(a.groups, 1);
  return a.groups > 1 && a.C == a.K && (kg == 2 || kg == 4);
}

// The grouped convs of conv_grouped_bcast_fwd: 8 to 32 output channels a group (a multiple of 8),
// any number of input channels.
bool grouped_bcast(const ConvArgs& a) {
  const int64_t kg = a.K / std::max<int64_t>(a.groups, 1);
  return a.groups > 1 && kg > 0 && kg % 8 == 0 && kg <= 32 && !grouped(a) && !depthwise(a);
}

// Depthwise convs with a channel multiplier m = K / C of 2 to 7 or over 32 (multiples of 8 up to
// 32 run grouped_bcast): run as the depthwise conv of x with each channel repeated m times
// (expand_channels; the input gradient sums the m copies' gradients), one-channel GEMMs per
// group had taken 5-7x torch's time.
bool multiplier(const ConvArgs& a) {
  return a.groups > 1 && a.groups == a.C && a.K % a.C == 0 && a.K > a.C && !grouped_bcast(a);
}

// a as the depthwise conv of its expanded input (C = groups = K).
ConvArgs expanded(const ConvArgs& a) {
  ConvArgs e = a;
  e.C = e.groups = a.K;
  return e;
}

// x (N, C, H, W) with channel c repeated m times ((N, C m, H, W), channel k = x's k / m), NHWC
// memory in compute dtype.
at::Tensor expand_channels(const at::Tensor& x, int64_t m) {
  const at::Tensor xn = nhwc(x).permute({0, 2, 3, 1});  // (N, H, W, C)
  std::vector<int64_t> sizes(xn.sizes().begin(), xn.sizes().end());
  sizes.push_back(m);
  return xn.unsqueeze(4)
      .expand(sizes)
      .reshape({xn.size(0), xn.size(1), xn.size(2), xn.size(3) * m})
      .permute({0, 3, 1, 2});
}

// Whether the grouped_bcast conv a, computed in ct, runs in pairs of groups (8 channels a group in
// and out, an even number of groups, float32 on an ISA with conv_grouped_pairs_fwd).
bool grouped_pairs(const ConvArgs& a, at::ScalarType ct) {
  return kernels().grouped_pairs_fwd != nullptr && ct == at::kFloat && a.groups % 2 == 0 &&
         a.C / a.groups == 8 && a.K / a.groups == 8;
}

// w (K, cg, R, S) as the broadcast forward reads it, (groups, kg / sw, R, S, cg, sw) for sw =
// grouped_bcast_slice, or in pairs (groups / 2, R, S, 8, 16) with [h][r][s][c][8 j + k] =
// w[(2 h + j) 8 + k][c][r][s], in dtype T. The weight gradients' part is (groups, R, S, cg, kg)
// (sw = kg) or the pairs' layout: bcast_weight_grad takes it back to w's.
template <typename T>
at::Tensor bcast_weight(const at::Tensor& w, const ConvArgs& a, bool pairs) {
  const at::Tensor wc = w.to(c10::CppTypeToScalarType<T>::value);
  if (pairs)
    return wc.view({a.groups / 2, 2, 8, 8, a.R, a.S}).permute({0, 4, 5, 3, 1, 2}).contiguous();
  const int64_t kg = a.K / a.groups;
  const int64_t sw = kernels().grouped_bcast_slice[dt<T>()](kg);
  return wc.view({a.groups, kg / sw, sw, a.C / a.groups, a.R, a.S})
      .permute({0, 1, 4, 5, 3, 2})
      .contiguous();
}
at::Tensor bcast_weight_grad(const at::Tensor& gw, const ConvArgs& a, bool pairs) {
  const int64_t cg = a.C / a.groups;
  const at::Tensor g =
      pairs ? gw.view({a.groups / 2, a.R, a.S, 8, 2, 8}).permute({0, 4, 5, 3, 1, 2})
            : gw.view({a.groups, a.R, a.S, cg, a.K / a.groups}).permute({0, 4, 3, 1, 2});
  return g.reshape({a.K, cg, a.R, a.S});
}

// x as the broadcast kernels read it in ct, a's x_nchw set to match: NCHW memory as it is, else
// NHWC (nhwc: no copy where x is already).
at::Tensor bcast_input(const at::Tensor& x, ConvArgs& a, at::ScalarType ct) {
  a.x_nchw = x.scalar_type() == ct && x.is_contiguous() &&
             !x.is_contiguous(at::MemoryFormat::ChannelsLast);
  return a.x_nchw ? x : nhwc(x);
}

// The scratch of a broadcast kernel, in elements (a pair's input rows hold both groups'
// channels).
int64_t bcast_scratch(const ConvArgs& a, int64_t elem, bool pairs) {
  ConvArgs a2 = a;
  if (pairs) a2.groups /= 2;
  return group_scratch(a2, elem);
}

// w (K, kg, R, S) as conv_grouped_fwd reads it: (R, S, kg, K) with [r][s][t][k] =
// w[k][(k % kg + t) % kg][r][s], in dtype ct.
at::Tensor grouped_weight(const at::Tensor& w, at::ScalarType ct) {
  const int64_t K = w.size(0), kg = w.size(1);
  const at::Tensor wc = w.to(ct);
  const at::Tensor k = at::arange(K, w.options().dtype(at::kLong));
  std::vector<at::Tensor> steps;
  for (int64_t t = 0; t < kg; ++t) {
    const at::Tensor ci = (k.remainder(kg) + t).remainder(kg).view({K, 1, 1, 1});
    steps.push_back(wc.gather(1, ci.expand({K, 1, w.size(2), w.size(3)})).squeeze(1));
  }
  return at::stack(steps).permute({2, 3, 0, 1}).contiguous();
}

// The weight and bias gradients by a direct kernel that adds, over output rows (n, p) in
// [r0, r1), its `rows` rows of K products of gy and xn (NHWC; undefined: the bias alone) and gy's
// sum into a partial (with `scratch` elements of scratch): summed over chunks of output rows
// fixed by the shapes, merged in order. A kernel whose `groups` groups write disjoint parts of
// the partial (the broadcast kernels) takes slices of them as separate items of one chunk, so a
// large partial needs fewer chunks (each is zeroed and summed: 16 of 1.2 MB had cost a quarter of
// the time). Returns (rows, K) and (K) in gy's dtype.
std::pair<at::Tensor, at::Tensor> direct_params(const ConvArgs& a, const at::Tensor& xn,
                                                const at::Tensor& gy, int64_t rows,
                                                const DirectParamsFn* kernel, int64_t scratch = 0,
                                                int64_t groups = 1) {
  const at::ScalarType ct = gy.scalar_type();
  const int64_t out_rows = a.N * a.P, part = (rows + 1) * a.K;
  const int64_t budget = groups > 1 ? kSplitPartialBytes : kPartialBytes;
  const int64_t chunks = std::max<int64_t>(
      1, std::min({out_rows, kMaxChunks, budget / (part * int64_t(c10::elementSize(ct)))}));
  const int64_t split = std::min(groups, (kMaxChunks + chunks - 1) / chunks);
  at::Tensor partial = at::zeros({chunks, part}, gy.options());
  at::Tensor gw = at::empty({rows, a.K}, gy.options()), gb = at::empty({a.K}, gy.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "conv_direct_wgrad", [&] {
    scalar_t* pp = partial.data_ptr<scalar_t>();
    const scalar_t* xp = xn.defined() ? xn.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, chunks * split, 1, [&](int64_t i0, int64_t i1) {
      std::vector<scalar_t> rows_scratch(scratch);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t c = i / split, s = i % split;
        kernel[dt<scalar_t>()](a, xp, gy.const_data_ptr<scalar_t>(), pp + c * part,
                               c * out_rows / chunks, (c + 1) * out_rows / chunks,
                               s * groups / split, (s + 1) * groups / split, rows_scratch.data());
      }
    });
    scalar_t* w_out = gw.data_ptr<scalar_t>();
    scalar_t* b_out = gb.data_ptr<scalar_t>();
    const int64_t wsize = rows * a.K;
    sum_chunks(pp, chunks, part,
               [&](int64_t i, scalar_t v) { (i < wsize ? w_out[i] : b_out[i - wsize]) = v; });
  });
  return {gw, gb};
}

// Whether a conv runs on AMX tiles without im2col (amx_forward): bfloat16 operands on a CPU with
// AMX, groups 1, stride 1, C and K multiples of 32, output rows no wider than the padded input's
// reach (the adjoint of a conv_transpose2d with output_padding can be wider: its last columns
// would read the next row's pixels), not per tap. amx_shape: all but the last, on a ConvArgs or a
// conv::ConvGeom.
template <typename G>
bool amx_shape(const G& a, at::ScalarType dtype) {
  return dtype == at::kBFloat16 && cpu_amx() && a.groups == 1 && a.stride_h == 1 &&
         a.stride_w == 1 && a.C > 0 && a.C % 32 == 0 && a.K % 32 == 0 &&
         a.Q <= a.W + 2 * a.pad_w - a.dil_w * (a.S - 1);
}

std::atomic<int64_t> amx_runs{0};

bool amx_suits(const Gemm& p, at::ScalarType dtype) {
  return amx_shape(p.a, dtype) && !p.taps;
}

}  // namespace

at::Tensor adjoint_input_grad(const conv::ConvGeom& g, const at::Tensor& gpre,
                              const at::Tensor& weight, at::MemoryFormat fmt,
                              at::ScalarType dtype) {
  conv::ConvGeom adj = g;
  std::tie(adj.H, adj.W, adj.P, adj.Q) = std::make_tuple(g.P, g.Q, g.H, g.W);
  std::tie(adj.C, adj.K) = std::make_pair(g.K, g.C);
  adj.pad_h = g.dil_h * (g.R - 1) - g.pad_h;
  adj.pad_w = g.dil_w * (g.S - 1) - g.pad_w;
  if (g.stride_h != 1 || g.stride_w != 1 || adj.pad_h < 0 || adj.pad_w < 0) return {};
  // A dense conv's adjoint runs only on AMX tiles: nothing copied or allocated where they do not
  // apply.
  if (g.groups == 1 && !amx_shape(adj, gpre.scalar_type())) return {};
  const int64_t kg = g.K / g.groups, cg = g.C / g.groups;
  const at::Tensor wa = weight.reshape({g.groups, kg, cg, g.R, g.S})
                            .transpose(1, 2)
                            .flip({3, 4})
                            .reshape({g.C, kg, g.R, g.S});
  const at::ScalarType ct = compute_type(gpre);
  at::Tensor gx = new_output({g.N, g.C, g.H, g.W}, gpre.options().dtype(dtype), fmt);
  if (gx.numel() == 0) return gx;
  const Gemm p = plan(adj, 0, gx, gpre.scalar_type(), wa);
  if (amx_forward(p, gpre, wa, plain_epilogue(gx))) return gx;
  if (!direct_conv(p.a)) return {};
  AT_DISPATCH_FLOATING_TYPES(ct, "conv_adjoint_dgrad",
                             [&] { direct_forward<scalar_t>(p, gpre, wa, plain_epilogue(gx)); });
  return gx;
}

namespace {

ConvGrads depthwise_grads(const ConvArgs& a, const at::Tensor& x, const at::Tensor& gy,
                          const at::Tensor& weight, at::MemoryFormat fmt, at::ScalarType dtype,
                          bool want_input, bool want_weight, bool want_bias) {
  const at::ScalarType ct = gy.scalar_type();
  const ConvKernels& kr = kernels();
  ConvGrads r;
  if (want_input) {
    at::Tensor gx = new_output({a.N, a.H, a.W, a.C}, gy.options());
    const at::Tensor w = weight.to(ct).reshape({a.C, a.R * a.S}).t().contiguous();
    AT_DISPATCH_FLOATING_TYPES(ct, "conv_depthwise_dgrad", [&] {
      at::parallel_for(0, a.N * a.H, 1, [&](int64_t r0, int64_t r1) {
        kr.depthwise_bwd_input[dt<scalar_t>()](a, gy.const_data_ptr<scalar_t>(),
                                               w.const_data_ptr<scalar_t>(),
                                               gx.data_ptr<scalar_t>(), r0, r1);
      });
    });
    r.input = from_nhwc(gx, fmt, dtype);
  }
  if (!want_weight && !want_bias) return r;
  const auto [gw, gb] = direct_params(a, want_weight ? nhwc(x) : at::Tensor(), gy, a.R * a.S,
                                      kr.depthwise_bwd_params);
  if (want_weight) r.weight = gw.t().reshape(weight.sizes()).to(weight.scalar_type()).contiguous();
  if (want_bias) r.bias = gb.to(dtype);
  return r;
}

// Gradients of a depthwise conv on flat NCHW planes (depthwise_flat, NCHW fmt): the input's by the
// adjoint's forward on gpre's planes, the weight's and bias's as sums over each plane
// (conv_depthwise_plane_bwd_params) added over the images; no layout transposes.
ConvGrads depthwise_plane_grads(const conv::ConvGeom& g, const ConvArgs& a, const at::Tensor& x,
                                const at::Tensor& gpre, const at::Tensor& weight,
                                at::ScalarType dtype, bool want_input, bool want_weight,
                                bool want_bias) {
  ConvGrads r;
  const at::ScalarType ct = compute_type(gpre);
  const at::Tensor gc = as_output(gpre, ct, at::MemoryFormat::Contiguous);  // once, for both
  if (want_input) {
    r.input = adjoint_input_grad(g, gc, weight, at::MemoryFormat::Contiguous, dtype);
    if (!r.input.defined())  // padded beyond the taps' reach: gathered per input pixel
      r.input = depthwise_grads(a, x, nhwc(gpre), weight, at::MemoryFormat::Contiguous, dtype, true,
                                false, false)
                    .input;
  }
  if (!want_weight && !want_bias) return r;
  const at::Tensor xc = want_weight ? as_output(x, ct, at::MemoryFormat::Contiguous) : at::Tensor();
  const int64_t rs = a.R * a.S;
  at::Tensor sums = at::empty({a.N, a.C, rs + 1}, gc.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "conv_depthwise_plane_wgrad", [&] {
    at::parallel_for(0, a.N * a.C, 1, [&](int64_t c0, int64_t c1) {
      std::vector<scalar_t> masks(depthwise_flat_scratch(a, sizeof(scalar_t)));
      kernels().depthwise_plane_bwd_params[dt<scalar_t>()](
          a, want_weight ? xc.const_data_ptr<scalar_t>() : nullptr, gc.const_data_ptr<scalar_t>(),
          sums.data_ptr<scalar_t>(), c0, c1, masks.data());
    });
  });
  if (want_weight)
    r.weight =
        sums.narrow(2, 0, rs).sum(0).reshape(weight.sizes()).to(weight.scalar_type()).contiguous();
  if (want_bias) r.bias = sums.select(2, rs).sum(0).to(dtype);
  return r;
}

ConvGrads grouped_grads(const conv::ConvGeom& g, const ConvArgs& a, const at::Tensor& x,
                        const at::Tensor& gy, const at::Tensor& weight, at::MemoryFormat fmt,
                        at::ScalarType dtype, bool want_input, bool want_weight, bool want_bias) {
  ConvGrads r;
  if (want_input) r.input = adjoint_input_grad(g, gy, weight, fmt, dtype);
  if ((!want_weight && !want_bias) || a.N * a.P * a.Q == 0) {
    if (want_weight) r.weight = at::zeros_like(weight, at::MemoryFormat::Contiguous);
    if (want_bias) r.bias = at::zeros({a.K}, gy.options().dtype(dtype));
    return r;
  }
  if (grouped_bcast(a)) {
    // The broadcast kernels' part is their forward's weight layout (bcast_weight).
    const ConvKernels& kr = kernels();
    const bool pairs = grouped_pairs(a, gy.scalar_type());
    const DirectParamsFn paired[kNumConvDtypes] = {kr.grouped_pairs_bwd_params, nullptr};
    ConvArgs ax = a;
    const at::Tensor xn = want_weight ? bcast_input(x, ax, gy.scalar_type()) : at::Tensor();
    const auto [gw, gb] = direct_params(
        ax, xn, gy, a.R * a.S * (a.C / a.groups), pairs ? paired : kr.grouped_bcast_bwd_params,
        bcast_scratch(a, gy.element_size(), pairs), pairs ? a.groups / 2 : a.groups);
    if (want_weight)
      r.weight = bcast_weight_grad(gw, a, pairs).to(weight.scalar_type()).contiguous();
    if (want_bias) r.bias = gb.to(dtype);
    return r;
  }
  // conv_grouped_bwd_params' rows are grouped_weight's (r, s, t): scattered back to w's ci.
  const int64_t kg = a.K / a.groups;
  const auto [gw, gb] = direct_params(a, want_weight ? nhwc(x) : at::Tensor(), gy, a.R * a.S * kg,
                                      kernels().grouped_bwd_params);
  if (want_weight) {
    const at::Tensor k = at::arange(a.K, gw.options().dtype(at::kLong));
    const at::Tensor t = at::arange(kg, k.options());
    const at::Tensor ci = (k.remainder(kg).view({a.K, 1}) + t).remainder(kg);
    r.weight = at::empty({a.K, kg, a.R, a.S}, gw.options())
                   .scatter_(1, ci.view({a.K, kg, 1, 1}).expand({a.K, kg, a.R, a.S}),
                             gw.view({a.R, a.S, kg, a.K}).permute({3, 2, 0, 1}))
                   .to(weight.scalar_type());
  }
  if (want_bias) r.bias = gb.to(dtype);
  return r;
}

}  // namespace

bool direct_conv(const ConvArgs& a) {
  return depthwise(a) || grouped(a) || grouped_bcast(a) || multiplier(a);
}

template <typename T>
void direct_forward(const Gemm& p, const at::Tensor& x, const at::Tensor& weight,
                    const ConvEpilogue& e) {
  const ConvArgs& a = p.a;
  const at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  const ConvKernels& kr = kernels();
  if (multiplier(a)) {
    Gemm pe = p;
    pe.a = expanded(a);
    return direct_forward<T>(pe, expand_channels(x, a.K / a.C), weight, e);
  }
  if (grouped(a) || grouped_bcast(a)) {
    const bool bcast = grouped_bcast(a), pairs = bcast && grouped_pairs(a, ct);
    ConvArgs ax = a;
    const at::Tensor xn = bcast ? bcast_input(x, ax, ct) : nhwc(x);
    const at::Tensor wt = bcast ? bcast_weight<T>(weight, a, pairs) : grouped_weight(weight, ct);
    const GroupedFwdFn fn =
        pairs ? kr.grouped_pairs_fwd : (bcast ? kr.grouped_bcast_fwd : kr.grouped_fwd)[dt<T>()];
    at::parallel_for(0, a.N * a.P, 1, [&](int64_t r0, int64_t r1) {
      std::vector<T> rows(bcast ? bcast_scratch(a, sizeof(T), pairs) : 0);
      fn(ax, xn.const_data_ptr<T>(), wt.const_data_ptr<T>(), e, r0, r1, rows.data());
    });
    return;
  }
  const at::Tensor wc = weight.to(ct).reshape({a.C, a.R * a.S});
  // A bfloat16 x is read as it is, widened plane by plane (NCHW planes) or row by row (the NHWC
  // ring) in the kernels: a float32 copy of it, fresh memory every call, had cost more than the
  // conv (page faults and clearing included), and tripled the traffic of this memory-bound conv.
  const bool x_bf16 = std::is_same_v<T, float> && x.scalar_type() == at::kBFloat16;
  // NCHW output and width stride 1 or 2: SIMD over the width of each plane, no transposes.
  if (a.stride_w <= 2 && a.out_spq == 1 && a.out_sk == a.P * a.Q && a.out_sn == a.C * a.P * a.Q) {
    const at::Tensor xc = x_bf16 ? x.contiguous() : x.to(ct).contiguous();
    const at::Tensor w = wc.contiguous();
    const int64_t scratch = depthwise_plane_scratch(a, sizeof(T), x_bf16);
    at::parallel_for(0, a.N * a.C, 1, [&](int64_t c0, int64_t c1) {
      std::vector<T> pad(scratch);
      kr.depthwise_plane_fwd[dt<T>()](a, xc.const_data_ptr(), x_bf16, w.const_data_ptr<T>(), e, c0,
                                      c1, pad.data());
    });
    return;
  }
  const at::Tensor xn =
      x_bf16 ? as_output(x, at::kBFloat16, at::MemoryFormat::ChannelsLast) : nhwc(x);
  // The weight blocked (depthwise_ring): (C / L, R S, L), L channels a cache line, zero past C.
  const int64_t line = 64 / int64_t{sizeof(T)}, cp = (a.C + line - 1) / line * line;
  const at::Tensor w = at::constant_pad_nd(wc, {0, 0, 0, cp - a.C})
                           .reshape({cp / line, line, a.R * a.S})
                           .transpose(1, 2)
                           .contiguous();
  at::parallel_for(0, a.N * a.P, 1, [&](int64_t r0, int64_t r1) {
    std::vector<T> ring(depthwise_scratch(a, sizeof(T)));
    kr.depthwise_fwd[dt<T>()](a, xn.const_data_ptr(), x_bf16, w.const_data_ptr<T>(), e, r0, r1,
                              ring.data());
  });
}
template void direct_forward<float>(const Gemm&, const at::Tensor&, const at::Tensor&,
                                    const ConvEpilogue&);
template void direct_forward<double>(const Gemm&, const at::Tensor&, const at::Tensor&,
                                     const ConvEpilogue&);

template <typename T>
bool plane_forward(const Gemm& p, const at::Tensor& x, const at::Tensor& weight,
                   const ConvEpilogue& e) {
  const ConvArgs& a = p.a;
  const at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  const int64_t pq = a.P * a.Q;
  const bool out_nchw = a.out_spq == 1 && a.out_sk == pq && a.out_sn == a.K * pq;
  const bool out_nhwc = a.out_sk == 1 && a.out_spq == a.K && a.out_sn == pq * a.K;
  if (!plane_suits(a) || p.wino > 0 || x.scalar_type() != ct || !(out_nchw || out_nhwc))
    return false;
  // x as it is where dense NHWC (read element by element), else NCHW memory.
  const bool x_cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor xc = x_cl ? x : x.contiguous();
  const int64_t kb = (a.K + kPlaneChannels - 1) / kPlaneChannels;
  const int64_t taps = a.C * a.R * a.S;
  const at::Tensor wt =
      at::constant_pad_nd(weight.to(ct).reshape({a.K, taps}), {0, 0, 0, kb * kPlaneChannels - a.K})
          .reshape({kb, kPlaneChannels, taps})
          .transpose(1, 2)
          .contiguous();
  const PlaneFwdFn fn = kernels().plane_fwd[dt<T>()];
  at::parallel_for(0, a.N * plane_rows(a, sizeof(T)).blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> scratch(plane_scratch(a, sizeof(T)));
    fn(a, xc.const_data_ptr<T>(), x_cl, wt.const_data_ptr<T>(), e, b0, b1, scratch.data());
  });
  return true;
}
template bool plane_forward<float>(const Gemm&, const at::Tensor&, const at::Tensor&,
                                   const ConvEpilogue&);
template bool plane_forward<double>(const Gemm&, const at::Tensor&, const at::Tensor&,
                                    const ConvEpilogue&);

namespace {

// The weight (K, C, R, S) as conv_amx.h's B tiles: per 32 output channels, tap (r, s) and 32
// input channels, two tiles of 16 pairs of channels x 16 output channels, a pair in a word (its
// lower channel in the low half).
at::Tensor amx_weight(const at::Tensor& weight) {
  const int64_t K = weight.size(0), C = weight.size(1), rs = weight.size(2) * weight.size(3);
  const at::Tensor w = as_output(weight.permute({0, 2, 3, 1}), at::kBFloat16,
                                 at::MemoryFormat::Contiguous);  // (K, R, S, C)
  const uint16_t* src = static_cast<const uint16_t*>(w.const_data_ptr());
  at::Tensor packed = at::empty({K * rs * C / 2}, w.options().dtype(at::kInt));
  uint32_t* dst = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  const int64_t cb = C / 32;
  at::parallel_for(0, K / 32 * rs, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t kb = t / rs, tap = t % rs;
      for (int64_t c = 0; c < cb; ++c)
        for (int64_t half = 0; half < 2; ++half)
          for (int64_t q = 0; q < 16; ++q)
            for (int64_t col = 0; col < 16; ++col) {
              const uint16_t* v =
                  src + ((kb * 32 + half * 16 + col) * rs + tap) * C + c * 32 + 2 * q;
              dst[((t * cb + c) * 2 + half) * 256 + q * 16 + col] = uint32_t{v[0]} | uint32_t{v[1]}
                                                                                         << 16;
            }
    }
  });
  return packed;
}

}  // namespace

int64_t conv_amx_runs() {
  return amx_runs.load();
}

bool amx_forward(const Gemm& p, const at::Tensor& x, const at::Tensor& weight,
                 const ConvEpilogue& e) {
#if defined(__x86_64__)
  const ConvArgs& a = p.a;
  if (!amx_suits(p, x.scalar_type())) return false;
  // An NCHW x as it is (each band transposes the rows it copies), any other as NHWC.
  const bool x_nchw = x.is_contiguous() && !x.is_contiguous(at::MemoryFormat::ChannelsLast);
  // A 1x1 conv of an NHWC x is one GEMM reading x in place; the bands' copy of its rows cost
  // more than the tiles gain (32x256x56x56 to 64 channels, forward: 3.2 -> 4.0 ms). An NCHW x's
  // bands transpose it as they copy it (18 -> 6.7 ms).
  if (a.R * a.S == 1 && !x_nchw) return false;
  const at::Tensor xb = x_nchw ? x : as_output(x, at::kBFloat16, at::MemoryFormat::ChannelsLast);
  const at::Tensor w = amx_weight(weight);
  ++amx_runs;
  // Whole images a task where there are enough of them, else bands of rows (each copying the
  // taps' reach of rows more).
  const int64_t per = std::clamp<int64_t>((2 * at::get_num_threads() + a.N - 1) / a.N, 1, a.P);
  const int64_t band = (a.P + per - 1) / per, bands = (a.P + band - 1) / band;
  const AmxBandFn fn = conv_amx_band();
  const EpilogueFn epi = kernels().epilogue[kConvF32];
  const auto* xs = static_cast<const uint16_t*>(xb.const_data_ptr());
  const auto* ws = reinterpret_cast<const uint32_t*>(w.const_data_ptr<int32_t>());
  at::parallel_for(0, a.N * bands, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint16_t> pad(amx_pad_rows(a, band) * amx_padded_width(a) * a.C);
    std::vector<float> ring(amx_ring_positions(a) * a.K);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / bands, p0 = b % bands * band;
      fn(a, xs, x_nchw, ws, n, p0, std::min(a.P, p0 + band), pad.data(), ring.data(), e, epi);
    }
  });
  return true;
#else
  return false;
#endif
}

ConvGrads direct_grads(const conv::ConvGeom& g, const Gemm& p, const at::Tensor& x,
                       const at::Tensor& gpre, const at::Tensor& weight, at::MemoryFormat fmt,
                       at::ScalarType dtype, bool want_input, bool want_weight, bool want_bias) {
  if (depthwise(p.a) && depthwise_flat(p.a) && fmt == at::MemoryFormat::Contiguous)
    return depthwise_plane_grads(g, p.a, x, gpre, weight, dtype, want_input, want_weight,
                                 want_bias);
  // The output gradient in NHWC once, for every other kernel (the adjoint's forward reads it as
  // is).
  const at::Tensor gy = nhwc(gpre);
  if (multiplier(p.a)) {
    const ConvArgs& a = p.a;
    const at::Tensor xe = want_weight ? expand_channels(x, a.K / a.C) : at::Tensor();
    ConvGrads r = depthwise_grads(expanded(a), xe, gy, weight, fmt, gy.scalar_type(), want_input,
                                  want_weight, want_bias);
    if (want_bias) r.bias = r.bias.to(dtype);
    if (want_input)  // the m copies' gradients summed in the compute dtype
      r.input = r.input.unflatten(1, {a.C, a.K / a.C}).sum(2).to(dtype).contiguous(fmt);
    return r;
  }
  if (depthwise(p.a)) {
    // Stride 1: the input gradient is the adjoint's forward (the depthwise forward on gy), in
    // fmt and dtype directly; else gathered per input pixel.
    const at::Tensor gx = want_input ? adjoint_input_grad(g, gy, weight, fmt, dtype) : at::Tensor();
    ConvGrads r = depthwise_grads(p.a, x, gy, weight, fmt, dtype, want_input && !gx.defined(),
                                  want_weight, want_bias);
    if (gx.defined()) r.input = gx;
    return r;
  }
  return grouped_grads(g, p.a, x, gy, weight, fmt, dtype, want_input, want_weight, want_bias);
}

}  // namespace fastdl::cpu::conv_impl
