"""Host launchers of the int8 family's Triton kernels (kernels/int8_jit.py), registered by
fastdl/ops/int8.py as the ``fastdl::<op>_triton`` custom ops: each launcher's annotations are
its op's schema, matching csrc/ops.cpp. They check their inputs with the messages of the C++
ops (fastdl/_checks.py), allocate the outputs the fake kernels describe and launch. Also AOT,
the configurations tests/test_gpu_build.py compiles ahead of time.
"""

import math
from dataclasses import dataclass

import torch
import triton

from fastdl import _checks, _ext

from . import int8_jit as jit

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.int32, *FLOATS)
QUANT_BLOCK = 1024
# GPU tiles: 128 x 128 int32 accumulators over 8 warps, K in steps of 64 bytes (two k32 mma
# steps). The interpreter runs numpy per program: fewer, smaller tiles keep the tests quick.
GPU_TILE = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}
CPU_TILE = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}


def _require_runnable(op: str, x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not _ext.TRITON_INTERPRET:
        raise RuntimeError(
            f"{op}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before "
            f"importing fastdl, for CPU tensors), got x on {x.device}"
        )


def _tile(t: torch.Tensor) -> dict:
    return GPU_TILE if t.device.type == "cuda" else CPU_TILE


def _rows(x: torch.Tensor) -> torch.Tensor:
    r = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (-1, 0) would be ambiguous
    return r if r.stride(-1) == 1 else r.contiguous()


def _row_scales(x2: torch.Tensor, q: torch.Tensor | None, skip: torch.Tensor | None):
    scale = x2.new_empty(x2.shape[0], dtype=torch.float32)
    if x2.shape[0]:
        dummy = scale
        jit.quantize_kernel[(x2.shape[0],)](
            x2, dummy if q is None else q, scale, dummy if skip is None else skip,
            x2.shape[1], x2.stride(0),
            HAS_SKIP=skip is not None, WRITE_Q=q is not None, BLOCK=QUANT_BLOCK,
        )  # fmt: skip
    return scale


def _launch(a, b, out, a_scale, b_scale, bias, skip, a_float):
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return
    tile = _tile(a)
    grid = (triton.cdiv(m, tile["BLOCK_M"]), triton.cdiv(n, tile["BLOCK_N"]))
    dummy = out
    jit.matmul_kernel[grid](
        a, b, out,
        dummy if a_scale is None else a_scale,
        dummy if b_scale is None else b_scale,
        dummy if bias is None else bias,
        dummy if skip is None else skip,
        m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
        A_FLOAT=a_float, HAS_AS=a_scale is not None, HAS_BS=b_scale is not None,
        HAS_BIAS=bias is not None, HAS_SKIP=skip is not None, OUT_INT=out.dtype == torch.int32,
        num_warps=8 if a.device.type == "cuda" else 1, **tile,
    )  # fmt: skip


def _flat_float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1).float().contiguous()


