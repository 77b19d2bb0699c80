"""What every family of fastdl/ops registers on its ops, a NATIVE or TRITON namespace of
``<op>_fwd`` / ``<op>_bwd`` pairs: the fake kernels and the autograd formulas."""

import functools
from collections.abc import Callable
from types import SimpleNamespace

import torch


def register(
    ops: SimpleNamespace, fakes: dict[str, Callable], autograd: dict[str, tuple[Callable, Callable]]
) -> SimpleNamespace:
    """Registers ``fakes`` ({op name: fake kernel}) and, for each ``autograd`` entry
    ``{op: (setup_context, make_backward)}``, ``make_backward(ops.<op>_bwd)`` as the backward of
    ``ops.<op>_fwd``. The backward ops have no derivative of their own: the formulas are once
    differentiable, so a second derivative through them (``create_graph=True``, then backward
    again) raises instead of silently missing terms, and the first runs without recording."""
    for name, fake in fakes.items():
        torch.library.register_fake(getattr(ops, name), fake)
    for op, (setup, make_backward) in autograd.items():
        fwd = getattr(ops, op + "_fwd")
        backward = _once_differentiable(make_backward(getattr(ops, op + "_bwd")))
        torch.library.register_autograd(fwd, backward, setup_context=setup)
        _EAGER[fwd] = _eager_function(fwd, setup, backward)
    return ops


# {forward op: the autograd.Function that call() runs it through in eager grad mode}.
_EAGER: dict[Callable, type[torch.autograd.Function]] = {}


def _eager_function(op: Callable, setup: Callable, backward: Callable):
    """The autograd.Function torch.library builds around ``op`` from the same setup_context and
    backward, for call(): applied straight from Python, it skips the dispatcher's trip to the
    autograd wrapper, which fills the schema's defaults back in per call (a 1x8x8x8 conv's
    forward with grad: 145-200 -> 91-97 us on a Zen 3). setup_context sees every argument,
    defaults filled in, as there."""
    schema = getattr(op, "_opoverload", op)._schema  # a CustomOpDef (Triton) or an OpOverload
    defaults = tuple(a.default_value for a in schema.arguments)

    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            out = op(*args)
        setup(ctx, args + defaults[len(args) :], out)
        return out

    name = "Eager_" + schema.name.replace("::", "_")  # its node: Eager_fastdl_<op>Backward
    body = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    return type(name, (torch.autograd.Function,), body)


def call(op: Callable, *args):
    """``op(*args)``, in eager mode past the Python autograd wrapper torch.library puts around an
    op with a registered backward: with grad mode off straight to the kernel below autograd, as
    that wrapper does itself under no_grad (it costs ~10 us a call: a 1x8x8x8 conv 23 -> 13 us, a
    cold-cache int8 GEMV ~0.1 of 1 ms); with grad mode on through the same autograd formula
    applied from here (_eager_function). torch.compile's graphs, torch.jit traces and torch.func
    transforms take the op as it is."""
    if torch.compiler.is_compiling():
        return op(*args)
    if not torch.is_grad_enabled():
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    fn = _EAGER.get(op)
    if fn is None or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active():
        return op(*args)
    return fn.apply(*args)


def _once_differentiable(backward: Callable) -> Callable:
    # Under create_graph=True the results are linked to everything they were computed from that
    # requires grad (the incoming gradients and the saved tensors) through a node whose backward
    # raises: a second derivative is refused whichever way it is asked for. torch's
    # once_differentiable links them to nothing (a fresh leaf per result): torch.autograd.grad
    # with inputs=, hessian and gradgradcheck then never reach its error node and return missing
    # terms or zeros; it also marks the results only when an incoming gradient requires grad, so
    # a gradient penalty (grad_outputs of ones) would be a constant a loss silently drops.
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        ctx = _Unpacked(ctx)
        with torch.no_grad():
            results = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return results
        links = [
            t
            for t in (*grads, *ctx.saved_tensors)
            if isinstance(t, torch.Tensor) and t.requires_grad
        ]
        if not links:  # the results are constants: their derivative is rightly zero
            return results
        results = list(results) if isinstance(results, tuple) else [results]
        given = [i for i, r in enumerate(results) if r is not None]
        linked = _NotDifferentiable.apply(len(given), *(results[i] for i in given), *links)
        for i, r in zip(given, linked, strict=True):
            results[i] = r
        return tuple(results)

    return wrapper


class _Unpacked:
    """A backward's ctx with its saved tensors unpacked once: a second unpack fails under
    non-reentrant checkpointing and doubles a saved-tensor hook's work (offloading, say)."""

    def __init__(self, ctx):
        self._ctx = ctx
        self.saved_tensors = ctx.saved_tensors

    def __getattr__(self, name):
        return getattr(self._ctx, name)


class _NotDifferentiable(torch.autograd.Function):
    """The identity on the first ``n`` tensors, taking the rest as inputs only to link them into
    the graph; its backward raises."""

    @staticmethod
    def forward(ctx, n, *tensors):
        return tuple(t.detach() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("fastdl: the backward ops are not differentiable (no double backward)")
