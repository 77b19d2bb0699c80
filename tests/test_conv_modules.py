"""fastdl.nn.Conv2d / ConvTranspose2d against their torch.nn twins (same weights, forward and
backward, state_dict), fastdl.patch swapping them, and fastdl.fuse_conv_bn."""

import pytest
import torch
from conv_ref import assert_close
from torch import nn

import fastdl


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "padding": 1, "bias": True},
        {"kernel_size": (3, 2), "stride": 2, "groups": 2, "bias": False},
        {"kernel_size": 3, "padding": "same", "dilation": 2},
        {"kernel_size": 3, "padding": 2, "padding_mode": "reflect"},
        {"kernel_size": 3, "padding": 1, "padding_mode": "circular"},
        {"kernel_size": 3, "padding": 1, "padding_mode": "replicate"},
    ],
)
def test_conv2d_module_matches_torch(kwargs):
    torch_conv = nn.Conv2d(4, 6, **kwargs).double()
    conv = fastdl.nn.Conv2d(4, 6, **kwargs).double()
    conv.load_state_dict(torch_conv.state_dict())
    assert conv.state_dict().keys() == torch_conv.state_dict().keys()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64, requires_grad=True)
    y, expected = conv(x), torch_conv(x)
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, conv.weight), g)
    expected_grads = torch.autograd.grad(expected, (x, torch_conv.weight), g)
    for a, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("output_size", [None, (10, 12)])
def test_conv_transpose2d_module_matches_torch(output_size):
    torch_conv = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    conv = fastdl.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    conv.load_state_dict(torch_conv.state_dict())
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    y = conv(x, output_size)
    assert output_size is None or tuple(y.shape[2:]) == output_size
    torch.testing.assert_close(y, torch_conv(x, output_size))


def test_jit_trace():
    """torch.jit.trace records the training path (a traced graph serves both grad modes; its
    check retraces under another one, where the inference flag once differed): the trace checks
    and gives eager's outputs and gradients."""
    conv = fastdl.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(torch.jit.TracerWarning):  # the shape checks read shapes as constants
        traced = torch.jit.trace(conv, x)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), conv(x), rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_()
    (got,) = torch.autograd.grad(traced(xg).square().sum(), xg)
    (want,) = torch.autograd.grad(conv(xg).square().sum(), xg)
    torch.testing.assert_close(got, want)


def test_conv_transpose2d_padding_mode_refused():
    conv = fastdl.nn.ConvTranspose2d(2, 2, 3)
    conv.padding_mode = "reflect"
    with pytest.raises(ValueError, match="only padding_mode='zeros'"):
        conv(torch.randn(1, 2, 4, 4))


def test_conv2d_module_fused_activation_and_residual():
    conv = fastdl.nn.Conv2d(3, 5, 3, padding=1)
    conv.activation = "silu"
    x, r = torch.randn(2, 3, 6, 6), torch.randn(2, 5, 6, 6)
    expected = torch.nn.functional.silu(
        torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), 1, 1)
        + r.double()
    )
    assert_close(conv(x, r), expected, torch.float32)


def test_patch_swaps_conv_modules():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 2, 2, stride=2))
    x = torch.randn(1, 3, 8, 8)
    expected = model(x)
    report = fastdl.patch(model)
    assert type(model[0]) is fastdl.nn.Conv2d and type(model[2]) is fastdl.nn.ConvTranspose2d
    assert len(report.swapped) == 2
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


class _Block(nn.Module):
    """A residual block: the conv -> bn pairs are found by tracing, not by module order."""

    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8, affine=False)
        self.skip = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-1, 1)


@pytest.mark.parametrize("kind", ["traced", "sequential_untraceable"])
def test_fuse_conv_bn(kind):
    if kind == "traced":
        model = _Block()
    else:

        class Untraceable(nn.Sequential):
            def forward(self, x):
                if x.sum() > 1e30:  # data-dependent control flow: fx cannot trace it
                    return x
                return super().forward(x)

        model = Untraceable(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    _randomize_bn(model)
    model = model.double().eval()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    fused = fastdl.fuse_conv_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # original untouched
    torch.testing.assert_close(fused(x), model(x))


def test_fuse_conv_bn_needs_eval():
    with pytest.raises(RuntimeError, match="eval mode"):
        fastdl.fuse_conv_bn(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)))


class _SharedConv(nn.Module):
    # The conv runs twice and only one call is followed by the BatchNorm: nothing may fold.
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class _ResidualConv(nn.Module):
    # bn(conv(x, residual)) would scale the residual too: nothing may fold.
    def __init__(self):
        super().__init__()
        self.conv = fastdl.nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x, residual=x))


def _activated_conv():
    # bn(relu(conv)) is not relu(conv'): nothing may fold.
    model = nn.Sequential(fastdl.nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    model[0].activation = "relu"
    return model


def _bn_left_training():
    # A BatchNorm still in training mode normalizes with batch statistics: it must not fold.
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    model[1].train()
    model[1].momentum = 0.0  # the reference call leaves the running statistics as they are
    return model


@pytest.mark.parametrize(
    "build",
    [
        lambda: _SharedConv().eval(),
        lambda: _ResidualConv().eval(),
        _activated_conv,
        _bn_left_training,
    ],
    ids=["conv_called_twice", "residual", "activation", "bn_training"],
)
def test_fuse_conv_bn_leaves_pairs_it_cannot_fold(build):
    model = build()
    _randomize_bn(model)
    model = model.double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    expected = model(x)
    fused = fastdl.fuse_conv_bn(model)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == 1
    torch.testing.assert_close(fused(x), expected)


def test_fuse_conv_bn_after_patch():
    # fastdl.patch's convs and BatchNorms trace as modules: the pairs outside a Sequential fold.
    model = _Block()
    _randomize_bn(model)
    model = model.double().eval()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    expected = model(x)
    fastdl.patch(model)
    fused = fastdl.fuse_conv_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(fused(x), expected)


@pytest.mark.parametrize("module", ["Conv2d", "ConvTranspose2d"])
def test_mixed_dtypes_raise_torchs_exception_class(module):
    # torch answers a float64 input to a float32 conv with a RuntimeError; fastdl's DtypeError
    # is one (and a TypeError).
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    with pytest.raises(Exception) as torch_error:
        getattr(nn, module)(2, 3, 3)(x)
    with pytest.raises(torch_error.type, match="fastdl"):
        getattr(fastdl.nn, module)(2, 3, 3)(x)
