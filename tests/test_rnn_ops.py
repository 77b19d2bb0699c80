"""The op contract (DESIGN §2) for the rnn family: opcheck of every raw op on every backend,
gradcheck in float64 (CPU native), torch.compile(fullgraph=True) against eager for functions and
cells, bit-identical repeated backward, and the CPU kernels under every ISA this CPU supports."""

import pytest
import torch
from conftest import BF16_ISAS, ISAS, NATIVE_CPU, cases
from rnn_ref import RnnCase, check_rnn

import fastdl
from fastdl.ops import rnn as rnn_ops

# ---------------------------------------------------------------- opcheck


def _forward_samples(dev, grad):
    """(id, op name, args) of the forward ops; inputs require grad when `grad`."""

    def t(*shape):
        return (0.5 * torch.randn(shape, device=dev)).requires_grad_(grad)

    T, B, IN, H, P = 3, 2, 5, 4, 3
    x, h0, c0, hp0 = t(T, B, IN), t(B, H), t(B, H), t(B, P)
    wl = (t(4 * H, IN), t(4 * H, H), t(4 * H), t(4 * H))
    wg = (t(3 * H, IN), t(3 * H, H), t(3 * H), t(3 * H))
    wlp, w_hr = t(4 * H, P), t(P, H)
    lens = torch.tensor([2, 3], device=dev)
    xl, xg = t(T, B, 4 * H), t(T, B, 3 * H)  # input projections (no w_ih)
    tl, tg = t(7, 4 * H), t(7, 3 * H)  # tables of them, read at idx (a row twice, some never)
    idx = torch.tensor([[0, 6], [3, 3], [5, 0]], device=dev)
    return [
        ("lstm", "lstm_layer_fwd", (x, h0, c0, *wl, None, None, False)),
        ("lstm_rev_len", "lstm_layer_fwd", (x, h0, c0, *wl, None, lens, True)),
        (
            "lstm_proj_nobias",
            "lstm_layer_fwd",
            (x, hp0, c0, wl[0], wlp, None, None, w_hr, lens, False),
        ),
        ("gru", "gru_layer_fwd", (x, h0, *wg, None, False)),
        ("gru_rev_len", "gru_layer_fwd", (x, h0, wg[0], wg[1], None, wg[3], lens, True)),
        ("lstm_projected", "lstm_layer_fwd", (xl, h0, c0, None, *wl[1:], None, lens, False)),
        ("gru_projected", "gru_layer_fwd", (xg, h0, None, *wg[1:], None, True)),
        ("lstm_indexed", "lstm_layer_fwd", (tl, h0, c0, None, *wl[1:], None, lens, True, idx)),
        ("gru_indexed", "gru_layer_fwd", (tg, h0, None, *wg[1:], None, False, idx)),
    ]


# Each backward sample: the forward's saved tensors and both output masks of interest.
BWD_MASKS = {"all": [True, True], "x_only": [True, False], "params_only": [False, True]}


def _backward_sample(ops, dev, fwd_id, mask):
    _, op, args = next(s for s in _forward_samples(dev, False) if s[0] == fwd_id)
    with torch.no_grad():
        out = getattr(ops, op)(*args)
    y = out[0]
    if op == "lstm_layer_fwd":
        x, h0, c0, w_ih, w_hh, _, _, w_hr, lens, rev, *index = args
        return "lstm_layer_bwd", (
            torch.randn_like(y),
            torch.randn_like(out[1]),
            None,
            x,
            h0,
            c0,
            w_ih,
            w_hh,
            w_hr,
            lens,
            rev,
            y,
            out[3],
            out[4],
            mask,
            *index,
        )
    x, h0, w_ih, w_hh, _, _, lens, rev, *index = args
    return "gru_layer_bwd", (
        torch.randn_like(y),
        None,
        x,
        h0,
        w_ih,
        w_hh,
        lens,
        rev,
        y,
        out[2],
        mask,
        *index,
    )


FWD_IDS = [s[0] for s in _forward_samples("cpu", False)]


@pytest.mark.parametrize("sample", FWD_IDS)
@pytest.mark.parametrize("grad", [False, True], ids=["plain", "requires_grad"])
def test_opcheck_forward(backend, sample, grad):
    _, op, args = next(s for s in _forward_samples(backend.device, grad) if s[0] == sample)
    torch.library.opcheck(getattr(backend.ops(rnn_ops), op), args)


@pytest.mark.parametrize("sample", FWD_IDS)
@pytest.mark.parametrize("mask", list(BWD_MASKS))
def test_opcheck_backward(backend, sample, mask):
    ops = backend.ops(rnn_ops)
    op, args = _backward_sample(ops, backend.device, sample, BWD_MASKS[mask])
    torch.library.opcheck(getattr(ops, op), args)


# ---------------------------------------------------------------- gradcheck (float64, CPU native)


