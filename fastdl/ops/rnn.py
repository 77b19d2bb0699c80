"""Recurrent family: LSTM and GRU cells and layers.

Every op runs one layer in one direction over a whole sequence (schemas and semantics in
csrc/ops.cpp): the forward over all time steps, and backpropagation through time in the backward
op. The public functions loop here over layers and directions (so torch.compile sees a plain
graph of custom ops), apply dropout between layers, and transpose batch_first; a cell is a layer
over one step. Native kernels: C++ on CPU, CUDA on GPU; Triton kernels (kernels/rnn.py) are
registered as ``fastdl::<op>_triton`` custom ops with the same schema. Both share the fake
kernels and the autograd formulas below.
"""

from collections.abc import Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from fastdl import _autocast, _backend, _checks, _ext
from fastdl.ops import _library

OPS = ("lstm_layer_fwd", "lstm_layer_bwd", "gru_layer_fwd", "gru_layer_bwd")
LSTM, GRU = "fastdl.lstm", "fastdl.gru"


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- fake kernels (all backends)


def _seq_fake(x, index, width, dtype=None):
    """A (T, B, width) output: (T, B) of x, or of index when x is its table."""
    T, B = (index if index is not None else x).shape[:2]
    return x.new_empty(T, B, width, dtype=dtype or x.dtype)


def _lstm_layer_fwd_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, index=None):
    hidden = w_hh.shape[0] // 4
    acc = _acc_dtype(x)
    return (
        _seq_fake(x, index, h0.shape[1]),
        torch.empty_like(h0, memory_format=torch.contiguous_format),
        torch.empty_like(c0, memory_format=torch.contiguous_format),
        _seq_fake(x, index, 4 * hidden, acc),
        _seq_fake(x, index, hidden, acc),
    )


def _grad_or_none(x, shape, wanted):
    return x.new_empty(shape if wanted else (0,))


def _weight_grad(x, w, wanted):
    """The gradient of an optional weight: empty when masked off or when there is no weight."""
    return _grad_or_none(x, w.shape if w is not None else (0,), wanted and w is not None)


def _lstm_layer_bwd_fake(
    grad_y, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, w_hr, lengths, reverse, y, gates, cs, mask,
    index=None,
):  # fmt: skip
    g = w_hh.shape[0]
    return (
        _grad_or_none(x, x.shape, mask[0]),
        x.new_empty(h0.shape),
        x.new_empty(c0.shape),
        _weight_grad(x, w_ih, mask[1]),
        _grad_or_none(x, w_hh.shape, mask[1]),
        _grad_or_none(x, (g,), mask[1]),
        _grad_or_none(x, (g,), mask[1]),
        _weight_grad(x, w_hr, mask[1]),
    )


def _gru_layer_fwd_fake(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, index=None):
    hidden = w_hh.shape[0] // 3
    return (
        _seq_fake(x, index, hidden),
        torch.empty_like(h0, memory_format=torch.contiguous_format),
        _seq_fake(x, index, 4 * hidden, _acc_dtype(x)),
    )


def _gru_layer_bwd_fake(
    grad_y, grad_hn, x, h0, w_ih, w_hh, lengths, reverse, y, gates, mask, index=None
):
    g = w_hh.shape[0]
    return (
        _grad_or_none(x, x.shape, mask[0]),
        x.new_empty(h0.shape),
        _weight_grad(x, w_ih, mask[1]),
        _grad_or_none(x, w_hh.shape, mask[1]),
        _grad_or_none(x, (g,), mask[1]),
        _grad_or_none(x, (g,), mask[1]),
    )


# ---------------------------------------------------------------- autograd (all backends)


def _x_to_save(x, w_ih):
    """What the backward op gets as x: x itself for dw_ih, or, without w_ih (x the caller's input
    projection or its table, which the backward does not read), a stride-0 stand-in of its shape
    that keeps no (T, B, G) activation alive."""
    return x if w_ih is not None else x.new_zeros(()).expand(x.shape)


