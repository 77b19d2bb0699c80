"""INT8 family: symmetric quantization and int8 x int8 -> int32 matrix multiplies with the
dequantization and bias fused into the epilogue.

Native ops (C++ on CPU with AVX512-VNNI / AVX2 / portable kernels chosen at run time, CUDA;
schemas in csrc/ops.cpp) and Triton ones (kernels/int8.py, registered here as
``fastdl::<op>_triton``) share the fake kernels and the autograd formula below; the public
functions pick the backend per call (fastdl/_backend.py).
"""

import math
from types import SimpleNamespace

import torch

from fastdl import _backend, _checks, _ext
from fastdl.ops import _library

OPS = ("int8_quantize", "int8_pack_weight", "int8_matmul", "int8_linear")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.int32, *FLOAT_DTYPES)
PANEL = 64  # columns per panel of the CPU's packed weight (csrc/cpu/int8_params.h)


def packed_bytes(k: int, n: int) -> int:
    """Size of the CPU's packed weight for an (n, k) weight: 64-column panels of k rounded up
    to 4, then an int32 sum per column."""
    panels = -(-n // PANEL)
    return panels * PANEL * (-(-k // 4) * 4 + 4)


# ---------------------------------------------------------------- fake kernels (all backends)


def _quantize_fake(x):
    return torch.empty_like(
        x, dtype=torch.int8, memory_format=torch.contiguous_format
    ), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _pack_weight_fake(w):
    return w.new_empty(packed_bytes(w.shape[1], w.shape[0]), dtype=torch.uint8)


def _matmul_fake(a, b, a_scale, b_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


def _linear_fake(x, w, w_packed, w_scale, bias, outlier_threshold):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


# ---------------------------------------------------------------- autograd (all backends)


def _linear_setup(ctx, inputs, output):
    x, w, _packed, w_scale, bias, _threshold = inputs
    ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype
    ctx.save_for_backward(w, w_scale)  # references, no copies: the layer keeps them anyway


def _linear_backward(ctx, grad):
    # Straight-through: the gradient of x @ (w * w_scale)^T, the layer the int8 one stands for,
    # so a model with frozen int8 weights fine-tunes around them.
    w, w_scale = ctx.saved_tensors
    if any(ctx.needs_input_grad[1:4]):
        raise RuntimeError("fastdl.int8_linear: w, w_packed and w_scale take no gradient")
    gx = gb = None
    rows = math.prod(grad.shape[:-1])
    if ctx.needs_input_grad[0]:
        g = grad.reshape(rows, grad.shape[-1]).float() * w_scale.float()
        gx = (g @ w.float()).view(*grad.shape[:-1], w.shape[1]).to(ctx.x_dtype)
    if ctx.needs_input_grad[4]:
        gb = grad.reshape(rows, grad.shape[-1]).float().sum(0).to(ctx.bias_dtype)
    return gx, None, None, None, gb, None


_FAKE = {
    "int8_quantize": _quantize_fake,
    "int8_pack_weight": _pack_weight_fake,
    "int8_matmul": _matmul_fake,
    "int8_linear": _linear_fake,
}


def _register(ops: SimpleNamespace) -> SimpleNamespace:
    for name in OPS:
        if getattr(ops, name, None) is not None:
            torch.library.register_fake(getattr(ops, name), _FAKE[name])
    torch.library.register_autograd(ops.int8_linear, _linear_backward, setup_context=_linear_setup)
    return ops


def _native_ops() -> SimpleNamespace | None:
    if _ext._C is None:
        return None
    return _register(SimpleNamespace(**{n: getattr(torch.ops.fastdl, n).default for n in OPS}))


def _triton_ops() -> SimpleNamespace | None:
    if not _ext.HAS_TRITON:
        return None
    from fastdl.kernels import int8 as launchers

    ops = {
        n: torch.library.custom_op(f"fastdl::{n}_triton", getattr(launchers, n), mutates_args=())
        for n in OPS
        if n != "int8_pack_weight"  # Triton reads w itself: nothing to pack
    }
    return _register(SimpleNamespace(int8_pack_weight=None, **ops))


NATIVE = _native_ops()
TRITON = _triton_ops()


def _ops(op: str, x: torch.Tensor) -> SimpleNamespace:
    return _backend.namespace("int8", op, x, NATIVE, TRITON)


def _no_grad(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"{op}: {name} requires grad, but the gradient w.r.t. {name} is not implemented"
            )


def _same_device(op, x, **tensors):
    # Also here, not only in the kernels: a "meta" argument would route the call to the fake.
    for name, t in tensors.items():
        if t is not None:
            _checks.same_device(op, name, t, x)


# ---------------------------------------------------------------- public functions


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization of x (..., K): ``scale = max|x| / 127`` per row
    (1 for an all-zero row), ``q = clamp(round_half_even(x / scale), -127, 127)``, so that
    ``x ~= q * scale[..., None]``.

    Returns q (x's shape, int8, contiguous) and scale (x.shape[:-1], float32). Dtypes: float32,
    bfloat16, float16 (computed in float32). A row holding NaN gets a NaN scale. Not
    differentiable. Backends: C++ (CPU), CUDA, Triton. Deterministic: yes.
    """
    op = "fastdl.quantize_per_token"
    _checks.dtype(op, "x", x, FLOAT_DTYPES)
    if x.dim() < 1:
        raise RuntimeError(f"{op}: x must have at least one dimension, got a scalar")
    _no_grad(op, x=x)
    return _ops(op, x).int8_quantize(x)


def quantize_per_channel(w: torch.Tensor, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel int8 quantization of a weight: one scale per index of ``axis``
    (default 0, the output channels of an nn.Linear / nn.Conv weight), taken over all other
    dimensions; rounding and clamping as :func:`quantize_per_token`.

    Returns q (w's shape, int8) and scale (w.shape[axis],) float32. ``w ~= q * scale`` broadcast
    along ``axis``. Backends and determinism as :func:`quantize_per_token`.
    """
    op = "fastdl.quantize_per_channel"
    _checks.dtype(op, "w", w, FLOAT_DTYPES)
    if w.dim() < 1:
        raise RuntimeError(f"{op}: w must have at least one dimension, got a scalar")
    if not -w.dim() <= axis < w.dim():
        raise IndexError(f"{op}: axis {axis} out of range for w of shape {list(w.shape)}")
    _no_grad(op, w=w)
    moved = w.movedim(axis, 0)
    q, scale = _ops(op, w).int8_quantize(moved.reshape(moved.shape[0], math.prod(moved.shape[1:])))
    return q.view(moved.shape).movedim(0, axis), scale


def int8_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``a @ b`` for int8 a (M, K) and b (K, N) (any strides, e.g. a transposed (N, K) weight),
    accumulated exactly in int32.

    Without scales and bias the result is the int32 product (``out_dtype`` None or int32).
    With them the epilogue computes ``(a @ b) * a_scale[:, None] * b_scale[None, :] + bias`` in
    float32 and writes ``out_dtype`` (default float32; bfloat16, float16): a_scale (M,) or
    (M, 1) per token, b_scale (N,) or (1, N) per channel, positive and finite (a missing scale
    counts as 1), bias (N,). Any M (including 0 and 1), any K. Not differentiable.
    Backends: C++ (CPU: AVX512-VNNI, AVX2), CUDA (int8 tensor cores), Triton. Deterministic: yes.
    """
    op = "fastdl.int8_matmul"
    scaled = a_scale is not None or b_scale is not None or bias is not None
    if out_dtype is None:
        out_dtype = torch.float32 if scaled else torch.int32
    if out_dtype not in OUT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in OUT_DTYPES)
        raise TypeError(f"{op}: unsupported out_dtype {out_dtype}; supported: {names}")
    _checks.dtype(op, "a", a, (torch.int8,))
    _checks.dtype(op, "b", b, (torch.int8,))
    _same_device(op, a, b=b, a_scale=a_scale, b_scale=b_scale, bias=bias)
    _no_grad(op, a_scale=a_scale, b_scale=b_scale, bias=bias)
    return _ops(op, a).int8_matmul(a, b, a_scale, b_scale, bias, out_dtype)


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """The int8 weight w (out_features, in_features) in the CPU GEMM's packed layout (a uint8
    buffer: 64-column panels, k in groups of 4, each byte + 128 as VNNI's unsigned operand).
    Pack once, pass to :func:`int8_linear` as ``packed``. An empty tensor for CUDA tensors (the
    GPU kernels read w directly) and when the C++ extension is absent."""
    op = "fastdl.pack_weight"
    _checks.dtype(op, "w", w, (torch.int8,))
    if w.dim() != 2:
        raise RuntimeError(f"{op}: w must be (out_features, in_features), got {list(w.shape)}")
    if w.device.type != "cpu" or _ext._C is None:  # nothing to pack (int8_linear packs later)
        return w.new_empty(0, dtype=torch.uint8)
    return NATIVE.int8_pack_weight(w)


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    packed: torch.Tensor | None = None,
    outlier_threshold: float | None = None,
) -> torch.Tensor:
    """``x @ (weight * weight_scale[:, None]).T + bias`` with int8 weight (N, K) and per-channel
    weight_scale (N,): x (..., K) is quantized per token on the fly (into the GEMM's A operand,
    no int8 tensor in between), multiplied in int8 with int32 accumulation, and dequantized with
    the bias in the epilogue. Output x's shape with N last, x's dtype (float32, bfloat16,
    float16); bias x's dtype or float32.

    ``outlier_threshold`` (LLM.int8, Dettmers et al. 2022): input columns where any |x| reaches
    it are multiplied in floating point by the dequantized weight columns, the rest in int8.
    ``packed``: :func:`pack_weight` (weight), computed here when None on CPU.
    Gradients: x (through the dequantized weight) and bias. Backends: C++ (CPU), CUDA, Triton.
    Deterministic: yes.
    """
    op = "fastdl.int8_linear"
    _checks.dtype(op, "x", x, FLOAT_DTYPES)
    _checks.dtype(op, "weight", weight, (torch.int8,))
    _same_device(op, x, weight=weight, weight_scale=weight_scale, bias=bias, packed=packed)
    _no_grad(op, weight_scale=weight_scale)
    if outlier_threshold is not None and not outlier_threshold > 0:
        raise ValueError(f"{op}: outlier_threshold must be positive, got {outlier_threshold}")
    ops = _ops(op, x)
    stale = packed is None or packed.numel() != packed_bytes(weight.shape[-1], weight.shape[0])
    if ops is NATIVE and x.device.type == "cpu" and stale and weight.dim() == 2:
        packed = pack_weight(weight)  # not packed yet (or packed while the extension was absent)
    elif packed is None:
        packed = weight.new_empty(0, dtype=torch.uint8)
    return _library.call(ops.int8_linear, x, weight, packed, weight_scale, bias, outlier_threshold)
