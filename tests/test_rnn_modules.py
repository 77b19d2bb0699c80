"""fastdl.nn.LSTM / GRU / LSTMCell / GRUCell as drop-ins for their torch.nn twins: same
parameters and state_dict, same outputs and gradients, PackedSequence in and out, eval mode with
gradients, torch.compile(fullgraph=True), and fastdl.patch."""

import weakref

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastdl

TWINS = [
    (
        nn.LSTM,
        fastdl.nn.LSTM,
        {"input_size": 5, "hidden_size": 7, "num_layers": 2, "bidirectional": True},
    ),
    (
        nn.LSTM,
        fastdl.nn.LSTM,
        {"input_size": 5, "hidden_size": 7, "proj_size": 3, "batch_first": True},
    ),
    (nn.GRU, fastdl.nn.GRU, {"input_size": 5, "hidden_size": 7, "num_layers": 2, "bias": False}),
    (
        nn.GRU,
        fastdl.nn.GRU,
        {"input_size": 5, "hidden_size": 6, "bidirectional": True, "batch_first": True},
    ),
]
IDS = ["lstm_2layer_bi", "lstm_proj_bf", "gru_2layer_nobias", "gru_bi_bf"]


def _pair(torch_cls, ours_cls, kw, dev):
    ref = torch_cls(**kw).to(dev)
    ours = ours_cls(**kw).to(dev)
    ours.load_state_dict(ref.state_dict())
    # LSTM/GRU: nn.RNNBase (Dynamo refuses nn.LSTM/nn.GRU instances); cells: torch's cell.
    assert isinstance(ours, nn.RNNBase if issubclass(torch_cls, nn.RNNBase) else torch_cls)
    assert repr(ours) == repr(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())
    return ref, ours


def _grads(mod, outs, inputs):
    flat = [o for o in outs if isinstance(o, torch.Tensor)]
    loss = sum(
        (o * torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape)).sum() for o in flat
    )
    return torch.autograd.grad(loss, [*inputs, *mod.parameters()], retain_graph=True)


def _flat(out):
    y, h = out
    return [y, *(h if isinstance(h, tuple) else (h,))]


