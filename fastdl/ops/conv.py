"""Convolution family: conv2d with a fused epilogue (bias + residual + activation, forward and
backward), grouped/depthwise conv2d, conv_transpose2d, and fuse_conv_bn.

Each op has a native implementation (C++ on CPU, CUDA on GPU; schemas in csrc/ops.cpp) and a
Triton one (kernels/conv.py, registered here as ``fastdl::<op>_triton`` custom ops with the same
schema). Both share one fake kernel and one autograd formula; the public functions check their
arguments here (the messages of csrc/common/conv.h) and pick the backend per call.
"""

from collections.abc import Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from fastdl import _autocast, _backend, _checks, _ext
from fastdl.ops import _library

OPS = ("conv2d_fwd", "conv2d_bwd", "conv_transpose2d_fwd", "conv_transpose2d_bwd")
ACTIVATIONS = ("none", "relu", "silu", "gelu")
CONV = "fastdl.conv2d"
CONV_T = "fastdl.conv_transpose2d"
CPU_DTYPES = _checks.KERNEL_DTYPES["cpu"]
GPU_DTYPES = _checks.KERNEL_DTYPES["cuda"]


def _dtypes(x: torch.Tensor) -> tuple[torch.dtype, ...]:
    """The C++ CPU kernels' dtypes, or the GPU ones (CUDA and Triton, also interpreted); on the
    meta device (shapes only) those of every backend."""
    if x.device.type == "meta":
        return _checks.KERNEL_DTYPES["meta"]
    native_cpu = x.device.type == "cpu" and _backend.resolve("conv", "cpu") == "native"
    return CPU_DTYPES if native_cpu else GPU_DTYPES


