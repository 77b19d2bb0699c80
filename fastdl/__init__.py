"""fastdl: fused deep-learning kernels for PyTorch (C++ on CPU, CUDA, Triton) as torch.library
custom ops, with drop-in nn modules and fastdl.patch(model)."""

from fastdl import nn
from fastdl._backend import backend, get_backend
from fastdl._ext import available_backends, cpu_isa, set_cpu_isa
from fastdl.ops.attention import scaled_dot_product_attention, varlen_attention
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
    "layer_norm",
    "nn",
    "patch",
    "rms_norm",
    "scaled_dot_product_attention",
    "set_cpu_isa",
    "varlen_attention",
]
