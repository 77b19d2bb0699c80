"""fastdl: fused deep-learning kernels for PyTorch (C++ on CPU, CUDA, Triton) as torch.library
custom ops, with drop-in nn modules and fastdl.patch(model)."""

from fastdl import nn
from fastdl._backend import backend, get_backend
from fastdl._ext import available_backends, cpu_isa, set_cpu_isa
from fastdl.ops.norm import add_layer_norm, add_rms_norm, batch_norm, layer_norm, rms_norm
from fastdl.ops.rnn import gru, gru_cell, lstm, lstm_cell
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
    "gru",
    "gru_cell",
    "layer_norm",
    "lstm",
    "lstm_cell",
    "nn",
    "patch",
    "rms_norm",
    "set_cpu_isa",
]
