"""Host launchers of the conv family's Triton kernels (kernels/conv_jit.py), registered by
fastdl/ops/conv.py as the ``fastdl::<op>_triton`` custom ops: each launcher's annotations are its
op's schema, matching csrc/ops.cpp. They check their inputs (the checks of fastdl/ops/conv.py,
which mirror csrc/common/conv.h), allocate the outputs the fake kernels describe, pick tiles
and launch. Also AOT, the configurations tests/test_gpu_build.py compiles ahead of time.
"""

from dataclasses import dataclass

import torch
import triton

from fastdl import _ext

from . import conv_jit as jit

ACT = {"none": jit.NONE, "relu": jit.RELU, "silu": jit.SILU, "gelu": jit.GELU}
# Output tile 64 pixels x 64 channels, reduction step 32: 2 x 4 KiB fp16 operand tiles per step,
# a 64 x 64 fp32 accumulator over 4 warps (32 registers a thread), tensor-core shaped for fp16.
BLOCK_M, BLOCK_N, BLOCK_R = 64, 64, 32
EPI_BLOCK = 1024


def _conv():
    # Imported late: fastdl.ops.conv imports this module while it registers the Triton ops.
    from fastdl.ops import conv

    return conv


def _require_runnable(op: str, x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not _ext.TRITON_INTERPRET:
        raise RuntimeError(
            f"{op}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before "
            f"importing fastdl, for CPU tensors), got x on {x.device}"
        )


def _tile(n: int, block: int) -> int:
    # Narrow groups (depthwise: one channel) get a narrower tile; tl.dot needs at least 16.
    return max(16, min(block, triton.next_power_of_2(n)))


def _f32_dot(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"  # the interpreter (see conv_jit._dot)


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _fwd(x, weight, bias, residual, out, pre, stride, padding, dilation, groups, act):
    n, _, h, w = x.shape
    k, cg, kr, ks = weight.shape
    _, _, p, q = out.shape
    kg = k // groups
    bn, bc = _tile(kg, BLOCK_N), _tile(cg, BLOCK_R)
    grid = (triton.cdiv(n * p * q, BLOCK_M), triton.cdiv(kg, bn), groups)
    jit.conv2d_fwd_kernel[grid](
        x, weight, x if bias is None else bias, out if residual is None else residual, out,
        out if pre is None else pre,
        n, h, w, p, q, cg, kg,
        *_strides(x), *_strides(weight), *_strides(out),
        *stride, *padding, *dilation,
        KR=kr, KS=ks, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        SAVE_PRE=pre is not None, ACT=act, BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_C=bc,
        F32_DOT=_f32_dot(x),
    )  # fmt: skip


def _dgrad(g, weight, bias, dx, stride, padding, dilation, groups):
    n, _, h, w = dx.shape
    k, cg, kr, ks = weight.shape
    _, _, p, q = g.shape
    kg = k // groups
    bn, bk = _tile(cg, BLOCK_N), _tile(kg, BLOCK_R)
    grid = (triton.cdiv(n * h * w, BLOCK_M), triton.cdiv(cg, bn), groups)
    jit.conv2d_dgrad_kernel[grid](
        g, weight, g if bias is None else bias, dx,
        n, h, w, p, q, cg, kg,
        *_strides(g), *_strides(weight), *_strides(dx),
        *stride, *padding, *dilation,
        KR=kr, KS=ks, HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=bk,
        F32_DOT=_f32_dot(g),
    )  # fmt: skip


def _wgrad(x, g, dw, stride, padding, dilation, groups):
    n, _, h, w = x.shape
    k, cg, kr, ks = dw.shape
    _, _, p, q = g.shape
    kg = k // groups
    bk, bc = _tile(kg, BLOCK_N), _tile(cg, BLOCK_N)
    grid = (triton.cdiv(kg, bk), triton.cdiv(cg, bc), groups * kr * ks)
    jit.conv2d_wgrad_kernel[grid](
        x, g, dw, n, h, w, p, q, cg, kg,
        *_strides(x), *_strides(g), *_strides(dw),
        *stride, *padding, *dilation,
        KR=kr, KS=ks, BLOCK_K=bk, BLOCK_C=bc, BLOCK_M=BLOCK_R, F32_DOT=_f32_dot(x),
    )  # fmt: skip


def _channel_sum(g: torch.Tensor) -> torch.Tensor:
    n, k, p, q = g.shape
    out = g.new_empty(k)
    bk = _tile(k, 64)
    jit.channel_sum_kernel[(triton.cdiv(k, bk),)](
        g, out, n, k, p, q, *_strides(g), BLOCK_M=BLOCK_M, BLOCK_K=bk
    )
    return out


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


def conv2d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    activation: str,
    inference: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    del inference  # the GPU kernels round alike either way
    conv = _conv()
    conv._check_activation(activation)
    shape = conv.conv2d_out_shape(
        x, weight, stride, padding, dilation, groups, dtypes=conv.GPU_DTYPES
    )
    conv._check_bias(conv.CONV, bias, x, shape[1])
    conv._check_residual(residual, x, shape)
    _require_runnable(conv.CONV, x)
    fmt = conv.memory_format(x)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    pre = torch.empty_like(out) if conv.saves_pre(activation) else None
    if residual is not None:  # the kernel reads it at the output's offsets
        residual = residual.contiguous(memory_format=fmt)
    if out.numel() > 0:
        _fwd(x, weight, bias, residual, out, pre, stride, padding, dilation, groups,
             ACT[activation])  # fmt: skip
    return out, _empty(x) if pre is None else pre


def conv2d_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    pre: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    activation: str,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    conv = _conv()
    conv._check_activation(activation)
    shape = conv.conv2d_out_shape(
        x, weight, stride, padding, dilation, groups, dtypes=conv.GPU_DTYPES
    )
    conv._check_residual(grad_out, x, shape)
    _require_runnable(conv.CONV, x)
    fmt = conv.memory_format(x)
    if activation == "none":
        gpre = grad_out
    else:
        go = grad_out.contiguous(memory_format=fmt)
        saved = (out if activation == "relu" else pre).contiguous(memory_format=fmt)
        conv._check_residual(saved, x, shape)
        gpre = torch.empty_like(go)
        if gpre.numel() > 0:
            grid = (triton.cdiv(gpre.numel(), EPI_BLOCK),)
            jit.epilogue_bwd_kernel[grid](
                go, saved, gpre, gpre.numel(), ACT=ACT[activation], BLOCK=EPI_BLOCK
            )
    gi, gw, gb, gp = (_empty(x) for _ in range(4))
    if output_mask[0]:
        gi = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt).zero_()
        if gi.numel() > 0 and gpre.numel() > 0:
            _dgrad(gpre, weight, None, gi, stride, padding, dilation, groups)
    if output_mask[1]:
        gw = torch.zeros(weight.shape, dtype=x.dtype, device=x.device)
        if gpre.numel() > 0:
            _wgrad(x, gpre, gw, stride, padding, dilation, groups)
    if output_mask[2]:
        gb = _channel_sum(gpre)
    if output_mask[3]:
        gp = gpre.contiguous(memory_format=fmt).clone() if gpre is grad_out else gpre
    return gi, gw, gb, gp


def conv_transpose2d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    output_padding: list[int],
    groups: int,
    dilation: list[int],
) -> torch.Tensor:
    conv = _conv()
    shape = conv.conv_transpose2d_out_shape(
        x, weight, stride, padding, output_padding, groups, dilation, dtypes=conv.GPU_DTYPES
    )
    conv._check_bias(conv.CONV_T, bias, x, shape[1])
    _require_runnable(conv.CONV_T, x)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=conv.memory_format(x))
    if out.numel() > 0:
        _dgrad(x, weight, bias, out, stride, padding, dilation, groups)
    return out


