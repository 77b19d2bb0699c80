"""Drop-in modules, state_dict-compatible with their torch.nn (or PyG) twins."""

from fastdl.nn.attention import MultiheadAttention
from fastdl.nn.conv import Conv2d, ConvTranspose2d
from fastdl.nn.graph import GATConv, GCNConv, GINConv, SAGEConv
from fastdl.nn.int8 import Int8Linear
from fastdl.nn.norm import BatchNorm1d, BatchNorm2d, LayerNorm, RMSNorm
from fastdl.nn.rnn import GRU, LSTM, GRUCell, LSTMCell

__all__ = [
    "GRU",
    "LSTM",
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "ConvTranspose2d",
    "GATConv",
    "GCNConv",
    "GINConv",
    "GRUCell",
    "Int8Linear",
    "LSTMCell",
    "LayerNorm",
    "MultiheadAttention",
    "RMSNorm",
    "SAGEConv",
]
