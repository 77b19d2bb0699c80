"""LayerNorm, RMSNorm and the fused add+norm variants through every backend: forward and
backward against float64 references, odd / strided / expanded / empty shapes, eps, raw-op
outputs, a hand-computed table and bad inputs. BatchNorm: test_norm_batch.py; opcheck,
gradcheck, compile, determinism and CPU ISAs: test_norm_ops.py; modules: test_norm_modules.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import case_id, cases
from norm_ref import KIND, KINDS, check_norm, norm_inputs

import fastdl
from fastdl.ops import norm

ROWS = (0, 1, 3, 113)
SIZES = (1, 3, 40, 59, 111, 499, 4097)
NATIVE_SHAPES = [(r, n) for r in ROWS for n in SIZES]
# The Triton interpreter is slow: rows <= 64, normalized size <= 300.
INTERP_SHAPES = [(0, 40), (1, 1), (3, 3), (1, 59), (33, 111), (3, 300), (64, 40)]


@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize(
    "backend,dtype,case", cases(NATIVE_SHAPES, INTERP_SHAPES), indirect=["backend"]
)
def test_forward_backward(kind, backend, dtype, case):
    rows, n = case
    x, r, w, b = norm_inputs(kind, (rows, n), (n,), dtype, backend.device)
    check_norm(kind, x, r, w, b, (n,), 1e-5)


AFFINE = [
    (k, w, b) for k in KINDS for w in (True, False) for b in ((True, False) if k.bias else (False,))
]


@pytest.mark.parametrize(
    "kind,weight,bias", AFFINE, ids=[f"{k}-w{int(w)}-b{int(b)}" for k, w, b in AFFINE]
)
def test_weight_bias_optional(backend, kind, weight, bias):
    x, r, w, b = norm_inputs(kind, (7, 59), (59,), torch.float32, backend.device, weight, bias)
    check_norm(kind, x, r, w, b, (59,), 1e-5)


@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("normalized_shape", [(5, 7), (3, 5, 7), 7], ids=case_id)
def test_multidim_normalized_shape(backend, kind, normalized_shape):
    shape = normalized_shape if isinstance(normalized_shape, tuple) else (normalized_shape,)
    x, r, w, b = norm_inputs(kind, (2, 3, 5, 7), shape, torch.float32, backend.device)
    check_norm(kind, x, r, w, b, normalized_shape, 1e-5)


@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize(
    "backend,dtype,case",
    cases([(9, 111)], dtypes=(torch.bfloat16, torch.float16)),
    indirect=["backend"],
)
def test_float32_params_with_reduced_precision_x(kind, backend, dtype, case):
    rows, n = case
    x, r, w, b = norm_inputs(kind, (rows, n), (n,), dtype, backend.device, pdtype=torch.float32)
    check_norm(kind, x, r, w, b, (n,), 1e-5)


@pytest.mark.parametrize(
    "backend,dtype,case", cases([(64, 4097)], [(16, 300)]), indirect=["backend"]
)
def test_layer_norm_large_mean(backend, dtype, case):
    """Rows with a large mean relative to their spread: a one-pass E[x^2] - E[x]^2 variance
    loses the digits the tolerance asks for; torch's own kernel does not."""
    rows, n = case
    kind = KIND["layer_norm"]
    x, r, w, b = norm_inputs(kind, (rows, n), (n,), dtype, backend.device)
    x = (x.double() + 100).to(dtype)
    check_norm(kind, x, r, w, b, (n,), 1e-5)


def _view(layout, rows, n, device):
    """A (rows, n) tensor, mean 1, with the given memory layout."""
    if layout == "transposed":  # the normalized dim has stride `rows`
        return (torch.randn(n, rows, device=device) + 1).t()
    if layout == "padded_rows":  # row stride n + 5
        return (torch.randn(rows, n + 5, device=device) + 1)[:, :n]
    if layout == "step_slice":  # last-dim stride 2
        return (torch.randn(rows, 2 * n, device=device) + 1)[:, ::2]
    if layout == "expanded":  # stride 0 over rows
        return (torch.randn(1, n, device=device) + 1).expand(rows, n)
    raise AssertionError(layout)