def channels_last(x: torch.Tensor) -> bool:
    """Whether a conv keeps x in channels_last (the rule of every backend, common/conv.h)."""
    return (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if channels_last(x) else torch.contiguous_format


def _as_weight_format(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x in channels_last when the weight alone is (torch's convs then compute and return
    channels_last too); as it is otherwise, and when empty (torch keeps NCHW strides there)."""
    if x.numel() > 0 and channels_last(weight) and not channels_last(x):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def saves_pre(activation: str) -> bool:
    return activation in ("silu", "gelu")


# ---------------------------------------------------------------- checks (mirror common/conv.h)


def _integer(e):
    # _checks.as_int, a SymInt as it is; TypeError for anything else.
    n = e if isinstance(e, torch.SymInt) else _checks.as_int(e)
    if n is None:
        raise TypeError
    return n


def _pair(op: str, arg: str, v, minimum: int) -> tuple[int, int]:
    # An int or one or two ints, as torch takes them (one value serves both dims).
    if type(v) is int and v >= minimum:  # the common cases first: a call costs tens of us
        return (v, v)
    if type(v) is tuple and len(v) == 2 and type(v[0]) is type(v[1]) is int and min(v) >= minimum:
        return v
    try:
        if isinstance(v, (tuple, list, torch.Size)):
            v = tuple(_integer(e) for e in v)
            v = v * 2 if len(v) == 1 else v
        else:
            v = (_integer(v),) * 2
    except TypeError:
        raise TypeError(f"{op}: {arg} must be an int or a pair of ints, got {v!r}") from None
    if len(v) != 2:
        raise RuntimeError(f"{op}: {arg} must have 2 values, got {list(v)}")
    if v[0] < minimum or v[1] < minimum:
        bound = ">= 0" if minimum == 0 else "> 0"
        raise RuntimeError(f"{op}: {arg} must be {bound}, got {list(v)}")
    return v


def _tensors(op, x, weight, groups, c_w, dtypes):
    _checks.dtype(op, "x", x, dtypes or _dtypes(x))
    _checks.same_device(op, "weight", weight, x)
    _checks.same_dtype(op, "weight", weight, x)
    xs, ws = x.shape, weight.shape
    if len(xs) != 4:
        raise RuntimeError(f"{op}: x must be 4-D (N, C, H, W), got shape {list(xs)}")
    if len(ws) != 4 or ws[2] < 1 or ws[3] < 1:
        raise RuntimeError(
            f"{op}: weight must be 4-D with a kernel of at least 1x1, got shape {list(ws)}"
        )
    if groups < 1:
        raise RuntimeError(f"{op}: groups must be >= 1, got {groups}")
    c = xs[1]
    if c % groups:
        raise RuntimeError(f"{op}: input channels {c} are not divisible by groups={groups}")
    # conv2d weight (K, C / groups, R, S); conv_transpose2d weight (C, C_out / groups, R, S).
    expected = ws[1] * groups if c_w == 1 else ws[0]
    if expected != c:
        raise RuntimeError(
            f"{op}: x has {c} channels but weight of shape {list(ws)} with "
            f"groups={groups} expects {expected}"
        )
    if c_w == 1 and ws[0] % groups:
        raise RuntimeError(
            f"{op}: output channels {ws[0]} (weight.size(0)) are not divisible by groups={groups}"
        )


def conv2d_out_shape(x, weight, stride, padding, dilation, groups, dtypes=None) -> tuple[int, ...]:
    """Checks the conv2d arguments and returns the output shape (N, K, P, Q). x's dtype must be
    one of ``dtypes``: by default those of the backend in force (a kernel that runs whatever
    backend is in force later, as a backward op, passes its own)."""
    _tensors(CONV, x, weight, groups, 1, dtypes)
    stride = _pair(CONV, "stride", stride, 1)
    padding = _pair(CONV, "padding", padding, 0)
    dilation = _pair(CONV, "dilation", dilation, 1)
    xs, ws = x.shape, weight.shape
    out = [xs[0], ws[0]]
    for d in (0, 1):
        eff = dilation[d] * (ws[2 + d] - 1) + 1
        padded = xs[2 + d] + 2 * padding[d]
        if padded < eff:
            raise RuntimeError(
                f"{CONV}: kernel size (dilated) {eff} is larger than the padded input {padded}"
            )
        out.append((padded - eff) // stride[d] + 1)
    return tuple(out)


def conv_transpose2d_out_shape(
    x, weight, stride, padding, output_padding, groups, dilation, dtypes=None
) -> tuple[int, ...]:
    """Checks the conv_transpose2d arguments and returns the output shape (dtypes as
    conv2d_out_shape)."""
    _tensors(CONV_T, x, weight, groups, 0, dtypes)
    stride = _pair(CONV_T, "stride", stride, 1)
    padding = _pair(CONV_T, "padding", padding, 0)
    output_padding = _pair(CONV_T, "output_padding", output_padding, 0)
    dilation = _pair(CONV_T, "dilation", dilation, 1)
    out = [x.shape[0], weight.shape[1] * groups]
    for d in range(2):
        if not (output_padding[d] < stride[d] or output_padding[d] < dilation[d]):
            raise RuntimeError(
                f"{CONV_T}: output_padding must be smaller than stride or dilation, got "
                f"output_padding={list(output_padding)}, stride={list(stride)}, "
                f"dilation={list(dilation)}"
            )
        size = (
            (x.shape[2 + d] - 1) * stride[d]
            - 2 * padding[d]
            + dilation[d] * (weight.shape[2 + d] - 1)
            + output_padding[d]
            + 1
        )
        if size < 0 or (size == 0 and x.shape[0] != 0):  # an empty batch may give 0 (as torch)
            raise RuntimeError(f"{CONV_T}: output size {size} is not positive")
        out.append(size)
    return tuple(out)


def _check_bias(op, bias, x, k):
    if bias is None:
        return
    _checks.same_device(op, "bias", bias, x)
    if bias.dim() != 1 or bias.shape[0] != k:
        raise RuntimeError(f"{op}: bias must have shape ({k},), got {list(bias.shape)}")
    _checks.same_dtype(op, "bias", bias, x)


def _check_residual(residual, x, shape):
    if residual is None:
        return
    _checks.same_device(CONV, "residual", residual, x)
    if tuple(residual.shape) != tuple(shape):
        raise RuntimeError(
            f"{CONV}: residual must have the output's shape {list(shape)}, "
            f"got {list(residual.shape)}"
        )
    _checks.same_dtype(CONV, "residual", residual, x)


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise RuntimeError(
            f"{CONV}: activation must be one of none, relu, silu, gelu; got '{activation}'"
        )


# ---------------------------------------------------------------- fake kernels (all backends)


def _empty(shape, like: torch.Tensor, fmt=torch.contiguous_format) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def _conv2d_fwd_fake(
    x, weight, bias, residual, stride, padding, dilation, groups, activation, inference=False
):
    shape = conv2d_out_shape(x, weight, stride, padding, dilation, groups)
    out = _empty(shape, x, memory_format(x))
    return out, (torch.empty_like(out) if saves_pre(activation) else x.new_empty(0))


def _conv2d_bwd_fake(grad_out, x, weight, out, pre, stride, padding, dilation, groups, act, mask):
    fmt = memory_format(x)
    return (
        _empty(x.shape, x, fmt) if mask[0] else x.new_empty(0),
        _empty(weight.shape, x) if mask[1] else x.new_empty(0),
        x.new_empty(weight.shape[0] if mask[2] else 0),
        _empty(grad_out.shape, x, fmt) if mask[3] else x.new_empty(0),
    )


def _conv_transpose2d_fwd_fake(x, weight, bias, stride, padding, output_padding, groups, dil):
    shape = conv_transpose2d_out_shape(x, weight, stride, padding, output_padding, groups, dil)
    return _empty(shape, x, memory_format(x))


def _conv_transpose2d_bwd_fake(grad_out, x, weight, stride, padding, opad, groups, dil, mask):
    return (
        _empty(x.shape, x, memory_format(x)) if mask[0] else x.new_empty(0),
        _empty(weight.shape, x) if mask[1] else x.new_empty(0),
        x.new_empty(weight.shape[1] * groups if mask[2] else 0),
    )


# ---------------------------------------------------------------- autograd (all backends)


def _conv2d_setup(ctx, inputs, output):
    x, weight, bias, _residual, stride, padding, dilation, groups, activation, _inference = inputs
    out, pre = output
    ctx.args = (stride, padding, dilation, groups, activation)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(
        x, weight, out if activation == "relu" else None, pre if saves_pre(activation) else None
    )


def _conv2d_backward(bwd):
    def backward(ctx, g_out, _g_pre):
        x, weight, out, pre = ctx.saved_tensors
        stride, padding, dilation, groups, activation = ctx.args
        nx, nw, nb, nr = ctx.needs_input_grad[:4]
        fused = activation != "none"
        empty = x.new_empty(0)
        gi, gw, gb, gp = bwd(
            g_out,
            x,
            weight,
            empty if out is None else out,
            empty if pre is None else pre,
            stride,
            padding,
            dilation,
            groups,
            activation,
            [nx, nw, nb and ctx.has_bias, nr and fused],
        )
        gr = (gp if fused else g_out) if nr else None
        return (
            gi if nx else None,
            gw if nw else None,
            gb if nb and ctx.has_bias else None,
            gr,
            *(None,) * 6,
        )

    return backward


def _conv_transpose2d_setup(ctx, inputs, output):
    x, weight, bias, *args = inputs
    ctx.args = tuple(args)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _conv_transpose2d_backward(bwd):
    def backward(ctx, g_out):
        x, weight = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[:3]
        nb = nb and ctx.has_bias
        gi, gw, gb = bwd(g_out, x, weight, *ctx.args, [nx, nw, nb])
        return (gi if nx else None, gw if nw else None, gb if nb else None, *(None,) * 5)

    return backward


_FAKE = {
    "conv2d_fwd": _conv2d_fwd_fake,
    "conv2d_bwd": _conv2d_bwd_fake,
    "conv_transpose2d_fwd": _conv_transpose2d_fwd_fake,
    "conv_transpose2d_bwd": _conv_transpose2d_bwd_fake,
}
_AUTOGRAD = {
    "conv2d": (_conv2d_setup, _conv2d_backward),
    "conv_transpose2d": (_conv_transpose2d_setup, _conv_transpose2d_backward),
}


def _register(ops: SimpleNamespace) -> SimpleNamespace:
    return _library.register(ops, _FAKE, _AUTOGRAD)


def _native_ops() -> SimpleNamespace | None:
    if _ext._C is None:
        return None
    return _register(SimpleNamespace(**{n: getattr(torch.ops.fastdl, n).default for n in OPS}))


def _triton_ops() -> SimpleNamespace | None:
    if not _ext.HAS_TRITON:
        return None
    from fastdl.kernels import conv as launchers

    return _register(
        SimpleNamespace(
            **{
                n: torch.library.custom_op(
                    f"fastdl::{n}_triton", getattr(launchers, n), mutates_args=()
                )
                for n in OPS
            }
        )
    )


NATIVE = _native_ops()
TRITON = _triton_ops()


def _ops(op: str, x: torch.Tensor, dense: bool) -> SimpleNamespace:
    # "auto" takes Triton only for a dense (groups = 1) conv2d, which the H200 run measured 3x
    # faster than the CUDA kernels in bfloat16: its depthwise and transposed kernels were 5-15x
    # slower than theirs.
    return _backend.namespace("conv", op, x, NATIVE, TRITON, triton_slow=not dense)


# ---------------------------------------------------------------- public functions

IntPair = int | Sequence[int]


def _same_padding(x, weight, padding, stride, dilation):
    """'same'/'valid' -> (x, symmetric padding); an uneven 'same' pads the extra row/column at
    the bottom/right beforehand, as torch does."""
    if not isinstance(padding, str):
        return x, padding
    if padding == "valid":
        return x, 0
    if padding != "same":
        raise RuntimeError(f"{CONV}: padding must be 'same', 'valid' or int(s), got '{padding}'")
    if _pair(CONV, "stride", stride, 1) != (1, 1):
        raise RuntimeError(f"{CONV}: padding='same' is not supported for strided convolutions")
    dilation = _pair(CONV, "dilation", dilation, 1)
    total = [dilation[d] * (weight.shape[2 + d] - 1) for d in range(2)]
    pad = (total[0] // 2, total[1] // 2)
    extra = (total[0] - 2 * pad[0], total[1] - 2 * pad[1])
    if extra != (0, 0):
        x = F.pad(x, (0, extra[1], 0, extra[0]))
    return x, pad


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """2-D convolution as ``torch.nn.functional.conv2d`` with a fused epilogue:
    ``act(conv2d(x, weight, bias) + residual)``, ``activation`` in None, "relu", "silu", "gelu"
    (exact erf GELU), differentiable through the epilogue (training, not only inference).

    Shapes: x (N, C, H, W) or unbatched (C, H, W); weight (K, C / groups, R, S); bias (K,);
    residual the output's shape. padding: int(s), "same" or "valid". Output: (N, K, P, Q) in
    x's memory format (channels_last stays channels_last), or as torch channels_last when the
    weight alone is. Dtypes: CPU float32, float64,
    bfloat16 (computed in float32); CUDA/Triton float32, float16, bfloat16. Depthwise
    (groups == C == K) has a direct kernel of its own. Backends: C++ (CPU), CUDA, Triton.
    Deterministic: yes on CPU (weight/bias gradients summed in a fixed order).

    CPU float32 stride-1 3x3 convs run Winograd: F(2x2, 3x3), whose rounding is the direct
    conv's, when a gradient will flow through the output (grad mode on and an input requiring
    grad); F(4x4, 3x3), ~1.4x faster with ~8x the rounding error (4-8e-6 of the output's largest
    magnitude), for inference. A forward under reentrant checkpointing
    (``use_reentrant=True`` runs it under no_grad) counts as inference, its recomputation in the
    backward does not: use ``use_reentrant=False``. ``FASTDL_CONV_WINOGRAD`` = 2 / 4 / 0 forces
    one tile or the direct path.
    """
    x, weight, bias, residual = _autocast.lower(x, weight, bias, residual)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
        residual = None if residual is None else residual.unsqueeze(0)
    activation = "none" if activation is None else activation
    _check_activation(activation)
    x, padding = _same_padding(x, weight, padding, stride, dilation)
    x = x if unbatched else _as_weight_format(x, weight)
    shape = conv2d_out_shape(x, weight, stride, padding, dilation, groups)
    stride = _pair(CONV, "stride", stride, 1)  # checked: fast paths from here
    padding = _pair(CONV, "padding", padding, 0)
    dilation = _pair(CONV, "dilation", dilation, 1)
    _check_bias(CONV, bias, x, weight.shape[0])
    _check_residual(residual, x, shape)
    out = _library.call(
        _ops(CONV, x, groups == 1).conv2d_fwd,
        x,
        weight,
        bias,
        residual,
        stride,
        padding,
        dilation,
        groups,
        activation,
        not _checks.plans_for_grad(x, weight, bias, residual),
    )[0]
    return out.squeeze(0) if unbatched else out


def conv_transpose2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    output_padding: IntPair = 0,
    groups: int = 1,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """Transposed 2-D convolution (the adjoint of conv2d, "deconvolution") as
    ``torch.nn.functional.conv_transpose2d``.

    Shapes: x (N, C_in, H, W) or unbatched; weight (C_in, C_out / groups, kH, kW); bias (C_out,).
    Output size per dim ``(in - 1) * stride - 2 * padding + dilation * (k - 1) +
    output_padding + 1``, in x's memory format (or the weight's, as :func:`conv2d`). Dtypes and
    backends as :func:`conv2d`.
    Deterministic: yes on CPU.
    """
    x, weight, bias = _autocast.lower(x, weight, bias)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    x = x if unbatched else _as_weight_format(x, weight)
    args = (
        _pair(CONV_T, "stride", stride, 1),
        _pair(CONV_T, "padding", padding, 0),
        _pair(CONV_T, "output_padding", output_padding, 0),
        groups,
        _pair(CONV_T, "dilation", dilation, 1),
    )
    conv_transpose2d_out_shape(x, weight, *args)
    _check_bias(CONV_T, bias, x, weight.shape[1] * groups)
    out = _library.call(_ops(CONV_T, x, dense=False).conv_transpose2d_fwd, x, weight, bias, *args)
    return out.squeeze(0) if unbatched else out
