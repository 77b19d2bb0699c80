"""LSTM/GRU layers and cells on every backend against torch.nn in float64: outputs, final states
and every gradient; multiple layers, bidirectional, proj_size, no bias, batch_first, variable
lengths, odd sizes, batch 1 / sequence 1, non-contiguous and empty inputs, and bad input."""

import pytest
import torch
from conftest import cases
from norm_ref import assert_matches
from rnn_ref import RnnCase, check_rnn

import fastdl

L, G = "lstm", "gru"
NATIVE_CASES = [
    RnnCase(L, 5, 3, 7, 9),
    RnnCase(L, 1, 1, 4, 6),
    RnnCase(L, 13, 4, 10, 17, layers=2, bidir=True, batch_first=True, lengths=True),
    RnnCase(L, 6, 5, 5, 8, layers=2, proj=5, bias=False, lengths=True),
    RnnCase(L, 9, 3, 16, 33, bidir=True, proj=7, lengths=True),
    # Batches above 4 without lengths or projection: the fused whole-sequence loops (threads own
    # blocks of 16 hidden units; 37 leaves a remainder block).
    RnnCase(L, 7, 6, 5, 37, bidir=True),
    # Hidden 300: the recurrent products' depth (H forward, 4H / 3H backward) spans several k
    # blocks of the packed weights.
    RnnCase(L, 3, 5, 4, 300),
    RnnCase(G, 3, 5, 4, 300),
    RnnCase(G, 5, 3, 7, 9),
    RnnCase(G, 1, 1, 4, 6),
    RnnCase(G, 13, 4, 10, 17, layers=2, bidir=True, batch_first=True, lengths=True),
    RnnCase(G, 7, 5, 6, 19, layers=3, bias=False, lengths=True),
    RnnCase(G, 7, 6, 5, 37, layers=2, bidir=True, batch_first=True),
    # The first layer's input projected by the caller (w_ih None): small and fused batches,
    # lengths, projection, both directions side by side.
    RnnCase(L, 4, 2, 3, 5, projected=True),
    RnnCase(L, 6, 7, 5, 9, layers=2, bias=False, projected=True),
    RnnCase(L, 5, 3, 4, 6, bidir=True, proj=3, lengths=True, projected=True),
    RnnCase(G, 4, 2, 3, 5, lengths=True, projected=True),
    RnnCase(G, 5, 6, 5, 19, layers=2, bidir=True, batch_first=True, projected=True),
    # ... or as a table of projections whose rows the ops gather (index).
    RnnCase(L, 6, 7, 5, 9, layers=2, indexed=True),
    RnnCase(L, 5, 3, 4, 6, bidir=True, batch_first=True, lengths=True, indexed=True),
    RnnCase(L, 4, 5, 3, 6, proj=2, indexed=True),
    RnnCase(G, 4, 2, 3, 5, lengths=True, indexed=True),
    RnnCase(G, 5, 6, 5, 19, bidir=True, batch_first=True, indexed=True),
]
# The interpreter launches one program per step and row: a few steps of small batches.
INTERP_CASES = [
    RnnCase(L, 3, 2, 5, 6),
    RnnCase(L, 4, 3, 3, 5, bidir=True, proj=3, lengths=True),
    RnnCase(G, 3, 2, 5, 6),
    RnnCase(G, 4, 3, 3, 5, layers=2, bidir=True, lengths=True),
    RnnCase(L, 3, 2, 4, 5, bidir=True, lengths=True, projected=True),
    RnnCase(G, 3, 2, 4, 5, projected=True),
    RnnCase(L, 3, 2, 4, 5, bidir=True, lengths=True, indexed=True),
    RnnCase(G, 3, 2, 4, 5, batch_first=True, indexed=True),
]


@pytest.mark.parametrize(
    "backend,dtype,case", cases(NATIVE_CASES, INTERP_CASES), indirect=["backend"]
)
def test_layers_match_torch(backend, dtype, case):
    check_rnn(case, dtype, backend.device)