def conv_transpose2d_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    output_padding: list[int],
    groups: int,
    dilation: list[int],
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    conv = _conv()
    shape = conv.conv_transpose2d_out_shape(
        x, weight, stride, padding, output_padding, groups, dilation, dtypes=conv.GPU_DTYPES
    )
    if tuple(grad_out.shape) != shape:
        raise RuntimeError(
            f"{conv.CONV_T}: grad_out must have shape {list(shape)}, got {list(grad_out.shape)}"
        )
    _require_runnable(conv.CONV_T, x)
    gi, gw, gb = (_empty(x) for _ in range(3))
    if output_mask[0]:
        fmt = conv.memory_format(x)
        gi = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        if gi.numel() > 0:
            _fwd(grad_out, weight, None, None, gi, None, stride, padding, dilation, groups, 0)
    if output_mask[1]:
        gw = torch.zeros(weight.shape, dtype=x.dtype, device=x.device)
        if x.numel() > 0:
            _wgrad(grad_out, x, gw, stride, padding, dilation, groups)
    if output_mask[2]:
        gb = _channel_sum(grad_out)
    return gi, gw, gb


# ---------------------------------------------------------------- ahead-of-time configurations


@dataclass(frozen=True)
class AotConfig:
    """One entry of tests/test_gpu_build.py's AOT contract (see its docstring)."""

    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    attrs: dict[tuple[int, ...], list[list[object]]]
    tensor_cores: bool