def _gradcheck_case(kind, layers=1, bidir=False, proj=0, lengths=None, bias=True):
    mod = (
        torch.nn.LSTM(3, 4, layers, bias=bias, bidirectional=bidir, proj_size=proj)
        if kind == "lstm"
        else torch.nn.GRU(3, 4, layers, bias=bias, bidirectional=bidir)
    )
    mod = mod.double()
    params = [p.detach().clone().requires_grad_() for p in mod._flat_weights]
    dirs = 2 if bidir else 1
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(layers * dirs, 2, proj or 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(layers * dirs, 2, 4, dtype=torch.float64, requires_grad=True)
    lens = None if lengths is None else torch.tensor(lengths)
    n = len(params)

    if kind == "lstm":

        def fn(x, h0, c0, *ps):
            y, (h, c) = fastdl.lstm(
                x, (h0, c0), ps[:n], bias, layers, 0.0, False, bidir, lengths=lens
            )
            return y, h, c

        return fn, (x, h0, c0, *params)

    def fn(x, h0, *ps):
        return fastdl.gru(x, h0, ps[:n], bias, layers, 0.0, False, bidir, lengths=lens)

    return fn, (x, h0, *params)


def _gradcheck_indexed(kind):
    """The index mode: gradients of the table (rows read twice, one never) and of the rest."""
    mod = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(3, 4).double()
    params = [p.detach().clone().requires_grad_() for p in mod._flat_weights][1:]
    table = torch.randn(5, mod.weight_ih_l0.shape[0], dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[0, 3], [3, 1], [4, 0], [0, 0]])
    run = fastdl.lstm if kind == "lstm" else fastdl.gru

    def fn(table, *ps):
        y, h = run(table, None, [None, *ps], index=index)
        return y, *(h if kind == "lstm" else (h,))

    return fn, (table, *params)


@pytest.mark.parametrize("backend", [NATIVE_CPU], indirect=True, ids=str)
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gradcheck_indexed(backend, kind):
    fn, inputs = _gradcheck_indexed(kind)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


GRADCHECK = {
    "lstm": ("lstm",),
    "lstm_bi_len": ("lstm", 1, True, 0, [4, 2]),
    "lstm_2layer_proj_len": ("lstm", 2, False, 2, [1, 3]),
    "lstm_nobias": ("lstm", 1, False, 0, None, False),
    "gru": ("gru",),
    "gru_bi_2layer_len": ("gru", 2, True, 0, [3, 4]),
}


@pytest.mark.parametrize("backend", [NATIVE_CPU], indirect=True, ids=str)
@pytest.mark.parametrize("case", list(GRADCHECK))
def test_gradcheck(backend, case):
    fn, inputs = _gradcheck_case(*GRADCHECK[case])
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", [NATIVE_CPU], indirect=True, ids=str)
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gradcheck_cells(backend, kind):
    g = 4 if kind == "lstm" else 3

    def t(*s):
        return torch.randn(*s, dtype=torch.float64, requires_grad=True)

    ps = (t(g * 5, 3), t(g * 5, 5), t(g * 5), t(g * 5))
    if kind == "lstm":
        inputs = (t(2, 3), t(2, 5), t(2, 5), *ps)
        fn = lambda x, h, c, *p: fastdl.lstm_cell(x, (h, c), *p)
    else:
        inputs = (t(2, 3), t(2, 5), *ps)
        fn = fastdl.gru_cell
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- torch.compile


def _compile_fns(dev):
    lstm = torch.nn.LSTM(5, 6, 2, bidirectional=True).to(dev)
    gru = torch.nn.GRU(5, 6, batch_first=True).to(dev)
    lcell, gcell = torch.nn.LSTMCell(5, 6).to(dev), torch.nn.GRUCell(5, 6).to(dev)
    lens = torch.tensor([4, 1, 3], device=dev)
    index = torch.tensor([[0, 5, 2], [5, 5, 1], [3, 0, 4]], device=dev)
    # The weights as lists: Dynamo refuses to trace anything touching an nn.LSTM/nn.GRU instance.
    lstm, gru = list(lstm._flat_weights), list(gru._flat_weights)
    lcell = [lcell.weight_ih, lcell.weight_hh, lcell.bias_ih, lcell.bias_hh]
    gcell = [gcell.weight_ih, gcell.weight_hh, gcell.bias_ih, gcell.bias_hh]
    return {
        "lstm_bi_len": (
            lambda x: fastdl.lstm(x, None, lstm, True, 2, 0.0, False, True, lengths=lens),
            (4, 3, 5),
        ),
        "gru_batch_first": (
            lambda x: fastdl.gru(x, None, gru, batch_first=True),
            (3, 4, 5),
        ),
        # The first layer's input projected in the compiled graph (w_ih None).
        "gru_projected": (
            lambda x: fastdl.gru(x @ gru[0].t(), None, [None, *gru[1:]], batch_first=True),
            (3, 4, 5),
        ),
        # ... and as a table the op reads at an index.
        "lstm_indexed": (
            lambda x: fastdl.lstm(x @ lstm[0].t(), None, [None, *lstm[1:4]], index=index),
            (6, 5),
        ),
        "lstm_cell": (
            lambda x: fastdl.lstm_cell(x, None, *lcell),
            (3, 5),
        ),
        "gru_cell": (
            lambda x: fastdl.gru_cell(x, None, *gcell),
            (3, 5),
        ),
    }


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


