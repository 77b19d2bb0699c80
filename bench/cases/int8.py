"""INT8 cases: the int8 x int8 -> int32 GEMM against torch._int_mm (oneDNN, VNNI on CPU), and
the int8 linear layer against torch's dynamic int8 quantized Linear and the float32 nn.Linear.

The linear cases pass both layers as arguments; their float64 reference (the error column) is
the float32 layer computed in float64, so the error shown is the quantization error itself.
The int8 GEMM's reference is torch._int_mm: its error column checks the product is exact.
"""

import torch
from torch import nn

import fastdl
from bench.cases import Case, Inputs, Target

GEMM = (2048, 2048, 2048)  # (M, N, K)
LINEAR = (4096, 4096)  # (in_features, out_features)
TOKENS = (1, 16, 128, 1024)


def _gemm_inputs(case: Case, device: torch.device) -> Inputs:
    torch.manual_seed(0)
    m, n, k = case.shape
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8, device=device)
    if case.variant == "epilogue":
        scales = (torch.rand(m, device=device) + 0.5, torch.rand(n, device=device) + 0.5)
        return Inputs((a, b, *scales, torch.randn(n, device=device)), None)
    return Inputs((a, b), None)


def _int8_matmul(a, b, *epilogue):
    if epilogue:
        return fastdl.int8_matmul(a, b, *epilogue, out_dtype=torch.bfloat16)
    return fastdl.int8_matmul(a, b)


def _int_mm(a, b, *epilogue):
    out = torch._int_mm(a, b)
    if epilogue:
        a_scale, b_scale, bias = epilogue
        return (out.to(a_scale.dtype) * a_scale[:, None] * b_scale + bias).to(torch.bfloat16)
    return out


def _linear_inputs(case: Case, device: torch.device) -> Inputs:
    torch.manual_seed(0)
    m, n, k = case.shape
    linear = nn.Linear(k, n, device=device).eval()
    x = torch.randn(m, k, device=device)
    return Inputs((x, fastdl.nn.Int8Linear.from_float(linear), linear), None)


def _int8_linear(x, int8, linear):
    return int8(x)


def _float64(x, linear):
    # The reference of both linear baselines: the float layer the int8 ones stand for.
    return nn.functional.linear(x, linear.weight.double(), linear.bias.double())


def _dynamic(x, int8, linear):
    return _float64(x, linear) if x.dtype == torch.float64 else _dynamic_twin(linear)(x)


_TWINS: dict[int, nn.Module] = {}


def _dynamic_twin(linear: nn.Linear) -> nn.Module:
    # torch's dynamic int8 Linear (FBGEMM on x86): weight quantized once, activations per call.
    key = id(linear)
    if key not in _TWINS:
        _TWINS.clear()
        model = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8
        )
        _TWINS[key] = model[0]
    return _TWINS[key]


def _fp32(x, int8, linear):
    return _float64(x, linear) if x.dtype == torch.float64 else linear(x)


def _gemm_case(variant: str, target: Target | None) -> Case:
    m, n, k = GEMM
    return Case(
        family="int8", op="int8_matmul", mode="fwd", shape=GEMM, dtype=torch.int8,
        make=_gemm_inputs, fastdl=_int8_matmul, eager=_int_mm, flops=2 * m * n * k,
        variant=variant, target=target,
    )  # fmt: skip


def _linear_case(m: int, baseline: str, target: Target | None) -> Case:
    k, n = LINEAR
    return Case(
        family="int8", op="int8_linear", mode="fwd", shape=(m, n, k), dtype=torch.float32,
        make=_linear_inputs, fastdl=_int8_linear,
        eager=_dynamic if baseline == "dynamic" else _fp32,
        flops=2 * m * n * k, variant=f"vs-{baseline}", target=target,
    )  # fmt: skip


CASES = [
    _gemm_case("", Target(eager=1.0)),
    _gemm_case("epilogue", None),
    *(_linear_case(m, "dynamic", Target(eager=1.0)) for m in TOKENS),
    *(_linear_case(m, "fp32", Target(eager=3.0) if m >= 16 else None) for m in TOKENS),
]
