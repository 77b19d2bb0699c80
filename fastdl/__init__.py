"""fastdl: fused deep-learning kernels for PyTorch (C++ on CPU, CUDA, Triton) as torch.library
custom ops, with drop-in nn modules and fastdl.patch(model)."""

from fastdl import nn
from fastdl._backend import backend, get_backend
from fastdl._ext import available_backends, cpu_isa, set_cpu_isa
from fastdl.nn.int8 import quantize_model
from fastdl.ops.int8 import (
    int8_linear,
    int8_matmul,
    pack_weight,
    quantize_per_channel,
    quantize_per_token,
)
from fastdl.ops.norm import add_layer_norm, add_rms_norm, batch_norm, layer_norm, rms_norm
from fastdl.patch import PatchReport, patch

__version__ = "0.1.0"

__all__ = [
    "PatchReport",
    "add_layer_norm",
    "add_rms_norm",
    "available_backends",
    "backend",
    "batch_norm",
    "cpu_isa",
    "get_backend",
    "int8_linear",
    "int8_matmul",
    "layer_norm",
    "nn",
    "pack_weight",
    "patch",
    "quantize_model",
    "quantize_per_channel",
    "quantize_per_token",
    "rms_norm",
    "set_cpu_isa",
]