@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("layout", ["transposed", "padded_rows", "step_slice", "expanded"])
def test_strided_inputs(backend, kind, layout):
    rows, n = 13, 59
    _, _, w, b = norm_inputs(kind, (rows, n), (n,), torch.float32, backend.device)
    x = _view(layout, rows, n, backend.device)
    other = "transposed" if layout == "expanded" else "expanded"
    r = _view(other, rows, n, backend.device) if kind.residual else None
    assert not x.is_contiguous()
    check_norm(kind, x, r, w, b, (n,), 1e-5)


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_batch_strided_input(backend, kind):
    """(B, S, n) seen through a transpose of its first two dims: rows are not evenly strided."""
    x, r, w, b = norm_inputs(kind, (5, 3, 40), (40,), torch.float32, backend.device)
    x = x.transpose(0, 1)
    r = r.transpose(0, 1).contiguous() if r is not None else None
    assert not x.is_contiguous()
    check_norm(kind, x, r, w, b, (40,), 1e-5)


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_strided_weight(backend, kind):
    n = 59
    x, r, _, _ = norm_inputs(kind, (6, n), (n,), torch.float32, backend.device)
    w = (1 + 0.5 * torch.randn(2 * n, device=backend.device))[::2]
    b = (0.5 * torch.randn(2 * n, device=backend.device))[1::2] if kind.bias else None
    check_norm(kind, x, r, w, b, (n,), 1e-5)


@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("shape", [(0, 40), (2, 0, 40), (0, 3, 5)], ids=case_id)
def test_empty_rows(backend, kind, shape):
    x, r, w, b = norm_inputs(kind, shape, shape[-1:], torch.float32, backend.device)
    outs = check_norm(kind, x, r, w, b, shape[-1:], 1e-5)
    assert all(o.shape == shape for o in outs)


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_no_features(backend, kind):
    # A normalized shape with no element: nothing to normalize, the empty input comes back.
    x, r, w, b = norm_inputs(kind, (3, 0, 4), (0, 4), torch.float32, backend.device)
    outs = kind.ours(x, r, w, b, (0, 4), 1e-5)
    assert all(o.shape == (3, 0, 4) for o in outs)


@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("eps", [1e-12, 1e-3, 0.5])
def test_eps(backend, kind, eps):
    # Small activations, so that eps changes the result visibly.
    x, r, w, b = norm_inputs(kind, (5, 40), (40,), torch.float32, backend.device)
    x = x * 0.01
    r = r * 0.01 if r is not None else None
    check_norm(kind, x, r, w, b, (40,), eps)


@pytest.mark.parametrize("kind", [KIND["rms_norm"], KIND["add_rms_norm"]], ids=str)
def test_rms_norm_eps_none_is_finfo_eps(backend, kind):
    for dtype in backend.dtypes:
        x, r, w, _ = norm_inputs(kind, (5, 40), (40,), dtype, backend.device)
        # mean(s^2) ~ eps, so that the default eps shows
        x = (x.double() * 1e-3).to(dtype)
        r = (r.double() * 1e-3).to(dtype) if r is not None else None
        # torch's default: the eps of the computation dtype (float32's for 16-bit inputs)
        finfo_eps = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
        check_norm(kind, x, r, w, None, (40,), None, ref_eps=finfo_eps)
        default = kind.ours(x, r, w, None, (40,), None)
        explicit = kind.ours(x, r, w, None, (40,), finfo_eps)
        other = kind.ours(x, r, w, None, (40,), finfo_eps * 64)
        assert torch.equal(default[0], explicit[0])
        assert not torch.equal(default[0], other[0])
        if r is None:
            expected = torch.nn.functional.rms_norm(x, (40,), w)
            torch.testing.assert_close(default[0], expected)


