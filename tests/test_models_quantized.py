"""fastdl.models.quantized: the GPT and the MLP after fastdl.quantize_model against their float32
twins holding the same (dequantized) weights, and greedy generation of a trained INT8 GPT.

Error measure: SQNR = 10 log10(sum ref^2 / sum (out - ref)^2). Each int8 layer must reach
35 dB against float32 on the same input (DESIGN §4); across a model the layers' rounding errors
are independent and add up, so a model of L int8 layers in a row is held to
35 - 10 log10(L) dB end to end."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import fastdl
from fastdl.models import corpus, quantized, sequence
from fastdl.models import train as training
from fastdl.models.twins import quantized as qtwins
from fastdl.models.twins import sequence as stwins

GPT_SMALL = {"vocab_size": len(corpus.VOCAB), "context": 32, "d_model": 64, "heads": 4, "layers": 2}
MLP_SMALL = {"in_features": 64, "hidden": 128, "depth": 3, "classes": 10}


@pytest.fixture(autouse=True)
def one_thread():
    """Small models run on one thread (see tests/test_models_sequence.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sqnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (10 * torch.log10(ref.square().sum() / (out - ref).square().sum())).item()


def chain_bound(layers: int) -> float:
    """The end-to-end SQNR bound of ``layers`` int8 layers in a row, each at 35 dB."""
    return 35 - 10 * math.log10(layers)


# The MLP is held to the chain bound (its 4 int8 layers give about 33 dB on random weights and
# Gaussian inputs); the GPT, whose residual stream carries each block's input past its
# quantized layers, reaches 35 dB outright (about 42 dB measured).
BOUNDS = {"gpt-int8": 35.0, "mlp-int8": chain_bound(quantized.MLP_CONFIG["depth"] + 1)}


def quantized_pair(model: torch.nn.Module, twin: torch.nn.Module):
    """The quantized copy of ``model`` and ``twin`` loaded from it (dequantized weights)."""
    q = quantized.quantized(copy.deepcopy(model))
    qtwins.dequantizing(twin).load_state_dict(q.state_dict())
    return q, twin.eval()


def test_quantize_swaps_every_linear():
    torch.manual_seed(0)
    q = quantized.quantized(sequence.GPT(**GPT_SMALL))
    assert not any(type(m) is torch.nn.Linear for m in q.modules())
    assert sum(isinstance(m, fastdl.nn.Int8Linear) for m in q.modules()) == 4 * 2 + 1


def test_mlp_int8_each_layer_and_whole_model():
    torch.manual_seed(0)
    q, twin = quantized_pair(quantized.MLP(**MLP_SMALL), qtwins.MLP(**MLP_SMALL))
    x = torch.randn(64, MLP_SMALL["in_features"])
    seen = []

    def record(module, args, out):
        ref = F.linear(args[0], module.dequantized_weight(), module.bias)
        seen.append(sqnr(out, ref))

    hooks = [
        m.register_forward_hook(record) for m in q.modules() if isinstance(m, fastdl.nn.Int8Linear)
    ]
    with torch.no_grad():
        out, ref = q(x), twin(x)
    for h in hooks:
        h.remove()
    assert len(seen) == MLP_SMALL["depth"] + 1 and min(seen) >= 35, seen
    assert sqnr(out, ref) >= chain_bound(len(seen))


def test_gpt_int8_close_to_float_twin():
    torch.manual_seed(0)
    q, twin = quantized_pair(sequence.GPT(**GPT_SMALL), stwins.GPT(**GPT_SMALL))
    x, _ = sequence._windows(corpus.words(), torch.Generator().manual_seed(0), 8, 32)
    with torch.no_grad():
        assert sqnr(q(x), twin(x)) >= 35


def test_trained_gpt_int8_generates_as_float():
    """A GPT trained for a few steps on the corpus, quantized: its next-word choices are the
    float model's, and greedy generation continues a prompt with the same words."""
    torch.manual_seed(0)
    model = sequence.GPT(**GPT_SMALL)
    spec = next(s for s in sequence.SPECS if s.name == "gpt")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        x, y = sequence._windows(corpus.words(), gen, 16, 32)
        losses.append(training.step(model, opt, spec, (x,), y).item())
    assert losses[-1] < losses[0] - 1
    q = quantized.quantized(copy.deepcopy(model))
    x, _ = sequence._windows(corpus.words(), gen, 16, 32)
    with torch.no_grad():
        agree = (q(x).argmax(-1) == model(x).argmax(-1)).float().mean().item()
    assert agree >= 0.95
    prompt = torch.tensor([[corpus.VOCAB.index(w) for w in ("the", "old", "cat")]])
    ours, ref = q.generate(prompt, 10), model.generate(prompt, 10)
    assert ours.shape == (1, 13) and torch.equal(ours, ref)


@pytest.mark.parametrize("spec", quantized.SPECS, ids=lambda s: s.name)
def test_spec_config(spec):
    """The bench's way: build, twin, twin.load_state_dict(model.state_dict()), one forward."""
    torch.manual_seed(0)
    model, twin = spec.build(), spec.twin()
    twin.load_state_dict(model.state_dict())
    assert not spec.train and not model.training
    inputs, target = spec.batch(torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad():
        out, ref = model(*inputs), twin.eval()(*inputs)
    assert sqnr(out, ref) >= BOUNDS[spec.name]
    assert abs(spec.loss(out, target) - spec.loss(ref, target)) <= 1e-2


def test_dequantizing_twin_still_loads_float_weights():
    torch.manual_seed(0)
    model = quantized.MLP(**MLP_SMALL)
    twin = qtwins.dequantizing(qtwins.MLP(**MLP_SMALL))
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, MLP_SMALL["in_features"])
    torch.testing.assert_close(model(x), twin(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(4, 63),
        torch.zeros(4, 64, 1),
        torch.zeros(4, 64, dtype=torch.long),
        [[0.0] * 64] * 4,
    ],
    ids=["features", "rank", "dtype", "list"],
)
def test_mlp_bad_input(x):
    model = quantized.quantized(quantized.MLP(**MLP_SMALL))
    with pytest.raises(ValueError, match=r"^MLP: x must be a float \(batch, 64\) tensor, got"):
        model(x)
