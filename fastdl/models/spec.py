"""What the tests, the benchmarks and ``python -m fastdl train`` need to know of a model.

Each model module (``fastdl/models/<group>.py``) lists a ``SPECS`` tuple of :class:`ModelSpec`;
the plain-torch twin of each model lives in ``fastdl/models/twins/<group>.py`` with the same
parameter names, so ``twin.load_state_dict(model.state_dict())`` copies the weights across.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastdl import _checks
from fastdl.ops.attention import MAX_HEAD_DIM
from fastdl.ops.norm import add_layer_norm


@dataclass(frozen=True)
class ModelSpec:
    """One trainable model: how to build it and its twin, feed them, and score them.

    ``batch(generator, device)`` returns ``(inputs, target)``: the model is called as
    ``model(*inputs)`` and ``loss(output, target)`` gives a scalar. ``train=False`` marks an
    inference-only model (INT8): the benchmark times its forward, not a training step.
    """

    name: str
    group: str  # "vision", "sequence", "graph", "quantized"
    task: str  # one line: the data it learns from
    build: Callable[[], nn.Module]
    twin: Callable[[], nn.Module]
    batch: Callable[[torch.Generator, torch.device], tuple[tuple, Any]]
    loss: Callable[[Any, Any], torch.Tensor]
    lr: float = 1e-3
    train: bool = True


def check_heads(model: str, name: str, width: int, heads: int) -> None:
    """heads must divide the model width ``name`` into heads of at most fastdl's attention limit.
    Checked when the model is built: the attention op's message would name neither."""
    if heads < 1 or width % heads:
        raise ValueError(f"{model}: heads ({heads}) must be a positive divisor of {name} ({width})")
    if width // heads > MAX_HEAD_DIM:
        raise ValueError(
            f"{model}: {name} / heads = {width // heads} is above fastdl's attention head size "
            f"limit of {MAX_HEAD_DIM}"
        )


def add_norm(x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm):
    """``(norm(x + residual), x + residual)`` in one fused pass (fastdl.add_layer_norm): the
    residual add of the Transformer blocks fused into the LayerNorm after it."""
    return add_layer_norm(x, residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def check_dtype(model: nn.Module, name: str, x: torch.Tensor) -> None:
    """x's dtype must be the model's (its first parameter's): a uint8 image or a float64 input to
    a float32 model would otherwise fail inside a kernel, naming neither. Inside torch.autocast
    any floating-point x is taken, as the ops cast it."""
    param = next(model.parameters(), None)
    dtype = x.dtype if param is None else param.dtype
    autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
    if x.dtype != dtype and not (autocast and x.is_floating_point()):
        raise _checks.DtypeError(
            f"{type(model).__name__}: {name} must have the model's dtype {dtype}, got {x.dtype}"
        )
