"""fastdl.nn norm modules and fastdl.patch: state_dict compatibility with the torch.nn twins
both ways, outputs and gradients against the twins, BatchNorm running statistics over several
steps (momentum=None, num_batches_tracked), track_running_stats=False, affine=False, fused ReLU,
torch.compile of a module, and patch swapping / leaving modules."""

import copy

import pytest
import torch
from conftest import NATIVE_CPU
from torch import nn

import fastdl
from fastdl import nn as fnn


def _randomize(module: nn.Module) -> nn.Module:
    """Non-trivial parameters and buffers, so that a state_dict mix-up shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1)
        for name, buf in module.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn_like(buf) * 0.3)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand_like(buf) + 0.5)
            elif name.endswith("num_batches_tracked"):
                buf.fill_(3)
    return module


TWINS = {
    "LayerNorm": (nn.LayerNorm, fnn.LayerNorm, {"normalized_shape": (4, 6)}, (5, 3, 4, 6)),
    "LayerNorm_no_affine": (
        nn.LayerNorm,
        fnn.LayerNorm,
        {"normalized_shape": 24, "elementwise_affine": False},
        (7, 24),
    ),
    "LayerNorm_no_bias": (
        nn.LayerNorm,
        fnn.LayerNorm,
        {"normalized_shape": 24, "bias": False},
        (7, 24),
    ),
    "RMSNorm": (nn.RMSNorm, fnn.RMSNorm, {"normalized_shape": 24}, (3, 5, 24)),
    "RMSNorm_eps": (
        nn.RMSNorm,
        fnn.RMSNorm,
        {"normalized_shape": (2, 12), "eps": 1e-3},
        (7, 2, 12),
    ),
    "BatchNorm1d_2d": (nn.BatchNorm1d, fnn.BatchNorm1d, {"num_features": 5}, (9, 5)),
    "BatchNorm1d_3d": (
        nn.BatchNorm1d,
        fnn.BatchNorm1d,
        {"num_features": 5, "momentum": 0.3},
        (4, 5, 7),
    ),
    "BatchNorm2d": (nn.BatchNorm2d, fnn.BatchNorm2d, {"num_features": 6}, (3, 6, 4, 5)),
    "BatchNorm2d_no_affine": (
        nn.BatchNorm2d,
        fnn.BatchNorm2d,
        {"num_features": 6, "affine": False},
        (3, 6, 4, 5),
    ),
    "BatchNorm2d_untracked": (
        nn.BatchNorm2d,
        fnn.BatchNorm2d,
        {"num_features": 6, "track_running_stats": False},
        (3, 6, 4, 5),
    ),
}


def _step(module, x, g):
    """Forward, backward; returns the output and the gradients of x and the parameters."""
    x = x.detach().requires_grad_()
    out = module(x)
    out.backward(g)
    return [out, x.grad] + [p.grad for p in module.parameters()]


def _assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("direction", ["torch_to_fastdl", "fastdl_to_torch"])
@pytest.mark.parametrize("twin", list(TWINS))
def test_state_dict_and_outputs_match_twin(backend, twin, direction):
    torch_cls, ours_cls, kwargs, shape = TWINS[twin]
    src_cls, dst_cls = (
        (torch_cls, ours_cls) if direction == "torch_to_fastdl" else (ours_cls, torch_cls)
    )
    src = _randomize(src_cls(**kwargs)).to(backend.device)
    dst = dst_cls(**kwargs).to(backend.device)
    dst.load_state_dict(src.state_dict())  # strict: same keys, shapes
    ours, theirs = (dst, src) if direction == "torch_to_fastdl" else (src, dst)
    assert type(ours) is ours_cls and isinstance(ours, torch_cls)
    for training in (True, False, True):
        ours.train(training)
        theirs.train(training)
        x = torch.randn(shape, device=backend.device) * 2 + 1
        g = torch.randn(shape, device=backend.device)
        for a, b in zip(_step(ours, x, g), _step(theirs, x, g), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        _assert_same_state(ours, theirs)


@pytest.mark.parametrize("momentum", [None, 0.1, 0.7])
def test_batch_norm_running_stats_over_steps(backend, momentum):
    """momentum=None is a cumulative average over num_batches_tracked, as in torch."""
    ours = fnn.BatchNorm2d(5, momentum=momentum).to(backend.device)
    theirs = nn.BatchNorm2d(5, momentum=momentum).to(backend.device)
    for step in range(4):
        x = torch.randn(3, 5, 4, 4, device=backend.device) * (step + 1) + step
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 4
    _assert_same_state(ours, theirs)
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 5, 3, 3, device=backend.device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_batch_norm_untracked_uses_batch_stats_in_eval(backend):
    ours = fnn.BatchNorm1d(4, track_running_stats=False).to(backend.device).eval()
    assert ours.running_mean is None
    x = torch.randn(6, 4, device=backend.device) * 3 + 2
    ref = nn.functional.batch_norm(x, None, None, ours.weight, ours.bias, True)
    torch.testing.assert_close(ours(x), ref, rtol=1e-5, atol=1e-5)


def test_batch_norm_relu_module(backend):
    ours = _randomize(fnn.BatchNorm2d(6, activation="relu")).to(backend.device)
    theirs = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU()).to(backend.device)
    theirs[0].load_state_dict(ours.state_dict())
    assert "activation='relu'" in repr(ours)
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        x = torch.randn(3, 6, 4, 5, device=backend.device)
        g = torch.randn_like(x)
        for a, b in zip(_step(ours, x, g), _step(theirs, x, g), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="activation must be one of"):
        fnn.BatchNorm1d(3, activation="tanh")


def test_batch_norm_module_channels_last(backend):
    ours = _randomize(fnn.BatchNorm2d(6)).to(backend.device)
    theirs = copy.deepcopy(ours)
    theirs.__class__ = nn.BatchNorm2d
    x = torch.randn(3, 6, 4, 5, device=backend.device).contiguous(memory_format=torch.channels_last)
    out = ours(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, theirs(x), rtol=1e-5, atol=1e-5)


def test_modules_reject_wrong_input_rank(backend):
    with pytest.raises(ValueError, match="expected 4D input"):
        fnn.BatchNorm2d(3).to(backend.device)(torch.randn(2, 3, 4, device=backend.device))
    with pytest.raises(RuntimeError, match="must match the trailing dimensions"):
        fnn.LayerNorm(5).to(backend.device)(torch.randn(2, 4, device=backend.device))


@pytest.mark.parametrize("backend", [NATIVE_CPU], indirect=True, ids=str)
@pytest.mark.parametrize("dynamic", [None, True], ids=["auto", "dynamic"])
def test_compile_module(backend, dynamic):
    # dynamic=True makes eps a symbolic float too: the eps checks must trace.
    model = nn.Sequential(fnn.BatchNorm1d(8), nn.Linear(8, 16), fnn.LayerNorm(16), fnn.RMSNorm(16))
    model = _randomize(model).to(backend.device)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True, dynamic=dynamic)
    for rows in (6, 9):
        x = torch.randn(rows, 8, device=backend.device)
        g = torch.randn(rows, 16, device=backend.device)
        model.zero_grad()
        twin.zero_grad()
        for a, b in zip(_step(model, x, g), _step(compiled, x, g), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    _assert_same_state(model, twin)


# ---------------------------------------------------------------- patch


class ScaledLayerNorm(nn.LayerNorm):
    """A user subclass with its own forward: patch must leave it alone."""

    def forward(self, x):
        return 2 * super().forward(x)


def _model():
    return _randomize(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 5 * 5, 16),
            nn.BatchNorm1d(16),
            nn.LayerNorm(16),
            ScaledLayerNorm(16),
            nn.RMSNorm(16),
        )
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_patch_swaps_supported_modules(backend, training):
    model = _model().to(backend.device).train(training)
    twin = copy.deepcopy(model)
    params = dict(model.named_parameters())
    report = fastdl.patch(model)

    assert isinstance(report, fastdl.PatchReport)
    assert [s[0] for s in report.swapped] == ["0", "1", "5", "6", "8"]
    assert [type(model[i]) for i in (0, 1, 5, 6, 8)] == [
        fnn.Conv2d,
        fnn.BatchNorm2d,
        fnn.BatchNorm1d,
        fnn.LayerNorm,
        fnn.RMSNorm,
    ]
    assert type(model[7]) is ScaledLayerNorm
    assert len(report.left) == 1 and report.left[0][0] == "7" and report.left[0][2]
    assert "ScaledLayerNorm" in report.left[0][1]
    assert all(p is params[n] for n, p in model.named_parameters()), "parameters were replaced"
    assert all(m.training == training for m in model.modules())
    assert "swapped 5" in str(report)

    x = torch.randn(4, 3, 5, 5, device=backend.device)
    g = torch.randn(4, 16, device=backend.device)
    for a, b in zip(_step(model, x, g), _step(twin, x, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    _assert_same_state(model, twin)


def test_patch_include_exclude_and_idempotence(backend):
    model = _model().to(backend.device)
    report = fastdl.patch(model, include=["LayerNorm"])
    assert [s[0] for s in report.swapped] == ["6"]
    assert type(model[1]) is nn.BatchNorm2d
    assert {n for n, _, why in report.left if "include" in why} == {"0", "1", "5", "8"}
    report = fastdl.patch(model, exclude=["RMSNorm"])
    assert [s[0] for s in report.swapped] == ["0", "1", "5"]
    assert type(model[8]) is nn.RMSNorm
    assert fastdl.patch(model, exclude=["RMSNorm"]).swapped == []


def test_patch_root_module(backend):
    ln = nn.LayerNorm(8).to(backend.device)
    report = fastdl.patch(ln)
    assert type(ln) is fnn.LayerNorm and report.swapped[0][0] == ""