def test_hand_computed_values(backend):
    dev = backend.device
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], device=dev)
    xhat = torch.tensor([[-3.0, -1.0, 1.0, 3.0]], device=dev) / math.sqrt(5)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], device=dev)
    b = torch.tensor([0.5, -1.0, 2.0, 3.0], device=dev)

    def close(a, e):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)

    # mean 2.5, biased variance 1.25
    close(fastdl.layer_norm(x, 4, eps=1e-12), xhat)
    close(fastdl.layer_norm(x, (4,), w, b, eps=1e-12), xhat * w + b)
    # rms of [3, 4] is sqrt(12.5): [3, 4] * sqrt(2) / 5
    close(
        fastdl.rms_norm(torch.tensor([[3.0, 4.0]], device=dev), 2, eps=1e-12),
        torch.tensor([[0.6, 0.8]], device=dev) * math.sqrt(2),
    )
    # a constant row normalizes to ones, then the weight
    close(fastdl.rms_norm(torch.full((2, 4), 2.0, device=dev), 4, w, eps=1e-12), w.expand(2, 4))
    # zero variance: (x - mean) = 0, the output is the bias, finite
    const = torch.full((3, 4), 5.0, device=dev)
    out = fastdl.layer_norm(const, 4, w, b)
    assert torch.isfinite(out).all()
    close(out, b.expand(3, 4))
    # the residual sum is exactly constant here, so the output is again the bias
    out, s = fastdl.add_layer_norm(x, torch.tensor([[3.0, 2.0, 1.0, 0.0]], device=dev), 4, w, b)
    assert torch.equal(s, torch.full((1, 4), 4.0, device=dev))
    close(out, b.expand(1, 4))
    out, s = fastdl.add_rms_norm(x, x, 4, None, eps=1e-12)
    assert torch.equal(s, 2 * x)
    close(out, x / math.sqrt(7.5))


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_nan_stays_in_its_row(backend, kind):
    x, r, w, b = norm_inputs(kind, (3, 40), (40,), torch.float32, backend.device)
    clean = kind.ours(x, r, w, b, (40,), 1e-5)[0]
    x = x.clone()
    x[1, 7] = float("nan")
    out = kind.ours(x, r, w, b, (40,), 1e-5)[0]
    assert torch.isnan(out[1]).all()
    assert torch.equal(out[0::2], clean[0::2])