def _lstm_setup(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, _b_ih, _b_hh, w_hr, lengths, reverse, index = inputs
    # Outputs without a gradient reach backward as None (the op takes them as optional), not
    # as zeros: gates alone would be a fresh (T, B, 4H) tensor of zeros every backward.
    ctx.set_materialize_grads(False)
    ctx.reverse = reverse
    ctx.save_for_backward(
        _x_to_save(x, w_ih), h0, c0, w_ih, w_hh, w_hr, lengths, index, output[0], *output[3:]
    )


def _lstm_backward(bwd):
    def backward(ctx, g_y, g_hn, g_cn, _g_gates, _g_cs):
        x, h0, c0, w_ih, w_hh, w_hr, lengths, index, y, gates, cs = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], any(need[3:8])]
        grads = bwd(
            g_y, g_hn, g_cn, x, h0, c0, w_ih, w_hh, w_hr, lengths, ctx.reverse, y, gates, cs, mask,
            index,
        )  # fmt: skip
        return *(g if n else None for g, n in zip(grads, need[:8], strict=True)), None, None, None

    return backward


def _gru_setup(ctx, inputs, output):
    x, h0, w_ih, w_hh, _b_ih, _b_hh, lengths, reverse, index = inputs
    ctx.set_materialize_grads(False)  # as in _lstm_setup
    ctx.reverse = reverse
    ctx.save_for_backward(_x_to_save(x, w_ih), h0, w_ih, w_hh, lengths, index, output[0], output[2])


def _gru_backward(bwd):
    def backward(ctx, g_y, g_hn, _g_gates):
        x, h0, w_ih, w_hh, lengths, index, y, gates = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], any(need[2:6])]
        grads = bwd(g_y, g_hn, x, h0, w_ih, w_hh, lengths, ctx.reverse, y, gates, mask, index)
        return *(g if n else None for g, n in zip(grads, need[:6], strict=True)), None, None, None

    return backward


_FAKE = {
    "lstm_layer_fwd": _lstm_layer_fwd_fake,
    "lstm_layer_bwd": _lstm_layer_bwd_fake,
    "gru_layer_fwd": _gru_layer_fwd_fake,
    "gru_layer_bwd": _gru_layer_bwd_fake,
}
_AUTOGRAD = {"lstm_layer": (_lstm_setup, _lstm_backward), "gru_layer": (_gru_setup, _gru_backward)}


def _register(ops: SimpleNamespace) -> SimpleNamespace:
    return _library.register(ops, _FAKE, _AUTOGRAD)


def _native_ops() -> SimpleNamespace | None:
    if _ext._C is None:
        return None
    return _register(SimpleNamespace(**{n: getattr(torch.ops.fastdl, n).default for n in OPS}))


def _triton_ops() -> SimpleNamespace | None:
    if not _ext.HAS_TRITON:
        return None
    from fastdl.kernels import rnn as launchers

    return _register(
        SimpleNamespace(
            **{
                n: torch.library.custom_op(
                    f"fastdl::{n}_triton", getattr(launchers, n), mutates_args=()
                )
                for n in OPS
            }
        )
    )


NATIVE = _native_ops()
TRITON = _triton_ops()


def _ops(op: str, x: torch.Tensor) -> SimpleNamespace:
    return _backend.namespace("rnn", op, x, NATIVE, TRITON)


# ---------------------------------------------------------------- public functions


PARAM_NAMES = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")  # a (layer, direction)'s group, as _layers


def _like_x(op: str, x: torch.Tensor, tensors) -> None:
    # Also here, not only in the kernels: a "meta" argument would route the call to the fake, and
    # a dtype mismatch raises _checks.DtypeError (the class torch's modules raise as well). A
    # non-float x is left to the op, whose message lists the dtypes its backend takes.
    for name, t in tensors:
        if t is not None:
            _checks.same_device(op, name, t, x)
            if x.is_floating_point():
                _checks.same_dtype(op, name, t, x)


def _integers(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """t (lengths, index) is an integer tensor on x's device."""
    _checks.same_device(op, name, t, x)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise _checks.DtypeError(f"{op}: {name} must be an integer tensor, got dtype {t.dtype}")


def _lengths(op: str, lengths, x: torch.Tensor, batch: int) -> torch.Tensor | None:
    """lengths as int64 (B,) on x's device; their values are checked by the op itself (reading
    them here would break torch.compile's graph)."""
    if lengths is None:
        return None
    if not isinstance(lengths, torch.Tensor):
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in lengths):
            raise TypeError(f"{op}: lengths must be integers, got {list(lengths)}")
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device=x.device)
    _integers(op, "lengths", lengths, x)
    if tuple(lengths.shape) != (batch,):
        raise RuntimeError(
            f"{op}: lengths must have shape ({batch},) (one per sequence), "
            f"got {list(lengths.shape)}"
        )
    return lengths.to(torch.int64)