def _cell_inputs(kind, b, i, h, dtype, dev, bias=True):
    g = 4 if kind == L else 3
    t = lambda *s: torch.randn(*s, dtype=torch.float64, device=dev)
    params = [t(g * h, i), t(g * h, h)] + ([t(g * h), t(g * h)] if bias else [None, None])
    shape = (b, h) if b else (h,)
    states = [t(*shape)] + ([t(*shape)] if kind == L else [])
    x = t(b, i) if b else t(i)
    return x, states, params


def _cell(kind, x, states, params, ref):
    if ref and x.dim() == 1:  # torch's cell ops take batches only (nn.LSTMCell adds the dim)
        outs = _cell(kind, x[None], [s[None] for s in states], params, ref)
        return tuple(o[0] for o in outs)
    if kind == L:
        fn = torch.lstm_cell if ref else fastdl.lstm_cell
        return fn(x, tuple(states), *params)
    fn = torch.gru_cell if ref else fastdl.gru_cell
    return (fn(x, states[0], *params),)


CELL_CASES = [
    (L, 3, 7, 9, True),
    (L, 0, 5, 4, True),
    (L, 1, 3, 17, False),
    (G, 3, 7, 9, True),
    (G, 0, 5, 4, True),
    (G, 2, 33, 5, False),
]


@pytest.mark.parametrize("backend,dtype,case", cases(CELL_CASES), indirect=["backend"])
def test_cells_match_torch(backend, dtype, case):
    """Batch 0 in a case stands for unbatched (input_size,) input."""
    kind, b, i, h, bias = case
    x, states, params = _cell_inputs(kind, b, i, h, dtype, backend.device, bias)
    # Rounded to dtype first: the float64 reference then differs from the run in dtype only by
    # the computation.
    all_in = [a.to(dtype).double() for a in (x, *states, *(p for p in params if p is not None))]

    def run(dt, ref):
        leaves = [a.detach().to(dt).requires_grad_() for a in all_in]
        it = iter(leaves[1 + len(states) :])
        ps = [next(it) if p is not None else None for p in params]
        outs = _cell(kind, leaves[0], leaves[1 : 1 + len(states)], ps, ref)
        gs = [torch.linspace(-1, 1, o.numel(), device=o.device).to(dt).view(o.shape) for o in outs]
        return [*outs, *torch.autograd.grad(outs, leaves, gs)]

    ref = run(torch.float64, True)
    ours = run(dtype, False)
    base = run(dtype, True) if dtype in (torch.bfloat16, torch.float16) else [None] * len(ref)
    for k, (o, r, bl) in enumerate(zip(ours, ref, base, strict=True)):
        assert o.dtype == dtype
        assert_matches(o, r, bl, f"{kind} cell output/grad {k}")


@pytest.mark.parametrize("kind", [L, G])
def test_non_contiguous_inputs(backend, kind):
    """x as a strided slice of a wider tensor and transposed weights give the same results."""
    dev = backend.device
    mod = torch.nn.LSTM(6, 5) if kind == L else torch.nn.GRU(6, 5)
    mod = mod.to(dev)
    wide = torch.randn(4, 3, 12, device=dev)
    x = wide[:, :, ::2]
    assert not x.is_contiguous()
    fn = fastdl.lstm if kind == L else fastdl.gru
    params = [p.detach() for p in mod._flat_weights]
    params[0] = torch.empty(params[0].shape[::-1], device=dev).t().copy_(params[0])
    assert not params[0].is_contiguous()
    y, _ = fn(x, None, params)
    y_ref, _ = fn(x.contiguous(), None, [p.contiguous() for p in params])
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    y_torch, _ = mod(x)
    torch.testing.assert_close(y, y_torch, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", [L, G])
def test_small_activations_keep_their_precision(backend, kind):
    """Gates near 0 (inputs ~1e-3, weights ~1e-2): float32 within 2e-6 of the output's scale, as
    torch's (the Triton tanh once cancelled to a fixed ~6e-8 absolute error: 5e-5 here)."""
    torch.manual_seed(0)
    dev = backend.device
    ref = (torch.nn.LSTM(8, 16) if kind == L else torch.nn.GRU(8, 16)).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(1e-2)
    x = torch.randn(5, 2, 8, dtype=torch.float64) * 1e-3
    want = ref(x)[0]
    fn = fastdl.lstm if kind == L else fastdl.gru
    params = [p.detach().float().to(dev).requires_grad_() for p in ref._flat_weights]
    got, _ = fn(x.float().to(dev), None, params)
    assert (got.cpu().double() - want).abs().max() <= 2e-6 * want.abs().max()
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, list(ref.parameters()), g)
    got_grads = torch.autograd.grad(got, params, g.float().to(dev))
    for k, (a, b) in enumerate(zip(got_grads, want_grads, strict=True)):
        assert (a.cpu().double() - b).abs().max() <= 2e-6 * b.abs().max(), k


