"""fastdl.int8_linear and fastdl.nn.Int8Linear on every backend: against the int8 reference
(per-token x per-channel quantization, exact integer product), SQNR against the float32 layer
(plain and with LLM.int8 outliers), gradients, state_dict, fine-tuning, torch.compile and
fastdl.quantize_model."""

import math
import pickle

import pytest
import torch
from test_int8 import ref_quantize
from torch import nn

import fastdl
from fastdl.nn import Int8Linear


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    noise = (out.double() - ref).square().sum().item()
    return 10 * math.log10(ref.square().sum().item() / noise)


def ref_int8_linear(x, w, ws, bias, threshold=None):
    """float64 of the documented computation: x quantized per token (outlier columns left out
    and multiplied in floating point by the dequantized weight), the int8 product exact."""
    x2 = x.reshape(-1, x.shape[-1]).float().cpu()
    w, ws = w.cpu(), ws.cpu().double()
    cols = torch.zeros(x2.shape[1], dtype=torch.bool)
    if threshold is not None and x2.numel():
        cols = x2.abs().amax(0) >= threshold
    q, s = ref_quantize(x2.masked_fill(cols, 0))
    out = (q.long() @ w.long().t()).double() * s.double()[:, None] * ws[None, :]
    out += x2[:, cols].double() @ (w[:, cols].double() * ws[:, None]).t()
    if bias is not None:
        out += bias.cpu().double()
    return out.view(*x.shape[:-1], w.shape[0])


def _layer(k, n, device, bias=True, threshold=None):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias, device=device)
    return lin, Int8Linear.from_float(lin, outlier_threshold=threshold)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_int8_linear_matches_reference(backend, dtype):
    shapes = [(1, 37, 9), (3, 499, 70)] if not backend.interpreted else [(1, 37, 9), (5, 20, 17)]
    for m, k, n in shapes:
        _, q = _layer(k, n, backend.device)
        x = torch.randn(2, m, k, device=backend.device).to(dtype)
        out = q.to(dtype)(x) if dtype != torch.float32 else q(x)
        assert out.dtype == dtype and out.shape == (2, m, n)
        ref = ref_int8_linear(x, q.weight, q.weight_scale, q.bias)
        tol = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-10}[dtype]
        assert (out.cpu().double() - ref).abs().max() <= tol * ref.abs().max() + 1e-5


def test_int8_linear_outliers_match_reference(backend):
    k, n = (64, 24) if backend.interpreted else (300, 50)
    _, q = _layer(k, n, backend.device, threshold=6.0)
    x = torch.randn(7, k, device=backend.device)
    x[:, [3, 17]] *= 100
    ref = ref_int8_linear(x, q.weight, q.weight_scale, q.bias, threshold=6.0)
    out = q(x)
    assert (out.cpu().double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_sqnr_gaussian_and_outliers(backend):
    # K large enough that the inlier columns carry a real part of the output.
    k, n, m = (1024, 32, 16) if backend.interpreted else (1024, 256, 64)
    lin, plain = _layer(k, n, backend.device)
    _, outl = _layer(k, n, backend.device, threshold=6.0)
    x = torch.randn(m, k, device=backend.device)
    with torch.no_grad():
        assert sqnr_db(plain(x), lin(x)) >= 35
        x[:, [5, 77, 200]] *= 100  # a few outlier feature columns, as in LLMs
        assert sqnr_db(plain(x), lin(x)) < 28  # plain per-token int8 falls well below
        assert sqnr_db(outl(x), lin(x)) >= 35


def test_backward_through_dequantized_weight(backend):
    _, q = _layer(37, 11, backend.device)
    x = torch.randn(2, 5, 37, device=backend.device, requires_grad=True)
    g = torch.randn(2, 5, 11, device=backend.device)
    gx, gb = torch.autograd.grad(q(x), (x, q.bias), g)
    xr = x.detach().double().requires_grad_()
    br = q.bias.detach().double().requires_grad_()
    out = xr @ q.dequantized_weight().double().t() + br
    rx, rb = torch.autograd.grad(out, (xr, br), g.double())
    assert torch.allclose(gx.double(), rx, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gb.double(), rb, rtol=1e-5, atol=1e-5)


def test_no_grad_matches_grad_mode(backend):
    # Under no_grad the op is called below autograd, past torch.library's wrapper: same output,
    # and no graph.
    _, q = _layer(37, 11, backend.device)
    x = torch.randn(3, 37, device=backend.device, requires_grad=True)
    with_graph = q(x)
    with torch.no_grad():
        without = q(x)
    assert with_graph.grad_fn is not None and without.grad_fn is None
    assert torch.equal(with_graph.detach(), without)


def test_finetune_with_frozen_int8(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(backend.device)
    report = fastdl.quantize_model(model, exclude=["0"])
    assert [s[0] for s in report.swapped] == ["2"] and isinstance(model[2], Int8Linear)
    frozen = model[2].weight.clone()
    x, y = torch.randn(64, 16, device=backend.device), torch.randn(64, 4, device=backend.device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and model[0].weight.grad is not None
    assert torch.equal(model[2].weight, frozen)


def test_state_dict_round_trip(backend):
    _, q = _layer(40, 20, backend.device)
    state = q.state_dict()
    assert set(state) == {"weight", "weight_scale", "bias"}
    assert state["weight"].dtype == torch.int8 and state["weight_scale"].shape == (20,)
    fresh = Int8Linear(40, 20, device=backend.device)
    fresh.load_state_dict(state)  # repacks the weight
    x = torch.randn(3, 40, device=backend.device)
    assert torch.equal(fresh(x), q(x))
    # Pickles (torch.save of a whole quantized model): no lambda among its hooks.
    copy = pickle.loads(pickle.dumps(q))
    assert torch.equal(copy(x), q(x))
    copy.load_state_dict(fresh.state_dict())
    assert torch.equal(copy(x), q(x))


def test_changed_weight_is_packed_again(backend):
    # The next forward packs a weight that was reassigned, swapped in by functional_call or
    # edited in place since it was packed.
    _, q = _layer(40, 20, backend.device)
    x = torch.randn(3, 40, device=backend.device)
    fresh = Int8Linear(40, 20, device=backend.device)
    fresh.weight_scale.copy_(q.weight_scale)
    fresh.bias.data.copy_(q.bias)
    zero = fresh(x)
    fresh.weight = q.weight.clone()
    assert torch.equal(fresh(x), q(x))
    fresh.weight.zero_()
    assert torch.equal(fresh(x), zero)
    swapped = torch.func.functional_call(fresh, {"weight": q.weight}, (x,))
    assert torch.equal(swapped, q(x))
    assert torch.equal(fresh(x), zero)


def test_empty_and_non_contiguous_input(backend):
    _, q = _layer(24, 10, backend.device)
    assert q(torch.randn(0, 24, device=backend.device)).shape == (0, 10)
    x = torch.randn(24, 6, device=backend.device).t()  # (6, 24) with column stride 6
    assert torch.equal(q(x), q(x.contiguous()))


def test_compile_module(backend):
    _, q = _layer(24, 10, backend.device, threshold=6.0)
    x = torch.randn(3, 24, device=backend.device)
    x[:, 2] *= 50
    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True)
    assert torch.equal(compiled(x), q(x))


def test_quantize_model_report():
    class Sub(nn.Linear):
        pass

    model = nn.Sequential(
        nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), Sub(8, 8)), nn.Linear(8, 2)
    )
    report = fastdl.quantize_model(model, exclude=["2"])
    assert [s[0] for s in report.swapped] == ["0", "1.0"]
    assert {(n, why) for n, _, why in report.left} == {
        ("1.1", "subclass of nn.Linear"),
        ("2", "filtered by include/exclude"),
    }
    assert isinstance(model[0], Int8Linear) and type(model[2]) is nn.Linear
    assert "swapped 1.0" in str(report)