def _state(op, name, t, x, shape):
    if t is None:
        return x.new_zeros(shape)
    _checks.same_device(op, name, t, x)
    _checks.same_dtype(op, name, t, x)
    if tuple(t.shape) != tuple(shape):
        raise RuntimeError(
            f"{op}: {name} must have shape {list(shape)} (num_layers * num_directions, batch, "
            f"{'hidden_size' if name == 'c0' else 'hidden_size or proj_size'}), "
            f"got {list(t.shape)}"
        )
    return t


def _layers(op, params, has_biases, num_layers, num_dirs, gates):
    """params in torch's _flat_weights order, grouped per (layer, direction) as
    (w_ih, w_hh, b_ih, b_hh, w_hr)."""
    if num_layers < 1:
        raise ValueError(f"{op}: num_layers must be >= 1, got {num_layers}")
    n = len(params)
    per = n // (num_layers * num_dirs)
    base = 4 if has_biases else 2
    if (
        per * num_layers * num_dirs != n
        or per not in (base, base + 1)
        or (gates == 3 and per != base)
    ):
        raise RuntimeError(
            f"{op}: expected {base} parameters per layer and direction "
            f"(w_ih, w_hh{', b_ih, b_hh' if has_biases else ''}"
            f"{', [w_hr]' if gates == 4 else ''}) for {num_layers} layer(s) x {num_dirs} "
            f"direction(s), got {n}"
        )
    groups = []
    for i in range(num_layers * num_dirs):
        w = params[i * per : (i + 1) * per]
        b = (w[2], w[3]) if has_biases else (None, None)
        groups.append((w[0], w[1], *b, w[base] if per > base else None))
    return groups


def _group_name(i: int, dirs: int) -> str:
    """The (layer, direction) of _layers' group i, as error messages name it."""
    return f"layer {i // dirs}" + " reverse" * (i % dirs)


def _projected(op, groups, dirs, x, index) -> bool:
    """Whether the first layer's input comes projected (its w_ih None, every direction): x then
    holds each direction's projection x W_ih^T side by side, (T, B, dirs * G), or a table of
    them (rows, dirs * G) with index."""
    missing = [g[0] is None for g in groups]
    if not any(missing):
        if index is not None:
            raise ValueError(
                f"{op}: index picks rows of a table of input projections: the first layer's "
                "w_ih must be None with it"
            )
        return False
    if any(missing[dirs:]) or not all(missing[:dirs]):
        i = next(i for i, m in enumerate(missing) if m)
        raise ValueError(
            f"{op}: w_ih of {_group_name(i, dirs)} is None, but only the first layer's w_ih "
            "may be None (for each of its directions): its input is then the input projection"
        )
    g = groups[0][1].shape[0]
    if dirs == 2 and x.shape[-1] != 2 * g:
        raise RuntimeError(
            f"{op}: without w_ih, a bidirectional layer's input holds both directions' input "
            f"projections ({'rows' if index is not None else 'T, B'}, 2 * {g}), got shape "
            f"{list(x.shape)}"
        )
    return True


def _index(op, index, input, batch_first):
    """index as int64 (T, B) (from (B, T) with batch_first; (T,) unbatched) on the table's device,
    and whether it is unbatched; its values are checked by the op."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{op}: index must be an integer tensor, got {type(index).__name__}")
    _integers(op, "index", index, input)
    if index.dim() not in (1, 2) or input.dim() != 2:
        raise _checks.RankError(
            f"{op}: with index, input is a table of input projections (rows, dirs * gates * "
            f"hidden_size) and index (T, B) ((B, T) with batch_first, (T,) unbatched), got "
            f"input {list(input.shape)} and index {list(index.shape)}"
        )
    unbatched = index.dim() == 1
    if unbatched:
        index = index.unsqueeze(1)
    elif batch_first:
        index = index.t()
    return index.to(torch.int64), unbatched


def _lstm_state(op: str, hx) -> tuple:
    """(h, c) of an LSTM's hx: None (zeros) or exactly two tensors."""
    if hx is None:
        return None, None
    if not (
        isinstance(hx, tuple | list)
        and len(hx) == 2
        and all(isinstance(t, torch.Tensor) for t in hx)
    ):
        raise TypeError(f"{op}: hx must be a tuple (h, c) of two tensors, or None")
    return tuple(hx)