# The interpreter: the cells and a one-layer GRU (a bidirectional 2-layer LSTM takes ~30 s there).
COMPILE_CASES = cases(
    list(_compile_fns("cpu")),
    ["lstm_cell", "gru_batch_first", "gru_projected", "lstm_indexed"],
    dtypes=False,
)


@pytest.mark.parametrize("backend,case", COMPILE_CASES, indirect=["backend"])
def test_compile_matches_eager(backend, case):
    fn, shape = _compile_fns(backend.device)[case]
    x = torch.randn(shape, device=backend.device)

    def run(f):
        xx = x.clone().requires_grad_()
        outs = _flat(f(xx))
        g = [torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape) for o in outs]
        return [*outs, *torch.autograd.grad(outs, xx, g)]

    torch._dynamo.reset()
    for e, c in zip(run(fn), run(torch.compile(fn, fullgraph=True)), strict=True):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("lengths", [True, False])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_repeated_backward_is_bit_identical(backend, kind, lengths):
    # Without lengths, batch 5 takes the CPU's fused whole-sequence loops.
    shape = (6, 5, 7, 33) if not backend.interpreted else (3, 2, 3, 5)
    T, B, IN, H = shape
    mod = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(IN, H, bidirectional=True)
    mod = mod.to(backend.device)
    fn = fastdl.lstm if kind == "lstm" else fastdl.gru
    x = torch.randn(T, B, IN, device=backend.device)
    lens = torch.randint(1, T + 1, (B,), device=backend.device) if lengths else None
    runs = []
    for _ in range(2):
        xx = x.clone().requires_grad_()
        y, _ = fn(xx, None, mod._flat_weights, bidirectional=True, lengths=lens)
        runs.append(torch.autograd.grad(y, [xx, *mod.parameters()], torch.ones_like(y)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- CPU ISA paths


@pytest.mark.parametrize("backend", [NATIVE_CPU], indirect=True, ids=str)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_isa_paths(backend, isa, dtype):
    """Hidden sizes around the vector widths and their tails, and values in the saturated range
    of the gates (the float exp clamps)."""
    before = fastdl.cpu_isa()
    fastdl.set_cpu_isa(isa)
    try:
        # Batch 2 takes the small-batch sequence kernels, batch 5 the per-step ones with lengths
        # and the fused whole-sequence loops without.
        for h in (1, 17, 40):
            for b in (2, 5):
                check_rnn(RnnCase("lstm", 3, b, 3, h, bidir=True, lengths=True), dtype)
                check_rnn(RnnCase("gru", 3, b, 3, h, lengths=True), dtype)
            check_rnn(RnnCase("lstm", 3, 5, 3, h, bidir=True), dtype)
            check_rnn(RnnCase("gru", 3, 5, 3, h, bidir=True), dtype)
        # Batch 1: five 16-unit register blocks of the small-batch kernels, the last one short,
        # split unevenly between two threads.
        check_rnn(RnnCase("lstm", 3, 1, 3, 70), dtype)
        check_rnn(RnnCase("gru", 3, 1, 3, 70), dtype)
        mod = torch.nn.LSTM(3, 16)
        x = 40 * torch.randn(4, 2, 3)
        y, (h, c) = fastdl.lstm(x.to(dtype), None, [p.to(dtype) for p in mod._flat_weights])
        y_ref, (_, c_ref) = mod.double()(x.double())
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c.double(), c_ref, rtol=1e-5, atol=1e-6)
    finally:
        fastdl.set_cpu_isa(before)


@pytest.mark.parametrize("backend", [NATIVE_CPU], indirect=True, ids=str)
@pytest.mark.parametrize("isa", BF16_ISAS)
def test_isa_paths_bfloat16(backend, isa):
    """bfloat16 layers under every ISA: with AVX512-BF16 their sequence-sized GEMMs (input
    projection, weight and input gradients) multiply bfloat16 operands, the gate gradients rounded
    to bfloat16; below it they run widened to float32. Both within twice torch's bfloat16 error."""
    before = fastdl.cpu_isa()
    fastdl.set_cpu_isa(isa)
    try:
        for b in (2, 7):
            check_rnn(RnnCase("lstm", 9, b, 33, 20, bidir=True, lengths=True), torch.bfloat16)
            check_rnn(RnnCase("gru", 9, b, 33, 17, layers=2), torch.bfloat16)  # odd k
        check_rnn(RnnCase("lstm", 6, 3, 5, 8, proj=3), torch.bfloat16)
        check_rnn(RnnCase("gru", 6, 3, 5, 8, indexed=True), torch.bfloat16)
    finally:
        fastdl.set_cpu_isa(before)
