"""fastdl: fused deep-learning kernels for PyTorch (C++ on CPU, CUDA, Triton) as torch.library
custom ops, with drop-in nn modules and fastdl.patch(model)."""

from fastdl import nn
from fastdl._backend import backend, get_backend
from fastdl._ext import available_backends, cpu_isa, set_cpu_isa
from fastdl.graph import Graph
from fastdl.nn.conv import fuse_conv_bn
from fastdl.nn.int8 import quantize_model
from fastdl.ops.attention import scaled_dot_product_attention, varlen_attention
from fastdl.ops.conv import conv2d, conv_transpose2d
from fastdl.ops.graph import gat_aggregate, gcn_aggregate, sddmm, spmm
from fastdl.ops.int8 import (
    int8_linear,
    int8_matmul,
    pack_weight,
    quantize_per_channel,
    quantize_per_token,
)
from fastdl.ops.norm import add_layer_norm, add_rms_norm, batch_norm, layer_norm, rms_norm
from fastdl.ops.rnn import gru, gru_cell, lstm, lstm_cell
from fastdl.patch import PatchReport, patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "Graph",
    "PatchReport",
    "add_layer_norm",
    "add_rms_norm",
    "available_backends",
    "backend",
    "batch_norm",
    "conv2d",
    "conv_transpose2d",
    "cpu_isa",
    "fuse_conv_bn",
    "gat_aggregate",
    "gcn_aggregate",
    "get_backend",
    "gru",
    "gru_cell",
    "int8_linear",
    "int8_matmul",
    "layer_norm",
    "lstm",
    "lstm_cell",
    "nn",
    "pack_weight",
    "patch",
    "quantize_model",
    "quantize_per_channel",
    "quantize_per_token",
    "rms_norm",
    "scaled_dot_product_attention",
    "sddmm",
    "set_cpu_isa",
    "spmm",
    "unpatch",
    "varlen_attention",
]
