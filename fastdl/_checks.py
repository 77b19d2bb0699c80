"""Input checks for the Python side (public functions and Triton ops). The messages mirror
csrc/common/checks.h: they name the op, the argument, what was expected and what was given."""

import math
import operator
from collections.abc import Sequence

import torch

REDUCED = (torch.bfloat16, torch.float16)
# The floating dtypes fastdl's kernels take per device type (the int8 family aside); meta tensors
# run the fake kernels, which take any of them.
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "meta": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}


class DtypeError(TypeError, ValueError, RuntimeError):
    """A tensor of a dtype the op does not take, or that does not match the others'. A TypeError,
    and also the classes torch raises for the same mistake (RuntimeError from its ops, ValueError
    from its recurrent modules), so code written against torch catches it."""


class RankError(RuntimeError, ValueError):
    """An input of a rank the op does not take: a RuntimeError, and a ValueError as torch's
    recurrent modules raise for it."""


def as_int(v) -> int | None:
    """v as an int when it is one of any integer type (numpy's, a 0-d integer tensor), else None
    (floats, None, bools: a flag is not a count)."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def kernels_take(x: torch.Tensor) -> bool:
    """Whether fastdl's kernels take x's dtype on x's device: the fastdl.nn modules run their
    torch twin's forward otherwise (a patched model moved to float16 on the CPU still runs)."""
    return x.dtype in KERNEL_DTYPES.get(x.device.type, ())


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether a gradient will flow through an op taking these tensors (grad mode on and one of
    them requiring grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def plans_for_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether an op that plans for its backward (conv's inference-only Winograd tile, the graph
    ops' transpose) should: a gradient will flow, or a torch.jit trace is being recorded (the
    traced graph must serve both grad modes: its check retraces under another)."""
    return torch.jit.is_tracing() or needs_grad(*tensors)


def dtype(op: str, arg: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(a).removeprefix("torch.") for a in allowed)
        raise DtypeError(f"{op}: {arg} has dtype {t.dtype}; supported dtypes: {names}")


def same_device(op: str, arg: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise RuntimeError(
            f"{op}: {arg} is on {t.device} but x is on {ref.device}; "
            "all tensors must be on the same device"
        )


def same_dtype(op: str, arg: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise DtypeError(
            f"{op}: {arg} has dtype {t.dtype} but x has dtype {ref.dtype}; they must match"
        )


def shape(op: str, arg: str, t: torch.Tensor, want: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(want):
        raise RuntimeError(f"{op}: {arg} must have shape {list(want)}, got {list(t.shape)}")


def same_shape(op: str, arg: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.shape != ref.shape:
        raise RuntimeError(
            f"{op}: {arg} must have the shape of x {list(ref.shape)}, got {list(t.shape)}"
        )


def positive_eps(op: str, eps: float) -> None:
    if torch.compiler.is_compiling():  # eps may be symbolic (dynamic=True): an assert, no branch
        torch._check(eps > 0, lambda: f"{op}: eps must be a positive finite number")
        return
    if not (math.isfinite(eps) and eps > 0):
        raise RuntimeError(f"{op}: eps must be a positive finite number, got {eps}")


def param(op: str, arg: str, p: torch.Tensor | None, x: torch.Tensor, numel: int) -> None:
    """A per-feature parameter: `numel` elements on x's device, dtype x.dtype (or float32 when x
    is bfloat16/float16)."""
    if p is None:
        return
    same_device(op, arg, p, x)
    if p.numel() != numel:
        raise RuntimeError(f"{op}: {arg} must have {numel} elements, got shape {list(p.shape)}")
    if not (p.dtype == x.dtype or (x.dtype in REDUCED and p.dtype == torch.float32)):
        extra = " or torch.float32" if x.dtype in REDUCED else ""
        raise DtypeError(
            f"{op}: {arg} has dtype {p.dtype} but x has dtype {x.dtype}; expected {x.dtype}{extra}"
        )


def normalized_numel(op: str, x: torch.Tensor, n: int) -> None:
    if n < 1:
        raise RuntimeError(f"{op}: normalized_numel must be >= 1, got {n}")
    if x.dim() < 1 or x.numel() % n != 0:
        raise RuntimeError(
            f"{op}: x of shape {list(x.shape)} cannot be viewed as rows of normalized_numel={n}"
        )


def normalized_shape(op: str, x: torch.Tensor, shape: int | Sequence[int]) -> tuple[int, ...]:
    """The normalized_shape as a tuple, checked against x's trailing dimensions."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if len(shape) == 0 or len(shape) > x.dim() or tuple(x.shape[x.dim() - len(shape) :]) != shape:
        raise RuntimeError(
            f"{op}: normalized_shape {list(shape)} must match the trailing dimensions of x, "
            f"got x of shape {list(x.shape)}"
        )
    return shape


def param_shape(op: str, arg: str, p: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if p is not None and tuple(p.shape) != shape:
        raise RuntimeError(
            f"{op}: {arg} must have shape normalized_shape {list(shape)}, got {list(p.shape)}"
        )


def int8_scale(op: str, arg: str, s: torch.Tensor, ref: torch.Tensor, n: int, alt) -> None:
    """An int8 dequantization scale: n values as (n,) or `alt` ((n, 1) or (1, n)), a floating
    dtype, every value positive and finite. Reads the values (a device sync on CUDA)."""
    same_device(op, arg, s, ref)
    dtype(op, arg, s, (torch.float32, torch.bfloat16, torch.float16))
    if tuple(s.shape) not in ((n,), tuple(alt)):
        raise RuntimeError(
            f"{op}: {arg} must have shape ({n},) or {list(alt)}, got {list(s.shape)}"
        )
    f = s.float()
    if n and not bool(((f > 0) & f.isfinite()).all()):
        nan = " and NaN" if bool(f.isnan().any()) else ""
        raise RuntimeError(
            f"{op}: {arg} must be positive and finite, got min {f.min().item()}, "
            f"max {f.max().item()}{nan}"
        )


def no_forward_ad(op: str, x: torch.Tensor) -> None:
    """Refuses forward-mode AD (torch.func.jvp / jacfwd, or x dual under
    torch.autograd.forward_ad): the ops register reverse-mode formulas only, and torch would run
    them with no tangent rule, giving zero tangents without a word. Not checked while
    torch.compile traces (a compiled function drops tangents, torch's own ops' too)."""
    if torch.compiler.is_compiling():
        return
    fwd = torch.autograd.forward_ad
    jvp = fwd._current_level >= 0 and fwd.unpack_dual(x).tangent is not None
    functorch = torch._C._functorch
    if not jvp and functorch.peek_interpreter_stack() is not None:
        jvp = any(i.key() == functorch.TransformType.Jvp for i in functorch.get_interpreter_stack())
    if jvp:
        raise NotImplementedError(
            f"{op}: forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) is not "
            "supported: fastdl's ops have reverse-mode (backward) formulas only"
        )
