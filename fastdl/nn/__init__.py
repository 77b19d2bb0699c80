"""Drop-in modules, state_dict-compatible with their torch.nn twins."""

from fastdl.nn.int8 import Int8Linear
from fastdl.nn.norm import BatchNorm1d, BatchNorm2d, LayerNorm, RMSNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "Int8Linear", "LayerNorm", "RMSNorm"]
