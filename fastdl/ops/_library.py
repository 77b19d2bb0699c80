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
        backward = _once_differentiable(make_backward(getattr(ops, op + "_bwd")))
        torch.library.register_autograd(getattr(ops, op + "_fwd"), backward, setup_context=setup)
    return ops


def _once_differentiable(backward: Callable) -> Callable:
    # torch.autograd.function.once_differentiable marks the results only when an incoming
    # gradient requires grad; a gradient penalty (grad_outputs of ones) would then be a constant
    # that a loss silently drops. Under create_graph=True every result is marked.
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            results = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return results
        results = results if isinstance(results, tuple) else (results,)
        error = torch._C._functions.DelayedError(
            b"fastdl: the backward ops are not differentiable (no double backward)", len(results)
        )
        return error(*(None if r is None else r.detach().requires_grad_() for r in results))

    return wrapper
