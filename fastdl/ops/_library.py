"""What every family of fastdl/ops registers on its ops, a NATIVE or TRITON namespace of
``<op>_fwd`` / ``<op>_bwd`` pairs: the fake kernels and the autograd formulas."""

from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch.autograd.function import once_differentiable


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
        backward = once_differentiable(make_backward(getattr(ops, op + "_bwd")))
        torch.library.register_autograd(getattr(ops, op + "_fwd"), backward, setup_context=setup)
    return ops
