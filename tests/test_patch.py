"""fastdl.patch / fastdl.unpatch on torch.nn models: every supported class swapped with its
parameters, buffers, mode and outputs kept; Linear -> Int8Linear only when asked; what is left
and why; shared modules, copies, and the way back."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

import fastdl
from fastdl import nn as fnn


class Net(nn.Module):
    """One of each class fastdl.patch swaps (besides Linear), in a small working model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.bn2 = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.ln = nn.LayerNorm(8, bias=False)
        self.rms = nn.RMSNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True, bidirectional=True)
        self.lstm_cell = nn.LSTMCell(16, 8)
        self.gru_cell = nn.GRUCell(8, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, img):
        x = self.up(torch.relu(self.bn2(self.conv(img))))  # (N, 2, 8, 8)
        x = self.ln(x.flatten(1, 2))  # (N, 16, 8): a sequence of 16 tokens
        x = self.rms(x + self.attn(x, x, x, need_weights=False)[0])
        x = self.gru(self.lstm(x)[0])[0][:, -1]  # (N, 16)
        h, _ = self.lstm_cell(x)
        return self.head(self.bn1(self.gru_cell(h)))


def _net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for m in net.modules():
            for p in m.parameters(recurse=False):
                p.add_(torch.randn_like(p) * 0.1)
    return net


def _step(model, x):
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    return out, *grads


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_supported_class_swapped_same_results(training):
    model = _net().double().train(training)  # float64: a deep chain compared tightly
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    report = fastdl.patch(model)

    names = {n for n, m in ref.named_children() if n != "head"}
    assert {s[0] for s in report.swapped} == names and not report.left, str(report)
    for n in names:
        twin = type(getattr(model, n))
        assert twin.__module__.startswith("fastdl.nn"), n
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert all(m.training == training for m in model.modules())
    assert type(model.head) is nn.Linear  # Linear only when asked

    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    for got, want in zip(_step(model, x), _step(ref, x), strict=True):
        torch.testing.assert_close(got, want)
    for (n, b), want in zip(model.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(b, want, msg=n)  # running statistics updated alike

    fastdl.unpatch(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    assert all(p is params[n] for n, p in model.named_parameters())
    report = fastdl.patch(model, include=["LayerNorm"])
    assert [s[0] for s in report.swapped] == ["ln"] and len(report.left) == len(names) - 1
    fastdl.unpatch(model)
    # One class name as a string is a list of one: "LSTMCell" does not also name LSTM (in a
    # string, "LSTM" is a substring of it).
    assert [s[0] for s in fastdl.patch(model, include="LSTMCell").swapped] == ["lstm_cell"]
    with pytest.raises(TypeError, match=r"fastdl.patch: exclude must be a list of strings"):
        fastdl.patch(model, exclude=[nn.LayerNorm])


def test_linear_quantized_only_when_asked():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    originals = list(model)
    x = torch.randn(16, 64)
    want = model(x)
    assert fastdl.patch(model).swapped == []
    report = fastdl.patch(model, quantize=True)
    assert [s[0] for s in report.swapped] == ["0", "2"]
    assert all(type(model[i]) is fnn.Int8Linear for i in (0, 2))
    got = model(x)
    sqnr = 10 * torch.log10(want.square().sum() / (got - want).square().sum())
    assert sqnr > 35, f"SQNR {sqnr:.1f} dB"
    fastdl.unpatch(model)
    assert all(a is b for a, b in zip(model, originals, strict=True))
    torch.testing.assert_close(model(x), want)

    report = fastdl.patch(model, include=["Linear"])  # naming Linear asks for it too
    assert [s[0] for s in report.swapped] == ["0", "2"]


def test_left_modules_and_reasons():
    class MyNorm(nn.LayerNorm):
        pass

    model = nn.Sequential(nn.LayerNorm(4).half(), MyNorm(4), nn.Linear(4, 4).double())
    report = fastdl.patch(model, quantize=True)
    assert report.swapped == []
    left = {n: why for n, _, why in report.left}
    assert "float16" in left["0"] and "subclass" in left["1"] and "float64" in left["2"]
    assert "left    1" in str(report)

    root = nn.Linear(4, 4)
    report = fastdl.patch(root, quantize=True)
    assert type(root) is nn.Linear and "root" in report.left[0][2]

    model = nn.Sequential(
        nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), weight_norm(nn.Conv2d(3, 3, 3)),
        nn.LazyConv1d(4, 3), nn.LazyLinear(3),  # no twins (Linear: not asked for): not listed
    )  # fmt: skip
    left = {n: why for n, _, why in fastdl.patch(model).left}
    assert left == {
        "0": "lazy module: run the model once (its shapes are set then), then patch",
        "1": "lazy module: run the model once (its shapes are set then), then patch",
        "2": "parametrized (torch.nn.utils.parametrize builds a subclass of its own)",
    }


def _same(model, ref, *inputs, **kwargs):
    got, want = model(*inputs, **kwargs), ref(*inputs, **kwargs)
    got, want = (o[0] if isinstance(o, tuple) else o for o in (got, want))
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_what_the_kernels_do_not_take_runs_torch():
    """float16 on the CPU (a model moved after patch, or norms without parameters, which patch
    cannot tell by their dtype), eps 0 norms, an LSTM in float16: torch's forward, same results."""
    ref = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.Flatten(2),
        nn.LayerNorm(9, elementwise_affine=False), nn.RMSNorm(9, elementwise_affine=False),
    )  # fmt: skip
    model = copy.deepcopy(ref)
    assert len(fastdl.patch(model).swapped) == 4
    model.half(), ref.half()
    _same(model, ref, torch.randn(2, 3, 5, 5).half())
    model[0].activation = "relu"  # the fused epilogue too
    _same(model[0], lambda x, residual: torch.relu(ref[0](x) + residual),
          torch.randn(1, 3, 5, 5).half(), residual=torch.randn(1, 4, 3, 3).half())  # fmt: skip
    for ref, shape, dtype in (
        (nn.LayerNorm(4, eps=0.0), (2, 4), torch.float32),
        (nn.RMSNorm(4, eps=0.0), (2, 4), torch.float32),
        (nn.LSTM(3, 4), (5, 2, 3), torch.float16),
        (nn.GRUCell(3, 4), (2, 3), torch.float16),
        (nn.ConvTranspose2d(3, 2, 3), (1, 3, 4, 4), torch.float16),
        (nn.MultiheadAttention(4, 2), (3, 1, 4), torch.float16),
    ):
        model = nn.Sequential(copy.deepcopy(ref))
        assert len(fastdl.patch(model).swapped) == 1
        model.to(dtype), ref.to(dtype)
        x = torch.randn(shape, dtype=dtype)
        _same(model[0], ref, *((x, x, x) if isinstance(ref, nn.MultiheadAttention) else (x,)))
    # An RMSNorm weight of another dtype than x: torch promotes (float64 out).
    ref = nn.RMSNorm(4)
    model = nn.Sequential(copy.deepcopy(ref))
    fastdl.patch(model)
    x = torch.randn(2, 4, dtype=torch.float64)
    assert model[0](x).dtype == torch.float64
    _same(model[0], ref, x)


