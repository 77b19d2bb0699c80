"""fastdl.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same weights:
forward and gradients on both layouts, masks, need_weights, state_dict, patch."""

import pytest
import torch
from torch import nn

import fastdl
from fastdl import _ext

pytestmark = pytest.mark.skipif(_ext._C is None, reason="needs the built extension")


def _pair(**kw):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, **kw).double()
    twin = fastdl.nn.MultiheadAttention(32, 4, **kw).double()
    twin.load_state_dict(ref.state_dict())
    return ref, twin


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "masks", ["none", "bool", "float", "padding", "both", "causal", "causal_hint_over_mask"]
)
def test_matches_torch(batch_first, masks):
    kdim = 24 if masks == "padding" else None  # separate q/k/v projection weights
    ref, twin = _pair(batch_first=batch_first, kdim=kdim, vdim=kdim)
    n, lq, s = 3, 7, 9
    shape = (n, lq, 32) if batch_first else (lq, n, 32)
    kshape = (n, s, 24 if masks == "padding" else 32)
    kshape = kshape if batch_first else (s, n, kshape[2])
    q = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    k = torch.randn(kshape, dtype=torch.float64, requires_grad=True)
    kw = {"need_weights": False}
    if masks in ("bool", "both"):
        kw["attn_mask"] = torch.rand(lq, s) > 0.7
    if masks == "float":
        kw["attn_mask"] = torch.randn(n * 4, lq, s, dtype=torch.float64)
    if masks in ("padding", "both"):
        pad = torch.zeros(n, s, dtype=torch.bool)
        pad[:, -3:] = True
        kw["key_padding_mask"] = pad
    if masks.startswith("causal"):
        kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(lq, dtype=torch.float64)
        if masks == "causal_hint_over_mask":  # torch keeps the hint and drops the mask
            kw["attn_mask"] = torch.randn(lq, lq, dtype=torch.float64)
        k = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        kw["is_causal"] = True
    out, w = twin(q, k, k, **kw)
    exp, _ = ref(q, k, k, **kw)
    assert w is None
    torch.testing.assert_close(out, exp)
    if not batch_first:  # torch's sequence-first output is contiguous: callers .view() it
        assert out.is_contiguous()
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, k, *twin.parameters()], g)
    want = torch.autograd.grad(exp, [q, k, *ref.parameters()], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_is_causal_needs_the_mask():
    ref, twin = _pair(batch_first=True)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    for module in (ref, twin):
        with pytest.raises(RuntimeError, match="attn_mask"):
            module(x, x, x, need_weights=False, is_causal=True)


def test_need_weights_and_patch():
    ref, twin = _pair(batch_first=True)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    out, w = twin(x, x, x)  # need_weights=True: torch's path, weights returned
    exp, wexp = ref(x, x, x)
    torch.testing.assert_close(out, exp)
    torch.testing.assert_close(w, wexp)
    model = nn.Sequential(nn.MultiheadAttention(32, 4))
    report = fastdl.patch(model)
    assert type(model[0]) is fastdl.nn.MultiheadAttention
    assert any(r[1].endswith("MultiheadAttention") for r in report.swapped)
    assert set(model[0].state_dict()) == set(ref.state_dict())