def _check_dropout(op: str, dropout: float) -> None:
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"{op}: dropout must be in [0, 1], got {dropout}")


def _rnn(
    op,
    gates,
    input,
    hx,
    params,
    has_biases,
    num_layers,
    dropout,
    train,
    bidirectional,
    batch_first,
    lengths,
    index,
):
    _check_dropout(op, dropout)
    if index is not None:
        index, unbatched = _index(op, index, input, batch_first)
    elif input.dim() not in (2, 3):
        raise _checks.RankError(
            f"{op}: input must be (T, B, input_size), (B, T, input_size) with batch_first, or "
            f"unbatched (T, input_size), got shape {list(input.shape)}"
        )
    else:
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(1)
        elif batch_first:
            input = input.transpose(0, 1)
    if unbatched:
        hx = tuple(None if h is None else h.unsqueeze(1) for h in hx)
    steps, batch = (index if index is not None else input).shape[:2]
    if steps == 0:
        raise RuntimeError(f"{op}: expected a sequence length larger than 0, got 0")
    dirs = 2 if bidirectional else 1
    groups = _layers(op, params, has_biases, num_layers, dirs, gates)
    for i, group in enumerate(groups):
        where = "" if len(groups) == 1 else f" of {_group_name(i, dirs)}"
        if not isinstance(group[1], torch.Tensor):
            raise TypeError(f"{op}: w_hh{where} must be a tensor, got {type(group[1]).__name__}")
        _like_x(op, input, [(n + where, t) for n, t in zip(PARAM_NAMES, group, strict=True)])
    split = _projected(op, groups, dirs, input, index) and dirs == 2
    # (shape[-1]: a w_hr of the wrong rank reaches the op, which names the shape it wants.)
    hidden = groups[0][1].shape[-1] if groups[0][4] is None else groups[0][4].shape[-1]
    out_size = groups[0][1].shape[-1]
    lens = _lengths(op, lengths, input, batch)
    h0 = _state(op, "h0", hx[0], input, (num_layers * dirs, batch, out_size))
    c0 = _state(op, "c0", hx[1], input, (num_layers * dirs, batch, hidden)) if gates == 4 else None
    ops = _ops(op, input)
    x, hn, cn = input, [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            i = layer * dirs + d
            w_ih, w_hh, b_ih, b_hh, w_hr = groups[i]
            # Projected input, both directions: each reads its own half.
            xd = x.narrow(-1, d * w_hh.shape[0], w_hh.shape[0]) if split and layer == 0 else x
            idx = index if layer == 0 else None
            if gates == 4:
                args = (xd, h0[i], c0[i], w_ih, w_hh, b_ih, b_hh, w_hr, lens, d == 1, idx)
                y, h, c, _, _ = _library.call(ops.lstm_layer_fwd, *args)
                cn.append(c)
            else:
                y, h, _ = _library.call(
                    ops.gru_layer_fwd, xd, h0[i], w_ih, w_hh, b_ih, b_hh, lens, d == 1, idx
                )
            outs.append(y)
            hn.append(h)
        x = outs[0] if dirs == 1 else torch.cat(outs, -1)
        if dropout > 0 and train and layer < num_layers - 1:
            x = F.dropout(x, dropout, True)
    if dirs == 1 and x.requires_grad:
        # The last layer's y is what its backward reads as h(t-1): the caller gets a copy it may
        # edit in place (nn.ReLU(inplace=True) after a GRU), as torch's GRU allows (~0.3% of a
        # training step of the LSTM 512/512).
        x = x.clone()
    hn = torch.stack(hn)
    cn = torch.stack(cn) if gates == 4 else None
    if unbatched:
        x, hn = x.squeeze(1), hn.squeeze(1)
        cn = cn.squeeze(1) if cn is not None else None
    elif batch_first:
        x = x.transpose(0, 1)
    return x, hn, cn


def lstm(
    input: torch.Tensor,
    hx: tuple[torch.Tensor, torch.Tensor] | None,
    params: Sequence[torch.Tensor],
    has_biases: bool = True,
    num_layers: int = 1,
    dropout: float = 0.0,
    train: bool = False,
    bidirectional: bool = False,
    batch_first: bool = False,
    *,
    lengths: torch.Tensor | Sequence[int] | None = None,
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Multi-layer LSTM (Hochreiter & Schmidhuber, 1997) over a whole sequence, as
    ``torch.lstm`` / ``nn.LSTM``: per step the gate pre-activations ``W_ih x + b_ih + W_hh h +
    b_hh`` split into i, f, g, o (sigmoid, sigmoid, tanh, sigmoid), ``c' = f c + i g``,
    ``h' = o tanh(c')`` (times ``W_hr`` with a projection).

    ``params`` in ``nn.LSTM._flat_weights`` order: per layer and direction ``w_ih, w_hh[, b_ih,
    b_hh][, w_hr]`` (the projection, proj_size = w_hr.shape[0], is inferred as torch does).
    The first layer's ``w_ih`` may be None (every direction's): input then holds its input
    projection ``x W_ih^T``, (T, B, 4H) ((B, T, 4H) with batch_first, (T, 4H) unbatched), both
    directions' side by side (last dimension 2 * 4H) when bidirectional, and the op still adds
    the biases. The gradient reaches the projection, so
    ``input = F.embedding(ids, F.linear(emb.weight, w_ih))`` is an embedding and the layer's
    input GEMM done as a row lookup in a (vocab, 4H) table. ``index`` does that lookup in the op:
    input is then the table itself, (rows, dirs * 4H), and ``index`` integer (T, B) ((B, T) with
    batch_first, (T,) unbatched) the row each position reads (fastdl.models' LSTM language
    model: no (T, B, 4H) tensor is made by the caller; the table gets the summed gradients).
    input (T, B, I) ((B, T, I) with batch_first, (T, I) unbatched); hx = (h0, c0) of shapes
    (num_layers * dirs, B, proj_size or H) and (num_layers * dirs, B, H), or None for zeros.
    ``lengths`` (B,) ints on input's device, 1 <= lengths[b] <= T: each sequence's final state is
    taken at its own last step and outputs past its end are zero (torch's packed-sequence
    semantics). Dropout between layers only when ``train``.
    Returns ``(output, (h_n, c_n))``, output (T, B, dirs * (proj_size or H)).

    Dtypes: CPU float32/float64/bfloat16 (bfloat16 computed in float32), CUDA/Triton float32/
    float16/bfloat16. Backends: C++ (CPU), CUDA, Triton. Deterministic: yes (without dropout).
    """
    h, c = _lstm_state(LSTM, hx)
    input, h, c, *params = _autocast.lower(input, h, c, *params)
    y, hn, cn = _rnn(
        LSTM,
        4,
        input,
        (h, c),
        params,
        has_biases,
        num_layers,
        dropout,
        train,
        bidirectional,
        batch_first,
        lengths,
        index,
    )
    return y, (hn, cn)


def gru(
    input: torch.Tensor,
    hx: torch.Tensor | None,
    params: Sequence[torch.Tensor],
    has_biases: bool = True,
    num_layers: int = 1,
    dropout: float = 0.0,
    train: bool = False,
    bidirectional: bool = False,
    batch_first: bool = False,
    *,
    lengths: torch.Tensor | Sequence[int] | None = None,
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-layer GRU (Cho et al., 2014) over a whole sequence, as ``torch.gru`` / ``nn.GRU``:
    ``r, z = sigmoid(W_i{r,z} x + b_i{r,z} + W_h{r,z} h + b_h{r,z})``, ``n = tanh(W_in x + b_in +
    r (W_hn h + b_hn))``, ``h' = (1 - z) n + z h``.

    ``params`` per layer and direction ``w_ih, w_hh[, b_ih, b_hh]``; hx (num_layers * dirs, B,
    H) or None. Shapes, ``lengths``, dropout, dtypes and backends as :func:`lstm`, a first layer
    without ``w_ih`` and ``index`` too (its input then (T, B, 3H) per direction, or a table of
    such rows).
    Returns ``(output, h_n)``. Deterministic: yes (without dropout).
    """
    if hx is not None and not isinstance(hx, torch.Tensor):
        raise TypeError(f"{GRU}: hx must be a tensor (num_layers * dirs, B, H) or None")
    input, hx, *params = _autocast.follow_x(input, hx, *params)
    y, hn, _ = _rnn(
        GRU,
        3,
        input,
        (hx, None),
        params,
        has_biases,
        num_layers,
        dropout,
        train,
        bidirectional,
        batch_first,
        lengths,
        index,
    )
    return y, hn


