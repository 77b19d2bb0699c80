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
