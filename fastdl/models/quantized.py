"""INT8 inference models: the GPT of ``fastdl.models.sequence`` and an MLP after
``fastdl.quantize_model`` (every nn.Linear -> fastdl.nn.Int8Linear: int8 weights per output
channel, activations quantized per token on the fly, int32 accumulation, fused dequantization).

Their twin is the float32 plain-torch model holding the same weights: it loads the quantized
model's state_dict with each int8 weight dequantized (``twins.quantized.dequantizing``), so the
two differ only by the int8 rounding of the activations.
"""

import itertools

import torch
import torch.nn.functional as F
from torch import nn

import fastdl
from fastdl import _checks
from fastdl.models import sequence
from fastdl.models.spec import ModelSpec
from fastdl.models.twins import quantized as qtwins
from fastdl.models.twins import sequence as stwins


class MLP(nn.Module):
    """``depth`` blocks ``gelu(layer_norm(linear(x)))`` and a linear head: x (B, in_features)
    float -> logits (B, classes). The LayerNorm (fastdl's) keeps each block's input on one scale,
    which per-token int8 activations need."""

    def __init__(self, in_features: int, hidden: int, depth: int, classes: int):
        super().__init__()
        self.in_features = in_features
        widths = [in_features] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.norms = nn.ModuleList(fastdl.nn.LayerNorm(hidden) for _ in range(depth))
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensor = isinstance(x, torch.Tensor)
        if not (
            tensor and x.dim() == 2 and x.shape[1] == self.in_features and x.is_floating_point()
        ):
            got = f"shape {list(x.shape)}, dtype {x.dtype}" if tensor else type(x).__name__
            bad_dtype = tensor and not x.is_floating_point()  # DtypeError: a ValueError too
            raise (_checks.DtypeError if bad_dtype else ValueError)(
                f"MLP: x must be a float (batch, {self.in_features}) tensor, got {got}"
            )
        for layer, norm in zip(self.layers, self.norms, strict=True):
            x = F.gelu(norm(layer(x)))
        return self.head(x)


def quantized(model: nn.Module) -> nn.Module:
    """``model`` with every nn.Linear swapped for fastdl.nn.Int8Linear, in eval mode."""
    fastdl.quantize_model(model)
    return model.eval()


MLP_CONFIG = {"in_features": 256, "hidden": 1024, "depth": 3, "classes": 10}
MLP_BATCH = 256


def mlp_batch(gen: torch.Generator, device: torch.device):
    """Gaussian inputs labelled by a fixed random linear teacher (argmax of 10 projections)."""
    x = torch.randn(MLP_BATCH, MLP_CONFIG["in_features"], generator=gen)
    teacher = torch.randn(
        MLP_CONFIG["in_features"],
        MLP_CONFIG["classes"],
        generator=torch.Generator().manual_seed(1234),
    )
    return (x.to(device),), (x @ teacher).argmax(1).to(device)


SPECS = (
    ModelSpec(
        name="gpt-int8",
        group="quantized",
        task="INT8 inference of the GPT (generated English-like sentences)",
        build=lambda: quantized(sequence.GPT(**sequence.GPT_CONFIG)),
        twin=lambda: qtwins.dequantizing(stwins.GPT(**sequence.GPT_CONFIG)),
        batch=sequence.gpt_batch,
        loss=sequence.token_loss,
        train=False,
    ),
    ModelSpec(
        name="mlp-int8",
        group="quantized",
        task="INT8 inference of an MLP (Gaussian inputs, labels of a random linear teacher)",
        build=lambda: quantized(MLP(**MLP_CONFIG)),
        twin=lambda: qtwins.dequantizing(qtwins.MLP(**MLP_CONFIG)),
        batch=mlp_batch,
        loss=F.cross_entropy,
        train=False,
    ),
)
