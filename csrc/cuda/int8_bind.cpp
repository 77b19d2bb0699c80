// TORCH_LIBRARY_IMPL(fastdl, CUDA) for the int8 family: the checks of the CPU ops (same
// messages, csrc/common/checks.h), allocation as the fake kernels in fastdl/ops/int8.py, device
// and stream, then the launchers of int8.cuh. int8_pack_weight has no CUDA kernel: the GPU GEMM
// reads the (N, K) weight directly and int8_linear accepts any w_packed.
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/int8.cuh"

namespace fastdl {
namespace {

using OptTensor = std::optional<at::Tensor>;

constexpr std::initializer_list<c10::ScalarType> kFloats = {at::kFloat, at::kBFloat16, at::kHalf};
constexpr std::initializer_list<c10::ScalarType> kOuts = {at::kInt, at::kFloat, at::kBFloat16,
                                                          at::kHalf};

cuda::Int8In in_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::Int8In::kFloat32;
    case at::kHalf:
      return cuda::Int8In::kFloat16;
    case at::kBFloat16:
      return cuda::Int8In::kBFloat16;
    default:
      return cuda::Int8In::kInt8;
  }
}

cuda::Int8Out out_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::Int8Out::kFloat32;
    case at::kHalf:
      return cuda::Int8Out::kFloat16;
    case at::kBFloat16:
      return cuda::Int8Out::kBFloat16;
    default:
      return cuda::Int8Out::kInt32;
  }
}

OptTensor as_float(const OptTensor& t) {
  if (!t.has_value()) return std::nullopt;
  return t->reshape({-1}).to(at::kFloat).contiguous();
}

const float* fptr(const OptTensor& t) {
  return t ? t->data_ptr<float>() : nullptr;
}

at::Tensor rows_view(const at::Tensor& x) {
  // Rows counted explicitly: reshape(-1, 0) is ambiguous for K = 0.
  const int64_t rows = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  at::Tensor r = x.reshape({rows, x.size(-1)});
  return r.stride(-1) == 1 ? r : r.contiguous();
}

// (N, K) with unit stride along K: b (K, N) as its transpose, copied only when needed.
at::Tensor as_bt(const at::Tensor& b) {
  at::Tensor bt = b.t();
  return bt.stride(1) == 1 ? bt : bt.contiguous();
}

void launch(const cuda::Int8GemmParams& p) {
  C10_CUDA_CHECK(cuda::int8_gemm(p, at::cuda::getCurrentCUDAStream()));
}

std::tuple<at::Tensor, at::Tensor> int8_quantize(const at::Tensor& x) {
  constexpr const char* op = "fastdl.int8_quantize";
  checks::dtype(op, "x", x, kFloats);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {q, scale.fill_(1.f)};
  const at::Tensor x2 = rows_view(x);
  cuda::Int8QuantParams p;
  p.x = x2.data_ptr();
  p.ldx = x2.stride(0);
  p.q = q.data_ptr<int8_t>();
  p.scale = scale.data_ptr<float>();
  p.rows = x2.size(0);
  p.cols = x2.size(1);
  p.in = in_of(x);
  C10_CUDA_CHECK(cuda::int8_quantize(p, at::cuda::getCurrentCUDAStream()));
  return {q, scale};
}

