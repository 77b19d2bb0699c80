"""fastdl.batch_norm through every backend: training and eval, fused ReLU, running statistics,
NCHW and channels_last, odd / strided / empty shapes, a hand-computed table and bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import case_id, cases
from norm_ref import assert_matches, bn_inputs, check_bn

import fastdl
from fastdl.ops import norm

NATIVE_SHAPES = [
    (7, 13),
    (113, 5),
    (1, 2, 3),
    (4, 11, 9),
    (3, 19, 5, 7),
    (2, 40, 3, 3),
    (16, 3, 1, 1),
]
INTERP_SHAPES = [(7, 13), (1, 2, 3), (4, 11, 9), (3, 5, 4, 5)]
MODES = [(True, False), (True, True), (False, False), (False, True)]
MODE_IDS = ["train", "train-relu", "eval", "eval-relu"]
DEVICE_MSG = "all tensors must be on the same device"
EPS_MSG = "eps must be a positive finite number"


@pytest.mark.parametrize("training,relu", MODES, ids=MODE_IDS)
@pytest.mark.parametrize(
    "backend,dtype,case", cases(NATIVE_SHAPES, INTERP_SHAPES), indirect=["backend"]
)
def test_forward_backward(backend, dtype, case, training, relu):
    x, w, b, rm, rv = bn_inputs(case, dtype, backend.device)
    out = check_bn(x, w, b, rm, rv, training, relu)
    assert out.is_contiguous()


@pytest.mark.parametrize("training,relu", MODES, ids=MODE_IDS)
@pytest.mark.parametrize(
    "backend,dtype,case", cases([(3, 19, 5, 7)], [(2, 5, 3, 4)]), indirect=["backend"]
)
def test_channels_last(backend, dtype, case, training, relu):
    x, w, b, rm, rv = bn_inputs(case, dtype, backend.device, memory_format=torch.channels_last)
    assert not x.is_contiguous()
    out = check_bn(x, w, b, rm, rv, training, relu)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    save_mean, save_invstd = backend.ops(norm).batch_norm_fwd(
        x, w, b, rm, rv, training, 1e-5, relu
    )[1:]
    gi = backend.ops(norm).batch_norm_bwd(
        torch.randn_like(x), x, w, b, save_mean, save_invstd, training, relu, [True, True, True]
    )[0]
    assert gi.is_contiguous(memory_format=torch.channels_last) and not gi.is_contiguous()


@pytest.mark.parametrize(
    "backend,dtype,case",
    cases([(6, 9, 5)], dtypes=(torch.bfloat16, torch.float16)),
    indirect=["backend"],
)
def test_float32_params_with_reduced_precision_x(backend, dtype, case):
    for training, relu in MODES:
        check_bn(*bn_inputs(case, dtype, backend.device, pdtype=torch.float32), training, relu)


@pytest.mark.parametrize("layout", ["transposed_hw", "sliced_c", "expanded_n", "permuted_nc"])
def test_strided_inputs(backend, layout):
    dev = backend.device
    _, w, b, rm, rv = bn_inputs((4, 6, 3, 5), torch.float32, dev)
    if layout == "transposed_hw":  # neither contiguous nor channels_last
        x = torch.randn(4, 6, 5, 3, device=dev).transpose(2, 3)
    elif layout == "sliced_c":
        x = torch.randn(4, 12, 3, 5, device=dev)[:, ::2]
    elif layout == "expanded_n":
        x = torch.randn(1, 6, 3, 5, device=dev).expand(4, 6, 3, 5)
    else:
        x = torch.randn(6, 4, 3, 5, device=dev).transpose(0, 1)
    assert not x.is_contiguous()
    for training, relu in MODES:
        out = check_bn(x, w, b, rm, rv, training, relu)
        assert out.is_contiguous()


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
def test_running_stats_over_steps(backend, momentum):
    """Three training steps update the running statistics as F.batch_norm does."""
    dev = backend.device
    _, _, _, rm, rv = bn_inputs((5, 7, 4), torch.float32, dev)
    mine, ref = [rm.clone(), rv.clone()], [rm.double(), rv.double()]
    for _ in range(3):
        x = torch.randn(5, 7, 4, device=dev) * 3 + 1
        fastdl.batch_norm(x, *mine, None, None, True, momentum, 1e-5)
        F.batch_norm(x.double(), *ref, None, None, True, momentum, 1e-5)
    assert_matches(mine[0], ref[0], name="running_mean")
    assert_matches(mine[1], ref[1], name="running_var")


def test_eval_uses_running_stats(backend):
    dev = backend.device
    x, w, b, rm, rv = bn_inputs((6, 4, 5), torch.float32, dev)
    out = fastdl.batch_norm(x, rm, rv, w, b, training=False)
    expect = (x - rm[:, None]) / torch.sqrt(rv[:, None] + 1e-5) * w[:, None] + b[:, None]
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    batch = fastdl.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True)
    assert not torch.allclose(out, batch, atol=1e-2)


def test_training_without_running_stats(backend):
    x, w, b, _, _ = bn_inputs((6, 4, 5), torch.float32, backend.device)
    check_bn(x, w, b, None, None, True, False)
    check_bn(x, None, None, None, None, True, True)


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (0, 3, 2, 2)], ids=case_id)
def test_empty_batch(backend, shape):
    x, w, b, rm, rv = bn_inputs(shape, torch.float32, backend.device)
    for training, relu in MODES:
        out = check_bn(x, w, b, rm, rv, training, relu)
        assert out.shape == shape


def test_hand_computed_values(backend):
    dev = backend.device
    x = torch.tensor([[1.0], [3.0]], device=dev)  # one channel: mean 2, biased variance 1
    rm, rv = torch.zeros(1, device=dev), torch.ones(1, device=dev)
    out = fastdl.batch_norm(x, rm, rv, training=True, momentum=0.1, eps=1e-5)
    torch.testing.assert_close(out, torch.tensor([[-1.0], [1.0]], device=dev) / math.sqrt(1 + 1e-5))
    # running_var takes the unbiased variance, 2
    torch.testing.assert_close(rm, torch.tensor([0.2], device=dev))
    torch.testing.assert_close(rv, torch.tensor([1.1], device=dev))
    out = fastdl.batch_norm(x, None, None, training=True, activation="relu")
    torch.testing.assert_close(out, torch.tensor([[0.0], [1.0]], device=dev) / math.sqrt(1 + 1e-5))
    # a constant channel: zero variance, the output is the bias
    const = torch.full((4, 2, 3), 7.0, device=dev)
    w, b = torch.tensor([2.0, 3.0], device=dev), torch.tensor([0.25, -0.5], device=dev)
    out = fastdl.batch_norm(const, None, None, w, b, training=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, b[None, :, None].expand(4, 2, 3))
    # eval: (x - 1) / sqrt(running_var + eps = 4) * 2 - 1 = [-1, 1] for x = [1, 3]
    out = fastdl.batch_norm(
        x,
        torch.ones(1, device=dev),
        torch.full((1,), 4.0 - 1e-5, device=dev),
        torch.full((1,), 2.0, device=dev),
        torch.full((1,), -1.0, device=dev),
    )
    torch.testing.assert_close(out, torch.tensor([[-1.0], [1.0]], device=dev))


def test_raw_stats_outputs(backend):
    dev = backend.device
    for dtype in backend.dtypes:
        x, w, b, rm, rv = bn_inputs((5, 3, 4), dtype, dev)
        stat = torch.float64 if dtype == torch.float64 else torch.float32
        tol = {"rtol": 1e-5, "atol": 1e-5}
        x64 = x.double()
        _, mean, invstd = backend.ops(norm).batch_norm_fwd(x, w, b, None, None, True, 1e-5, False)
        assert mean.shape == invstd.shape == (3,) and mean.dtype == invstd.dtype == stat
        torch.testing.assert_close(mean.double(), x64.mean((0, 2)), **tol)
        expect = (x64.var((0, 2), unbiased=False) + 1e-5).rsqrt()
        torch.testing.assert_close(invstd.double(), expect, **tol)
        _, mean, invstd = backend.ops(norm).batch_norm_fwd(x, w, b, rm, rv, False, 1e-5, False)
        assert mean.dtype == invstd.dtype == stat
        torch.testing.assert_close(mean.double(), rm.double(), **tol)
        torch.testing.assert_close(invstd.double(), (rv.double() + 1e-5).rsqrt(), **tol)


def test_running_stats_take_no_gradient(backend):
    x, w, b, rm, rv = bn_inputs((4, 3, 2), torch.float32, backend.device)
    x.requires_grad_()
    out = fastdl.batch_norm(x, rm.requires_grad_(), rv, w, b, training=False)
    with pytest.raises(RuntimeError, match="take no gradient"):
        out.sum().backward()


def _bad_calls(dev):
    x = torch.randn(3, 4, 5, device=dev)
    rm, rv = torch.zeros(4, device=dev), torch.ones(4, device=dev)
    w = torch.ones(4, device=dev)
    other = "cpu" if dev == "cuda" else "meta"  # a second device ("meta" stands in on CPU)
    bn = fastdl.batch_norm
    calls = [
        ("x_1d", lambda: bn(x[0, 0], None, None, training=True), RuntimeError, r"x must be \(N, C"),
        (
            "activation",
            lambda: bn(x, rm, rv, activation="gelu"),
            ValueError,
            "activation must be one of",
        ),
        (
            "one_value_2d",
            lambda: bn(x[:1, :, 0], rm, rv, training=True),
            ValueError,
            "more than 1 value per channel",
        ),
        (
            "one_value_4d",
            lambda: bn(x[:1, :, :1, None], rm, rv, training=True),
            ValueError,
            "more than 1 value per channel",
        ),
        (
            "eval_no_stats",
            lambda: bn(x, None, None, training=False),
            RuntimeError,
            "required in eval mode",
        ),
        (
            "running_mean_alone",
            lambda: bn(x, rm, None, training=True),
            ValueError,
            "both be None or both be tensors",
        ),
        (
            "running_var_alone",
            lambda: bn(x, None, rv, training=True),
            ValueError,
            "both be None or both be tensors",
        ),
        (  # as torch's: a RuntimeError in eval mode
            "eval_running_mean_alone",
            lambda: bn(x, rm, None, training=False),
            RuntimeError,
            "required in eval mode",
        ),
        (
            "running_mean_size",
            lambda: bn(x, rm[:3], rv, training=True),
            RuntimeError,
            "running_mean must have 4 elements",
        ),
        (
            "running_var_size",
            lambda: bn(x, rm, torch.ones(5, device=dev)),
            RuntimeError,
            "running_var must have 4 elements",
        ),
        (
            "running_var_dtype",
            lambda: bn(x, rm, rv.double(), training=True),
            TypeError,
            "running_var has dtype",
        ),
        ("running_mean_int", lambda: bn(x, rm.long(), rv), TypeError, "running_mean has dtype"),
        (
            "running_mean_device",
            lambda: bn(x, rm.to(other), rv, training=True),
            RuntimeError,
            DEVICE_MSG,
        ),
        (
            "weight_size",
            lambda: bn(x, rm, rv, torch.ones(5, device=dev)),
            RuntimeError,
            "weight must have 4 elements",
        ),
        (
            "bias_size",
            lambda: bn(x, rm, rv, w, torch.ones(3, device=dev), training=True),
            RuntimeError,
            "bias must have 4 elements",
        ),
        ("weight_dtype", lambda: bn(x, rm, rv, w.double()), TypeError, "weight has dtype"),
        (
            "weight_device",
            lambda: bn(x, rm, rv, w.to(other), training=True),
            RuntimeError,
            DEVICE_MSG,
        ),
        (
            "x_int",
            lambda: bn(x.int(), None, None, training=True),
            TypeError,
            "x has dtype .*supported dtypes",
        ),
    ]
    for eps in (0.0, -1.0, float("nan")):
        calls.append((f"eps_{eps}", lambda eps=eps: bn(x, rm, rv, eps=eps), RuntimeError, EPS_MSG))
    return calls


@pytest.mark.parametrize("which", [c[0] for c in _bad_calls("cpu")])
def test_bad_inputs(backend, which):
    _, call, exc, match = next(c for c in _bad_calls(backend.device) if c[0] == which)
    with pytest.raises(exc, match=match):
        call()


def test_unsupported_float_dtype(backend):
    bad = torch.float16 if backend.name == "native" and backend.device == "cpu" else torch.float64
    x = torch.randn(3, 4, 5, device=backend.device, dtype=bad)
    with pytest.raises(TypeError, match=r"x has dtype .*supported dtypes"):
        fastdl.batch_norm(x, None, None, training=True)