# ---------------------------------------------------------------- raw ops


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize(
    "backend,dtype,case", cases([(2, 3, 59)], [(2, 3, 40)]), indirect=["backend"]
)
def test_raw_forward_outputs(backend, dtype, case, residual):
    """Output/stat shapes and dtypes, the empty `sum` without residual, and the stats' values."""
    *lead, n = case
    dev = backend.device
    x = torch.randn(case, device=dev).to(dtype)
    r = torch.randn(case, device=dev).to(dtype) if residual else None
    w, b = torch.randn(n, device=dev).to(dtype), torch.randn(n, device=dev).to(dtype)
    rows, stat = math.prod(lead), _stat_dtype(dtype)
    s64 = (x + r if residual else x).double().view(rows, n)  # the sum as the op returns it
    mean64 = s64.mean(-1)
    rstd_ln = (s64.var(-1, unbiased=False) + 1e-5).rsqrt()
    rstd_rms = (s64.square().mean(-1) + 1e-5).rsqrt()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype != torch.float64 else {"rtol": 1e-12, "atol": 0}

    out, s, mean, rstd = backend.ops(norm).layer_norm_fwd(x, r, w, b, n, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert mean.shape == rstd.shape == (rows,) and mean.dtype == rstd.dtype == stat
    torch.testing.assert_close(mean.double().cpu(), mean64.cpu(), **tol)
    torch.testing.assert_close(rstd.double().cpu(), rstd_ln.cpu(), **tol)
    out2, s2, rstd2 = backend.ops(norm).rms_norm_fwd(x, r, w, n, 1e-5)
    assert out2.shape == x.shape and out2.dtype == dtype
    assert rstd2.shape == (rows,) and rstd2.dtype == stat
    torch.testing.assert_close(rstd2.double().cpu(), rstd_rms.cpu(), **tol)
    for sum_out in (s, s2):
        if residual:
            assert torch.equal(sum_out, x + r)
        else:
            assert sum_out.shape == (0,)


@pytest.mark.parametrize(
    "mask",
    [
        (True, True, True),
        (True, False, False),
        (False, True, True),
        (False, False, True),
        (False, True, False),
    ],
    ids=str,
)
def test_raw_backward_output_mask(backend, mask):
    """Masked-off parameter gradients come back empty (grad_input has x's shape whatever the
    mask: so says the fake kernel); parameter gradients are flat, in the stats dtype, and do not
    depend on what else was asked for."""
    dev, n = backend.device, 40
    x = torch.randn(2, 3, 5, 8, device=dev)  # normalized over the last two dims
    g, gs = torch.randn_like(x), torch.randn_like(x)
    w = torch.randn(5, 8, device=dev)
    ops = backend.ops(norm)
    _, _, mean, rstd = ops.layer_norm_fwd(x, None, w, None, n, 1e-5)
    full = ops.layer_norm_bwd(g, gs, x, mean, rstd, w, n, [True, True, True])
    part = ops.layer_norm_bwd(g, gs, x, mean, rstd, w, n, list(mask))
    _check_masked(mask, part, full, x, n)
    _, _, rstd = ops.rms_norm_fwd(x, None, w, n, 1e-5)
    full = ops.rms_norm_bwd(g, gs, x, rstd, w, n, [True, True])
    part = ops.rms_norm_bwd(g, gs, x, rstd, w, n, list(mask[:2]))
    _check_masked(mask[:2], part, full, x, n)


def _check_masked(mask, part, full, x, n):
    assert part[0].shape == x.shape and part[0].dtype == x.dtype
    if mask[0]:
        torch.testing.assert_close(part[0], full[0], rtol=1e-6, atol=1e-6)
    for want, a, ref in zip(mask[1:], part[1:], full[1:], strict=True):
        assert ref.shape == (n,) and ref.dtype == torch.float32
        if want:
            torch.testing.assert_close(a, ref, rtol=1e-6, atol=1e-6)
        else:
            assert a.shape == (0,)


def test_raw_backward_grad_sum_is_added(backend):
    dev, n = backend.device, 40
    x, g, gs = (torch.randn(6, n, device=dev) for _ in range(3))
    ops = backend.ops(norm)
    _, _, mean, rstd = ops.layer_norm_fwd(x, None, None, None, n, 1e-5)
    plain = ops.layer_norm_bwd(g, None, x, mean, rstd, None, n, [True, False, False])[0]
    summed = ops.layer_norm_bwd(g, gs, x, mean, rstd, None, n, [True, False, False])[0]
    torch.testing.assert_close(summed, plain + gs, rtol=1e-6, atol=1e-6)
    _, _, rstd = ops.rms_norm_fwd(x, None, None, n, 1e-5)
    plain = ops.rms_norm_bwd(g, None, x, rstd, None, n, [True, False])[0]
    summed = ops.rms_norm_bwd(g, gs, x, rstd, None, n, [True, False])[0]
    torch.testing.assert_close(summed, plain + gs, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- bad inputs

SHAPE_MSG = "must match the trailing dimensions"
EPS_MSG = "eps must be a positive finite number"
DEVICE_MSG = "all tensors must be on the same device"


def _bad_calls(dev):
    x = torch.randn(3, 5, device=dev)
    w, b = torch.ones(5, device=dev), torch.zeros(5, device=dev)
    # a second device: CPU next to CUDA; on CPU, "meta" stands in for one
    other = torch.ones(5, device="cpu" if dev == "cuda" else "meta")
    calls = [
        ("ln_shape", lambda: fastdl.layer_norm(x, (4,)), RuntimeError, SHAPE_MSG),
        ("ln_shape_too_long", lambda: fastdl.layer_norm(x, (2, 3, 5)), RuntimeError, SHAPE_MSG),
        ("ln_shape_empty", lambda: fastdl.layer_norm(x, ()), RuntimeError, SHAPE_MSG),
        ("rms_shape", lambda: fastdl.rms_norm(x, (3,)), RuntimeError, SHAPE_MSG),
        (
            "ln_weight",
            lambda: fastdl.layer_norm(x, 5, w[:4]),
            RuntimeError,
            "weight must have shape",
        ),
        (
            "ln_weight_2d",
            lambda: fastdl.layer_norm(x, 5, w.view(1, 5)),
            RuntimeError,
            "weight must have shape",
        ),
        (
            "ln_bias",
            lambda: fastdl.layer_norm(x, 5, w, torch.zeros(6, device=dev)),
            RuntimeError,
            "bias must have shape",
        ),
        (
            "rms_weight",
            lambda: fastdl.rms_norm(x, 5, torch.ones(6, device=dev)),
            RuntimeError,
            "weight must have shape",
        ),
        (
            "add_ln_residual",
            lambda: fastdl.add_layer_norm(x, x[:2], 5, w, b),
            RuntimeError,
            "residual must have the shape of x",
        ),
        (
            "add_rms_residual",
            lambda: fastdl.add_rms_norm(x, x.t(), 5, w),
            RuntimeError,
            "residual must have the shape of x",
        ),
        (
            "ln_int",
            lambda: fastdl.layer_norm(x.int(), 5),
            TypeError,
            "x has dtype .*supported dtypes",
        ),
        (
            "rms_int",
            lambda: fastdl.rms_norm(x.long(), 5),
            TypeError,
            "x has dtype .*supported dtypes",
        ),
        (
            "ln_weight_dtype",
            lambda: fastdl.layer_norm(x, 5, w.double()),
            TypeError,
            "weight has dtype",
        ),
        (
            "rms_weight_dtype",
            lambda: fastdl.rms_norm(x, 5, w.half()),
            TypeError,
            "weight has dtype",
        ),
        (
            "add_ln_residual_dtype",
            lambda: fastdl.add_layer_norm(x, x.double(), 5),
            TypeError,
            r"add_layer_norm: residual has dtype torch.float64 but x has dtype .*; they must match",
        ),
        (
            "add_rms_residual_dtype",
            lambda: fastdl.add_rms_norm(x, x.double(), 5),
            TypeError,
            r"add_rms_norm: residual has dtype torch.float64 but x has dtype .*; they must match",
        ),
        ("ln_weight_device", lambda: fastdl.layer_norm(x, 5, other), RuntimeError, DEVICE_MSG),
        ("ln_bias_device", lambda: fastdl.layer_norm(x, 5, w, other), RuntimeError, DEVICE_MSG),
        ("rms_weight_device", lambda: fastdl.rms_norm(x, 5, other), RuntimeError, DEVICE_MSG),
        (
            "add_rms_residual_device",
            lambda: fastdl.add_rms_norm(x, x.to(other.device), 5),
            RuntimeError,
            DEVICE_MSG,
        ),
    ]
    for eps in (0.0, -1e-5, float("nan"), float("inf")):
        calls += [
            (
                f"ln_eps_{eps}",
                lambda eps=eps: fastdl.layer_norm(x, 5, eps=eps),
                RuntimeError,
                EPS_MSG,
            ),
            (
                f"rms_eps_{eps}",
                lambda eps=eps: fastdl.rms_norm(x, 5, eps=eps),
                RuntimeError,
                EPS_MSG,
            ),
            (
                f"add_ln_eps_{eps}",
                lambda eps=eps: fastdl.add_layer_norm(x, x, 5, eps=eps),
                RuntimeError,
                EPS_MSG,
            ),
            (
                f"add_rms_eps_{eps}",
                lambda eps=eps: fastdl.add_rms_norm(x, x, 5, eps=eps),
                RuntimeError,
                EPS_MSG,
            ),
        ]
    return calls


BAD_IDS = [c[0] for c in _bad_calls("cpu")]


@pytest.mark.parametrize("which", BAD_IDS)
def test_bad_inputs(backend, which):
    _, call, exc, match = next(c for c in _bad_calls(backend.device) if c[0] == which)
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "xd,wd",
    [
        (torch.float64, torch.float32),
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.float64),
    ],
    ids=str,
)
def test_rms_norm_weight_of_another_dtype_with_float64(xd, wd):
    """torch's rms_norm takes a weight of another float dtype and returns x's dtype; so does
    fastdl's where float64 is involved (on the CPU backend, which has float64), gradients in
    each input's own dtype."""
    x = torch.randn(5, 2, 12, dtype=xd, requires_grad=True)
    w = torch.randn(12, dtype=wd, requires_grad=True)
    r = torch.randn(5, 2, 12, dtype=xd)
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2**-7}[xd]
    for ours, ref in (
        (fastdl.rms_norm(x, 12, w), F.rms_norm(x, (12,), w)),
        (fastdl.add_rms_norm(x, r, 12, w)[0], F.rms_norm(x + r, (12,), w)),
    ):
        assert ours.dtype == xd
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
        g = torch.randn_like(ref)
        got, want = torch.autograd.grad(ours, (x, w), g), torch.autograd.grad(ref, (x, w), g)
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=tol, atol=10 * tol)