def test_quantize_model_arguments():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = nn.Linear(4, 4), nn.Linear(4, 4)

    # A string is one prefix, not a list of characters ('e' would match "encoder" too).
    model = Pair()
    report = fastdl.quantize_model(model, exclude="decoder")
    assert [s[0] for s in report.swapped] == ["encoder"] and type(model.decoder) is nn.Linear
    assert [s[0] for s in fastdl.quantize_model(Pair(), include="decoder").swapped] == ["decoder"]
    with pytest.raises(TypeError, match=r"fastdl.quantize_model: include must be a list of str"):
        fastdl.quantize_model(Pair(), include=3)
    with pytest.raises(TypeError, match=r"fastdl.quantize_model: expects an nn.Module, got None"):
        fastdl.quantize_model(None)
    # The swapped layers keep the model's mode; a layer with NaN weights is left, with the reason.
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)).eval()
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    report = fastdl.quantize_model(model)
    assert isinstance(model[0], Int8Linear) and not model[0].training
    assert [(n, why) for n, _, why in report.left] == [("1", "weight holds NaN or Inf")]
    with pytest.raises(ValueError, match=r"Int8Linear.from_float: the weight holds NaN or Inf"):
        Int8Linear.from_float(model[1])
    # Deferred initialization: a meta Linear gives a meta Int8Linear.
    assert Int8Linear.from_float(nn.Linear(4, 3, device="meta")).weight.device.type == "meta"


def test_quantize_model_tied_and_float64_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).double())
    model.tied = model[0]  # one layer under two names: one twin, under both
    report = fastdl.quantize_model(model)
    assert [s[0] for s in report.swapped] == ["0", "tied"]
    assert model.tied is model[0] and isinstance(model[0], Int8Linear)
    # float64 activations are not what the int8 kernels take: left, not broken
    assert [(n, why) for n, _, why in report.left] == [
        ("1", "fastdl kernels take no float64 on cpu")
    ]
    assert type(model[1]) is nn.Linear


def test_bad_inputs(backend):
    _, q = _layer(8, 4, backend.device)
    dev = backend.device
    with pytest.raises(TypeError, match=r"x has dtype torch.int8"):
        q(torch.ones(2, 8, dtype=torch.int8, device=dev))
    with pytest.raises(RuntimeError, match=r"in_features = x.shape\[-1\] = 7"):
        q(torch.randn(2, 7, device=dev))
    with pytest.raises(RuntimeError, match=r"w_scale must be positive and finite"):
        fastdl.int8_linear(torch.randn(2, 8, device=dev), q.weight, -q.weight_scale)
    with pytest.raises(RuntimeError, match=r"bias must have 4 elements"):
        fastdl.int8_linear(torch.randn(2, 8, device=dev), q.weight, q.weight_scale,
                           torch.ones(5, device=dev))  # fmt: skip
    with pytest.raises(ValueError, match=r"outlier_threshold must be positive"):
        Int8Linear(8, 4, outlier_threshold=0.0)
