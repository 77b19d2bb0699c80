"""The op contract (DESIGN §2) for the norm family: opcheck of every raw op on every backend,
gradcheck in float64 (CPU native), torch.compile(fullgraph=True) against eager, bit-identical
repeated backward, and the CPU kernels under every ISA this CPU supports."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ISA_ORDER, ISAS, NATIVE_CPU, cases, dtype_id
from norm_ref import KINDS, bn_inputs, check_bn, check_norm, norm_inputs

import fastdl
from fastdl import _ext
from fastdl.ops import norm

# ---------------------------------------------------------------- opcheck


def _opcheck_samples(dev, grad):
    """(id, op name, args) for every raw op; with `grad`, the differentiable inputs of the
    forward ops require grad (opcheck then also tests the autograd registration)."""

    def t(*shape, fmt=torch.contiguous_format):
        return torch.randn(shape, device=dev).contiguous(memory_format=fmt).requires_grad_(grad)

    x, r = t(3, 2, 8), t(3, 2, 8)
    w, b, w8 = t(2, 8), t(2, 8), t(8)
    rm, rv = torch.randn(4, device=dev), torch.rand(4, device=dev) + 0.5
    xb, wb, bb = t(5, 4, 3), t(4), t(4)
    xc = t(2, 4, 3, 3, fmt=torch.channels_last)
    samples = [
        ("ln_fwd", "layer_norm_fwd", (x, None, None, None, 16, 1e-5)),
        ("ln_fwd_residual_affine", "layer_norm_fwd", (x, r, w, b, 16, 1e-5)),
        ("rms_fwd", "rms_norm_fwd", (x, None, w8, 8, 1e-5)),
        ("rms_fwd_residual", "rms_norm_fwd", (x, r, None, 16, 1e-6)),
        ("bn_fwd_train", "batch_norm_fwd", (xb, wb, bb, None, None, True, 1e-5, False)),
        ("bn_fwd_eval_relu", "batch_norm_fwd", (xb, wb, bb, rm, rv, False, 1e-5, True)),
        ("bn_fwd_channels_last", "batch_norm_fwd", (xc, wb, bb, None, None, True, 1e-5, True)),
    ]
    if grad:
        return samples
    g, gs = torch.randn_like(x), torch.randn_like(x)
    var, mean = torch.var_mean(x.view(6, 8), -1, correction=0)
    rstd = (var + 1e-5).rsqrt()
    ms = (x.view(6, 8).square().mean(-1) + 1e-5).rsqrt()
    gb, gc = torch.randn_like(xb), torch.randn_like(xc)
    var, bmean = torch.var_mean(xb, (0, 2), correction=0)
    binv = (var + 1e-5).rsqrt()
    var, cmean = torch.var_mean(xc, (0, 2, 3), correction=0)
    cinv = (var + 1e-5).rsqrt()
    full = [True, True, True]
    return [
        *samples,
        ("ln_bwd", "layer_norm_bwd", (g, gs, x, mean, rstd, w8, 8, full)),
        (
            "ln_bwd_no_weight",
            "layer_norm_bwd",
            (g, None, x, mean, rstd, None, 8, [True, False, True]),
        ),
        (
            "ln_bwd_params_only",
            "layer_norm_bwd",
            (g, None, x, mean, rstd, w8, 8, [False, True, True]),
        ),
        ("rms_bwd", "rms_norm_bwd", (g, gs, x, ms, w8, 8, [True, True])),
        ("rms_bwd_input_only", "rms_norm_bwd", (g, None, x, ms, None, 8, [True, False])),
        ("bn_bwd_train", "batch_norm_bwd", (gb, xb, wb, bb, bmean, binv, True, False, full)),
        ("bn_bwd_eval_relu", "batch_norm_bwd", (gb, xb, wb, bb, rm, rv.rsqrt(), False, True, full)),
        (
            "bn_bwd_channels_last",
            "batch_norm_bwd",
            (gc, xc, wb, bb, cmean, cinv, True, True, [True, False, True]),
        ),
    ]


OPCHECK_IDS = [s[0] for s in _opcheck_samples("cpu", False)]
OPCHECK_GRAD_IDS = [s[0] for s in _opcheck_samples("cpu", True)]


@pytest.mark.parametrize("sample", OPCHECK_IDS)
def test_opcheck(backend, sample):
    _, op, args = next(s for s in _opcheck_samples(backend.device, False) if s[0] == sample)
    torch.library.opcheck(getattr(backend.ops(norm), op), args)


@pytest.mark.parametrize("sample", OPCHECK_GRAD_IDS)
def test_opcheck_requires_grad(backend, sample):
    _, op, args = next(s for s in _opcheck_samples(backend.device, True) if s[0] == sample)
    torch.library.opcheck(getattr(backend.ops(norm), op), args)


# ---------------------------------------------------------------- gradcheck (float64, CPU native)


def _gradcheck_cases():
    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    def bn(training, relu, fmt=torch.contiguous_format, stats=False):
        x = t(4, 3, 2, 3).detach().contiguous(memory_format=fmt).requires_grad_()
        rm = torch.randn(3, dtype=torch.float64) if stats else None
        rv = torch.rand(3, dtype=torch.float64) + 0.5 if stats else None
        act = "relu" if relu else None
        return (
            lambda x, w, b: fastdl.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, act),
            (x, t(3), t(3)),
        )

    return {
        "layer_norm": (lambda x, w, b: fastdl.layer_norm(x, 5, w, b), (t(3, 5), t(5), t(5))),
        "layer_norm_2d_shape": (
            lambda x, w, b: fastdl.layer_norm(x, (3, 4), w, b, eps=1e-3),
            (t(2, 3, 4), t(3, 4), t(3, 4)),
        ),
        "layer_norm_no_affine": (lambda x: fastdl.layer_norm(x, 7), (t(4, 7),)),
        "add_layer_norm": (
            lambda x, r, w, b: fastdl.add_layer_norm(x, r, 6, w, b),
            (t(3, 6), t(3, 6), t(6), t(6)),
        ),
        "rms_norm": (lambda x, w: fastdl.rms_norm(x, 5, w, 1e-5), (t(3, 5), t(5))),
        "rms_norm_eps_none": (lambda x: fastdl.rms_norm(x, (2, 3)), (t(4, 2, 3),)),
        "add_rms_norm": (lambda x, r, w: fastdl.add_rms_norm(x, r, 6, w), (t(3, 6), t(3, 6), t(6))),
        "batch_norm_train": bn(True, False),
        "batch_norm_train_relu": bn(True, True),
        "batch_norm_eval": bn(False, False, stats=True),
        "batch_norm_eval_relu": bn(False, True, stats=True),
        "batch_norm_channels_last": bn(True, True, fmt=torch.channels_last),
    }


@pytest.mark.parametrize("backend", [NATIVE_CPU], indirect=True, ids=str)
@pytest.mark.parametrize("case", list(_gradcheck_cases()))
def test_gradcheck(backend, case):
    fn, inputs = _gradcheck_cases()[case]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- torch.compile


def _compile_cases(dev):
    """name -> (fn, inputs, how many leading inputs are differentiated)."""

    def t(*shape):
        return torch.randn(*shape, device=dev)

    bn_in = (t(5, 4, 3), t(4), t(4), t(4), torch.rand(4, device=dev) + 0.5)
    return {
        "layer_norm": (
            lambda x, w, b: fastdl.layer_norm(x, (40,), w, b),
            (t(6, 40), t(40), t(40)),
            3,
        ),
        "add_layer_norm": (
            lambda x, r, w, b: fastdl.add_layer_norm(x, r, 40, w, b),
            (t(6, 40), t(6, 40), t(40), t(40)),
            4,
        ),
        "rms_norm": (lambda x, w: fastdl.rms_norm(x, 40, w), (t(6, 40), t(40)), 2),
        "add_rms_norm": (
            lambda x, r, w: fastdl.add_rms_norm(x, r, 40, w, 1e-6),
            (t(6, 40), t(6, 40), t(40)),
            3,
        ),
        # training mutates the running statistics: compiled and eager must update them alike
        "batch_norm_train": (
            lambda x, w, b, rm, rv: fastdl.batch_norm(x, rm, rv, w, b, True, 0.1),
            bn_in,
            3,
        ),
        "batch_norm_eval_relu": (
            lambda x, w, b, rm, rv: fastdl.batch_norm(x, rm, rv, w, b, activation="relu"),
            bn_in,
            3,
        ),
    }


def _run(fn, inputs, n_diff):
    args = [a.detach().clone().requires_grad_(i < n_diff) for i, a in enumerate(inputs)]
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = [torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape) for o in outs]
    return [*outs, *torch.autograd.grad(outs, args[:n_diff], g), *args[n_diff:]]


COMPILE_CASES = cases(list(_compile_cases("cpu")), ["layer_norm", "batch_norm_train"], dtypes=False)


@pytest.mark.parametrize("backend,case", COMPILE_CASES, indirect=["backend"])
def test_compile_matches_eager(backend, case):
    """Outputs, gradients and (batch_norm) updated running statistics."""
    fn, inputs, n_diff = _compile_cases(backend.device)[case]
    eager = _run(fn, inputs, n_diff)
    compiled = _run(torch.compile(fn, fullgraph=True), inputs, n_diff)
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)


def test_compile_dynamic_normalized_size(backend):
    """torch.compile(dynamic=True) keeps the normalized size symbolic: one graph serves rows of
    16, 24 and 40, forward and backward, matching float64 (an int normalized_numel in the
    schemas specialized it: one recompile per size)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def fn(x, w, b):
        n = (x.shape[-1],)
        return fastdl.layer_norm(x, n, w, b).sum() + fastdl.rms_norm(x, n, w).square().sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
    frames = []
    for n in (16, 24, 40):
        inputs = [
            torch.randn(s, device=backend.device, requires_grad=True) for s in ((3, n), (n,), (n,))
        ]
        y = compiled(*inputs)
        grads = torch.autograd.grad(y, inputs)
        ref = [t.detach().double().requires_grad_() for t in inputs]
        yr = F.layer_norm(ref[0], (n,), ref[1], ref[2]).sum()
        yr = yr + F.rms_norm(ref[0], (n,), ref[1]).square().sum()
        for got, want in zip((y, *grads), (yr, *torch.autograd.grad(yr, ref)), strict=True):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
        frames.append(counter.frame_count)
    assert frames[0] == frames[-1]  # compiled for the first size only


