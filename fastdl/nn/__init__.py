"""Drop-in modules, state_dict-compatible with their torch.nn twins."""

from fastdl.nn.norm import BatchNorm1d, BatchNorm2d, LayerNorm, RMSNorm
from fastdl.nn.rnn import GRU, LSTM, GRUCell, LSTMCell

__all__ = [
    "GRU",
    "LSTM",
    "BatchNorm1d",
    "BatchNorm2d",
    "GRUCell",
    "LSTMCell",
    "LayerNorm",
    "RMSNorm",
]