at::Tensor int8_matmul(const at::Tensor& a, const at::Tensor& b, const OptTensor& a_scale,
                       const OptTensor& b_scale, const OptTensor& bias, at::ScalarType out_dtype) {
  constexpr const char* op = "fastdl.int8_matmul";
  checks::dtype(op, "a", a, {at::kChar});
  checks::dtype(op, "b", b, {at::kChar});
  checks::same_device(op, "b", b, a);
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, op, ": a and b must be 2-D, got shapes ", a.sizes(),
              " and ", b.sizes());
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(b.size(0) == K, op, ": a (", M, ", ", K, ") and b ", b.sizes(),
              " do not match in K (a.shape[1] must equal b.shape[0])");
  TORCH_CHECK_TYPE(std::find(kOuts.begin(), kOuts.end(), out_dtype) != kOuts.end(), op,
                   ": unsupported out_dtype ", out_dtype,
                   "; supported: ", checks::dtype_list(kOuts));
  const bool scaled = a_scale.has_value() || b_scale.has_value() || bias.has_value();
  TORCH_CHECK_TYPE(!(scaled && out_dtype == at::kInt), op,
                   ": scales and bias need a floating out_dtype (Float, BFloat16 or Half), ",
                   "got out_dtype Int");
  if (a_scale.has_value()) checks::int8_scale(op, "a_scale", *a_scale, a, M, {M, 1});
  if (b_scale.has_value()) checks::int8_scale(op, "b_scale", *b_scale, a, N, {1, N});
  if (bias.has_value()) {
    checks::same_device(op, "bias", *bias, a);
    checks::dtype(op, "bias", *bias, kFloats);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N,
                ",), got ", bias->sizes());
  }
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  const at::Tensor a2 = rows_view(a), bt = as_bt(b);
  const OptTensor as = as_float(a_scale), bs = as_float(b_scale), bi = as_float(bias);
  cuda::Int8GemmParams p;
  p.a = a2.data_ptr<int8_t>();
  p.lda = a2.stride(0);
  p.bt = bt.data_ptr<int8_t>();
  p.ldb = bt.stride(0);
  p.c = out.data_ptr();
  p.ldc = N;
  p.a_scale = fptr(as);
  p.b_scale = fptr(bs);
  p.bias = fptr(bi);
  p.M = M;
  p.N = N;
  p.K = K;
  p.out = out_of(out_dtype);
  launch(p);
  return out;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_packed,
                       const at::Tensor& w_scale, const OptTensor& bias,
                       std::optional<double> outlier_threshold) {
  constexpr const char* op = "fastdl.int8_linear";
  checks::dtype(op, "x", x, kFloats);
  checks::dtype(op, "w", w, {at::kChar});
  checks::same_device(op, "w", w, x);
  checks::same_device(op, "w_packed", w_packed, x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(-1), op,
              ": w must be (out_features, in_features) with in_features = x.shape[-1] = ",
              x.size(-1), ", got shape ", w.sizes());
  const int64_t N = w.size(0), K = w.size(1);
  checks::int8_scale(op, "w_scale", w_scale, x, N, {N, 1});
  if (bias.has_value()) checks::param(op, "bias", bias, x, N);
  if (outlier_threshold.has_value())
    TORCH_CHECK(*outlier_threshold > 0, op, ": outlier_threshold must be positive, got ",
                *outlier_threshold);
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  const at::Tensor x2 = rows_view(x);
  const int64_t M = x2.size(0);
  if (M == 0 || N == 0) return at::empty(shape, x.options());
  // LLM.int8: columns with any |x| >= threshold go through float32, the rest through int8.
  at::Tensor skip, outliers;
  if (outlier_threshold.has_value() && K > 0) {
    const at::Tensor mask = x2.abs().amax(0).ge(*outlier_threshold);
    outliers = mask.nonzero().view(-1);
    if (outliers.numel() > 0) skip = mask.to(at::kByte).contiguous();
  }
  const bool split = skip.defined();
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  cuda::Int8QuantParams q;
  q.x = x2.data_ptr();
  q.ldx = x2.stride(0);
  q.scale = scale.data_ptr<float>();
  q.skip = split ? skip.data_ptr<uint8_t>() : nullptr;
  q.rows = M;
  q.cols = K;
  q.in = in_of(x);
  // An int8 copy of x for the GEMM: quantizing inside its tile loads instead made nvcc take
  // over ten minutes per floating input type.
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
  q.q = xq.data_ptr<int8_t>();
  C10_CUDA_CHECK(cuda::int8_quantize(q, at::cuda::getCurrentCUDAStream()));
  const OptTensor ws = as_float(w_scale), bi = as_float(bias);
  at::Tensor out = at::empty({M, N}, x.options().dtype(split ? at::kFloat : x.scalar_type()));
  const at::Tensor wc = w.stride(1) == 1 ? w : w.contiguous();
  cuda::Int8GemmParams p;
  p.a = xq.data_ptr<int8_t>();
  p.lda = K;
  p.bt = wc.data_ptr<int8_t>();
  p.ldb = wc.stride(0);
  p.c = out.data_ptr();
  p.ldc = N;
  p.a_scale = scale.data_ptr<float>();
  p.b_scale = fptr(ws);
  p.bias = fptr(bi);
  p.M = M;
  p.N = N;
  p.K = K;
  p.out = out_of(out.scalar_type());
  launch(p);
  if (split) {
    const at::Tensor w_out = w.index_select(1, outliers).to(at::kFloat).mul_(ws->view({N, 1}));
    out.addmm_(x2.index_select(1, outliers).to(at::kFloat), w_out.t());
    out = out.to(x.scalar_type());
  }
  return out.view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("int8_quantize", &int8_quantize);
  m.impl("int8_matmul", &int8_matmul);
  m.impl("int8_linear", &int8_linear);
}

}  // namespace fastdl