def int8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): rows of x quantized symmetrically to int8, scale per row."""
    op = "fastdl.int8_quantize"
    _checks.dtype(op, "x", x, FLOATS)
    _require_runnable(op, x)
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    if x.numel() == 0:
        return q, torch.ones(x.shape[:-1], device=x.device)
    scale = _row_scales(_rows(x), q, None)
    return q, scale.view(x.shape[:-1])


def int8_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor | None,
    b_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """a (M, K) int8 @ b (K, N) int8 in int32, optionally dequantized with bias."""
    op = "fastdl.int8_matmul"
    _checks.dtype(op, "a", a, (torch.int8,))
    _checks.dtype(op, "b", b, (torch.int8,))
    _checks.same_device(op, "b", b, a)
    if a.dim() != 2 or b.dim() != 2:
        raise RuntimeError(
            f"{op}: a and b must be 2-D, got shapes {list(a.shape)} and {list(b.shape)}"
        )
    m, k = a.shape
    n = b.shape[1]
    if b.shape[0] != k:
        raise RuntimeError(
            f"{op}: a ({m}, {k}) and b {list(b.shape)} do not match in K "
            "(a.shape[1] must equal b.shape[0])"
        )
    if out_dtype not in OUT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in OUT_DTYPES)
        raise TypeError(f"{op}: unsupported out_dtype {out_dtype}; supported: {names}")
    if out_dtype == torch.int32 and not (a_scale is None and b_scale is None and bias is None):
        raise TypeError(f"{op}: scales and bias need a floating out_dtype, got out_dtype int32")
    if a_scale is not None:
        _checks.int8_scale(op, "a_scale", a_scale, a, m, (m, 1))
    if b_scale is not None:
        _checks.int8_scale(op, "b_scale", b_scale, a, n, (1, n))
    if bias is not None:
        _checks.same_device(op, "bias", bias, a)
        _checks.dtype(op, "bias", bias, FLOATS)
        if tuple(bias.shape) != (n,):
            raise RuntimeError(f"{op}: bias must have shape ({n},), got {list(bias.shape)}")
    _require_runnable(op, a)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if k == 0:  # no K loop to run: the epilogue of a zero product
        out.zero_()
        return out.add_(bias) if bias is not None else out
    _launch(a, b, out, _flat_float(a_scale), _flat_float(b_scale), _flat_float(bias), None, False)
    return out


def int8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    outlier_threshold: float | None,
) -> torch.Tensor:
    """x (..., K) @ dequantized w (N, K)^T + bias, x quantized per row inside the GEMM; columns
    of x reaching outlier_threshold multiplied in float32 (LLM.int8). w_packed is unused."""
    op = "fastdl.int8_linear"
    _checks.dtype(op, "x", x, FLOATS)
    _checks.dtype(op, "w", w, (torch.int8,))
    _checks.same_device(op, "w", w, x)
    if x.dim() < 1:
        raise RuntimeError(f"{op}: x must have at least one dimension, got a scalar")
    if w.dim() != 2 or w.shape[1] != x.shape[-1]:
        raise RuntimeError(
            f"{op}: w must be (out_features, in_features) with in_features = x.shape[-1] = "
            f"{x.shape[-1]}, got shape {list(w.shape)}"
        )
    n, k = w.shape
    _checks.int8_scale(op, "w_scale", w_scale, x, n, (n, 1))
    _checks.param(op, "bias", bias, x, n)
    if outlier_threshold is not None and not outlier_threshold > 0:
        raise RuntimeError(f"{op}: outlier_threshold must be positive, got {outlier_threshold}")
    _require_runnable(op, x)
    x2 = _rows(x)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x.new_empty((*x.shape[:-1], n))
    skip = cols = None
    if outlier_threshold is not None and k:
        mask = x2.abs().amax(0) >= outlier_threshold
        cols = mask.nonzero().view(-1)
        skip = mask.to(torch.uint8) if cols.numel() else None
    ws = _flat_float(w_scale)
    out = torch.empty((m, n), device=x.device, dtype=torch.float32 if skip is not None else x.dtype)
    if k == 0:
        out.zero_()
        if bias is not None:
            out.add_(bias)
    else:
        scale = _row_scales(x2, None, skip)
        _launch(x2, w.t(), out, scale, ws, _flat_float(bias), skip, True)
    if skip is not None:
        w_out = w.index_select(1, cols).float() * ws[:, None]
        out = out.addmm_(x2.index_select(1, cols).float(), w_out.t()).to(x.dtype)
    return out.view(*x.shape[:-1], n)


# ---------------------------------------------------------------- ahead-of-time configurations


@dataclass(frozen=True)
class AotConfig:
    """One specialization of a kernel for tests/test_gpu_build.py (see kernels/norm.py)."""

    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    attrs: dict[tuple[int, ...], list[list[object]]]
    tensor_cores: bool = False


def _aot(kernel, num_warps, types: dict[str, str], tensor_cores=False, **constexprs):
    # Pointers named in `types`, the other capitalized arguments float32 pointers, lower-case
    # ones i32 (sizes and strides, 16-divisible as the JIT sees them on aligned shapes).
    def arg_type(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name in types:
            return types[name]
        return "i32" if name.islower() or name in {"M", "N", "K"} else "*fp32"

    signature = {name: arg_type(name) for name in kernel.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, (name, ty) in enumerate(signature.items())
        if (ty.startswith("*") or ty == "i32") and name not in {"M", "stride_ak", "stride_bn"}
    }
    return AotConfig(kernel, signature, constexprs, num_warps, attrs, tensor_cores)


_I8 = {"A": "*i8", "B": "*i8", "SKIP": "*u8"}
_MM = {"A_FLOAT": False, "HAS_SKIP": False, **GPU_TILE, "stride_ak": 1}

AOT: list[AotConfig] = [
    _aot(jit.quantize_kernel, 4, {"X": "*fp32", "Q": "*i8", "SKIP": "*u8"},
         HAS_SKIP=False, WRITE_Q=True, BLOCK=QUANT_BLOCK),
    _aot(jit.quantize_kernel, 4, {"X": "*bf16", "Q": "*i8", "SKIP": "*u8"},
         HAS_SKIP=True, WRITE_Q=False, BLOCK=QUANT_BLOCK),
    # int8_matmul, int32 out; B as (K, N) and as a transposed (N, K) weight.
    _aot(jit.matmul_kernel, 8, {**_I8, "C": "*i32"}, True, **_MM, stride_bn=1,
         HAS_AS=False, HAS_BS=False, HAS_BIAS=False, OUT_INT=True),
    _aot(jit.matmul_kernel, 8, {**_I8, "C": "*bf16"}, True, **_MM, stride_bk=1,
         HAS_AS=True, HAS_BS=True, HAS_BIAS=True, OUT_INT=False),
    # int8_linear: float activations quantized in registers, outlier columns skipped.
    _aot(jit.matmul_kernel, 8, {**_I8, "A": "*fp16", "C": "*fp16"}, True,
         **{**_MM, "A_FLOAT": True, "HAS_SKIP": True}, stride_bk=1,
         HAS_AS=True, HAS_BS=True, HAS_BIAS=True, OUT_INT=False),
]  # fmt: skip
