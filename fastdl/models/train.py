"""One training step, shared by the tests, the benchmarks and ``python -m fastdl train``."""

from typing import Any

import torch
from torch import nn

from fastdl.models.spec import ModelSpec


def optimizer(model: nn.Module, spec: ModelSpec) -> torch.optim.Optimizer:
    """AdamW at the spec's learning rate over every trainable parameter."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr)


def step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    spec: ModelSpec,
    inputs: tuple,
    target: Any,
) -> torch.Tensor:
    """Forward, loss, backward and an optimizer step; returns the (detached) loss."""
    opt.zero_grad(set_to_none=True)
    loss = spec.loss(model(*inputs), target)
    loss.backward()
    opt.step()
    return loss.detach()