@pytest.mark.parametrize("twin", range(len(TWINS)), ids=IDS)
def test_module_matches_torch(backend, twin):
    torch_cls, ours_cls, kw = TWINS[twin]
    ref, ours = _pair(torch_cls, ours_cls, kw, backend.device)
    x = torch.randn(3, 4, 5, device=backend.device, requires_grad=True)
    r, o = _flat(ref(x)), _flat(ours(x))
    for a, b in zip(o, r, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    for a, b in zip(_grads(ours, o, [x]), _grads(ref, r, [x]), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("twin", range(len(TWINS)), ids=IDS)
def test_weights_from_functional_call_and_parametrizations(backend, twin):
    # The module reads its parameters per call, as torch's does: torch.func.functional_call's
    # substitutes and a parametrization's recomputed weight, each with its gradient.
    torch_cls, ours_cls, kw = TWINS[twin]
    ref, ours = _pair(torch_cls, ours_cls, kw, backend.device)
    x = torch.randn(3, 4, 5, device=backend.device)
    params = {k: torch.randn_like(v).requires_grad_() for k, v in ref.named_parameters()}
    r, o = (_flat(torch.func.functional_call(m, params, (x,))) for m in (ref, ours))
    for a, b in zip(o, r, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    grads = (torch.autograd.grad(out[0].square().sum(), list(params.values())) for out in (o, r))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    for mod in (ref, ours):
        torch.nn.utils.parametrizations.weight_norm(mod, "weight_hh_l0")
        with torch.no_grad():
            mod.parametrizations.weight_hh_l0.original0.mul_(2)
    r, o = _flat(ref(x)), _flat(ours(x))
    for a, b in zip(o, r, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    for a, b in zip(_grads(ours, o, []), _grads(ref, r, []), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("twin", range(len(TWINS)), ids=IDS)
def test_packed_sequence_in_and_out(backend, twin):
    torch_cls, ours_cls, kw = TWINS[twin]
    ref, ours = _pair(torch_cls, ours_cls, kw, backend.device)
    bf = kw.get("batch_first", False)
    x = torch.randn((4, 5, 5) if bf else (5, 4, 5), device=backend.device, requires_grad=True)
    packed = pack_padded_sequence(x, torch.tensor([3, 5, 1, 3]), bf, enforce_sorted=False)
    r, o = ref(packed), ours(packed)
    assert isinstance(o[0], PackedSequence)
    assert torch.equal(o[0].batch_sizes, r[0].batch_sizes)
    assert torch.equal(o[0].sorted_indices, r[0].sorted_indices)
    ro, oo = [r[0].data, *_flat(r)[1:]], [o[0].data, *_flat(o)[1:]]
    for a, b in zip(oo, ro, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    for a, b in zip(_grads(ours, oo, [x]), _grads(ref, ro, [x]), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    _, lens = pad_packed_sequence(o[0], bf)
    assert lens.tolist() == [3, 5, 1, 3]


def test_unbatched_and_initial_state(backend):
    ref, ours = _pair(nn.LSTM, fastdl.nn.LSTM, {"input_size": 3, "hidden_size": 4}, backend.device)
    x = torch.randn(6, 3, device=backend.device)
    hx = (torch.randn(1, 4, device=backend.device), torch.randn(1, 4, device=backend.device))
    for a, b in zip(_flat(ours(x, hx)), _flat(ref(x, hx)), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_cells_match_torch(backend, kind):
    torch_cls, ours_cls = (
        (nn.LSTMCell, fastdl.nn.LSTMCell) if kind == "lstm" else (nn.GRUCell, fastdl.nn.GRUCell)
    )
    ref, ours = _pair(torch_cls, ours_cls, {"input_size": 5, "hidden_size": 6}, backend.device)
    x = torch.randn(3, 5, device=backend.device, requires_grad=True)
    r, o = ref(x), ours(x)
    r, o = (list(r), list(o)) if kind == "lstm" else ([r], [o])
    for a, b in zip(o, r, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    for a, b in zip(_grads(ours, o, [x]), _grads(ref, r, [x]), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_eval_mode_backward_and_dropout(backend):
    """Eval mode: no dropout, gradients still flow. Training: dropout between layers."""
    ours = fastdl.nn.GRU(4, 5, 2, dropout=0.5).to(backend.device)
    x = torch.randn(3, 2, 4, device=backend.device, requires_grad=True)
    ours.eval()
    y1, _ = ours(x)
    y2, _ = ours(x)
    assert torch.equal(y1, y2)
    (gx,) = torch.autograd.grad(y1.sum(), x)
    assert gx.abs().sum() > 0
    ours.train()
    assert not torch.allclose(ours(x)[0], y1)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_compile_fullgraph(backend, kind):
    cls = fastdl.nn.LSTM if kind == "lstm" else fastdl.nn.GRU
    mod = cls(4, 5, 2, bidirectional=True).to(backend.device)
    x = torch.randn(3, 2, 4, device=backend.device)
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True)
    for a, b in zip(_flat(compiled(x)), _flat(mod(x)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_patch_swaps_rnn_modules(backend):
    model = nn.Sequential(nn.LSTMCell(3, 4), nn.GRUCell(3, 4))
    model.add_module("lstm", nn.LSTM(3, 4))
    model.add_module("gru", nn.GRU(3, 4))
    report = fastdl.patch(model)
    assert [type(m) for m in model] == [
        fastdl.nn.LSTMCell,
        fastdl.nn.GRUCell,
        fastdl.nn.LSTM,
        fastdl.nn.GRU,
    ]
    assert len(report.swapped) == 4
    ref = nn.LSTM(3, 4)
    ref.load_state_dict(model.lstm.state_dict())
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(model.lstm(x)[0], ref(x)[0], rtol=2e-5, atol=2e-5)


BAD_MODULE_CALLS = {
    "lstm_float64_x": (lambda M: M.LSTM(5, 6), (torch.randn(3, 2, 5, dtype=torch.float64),)),
    "gru_bfloat16_x": (lambda M: M.GRU(5, 6), (torch.randn(3, 2, 5, dtype=torch.bfloat16),)),
    "lstm_4d_x": (lambda M: M.LSTM(5, 6), (torch.randn(3, 2, 2, 5),)),
    "gru_1d_x": (lambda M: M.GRU(5, 6), (torch.randn(5),)),
    "lstm_cell_3d_x": (lambda M: M.LSTMCell(5, 6), (torch.randn(1, 2, 5),)),
    "gru_cell_float64_x": (lambda M: M.GRUCell(5, 6), (torch.randn(2, 5, dtype=torch.float64),)),
    "gru_cell_float64_h": (
        lambda M: M.GRUCell(5, 6),
        (torch.randn(2, 5), torch.randn(2, 6, dtype=torch.float64)),
    ),
}


@pytest.mark.parametrize("case", BAD_MODULE_CALLS)
def test_bad_input_raises_torchs_exception_class(case):
    """A mistake torch.nn answers with ValueError (the modules' dtype and rank checks) or
    RuntimeError (its ops') is answered with an exception of that class too (fastdl's DtypeError
    and RankError derive from both, and DtypeError from TypeError), so code written against torch
    catches it."""
    build, args = BAD_MODULE_CALLS[case]
    with pytest.raises(Exception) as torch_error:
        build(nn)(*args)
    with pytest.raises(torch_error.type, match="fastdl"):
        build(fastdl.nn)(*args)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_packed_sequence_under_autocast_keeps_its_dtype(kind):
    """torch autocasts the padded lstm/gru overloads, not the packed ones: under CPU autocast a
    packed float32 sequence gives float32 outputs and states, as torch's module does (whose
    GRU still runs its matmuls in bfloat16), here with float32's values."""
    torch.manual_seed(0)
    ref = getattr(nn, kind)(3, 4)
    ours = getattr(fastdl.nn, kind)(3, 4)
    ours.load_state_dict(ref.state_dict())
    packed = pack_padded_sequence(torch.randn(4, 3, 3), [4, 2, 1])
    exact = ref(packed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, got = ref(packed), ours(packed)

    def flat(out):
        return [out[0].data, *out[1]] if kind == "LSTM" else [out[0].data, out[1]]

    for g, a, e in zip(flat(got), flat(autocast), flat(exact), strict=True):
        assert g.dtype == a.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kind,kwargs,shape",
    [
        ("GRU", {}, (5, 2, 3)),
        ("LSTM", {"num_layers": 2}, (5, 2, 3)),
        ("GRU", {"batch_first": True}, (2, 5, 3)),
        ("LSTM", {"proj_size": 2}, (5, 3)),
    ],
)
def test_output_edited_in_place(backend, kind, kwargs, shape):
    """The output may be edited in place before backward (nn.ReLU(inplace=True) after the RNN),
    as with torch's float64 modules: the layer's backward reads its own copy of h(t-1)."""
    torch.manual_seed(0)
    dtype = torch.float64 if torch.float64 in backend.dtypes else torch.float32
    ref = getattr(nn, kind)(3, 4, **kwargs).double()
    ours = getattr(fastdl.nn, kind)(3, 4, **kwargs).to(backend.device, dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    grads = []
    for m, dev in ((ref, "cpu"), (ours, backend.device)):
        xi = x.to(dev, m.weight_ih_l0.dtype).detach().requires_grad_()
        y, _ = m(xi)
        y.relu_()
        y.square().sum().backward()
        grads.append([xi.grad.cpu().double(), *(p.grad.cpu().double() for p in m.parameters())])
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("twin", range(len(TWINS)), ids=IDS)
def test_projected_input(backend, twin):
    """forward(x W_ih^T per direction, projected=True) gives forward(x)'s outputs, and the same
    gradients to x and to every weight (weight_ih_l0 through the caller's product)."""
    torch.manual_seed(0)
    _, cls, kw = TWINS[twin]
    mod = cls(**kw).to(backend.device)
    x = torch.randn(3, 4, 5, device=backend.device, requires_grad=True)
    want_out = _flat(mod(x))
    want = _grads(mod, want_out, [x])
    w_ih = [mod.weight_ih_l0] + ([mod.weight_ih_l0_reverse] if mod.bidirectional else [])
    got_out = _flat(mod(torch.cat([x @ w.t() for w in w_ih], -1), projected=True))
    got = _grads(mod, got_out, [x])
    for g, w in zip([*got_out, *got], [*want_out, *want], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_projected_input_is_not_kept_for_backward(backend, kind):
    """The backward never reads a projected input: the graph keeps a stride-0 stand-in of its
    shape, not the (T, B, G) activation (an LM's gathered table rows)."""
    mod = getattr(fastdl.nn, kind)(5, 6).to(backend.device)
    x = torch.randn(4, 3, 5, device=backend.device, requires_grad=True)
    gx = x @ mod.weight_ih_l0.t()
    alive = weakref.ref(gx)
    y, _ = mod(gx, projected=True)
    del gx
    assert alive() is None
    y.square().sum().backward()
    want = torch.autograd.grad(mod(x)[0].square().sum(), x)[0]
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("twin", range(len(TWINS)), ids=IDS)
def test_indexed_input(backend, twin):
    """forward(table, projected=True, index=ids), the table an embedding's rows through W_ih per
    direction, gives forward(embedding(ids))'s outputs and the same gradients to the embedding
    (rows read several times, one never) and to every weight."""
    torch.manual_seed(0)
    _, cls, kw = TWINS[twin]
    mod = cls(**kw).to(backend.device)
    emb = torch.randn(6, 5, device=backend.device, requires_grad=True)
    ids = torch.tensor([[0, 2, 2, 5], [5, 0, 3, 3], [1, 1, 0, 2]], device=backend.device)
    want_out = _flat(mod(torch.nn.functional.embedding(ids, emb)))
    want = _grads(mod, want_out, [emb])
    w_ih = [mod.weight_ih_l0] + ([mod.weight_ih_l0_reverse] if mod.bidirectional else [])
    table = torch.cat([emb @ w.t() for w in w_ih], -1)
    got_out = _flat(mod(table, projected=True, index=ids))
    got = _grads(mod, got_out, [emb])
    for g, w in zip([*got_out, *got], [*want_out, *want], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_bad_indexed_input(backend, kind):
    """index only with a projected table: without projected=True, or with a PackedSequence, a
    clear error rather than an index silently ignored."""
    mod = getattr(fastdl.nn, kind)(5, 6).to(backend.device)
    g = mod.weight_ih_l0.shape[0]
    ids = torch.zeros(4, 3, dtype=torch.int64, device=backend.device)
    table = torch.randn(7, g, device=backend.device)
    with pytest.raises(ValueError, match=rf"{kind}: index picks rows .* with projected=True"):
        mod(table, index=ids)
    with pytest.raises(ValueError, match=rf"{kind}: index picks rows .*not a PackedSequence"):
        mod(pack_padded_sequence(torch.randn(4, 3, g), [4, 2, 1]), projected=True, index=ids)
    with pytest.raises(ValueError, match=rf"{kind}: index picks rows"):  # float16: torch's path
        mod.half()(table.half(), index=ids)
