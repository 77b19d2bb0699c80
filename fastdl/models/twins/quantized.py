"""Plain torch.nn twins of fastdl.models.quantized: the float32 models, able to load the
quantized models' state_dict (int8 weights dequantized on load). No fastdl."""

import itertools

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, depth: int, classes: int):
        super().__init__()
        widths = [in_features] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(depth))
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        for layer, norm in zip(self.layers, self.norms, strict=True):
            x = F.gelu(norm(layer(x)))
        return self.head(x)


def _dequantize(module, state_dict, prefix, *_):
    # An int8 linear layer saves ``weight`` (int8) and ``weight_scale`` (one per output row).
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith(".weight_scale")]:
        weight = key[: -len("_scale")]
        scale = state_dict.pop(key)
        state_dict[weight] = state_dict[weight].to(torch.float32) * scale[:, None]


def dequantizing(model: nn.Module) -> nn.Module:
    """``model`` (returned) made to load the state_dict of its quantized twin: each
    ``weight``/``weight_scale`` pair becomes the float32 weight ``weight * weight_scale[:, None]``.
    A float state_dict loads as before."""
    model.register_load_state_dict_pre_hook(_dequantize)
    return model