def _cell_input(op, x, states, w_ih, w_hh, b_ih, b_hh):
    if w_ih is None:  # the layers' projected input (w_ih None) is not a cell feature
        raise TypeError(f"{op}: a cell's w_ih must be a tensor, got None")
    _like_x(op, x, [("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh)])
    if x.dim() not in (1, 2):
        raise _checks.RankError(
            f"{op}: input must be (B, input_size) or unbatched (input_size,), "
            f"got shape {list(x.shape)}"
        )
    unbatched = x.dim() == 1
    x = x.unsqueeze(0) if unbatched else x
    hidden = w_hh.shape[-1] if w_hh.dim() == 2 else 0
    out = []
    for name, s in states:
        if s is None:
            out.append(x.new_zeros(x.shape[0], hidden))
            continue
        _checks.same_device(op, name, s, x)
        _checks.same_dtype(op, name, s, x)
        if unbatched and s.dim() != 1:
            raise RuntimeError(
                f"{op}: an unbatched input takes an unbatched {name} (hidden_size,), "
                f"got shape {list(s.shape)}"
            )
        s = s.unsqueeze(0) if unbatched else s
        if tuple(s.shape) != (x.shape[0], hidden):
            raise RuntimeError(
                f"{op}: {name} must have shape {[x.shape[0], hidden]} (batch, hidden_size), "
                f"got {list(s.shape)}"
            )
        out.append(s)
    return unbatched, x.unsqueeze(0), out


def lstm_cell(
    input: torch.Tensor,
    hx: tuple[torch.Tensor, torch.Tensor] | None,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None = None,
    b_hh: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step, as ``torch.lstm_cell`` / ``nn.LSTMCell``: returns ``(h', c')``.

    input (B, I) or (I,); hx = (h, c) each (B, H) (or (H,)), or None for zeros. The gate
    non-linearities and the state update are one fused pass, forward and backward. Dtypes and
    backends as :func:`lstm`.
    """
    h, c = _lstm_state(LSTM, hx)
    input, h, c, w_ih, w_hh, b_ih, b_hh = _autocast.follow_x(input, h, c, w_ih, w_hh, b_ih, b_hh)
    unbatched, x, (h, c) = _cell_input(LSTM, input, (("h", h), ("c", c)), w_ih, w_hh, b_ih, b_hh)
    _, hn, cn, _, _ = _library.call(
        _ops(LSTM, x).lstm_layer_fwd, x, h, c, w_ih, w_hh, b_ih, b_hh, None, None, False
    )
    return (hn[0], cn[0]) if unbatched else (hn, cn)


def gru_cell(
    input: torch.Tensor,
    hx: torch.Tensor | None,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None = None,
    b_hh: torch.Tensor | None = None,
) -> torch.Tensor:
    """One GRU step, as ``torch.gru_cell`` / ``nn.GRUCell``: returns ``h'``. Shapes as
    :func:`lstm_cell`."""
    if hx is not None and not isinstance(hx, torch.Tensor):
        raise TypeError(f"{GRU}: hx must be a tensor (B, H) or None")
    input, hx, w_ih, w_hh, b_ih, b_hh = _autocast.follow_x(input, hx, w_ih, w_hh, b_ih, b_hh)
    unbatched, x, (h,) = _cell_input(GRU, input, (("h", hx),), w_ih, w_hh, b_ih, b_hh)
    _, hn, _ = _library.call(_ops(GRU, x).gru_layer_fwd, x, h, w_ih, w_hh, b_ih, b_hh, None, False)
    return hn[0] if unbatched else hn