_POINTERS = {"X", "Wt", "B", "Res", "Y", "Pre", "G", "DX", "DW", "GO", "Saved", "GP", "Out"}


def _aot(kernel, dtype: str, num_warps: int = 4, tensor_cores: bool = False, **constexprs):
    signature = {
        name: "constexpr" if name in constexprs else ("*" + dtype if name in _POINTERS else "i32")
        for name in kernel.arg_names
    }
    # Pointers 16-byte aligned (what the JIT finds on fresh tensors): vectorized loads.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, ty in enumerate(signature.values())
        if ty.startswith("*")
    }
    return AotConfig(kernel, signature, constexprs, num_warps, attrs, tensor_cores)


def _gemm(kr, ks, **flags):
    return {"KR": kr, "KS": ks, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "F32_DOT": False, **flags}


_EPI = {"HAS_BIAS": True, "HAS_RES": True, "SAVE_PRE": True, "ACT": jit.SILU}
_PLAIN = {"HAS_BIAS": False, "HAS_RES": False, "SAVE_PRE": False, "ACT": jit.NONE}

AOT: list[AotConfig] = [
    _aot(jit.conv2d_fwd_kernel, "fp16", 4, True, **_gemm(3, 3, BLOCK_C=BLOCK_R, **_EPI)),
    _aot(jit.conv2d_fwd_kernel, "bf16", 4, True, **_gemm(1, 1, BLOCK_C=BLOCK_R, **_PLAIN)),
    _aot(jit.conv2d_fwd_kernel, "fp32", 4, False, **_gemm(7, 7, BLOCK_C=16, **_PLAIN)),
    _aot(jit.conv2d_dgrad_kernel, "fp16", 4, True, **_gemm(3, 3, BLOCK_K=BLOCK_R, HAS_BIAS=False)),
    _aot(jit.conv2d_dgrad_kernel, "bf16", 4, True, **_gemm(4, 4, BLOCK_K=BLOCK_R, HAS_BIAS=True)),
    _aot(
        jit.conv2d_wgrad_kernel,
        "fp16",
        4,
        True,
        KR=3,
        KS=3,
        BLOCK_K=BLOCK_N,
        BLOCK_C=BLOCK_N,
        BLOCK_M=BLOCK_R,
        F32_DOT=False,
    ),
    _aot(
        jit.conv2d_wgrad_kernel,
        "fp32",
        4,
        False,
        KR=1,
        KS=1,
        BLOCK_K=64,
        BLOCK_C=16,
        BLOCK_M=32,
        F32_DOT=False,
    ),
    _aot(jit.channel_sum_kernel, "fp32", 4, False, BLOCK_M=BLOCK_M, BLOCK_K=64),
    _aot(jit.epilogue_bwd_kernel, "bf16", 4, False, ACT=jit.GELU, BLOCK=EPI_BLOCK),
]