# ---------------------------------------------------------------- determinism


def _determinism_cases(case, dev):
    """(name, fn, inputs) for the LN/RMS kinds ((rows, n) cases) or batch_norm (4-d cases)."""
    if len(case) == 2:
        n = case[-1]
        return [
            (
                k.name,
                lambda *a, k=k: k.ours(*a, (n,), 1e-5),
                norm_inputs(k, case, (n,), torch.float32, dev),
            )
            for k in KINDS
        ]
    c = case[1]
    inputs = (torch.randn(case, device=dev), torch.randn(c, device=dev), torch.randn(c, device=dev))
    return [
        (
            f"batch_norm-{m}",
            lambda x, w, b, m=m: fastdl.batch_norm(x, None, None, w, b, True, activation=m),
            inputs,
        )
        for m in (None, "relu")
    ]


DET_NATIVE = [(2048, 64), (64, 8, 16, 16)]
DET_INTERP = [(64, 40), (8, 3, 4, 4)]


@pytest.mark.parametrize(
    "backend,case", cases(DET_NATIVE, DET_INTERP, dtypes=False), indirect=["backend"]
)
def test_repeated_backward_is_bit_identical(backend, case):
    for name, fn, inputs in _determinism_cases(case, backend.device):
        runs = []
        for _ in range(2):
            args = [None if a is None else a.detach().requires_grad_() for a in inputs]
            outs = fn(*args)
            outs = outs if isinstance(outs, tuple) else (outs,)
            g = [torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape) for o in outs]
            runs.append(torch.autograd.grad(outs, [a for a in args if a is not None], g))
        for a, b in zip(*runs, strict=True):
            assert torch.equal(a, b), f"{name}: gradients differ between identical runs"