@pytest.mark.parametrize("kind,used", [(L, "y"), (L, "h_n"), (L, "c_n"), (G, "y"), (G, "h_n")])
def test_gradient_from_one_output(backend, kind, used):
    """A loss on one output only: the others reach the backward op as None, not as zeros, and
    every gradient still matches torch in float64. Batch 6 takes the fused whole-sequence
    loops."""
    dev = backend.device
    dtype = torch.float64 if torch.float64 in backend.dtypes else torch.float32
    torch.manual_seed(0)
    mod = (torch.nn.LSTM(5, 7) if kind == L else torch.nn.GRU(5, 7)).double().to(dev)
    x = torch.randn(4, 6, 5, dtype=torch.float64, device=dev)

    def loss(y, states):
        h, c = states if kind == L else (states, None)
        out = {"y": y, "h_n": h, "c_n": c}[used]
        return (out * out).sum()

    x_ours = x.to(dtype).requires_grad_()
    p_ours = [p.detach().to(dtype).requires_grad_() for p in mod.parameters()]
    fn = fastdl.lstm if kind == L else fastdl.gru
    ours = torch.autograd.grad(loss(*fn(x_ours, None, p_ours)), [x_ours, *p_ours])
    x_ref = x.clone().requires_grad_()
    ref = torch.autograd.grad(loss(*mod(x_ref)), [x_ref, *mod.parameters()])
    for k, (o, r) in enumerate(zip(ours, ref, strict=True)):
        assert_matches(o, r, None, f"{kind} {used} grad {k}")


@pytest.mark.parametrize("kind", [L, G])
def test_empty_batch(backend, kind):
    dev = backend.device
    mod = (torch.nn.LSTM(4, 3, 2) if kind == L else torch.nn.GRU(4, 3, 2)).to(dev)
    x = torch.randn(5, 0, 4, device=dev, requires_grad=True)
    fn = fastdl.lstm if kind == L else fastdl.gru
    y, h = fn(x, None, mod._flat_weights, num_layers=2)
    h = h[0] if kind == L else h
    assert y.shape == (5, 0, 3) and h.shape == (2, 0, 3)
    (gx,) = torch.autograd.grad(y.sum() + h.sum(), x)
    assert gx.shape == x.shape


def test_lengths_zero_past_end_and_final_state(backend):
    """A hand-checkable pattern: sequence 1 (length 2) of a batch of identical inputs must give
    the full sequence's first two outputs, zeros after, and its state after step 2."""
    dev = backend.device
    mod = torch.nn.LSTM(3, 4).to(dev)
    x = torch.randn(5, 1, 3, device=dev).expand(5, 2, 3)
    y, (h, c) = fastdl.lstm(x, None, mod._flat_weights, lengths=torch.tensor([5, 2], device=dev))
    y_full, _ = fastdl.lstm(x[:, :1], None, mod._flat_weights)
    y_two, (h_two, c_two) = fastdl.lstm(x[:2, :1], None, mod._flat_weights)
    # Batch 2 against batch 1: the BLAS may round the two GEMM shapes differently (it does on
    # AMD Zen 4), so these agree to float32 rounding, not bit for bit; the zeros are exact.
    tol = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(y[:, 0], y_full[:, 0], **tol)
    torch.testing.assert_close(y[:2, 1], y_two[:, 0], **tol)
    assert torch.equal(y[2:, 1], torch.zeros_like(y[2:, 1]))
    torch.testing.assert_close(h[0, 1], h_two[0, 0], **tol)
    torch.testing.assert_close(c[0, 1], c_two[0, 0], **tol)


