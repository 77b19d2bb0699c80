"""LSTM, GRU, LSTMCell, GRUCell on fastdl kernels, drop-ins for their torch.nn twins: same
constructor, parameters, state_dict keys and repr, so a torch state_dict loads unchanged and
fastdl.patch can swap classes in place. They only replace forward.

LSTMCell and GRUCell subclass torch's cells. LSTM and GRU subclass torch's nn.RNNBase, as
nn.LSTM and nn.GRU do, but not those classes themselves: Dynamo refuses to trace any instance of
nn.LSTM / nn.GRU (torch._dynamo.config.allow_rnn), and these must run under
torch.compile(fullgraph=True). So ``isinstance(m, nn.RNNBase)`` holds, ``isinstance(m,
nn.LSTM)`` does not.

They backpropagate in eval mode on every backend. A PackedSequence input gives a PackedSequence
output with the input's batch_sizes and sorting (the packed path unpacks and repacks in Python,
outside what torch.compile can trace without a graph break)."""

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from fastdl import _checks
from fastdl.ops import rnn as F


def _takes(input) -> bool:
    # What the kernels do not take (float16 on the CPU, say) runs the torch twin's forward.
    return _checks.kernels_take(input.data if isinstance(input, PackedSequence) else input)


def _unpack(input):
    """(time-major padded input, lengths on its device) of a PackedSequence."""
    padded, lengths = pad_packed_sequence(input)
    return padded, lengths.to(padded.device)


def _repack(y: torch.Tensor, lengths: torch.Tensor, like: PackedSequence) -> PackedSequence:
    """y (T, B, *) padded, in the original batch order, packed as ``like`` is."""
    if like.sorted_indices is not None:
        y = y.index_select(1, like.sorted_indices)
        lengths = lengths.index_select(0, like.sorted_indices)
    data, _ = torch._VF._pack_padded_sequence(y, lengths.cpu(), False)
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


class _RNNBase:
    def _run(self, fn, input, hx, projected, index):
        # The parameters as they are now, not the cached self._flat_weights, which misses
        # torch.func.functional_call's and parametrizations' (torch refreshes it per call).
        weights = [getattr(self, name) for name in self._flat_weights_names]
        if projected:  # the first layer's w_ih, one per direction
            dirs = 2 if self.bidirectional else 1
            per = len(weights) // (self.num_layers * dirs)  # parameters per layer and direction
            for d in range(dirs):
                weights[d * per] = None
        args = (self.bias, self.num_layers, self.dropout, self.training, self.bidirectional)
        if index is not None:
            if not projected or isinstance(input, PackedSequence):
                raise ValueError(
                    f"{type(self).__name__}: index picks rows of a table of input projections: "
                    "pass the table (not a PackedSequence) with projected=True"
                )
            return fn(input, hx, weights, *args, self.batch_first, index=index)
        if isinstance(input, PackedSequence):
            x, lengths = _unpack(input)
            # torch autocasts the padded overloads of lstm/gru, not the packed ones: a packed
            # sequence runs in its own dtype under autocast, as torch's does.
            with torch.autocast(x.device.type, enabled=False):
                y, state = fn(x, hx, weights, *args, False, lengths=lengths)
            return _repack(y, lengths, input), state
        return fn(input, hx, weights, *args, self.batch_first)


class LSTM(_RNNBase, nn.RNNBase):
    """Drop-in for nn.LSTM (same arguments, proj_size included).

    ``forward(input, hx=None, *, projected=False, index=None)``: with ``projected``, input holds
    the first layer's input projection ``x W_ih^T`` instead of x (last dimension 4H, both
    directions' side by side when bidirectional; see fastdl.lstm), e.g. rows of
    ``F.linear(emb.weight, weight_ih_l0)`` gathered per token, or, with ``index`` (T, B) ((B, T)
    with batch_first), that table itself, whose row ``index[t, b]`` position (t, b) reads;
    weight_ih_l0 then gets its gradient only through that product. Only in the dtypes fastdl's
    kernels take (torch's LSTM, the fallback for others, has no such input)."""

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    # nn.LSTM's own checks of (h, c), which its forward (the fallback below) calls.
    check_forward_args = nn.LSTM.check_forward_args
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    permute_hidden = nn.LSTM.permute_hidden

    def forward(self, input, hx=None, *, projected=False, index=None):
        if not projected and index is None and not _takes(input):
            return nn.LSTM.forward(self, input, hx)
        return self._run(F.lstm, input, hx, projected, index)


class GRU(_RNNBase, nn.RNNBase):
    """Drop-in for nn.GRU; ``forward(input, hx=None, *, projected=False, index=None)`` as
    LSTM's (input then (T, B, 3H) per direction, or a table of such rows)."""

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)

    def forward(self, input, hx=None, *, projected=False, index=None):
        if not projected and index is None and not _takes(input):
            return nn.GRU.forward(self, input, hx)
        return self._run(F.gru, input, hx, projected, index)


class LSTMCell(nn.LSTMCell):
    def forward(self, input, hx=None):
        if not _takes(input):
            return super().forward(input, hx)
        return F.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class GRUCell(nn.GRUCell):
    def forward(self, input, hx=None):
        if not _takes(input):
            return super().forward(input, hx)
        return F.gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