def test_torch_call_conventions():
    # forward(input=...) as torch's modules are called; integer masks refused, as torch does.
    for ref, shape in (
        (nn.LayerNorm(4), (2, 4)),
        (nn.BatchNorm1d(4), (3, 4)),
        (nn.Conv2d(3, 4, 3), (1, 3, 5, 5)),
        (nn.ConvTranspose2d(3, 4, 3), (1, 3, 5, 5)),
    ):
        model = nn.Sequential(copy.deepcopy(ref))
        fastdl.patch(model)
        _same(model[0], ref, input=torch.randn(shape))
    mha = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    fastdl.patch(mha)
    x, pad = torch.randn(2, 3, 8), torch.tensor([[0, 0, 1], [0, 0, 0]], dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool or floating-point mask"):
        mha[0](x, x, x, key_padding_mask=pad, need_weights=False)


def test_meta_model_patched_then_materialized():
    # Deferred initialization: patch on meta, then to_empty and initialize.
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(2), nn.LayerNorm(9))
    assert len(fastdl.patch(model).swapped) == 3
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in model:
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    ref = copy.deepcopy(model)
    fastdl.unpatch(ref)
    _same(model, ref, torch.randn(2, 3, 5, 5))


def test_unpatch_keeps_a_parametrization_added_after_patch():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    fastdl.patch(model)
    weight_norm(model[0])
    x = torch.randn(1, 3, 8, 8)
    want = model(x)
    fastdl.unpatch(model)
    assert isinstance(model[0], nn.Conv2d) and not isinstance(model[0], fnn.Conv2d)
    assert parametrize.is_parametrized(model[0], "weight")
    torch.testing.assert_close(model(x), want)


def test_encoder_layer_fast_path_is_reported(monkeypatch):
    """torch's TransformerEncoderLayer runs its fused fast path in eval mode without autograd,
    never calling its (swapped) attention: the report says so for each layer."""
    model = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2, enable_nested_tensor=False
    )
    report = fastdl.patch(model)
    assert {n for n, _, _ in report.swapped} >= {"layers.0.self_attn", "layers.1.norm2"}
    left = {n: why for n, _, why in report.left}
    assert set(left) == {"layers.0", "layers.1"} and "fast path" in left["layers.0"]
    calls, forward = [], fnn.MultiheadAttention.forward

    def spy(self, *args, **kwargs):  # a forward hook would itself turn the fast path off
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(fnn.MultiheadAttention, "forward", spy)
    x = torch.randn(2, 5, 16)
    model.eval()
    with torch.no_grad():
        model(x)
    assert not calls  # what the report says
    model(x)
    assert calls


def test_shared_module_replaced_everywhere():
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    fastdl.patch(model, quantize=True)
    assert model.a[0] is model.b[0] and type(model.a[0]) is fnn.Int8Linear
    fastdl.unpatch(model)
    assert model.a[0] is shared and model.b[0] is shared


def test_copies_and_state_dicts_of_patched_models():
    model = _net()
    fastdl.patch(model)
    x = torch.randn(2, 3, 4, 4)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), model(x))
    fresh = _net(seed=1)
    fresh.load_state_dict(model.state_dict())  # same keys as the unpatched model
    fastdl.unpatch(clone)
    assert type(clone.ln) is nn.LayerNorm and type(model.ln) is fnn.LayerNorm
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-4, atol=1e-5)