def test_dropout_between_layers_only_in_training(backend):
    dev = backend.device
    mod = torch.nn.GRU(4, 8, 2).to(dev)
    x = torch.randn(6, 3, 4, device=dev)
    w = mod._flat_weights
    y_eval, _ = fastdl.gru(x, None, w, num_layers=2, dropout=0.5, train=False)
    y_ref, _ = mod.eval()(x)
    torch.testing.assert_close(y_eval, y_ref, rtol=1e-5, atol=1e-5)
    y_train, _ = fastdl.gru(x, None, w, num_layers=2, dropout=0.5, train=True)
    assert not torch.allclose(y_train, y_eval)
    y_p1, _ = fastdl.gru(x, None, w, num_layers=2, dropout=1.0, train=True)
    # All of layer 1's output dropped: layer 2 sees zeros, a function of its biases alone.
    y_zero, _ = fastdl.gru(torch.zeros(6, 3, 8, device=dev), None, w[4:])
    torch.testing.assert_close(y_p1, y_zero, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- bad input


def _lstm_args(dev="cpu", T=4, B=3, IN=5, H=6, proj=0, **over):
    mod = torch.nn.LSTM(IN, H, proj_size=proj).to(dev)
    args = {
        "input": torch.randn(T, B, IN, device=dev),
        "hx": None,
        "params": list(mod._flat_weights),
    }
    args.update(over)
    return args


def _no_w_ih(dev):
    return [None, *_lstm_args(dev)["params"][1:]]


def _index(dev):
    return torch.randint(0, 7, (4, 3), device=dev)


def _indexed(dev, **over):
    """fastdl.lstm's arguments in index mode: a (7, 24) table read at a (4, 3) index."""
    args = {"input": torch.randn(7, 24, device=dev), "params": _no_w_ih(dev), "index": _index(dev)}
    return _lstm_args(dev, **{**args, **over})


def _cast_first(params):
    return [params[0].to(torch.bfloat16), *params[1:]]


BAD = [
    (
        "input_size",
        lambda d: _lstm_args(d, input=torch.randn(4, 3, 7, device=d)),
        RuntimeError,
        r"fastdl.lstm: input size 7 of x does not match w_ih",
    ),
    (
        "h0_shape",
        lambda d: _lstm_args(
            d, hx=(torch.zeros(2, 3, 6, device=d), torch.zeros(1, 3, 6, device=d))
        ),
        RuntimeError,
        r"h0 must have shape \[1, 3, 6\] \(num_layers \* num_directions",
    ),
    (
        "c0_shape",
        lambda d: _lstm_args(
            d, hx=(torch.zeros(1, 3, 6, device=d), torch.zeros(1, 2, 6, device=d))
        ),
        RuntimeError,
        r"c0 must have shape \[1, 3, 6\]",
    ),
    (
        "h0_proj_shape",
        lambda d: _lstm_args(
            d, proj=2, hx=(torch.zeros(1, 3, 6, device=d), torch.zeros(1, 3, 6, device=d))
        ),
        RuntimeError,
        r"h0 must have shape \[1, 3, 2\]",
    ),
    (
        "lengths_too_long",
        lambda d: _lstm_args(d, lengths=torch.tensor([4, 5, 1], device=d)),
        RuntimeError,
        r"lengths must be <= the sequence length 4, got a length of 5",
    ),
    (
        "lengths_zero",
        lambda d: _lstm_args(d, lengths=torch.tensor([4, 0, 1], device=d)),
        RuntimeError,
        r"lengths must be >= 1, got a length of 0",
    ),
    (
        "lengths_negative",
        lambda d: _lstm_args(d, lengths=torch.tensor([-1, 2, 1], device=d)),
        RuntimeError,
        r"lengths must be >= 1, got a length of -1",
    ),
    (
        "lengths_device",
        lambda d: _lstm_args(d, lengths=torch.tensor([1, 2, 3], device="meta")),
        RuntimeError,
        r"lengths is on meta but x is on",
    ),
    (
        "lengths_shape",
        lambda d: _lstm_args(d, lengths=torch.tensor([1, 2], device=d)),
        RuntimeError,
        r"lengths must have shape \(3,\)",
    ),
    (
        "lengths_float",
        lambda d: _lstm_args(d, lengths=torch.tensor([1.0, 2, 3], device=d)),
        TypeError,
        r"lengths must be an integer tensor",
    ),
    (
        "lengths_float_list",
        lambda d: _lstm_args(d, lengths=[1.5, 2.0, 3.0]),
        TypeError,
        r"lengths must be integers",
    ),
    (
        "hx_one_state",
        lambda d: _lstm_args(d, hx=(torch.zeros(1, 3, 6, device=d),)),
        TypeError,
        r"hx must be a tuple \(h, c\) of two tensors",
    ),
    (
        "hx_none_state",
        lambda d: _lstm_args(d, hx=(torch.zeros(1, 3, 6, device=d), None)),
        TypeError,
        r"hx must be a tuple \(h, c\) of two tensors",
    ),
    (
        "empty_sequence",
        lambda d: _lstm_args(d, input=torch.randn(0, 3, 5, device=d)),
        RuntimeError,
        r"expected a sequence length larger than 0",
    ),
    (
        "dropout_high",
        lambda d: _lstm_args(d, dropout=1.5),
        ValueError,
        r"dropout must be in \[0, 1\], got 1.5",
    ),
    (
        "dropout_negative",
        lambda d: _lstm_args(d, dropout=-0.1),
        ValueError,
        r"dropout must be in \[0, 1\], got -0.1",
    ),
    (
        "mixed_dtype",
        lambda d: _lstm_args(d, params=_cast_first(_lstm_args(d)["params"])),
        TypeError,
        r"w_ih has dtype (BFloat16|torch.bfloat16) but x has dtype (Float|torch.float32)",
    ),
    (
        "int_dtype",
        lambda d: _lstm_args(d, input=torch.ones(4, 3, 5, device=d, dtype=torch.int32)),
        TypeError,
        r"x has dtype (Int|torch.int32); supported dtypes",
    ),
    (
        "mixed_device",
        lambda d: _lstm_args(
            d, hx=(torch.zeros(1, 3, 6, device="meta"), torch.zeros(1, 3, 6, device=d))
        ),
        RuntimeError,
        r"h0 is on meta but x is on",
    ),
    (
        "param_count",
        lambda d: _lstm_args(d, params=list(torch.nn.LSTM(5, 6)._flat_weights)[:3]),
        RuntimeError,
        r"expected 4 parameters per layer and direction",
    ),
    (
        "projected_width",
        lambda d: _lstm_args(d, input=torch.randn(4, 3, 23, device=d), params=_no_w_ih(d)),
        RuntimeError,
        r"without w_ih, x holds the input projection \(T, B, 24\)",
    ),
    (
        "projected_bidirectional_width",
        lambda d: _lstm_args(
            d,
            input=torch.randn(4, 3, 24, device=d),
            params=[None, *_lstm_args(d)["params"][1:]] * 2,
            bidirectional=True,
        ),
        RuntimeError,
        r"both directions' input projections \(T, B, 2 \* 24\)",
    ),
    (
        "w_hh_none",
        lambda d: _lstm_args(d, params=[_lstm_args(d)["params"][0], None], has_biases=False),
        TypeError,
        r"fastdl.lstm: w_hh must be a tensor, got NoneType",
    ),
    (
        # Three tensors without biases read as (w_ih, w_hh, w_hr): a bias is no projection.
        "bias_as_projection",
        lambda d: _lstm_args(d, params=_lstm_args(d)["params"][:3], has_biases=False),
        RuntimeError,
        r"w_hr must be \(proj_size, hidden_size=6\)",
    ),
    (
        "projected_second_layer",
        lambda d: _lstm_args(
            d,
            input=torch.randn(4, 3, 5, device=d),
            params=_lstm_args(d)["params"] + [None, *_lstm_args(d, IN=6)["params"][1:]],
            num_layers=2,
        ),
        ValueError,
        r"w_ih of layer 1 is None, but only the first layer's w_ih may be None",
    ),
    (
        "index_with_w_ih",
        lambda d: _lstm_args(d, input=torch.randn(7, 24, device=d), index=_index(d)),
        ValueError,
        r"index picks rows of a table of input projections: the first layer's w_ih must be None",
    ),
    (
        "index_float",
        lambda d: _indexed(d, index=_index(d).float()),
        TypeError,
        r"index must be an integer tensor, got dtype torch.float32",
    ),
    (
        "index_past_table",
        lambda d: _indexed(d, index=_index(d).index_fill(1, torch.tensor([1], device=d), 7)),
        RuntimeError,
        r"index out of range for a table of 7 rows, got 7",
    ),
    (
        "index_negative",
        lambda d: _indexed(d, index=_index(d).index_fill(0, torch.tensor([2], device=d), -1)),
        RuntimeError,
        r"index out of range for a table of 7 rows, got -1",
    ),
    (
        "index_rank",
        lambda d: _indexed(d, index=_index(d)[None]),
        RuntimeError,
        r"with index, input is a table of input projections \(rows, dirs \* gates",
    ),
    (
        "index_table_width",
        lambda d: _indexed(d, input=torch.randn(7, 23, device=d)),
        RuntimeError,
        r"without w_ih, x holds the input projection \(rows, 24\)",
    ),
    (
        "input_dims",
        lambda d: _lstm_args(d, input=torch.randn(2, 4, 3, 5, device=d)),
        RuntimeError,
        r"input must be \(T, B, input_size\)",
    ),
]


@pytest.mark.parametrize("name", [b[0] for b in BAD])
def test_bad_input(backend, name):
    _, make, exc, match = next(b for b in BAD if b[0] == name)
    with pytest.raises(exc, match=match):
        fastdl.lstm(**make(backend.device))


def test_bad_proj_size(backend):
    """proj_size >= hidden_size: w_hr of shape (H, H) reaches the op, which names the limit."""
    dev = backend.device
    mod = torch.nn.LSTM(5, 6, proj_size=4).to(dev)
    params = list(mod._flat_weights)
    params[4] = torch.randn(6, 6, device=dev)
    params[1] = torch.randn(24, 6, device=dev)
    with pytest.raises(RuntimeError, match=r"0 < proj_size < hidden_size"):
        fastdl.lstm(torch.randn(3, 2, 5, device=dev), None, params)


def test_bad_gru_and_cells(backend):
    dev = backend.device
    gru = torch.nn.GRU(5, 6).to(dev)
    with pytest.raises(TypeError, match=r"fastdl.gru: a cell's w_ih must be a tensor, got None"):
        fastdl.gru_cell(torch.randn(2, 18, device=dev), None, None, gru.weight_hh_l0)
    with pytest.raises(RuntimeError, match=r"fastdl.gru: h0 must have shape \[1, 3, 6\]"):
        fastdl.gru(
            torch.randn(4, 3, 5, device=dev), torch.zeros(1, 3, 7, device=dev), gru._flat_weights
        )
    with pytest.raises(RuntimeError, match=r"fastdl.gru: input size 4 of x does not match"):
        fastdl.gru(torch.randn(4, 3, 4, device=dev), None, gru._flat_weights)
    cell = torch.nn.LSTMCell(5, 6).to(dev)
    w = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    with pytest.raises(RuntimeError, match=r"fastdl.lstm: c must have shape \[2, 6\]"):
        fastdl.lstm_cell(
            torch.randn(2, 5, device=dev),
            (torch.zeros(2, 6, device=dev), torch.zeros(2, 5, device=dev)),
            *w,
        )
    with pytest.raises(RuntimeError, match=r"an unbatched input takes an unbatched h"):
        fastdl.lstm_cell(
            torch.randn(5, device=dev),
            (torch.zeros(1, 6, device=dev), torch.zeros(1, 6, device=dev)),
            *w,
        )
    with pytest.raises(TypeError, match=r"fastdl.gru: hx must be a tensor"):
        fastdl.gru(
            torch.randn(4, 3, 5, device=dev), (torch.zeros(1, 3, 6, device=dev),), gru._flat_weights
        )
    with pytest.raises(RuntimeError, match=r"fastdl.lstm: b_ih must have shape \[24\]"):
        fastdl.lstm_cell(torch.randn(2, 5, device=dev), None, w[0], w[1], w[2][:20], w[3])