# ---------------------------------------------------------------- CPU ISA paths


@pytest.fixture(params=ISAS)
def isa(request, backend):
    before = fastdl.cpu_isa()
    fastdl.set_cpu_isa(request.param)
    yield request.param
    fastdl.set_cpu_isa(before)


# Sizes around the vector widths (8 and 16 float32 lanes) and their tails.
ISA_SIZES = (1, 7, 15, 17, 33, 499, 4097)


@pytest.mark.parametrize("backend", [NATIVE_CPU], indirect=True, ids=str)
@pytest.mark.parametrize("dtype", NATIVE_CPU.dtypes, ids=dtype_id)
def test_isa_paths_norm(backend, isa, dtype):
    assert fastdl.cpu_isa() == isa
    for kind in KINDS:
        for n in ISA_SIZES:
            x, r, w, b = norm_inputs(kind, (5, n), (n,), dtype, "cpu")
            check_norm(kind, x, r, w, b, (n,), 1e-5)


@pytest.mark.parametrize("backend", [NATIVE_CPU], indirect=True, ids=str)
@pytest.mark.parametrize("dtype", NATIVE_CPU.dtypes, ids=dtype_id)
def test_isa_paths_batch_norm(backend, isa, dtype):
    assert fastdl.cpu_isa() == isa
    for shape, fmt in [
        ((6, 17), torch.contiguous_format),
        ((3, 19, 5, 7), torch.contiguous_format),
        ((3, 19, 5, 7), torch.channels_last),
        ((2, 33, 1, 9), torch.contiguous_format),
    ]:
        for training in (True, False):
            for relu in (False, True):
                check_bn(*bn_inputs(shape, dtype, "cpu", memory_format=fmt), training, relu)


@pytest.mark.parametrize("backend", [NATIVE_CPU], indirect=True, ids=str)
def test_set_cpu_isa_rejects(backend):
    with pytest.raises(RuntimeError, match="unknown CPU ISA 'sse9'"):
        fastdl.set_cpu_isa("sse9")
    best = _ext._C.best_cpu_isa()
    for name in ISA_ORDER[ISA_ORDER.index(best) + 1 :]:
        with pytest.raises(RuntimeError, match=f"does not support {name}"):
            fastdl.set_cpu_isa(name)
    assert fastdl.cpu_isa() in ISA_ORDER