def test_unsupported_float_dtype(backend):
    """Each backend names the dtypes it supports: CPU native has no float16, Triton no float64."""
    bad = torch.float16 if backend.name == "native" and backend.device == "cpu" else torch.float64
    x = torch.randn(3, 5, device=backend.device, dtype=bad)
    for call in (lambda: fastdl.layer_norm(x, 5), lambda: fastdl.add_rms_norm(x, x, 5)):
        with pytest.raises(TypeError, match=r"x has dtype .*supported dtypes"):
            call()


def test_raw_op_bad_inputs(backend):
    dev, ops = backend.device, backend.ops(norm)
    x = torch.randn(4, 6, device=dev)
    with pytest.raises(RuntimeError, match="cannot be viewed as rows of normalized_numel=5"):
        ops.layer_norm_fwd(x, None, None, None, 5, 1e-5)
    with pytest.raises(RuntimeError, match="normalized_numel must be >= 1"):
        ops.rms_norm_fwd(x, None, None, 0, 1e-5)
    with pytest.raises(RuntimeError, match=EPS_MSG):
        ops.layer_norm_fwd(x, None, None, None, 6, 0.0)
    with pytest.raises(RuntimeError, match="weight must have 6 elements"):
        ops.rms_norm_fwd(x, None, torch.ones(5, device=dev), 6, 1e-5)
    with pytest.raises(RuntimeError, match="residual must have the shape of x"):
        ops.layer_norm_fwd(x, x[:2], None, None, 6, 1e-5)
    _, _, mean, rstd = ops.layer_norm_fwd(x, None, None, None, 6, 1e-5)
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.layer_norm_bwd(x[:2], None, x, mean, rstd, None, 6, [True, True, True])
    with pytest.raises(RuntimeError, match="rstd"):
        ops.layer_norm_bwd(x, None, x, mean, rstd[:2], None, 6, [True, True, True])
    with pytest.raises(RuntimeError, match="rstd"):
        ops.rms_norm_bwd(x, None, x, rstd[:3], None, 6, [True, True])
