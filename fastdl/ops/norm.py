"""Normalization family: LayerNorm, RMSNorm, fused residual-add + norm, BatchNorm.

Each op has a native implementation (C++ on CPU, CUDA on GPU; schemas in csrc/ops.cpp) and a
Triton one (kernels/norm.py, registered here as ``fastdl::<op>_triton`` custom ops with the same
schema). Both share one fake kernel and one autograd formula; the public functions pick the
backend per call (fastdl/_backend.py).
"""

import math
from collections.abc import Sequence
from types import SimpleNamespace

import torch

from fastdl import _backend, _checks, _ext
from fastdl.ops import _library

OPS = (
    "layer_norm_fwd",
    "layer_norm_bwd",
    "rms_norm_fwd",
    "rms_norm_bwd",
    "batch_norm_fwd",
    "batch_norm_bwd",
)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def channels_last(x: torch.Tensor) -> bool:
    """Whether batch_norm keeps x in channels_last (the rule every backend follows)."""
    return (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def _param_grad(x: torch.Tensor, numel: int, wanted: bool) -> torch.Tensor:
    # Parameter gradients come back flat, in the statistics dtype; autograd casts and reshapes.
    return x.new_empty(numel if wanted else 0, dtype=_stat_dtype(x))


def _spec(p: torch.Tensor | None) -> tuple[torch.Size, torch.dtype] | None:
    return None if p is None else (p.shape, p.dtype)


def _as_param(grad: torch.Tensor, spec, wanted: bool) -> torch.Tensor | None:
    if not wanted:
        return None
    shape, dtype = spec
    return grad.view(shape).to(dtype)


# ---------------------------------------------------------------- fake kernels (all backends)


def _layer_norm_fwd_fake(x, residual, weight, bias, normalized_numel, eps):
    rows = x.numel() // normalized_numel
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty_like(out) if residual is not None else x.new_empty(0)
    stat = _stat_dtype(x)
    return out, s, x.new_empty(rows, dtype=stat), x.new_empty(rows, dtype=stat)


def _layer_norm_bwd_fake(grad_out, grad_sum, input, mean, rstd, weight, normalized_numel, mask):
    gi = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    n = normalized_numel
    return gi, _param_grad(input, n, mask[1]), _param_grad(input, n, mask[2])


def _rms_norm_fwd_fake(x, residual, weight, normalized_numel, eps):
    out, s, _, rstd = _layer_norm_fwd_fake(x, residual, weight, None, normalized_numel, eps)
    return out, s, rstd


def _rms_norm_bwd_fake(grad_out, grad_sum, input, rstd, weight, normalized_numel, mask):
    gi = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    return gi, _param_grad(input, normalized_numel, mask[1])


def _bn_like(x: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if channels_last(x) else torch.contiguous_format
    return torch.empty_like(x, memory_format=fmt)


def _batch_norm_fwd_fake(x, weight, bias, running_mean, running_var, training, eps, relu):
    c = x.shape[1]
    stat = _stat_dtype(x)
    return _bn_like(x), x.new_empty(c, dtype=stat), x.new_empty(c, dtype=stat)


def _batch_norm_bwd_fake(grad_out, x, weight, bias, save_mean, save_invstd, training, relu, mask):
    c = x.shape[1]
    return _bn_like(x), _param_grad(x, c, mask[1]), _param_grad(x, c, mask[2])


# ---------------------------------------------------------------- autograd (all backends)


def _norm_setup(ctx, inputs, output):
    x, residual = inputs[0], inputs[1]
    has_bias = len(inputs) == 6  # layer_norm_fwd has bias, rms_norm_fwd has not
    weight, n = inputs[2], inputs[4 if has_bias else 3]
    stats = output[2:]
    ctx.n, ctx.has_residual = n, residual is not None
    ctx.params = (_spec(weight), _spec(inputs[3] if has_bias else None))
    ctx.save_for_backward(output[1] if residual is not None else x, *stats, weight)


def _layer_norm_backward(bwd):
    def backward(ctx, g_out, g_sum, _g_mean, _g_rstd):
        inp, mean, rstd, weight = ctx.saved_tensors
        nx, nr, nw, nb = ctx.needs_input_grad[:4]
        mask = [nx or nr, nw, nb]
        gi, gw, gb = bwd(
            g_out, g_sum if ctx.has_residual else None, inp, mean, rstd, weight, ctx.n, mask
        )
        w, b = ctx.params
        return (
            *_input_grads(ctx, gi, nx, nr),
            _as_param(gw, w, nw),
            _as_param(gb, b, nb),
            None,
            None,
        )

    return backward


def _rms_norm_backward(bwd):
    def backward(ctx, g_out, g_sum, _g_rstd):
        inp, rstd, weight = ctx.saved_tensors
        nx, nr, nw = ctx.needs_input_grad[:3]
        gi, gw = bwd(
            g_out, g_sum if ctx.has_residual else None, inp, rstd, weight, ctx.n, [nx or nr, nw]
        )
        return (*_input_grads(ctx, gi, nx, nr), _as_param(gw, ctx.params[0], nw), None, None)

    return backward


def _input_grads(ctx, gi, nx, nr):
    # d(x + residual)/dx = d(x + residual)/dresidual = identity: both get the same gradient.
    return (gi if nx else None, gi if nr else None)


def _batch_norm_setup(ctx, inputs, output):
    x, weight, bias, _rm, _rv, training, _eps, relu = inputs
    ctx.training, ctx.relu = training, relu
    ctx.params = (_spec(weight), _spec(bias))
    ctx.save_for_backward(x, weight, bias if relu else None, output[1], output[2])


def _batch_norm_backward(bwd):
    def backward(ctx, g_out, _g_mean, _g_invstd):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[:3]
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            raise RuntimeError("fastdl.batch_norm: running_mean/running_var take no gradient")
        gi, gw, gb = bwd(g_out, x, weight, bias, mean, invstd, ctx.training, ctx.relu, [nx, nw, nb])
        w, b = ctx.params
        return (gi if nx else None, _as_param(gw, w, nw), _as_param(gb, b, nb), *(None,) * 5)

    return backward


_FAKE = {
    "layer_norm_fwd": _layer_norm_fwd_fake,
    "layer_norm_bwd": _layer_norm_bwd_fake,
    "rms_norm_fwd": _rms_norm_fwd_fake,
    "rms_norm_bwd": _rms_norm_bwd_fake,
    "batch_norm_fwd": _batch_norm_fwd_fake,
    "batch_norm_bwd": _batch_norm_bwd_fake,
}
_AUTOGRAD = {
    "layer_norm": (_norm_setup, _layer_norm_backward),
    "rms_norm": (_norm_setup, _rms_norm_backward),
    "batch_norm": (_batch_norm_setup, _batch_norm_backward),
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
    from fastdl.kernels import norm as launchers

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


def _ops(op: str, x: torch.Tensor) -> SimpleNamespace:
    return _backend.namespace("norm", op, x, NATIVE, TRITON)


# ---------------------------------------------------------------- public functions


def _same_device(op, x, **tensors):
    # Also here, not only in the kernels: a "meta" argument would route the call to the fake.
    for name, t in tensors.items():
        if t is not None:
            _checks.same_device(op, name, t, x)


def _affine_norm_args(op, x, normalized_shape, weight, bias, eps):
    _same_device(op, x, weight=weight, bias=bias)
    shape = _checks.normalized_shape(op, x, normalized_shape)
    _checks.param_shape(op, "weight", weight, shape)
    _checks.param_shape(op, "bias", bias, shape)
    _checks.positive_eps(op, eps)
    return math.prod(shape)


def _rms_weight(x, weight):
    """torch's rms_norm multiplies by a weight of another float dtype after normalizing in x's
    and returns x's dtype; where float64 meets another dtype the kernels take the weight cast to
    x's compute dtype (float32 for bfloat16/float16 x, which the kernels take with a float32
    weight as is): exact upward, downward the product's one rounding moves to the weight."""
    if weight is None or weight.dtype == x.dtype or torch.float64 not in (x.dtype, weight.dtype):
        return weight
    if not (weight.is_floating_point() and x.is_floating_point()):
        return weight  # the op's dtype check names the problem
    return weight.to(torch.float32 if x.element_size() < 4 else x.dtype)


def _forward(op, name, x, residual, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, x + residual) of the forward op ``name``; with no feature to normalize
    (normalized_numel 0, args[-2]) the (empty) input itself, as torch returns."""
    if args[-2] == 0:
        s = x if residual is None else x + residual
        return s.clone(), s
    return tuple(_library.call(getattr(_ops(op, x), name), x, residual, *args)[:2])


def layer_norm(
    x: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dims (Ba et al., 2016):
    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, biased variance, as
    ``torch.nn.functional.layer_norm``.

    Shapes: x (*, *normalized_shape); weight, bias normalized_shape or None. Output: x's shape,
    contiguous. Dtypes: CPU float32/float64/bfloat16, CUDA/Triton float32/float16/bfloat16,
    statistics in float32 (float64 for float64); weight/bias x's dtype or float32.
    Backends: C++ (CPU), CUDA, Triton. Deterministic: yes (dweight/dbias reduced in a fixed order).
    """
    n = _affine_norm_args("fastdl.layer_norm", x, normalized_shape, weight, bias, eps)
    return _forward("fastdl.layer_norm", "layer_norm_fwd", x, None, weight, bias, n, eps)[0]


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused pre-norm residual step: ``s = x + residual``, returns ``(layer_norm(s), s)`` in one
    pass over memory. Gradients flow through both outputs to x and residual (same shape as x).
    Dtypes, backends and determinism as :func:`layer_norm`.
    """
    op = "fastdl.add_layer_norm"
    _same_device(op, x, residual=residual)
    _checks.same_shape(op, "residual", residual, x)
    _checks.same_dtype(op, "residual", residual, x)
    n = _affine_norm_args(op, x, normalized_shape, weight, bias, eps)
    return _forward(op, "layer_norm_fwd", x, residual, weight, bias, n, eps)


def _rms_eps(x: torch.Tensor, eps: float | None) -> float:
    if eps is not None:
        return eps
    # A non-float x has no finfo; any positive eps lets the op's dtype check give the message.
    if not x.dtype.is_floating_point:
        return 1.0
    # torch takes the eps of the computation dtype: float32's for bfloat16/float16 inputs.
    return torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps


def rms_norm(
    x: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    """Root-mean-square normalization (Zhang & Sennrich, 2019): ``y = x / sqrt(mean(x^2) + eps)
    * weight`` over the trailing ``normalized_shape`` dims, as ``torch.nn.functional.rms_norm``
    (``eps=None`` means the machine epsilon of the computation dtype, as torch: float32's for
    float32, bfloat16 and float16 inputs, float64's for float64).

    Dtypes, backends and determinism as :func:`layer_norm`.
    """
    eps = _rms_eps(x, eps)
    n = _affine_norm_args("fastdl.rms_norm", x, normalized_shape, weight, None, eps)
    return _forward("fastdl.rms_norm", "rms_norm_fwd", x, None, _rms_weight(x, weight), n, eps)[0]


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``s = x + residual``; returns ``(rms_norm(s), s)``. See :func:`add_layer_norm`."""
    op = "fastdl.add_rms_norm"
    _same_device(op, x, residual=residual)
    _checks.same_shape(op, "residual", residual, x)
    _checks.same_dtype(op, "residual", residual, x)
    eps = _rms_eps(x, eps)
    n = _affine_norm_args(op, x, normalized_shape, weight, None, eps)
    return _forward(op, "rms_norm_fwd", x, residual, _rms_weight(x, weight), n, eps)


ACTIVATIONS = (None, "relu")


def batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str | None = None,
) -> torch.Tensor:
    """Batch normalization (Ioffe & Szegedy, 2015) over (N, C, *) per channel, as
    ``torch.nn.functional.batch_norm``, with an optional fused ``activation="relu"``.

    Training: batch statistics (biased variance to normalize); running_mean/running_var, when
    given, are updated in place as torch does: ``r = (1 - momentum) * r + momentum * stat`` with
    the unbiased variance. Eval: the running statistics. NCHW and channels_last inputs; the
    output keeps x's memory format. Dtypes as :func:`layer_norm`; weight, bias and running
    statistics x's dtype or float32. Backends: C++ (CPU), CUDA, Triton. Deterministic: yes.
    """
    op = "fastdl.batch_norm"
    if x.dim() < 2:
        raise RuntimeError(f"{op}: x must be (N, C, *), got shape {list(x.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    _checks.positive_eps(op, eps)
    _same_device(op, x, weight=weight, bias=bias)
    c = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _checks.param(op, name, t, x, c)
    if training and (running_mean is None) != (running_var is None):  # eval: RuntimeError below
        raise ValueError(
            f"{op}: running_mean and running_var must both be None or both be tensors, got "
            f"running_mean={'None' if running_mean is None else 'a tensor'} and "
            f"running_var={'None' if running_var is None else 'a tensor'}"
        )
    if training:
        count = x.numel() // c if c else 0
        if count == 1:
            raise ValueError(
                f"{op}: expected more than 1 value per channel when training, "
                f"got x of shape {list(x.shape)}"
            )
    elif running_mean is None or running_var is None:
        raise RuntimeError(f"{op}: running_mean and running_var are required in eval mode")
    ops = _ops(op, x)
    rm, rv = (None, None) if training else (running_mean, running_var)
    out, mean, invstd = _library.call(
        ops.batch_norm_fwd, x, weight, bias, rm, rv, training, eps, activation == "relu"
    )
    if training and running_mean is not None and count > 0:
        _update_running_stats(running_mean, running_var, mean, invstd, momentum, eps, count)
    return out


@torch.no_grad()
def _update_running_stats(running_mean, running_var, mean, invstd, momentum, eps, count):
    # The biased batch variance is recovered from the saved inverse std: var = invstd^-2 - eps.
    # Computed in the statistics dtype and rounded once into bf16/fp16 running stats.
    var = invstd.reciprocal().square_().sub_(eps).mul_(count / (count - 1))
    for running, batch in ((running_mean, mean), (running_var, var)):
        running.copy_(running.to(batch.dtype).mul_(1 - momentum).add_(batch, alpha=momentum))
