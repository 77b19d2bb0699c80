"""The op contract (DESIGN §2) for the attention family: opcheck of every raw op, gradcheck in
float64 (CPU native) through masks, bands, GQA, dropout and varlen, torch.compile(fullgraph=True)
against eager, bit-identical repeated runs, and the CPU kernels under every ISA."""

import pathlib

import pytest
import torch
import torch.nn.functional as F
from conftest import BF16_ISAS, ISAS, NATIVE_CPU
from test_attention import ATT_BACKENDS

import fastdl
from fastdl import _ext
from fastdl.ops import attention as A

on_backends = pytest.mark.parametrize("backend", ATT_BACKENDS, ids=str, indirect=True)


def _t(*shape, dev="cpu", grad=False, dtype=torch.float32):
    return torch.randn(shape, device=dev, dtype=dtype).requires_grad_(grad)


def _samples(dev, grad):
    """(id, op, args) for every raw op; with `grad` the forward inputs require grad."""
    q, k = _t(2, 4, 5, 8, dev=dev, grad=grad), _t(2, 2, 7, 8, dev=dev, grad=grad)
    v = _t(2, 2, 7, 8, dev=dev, grad=grad)
    fmask = _t(4, 5, 7, dev=dev, grad=grad)
    bmask = torch.rand(2, 1, 5, 7, device=dev) > 0.3
    qv, kv = _t(9, 4, 8, dev=dev, grad=grad), _t(11, 2, 8, dev=dev, grad=grad)
    vv = _t(11, 2, 8, dev=dev, grad=grad)
    cq = torch.tensor([0, 4, 9], dtype=torch.int32, device=dev)
    ck = torch.tensor([0, 6, 11], dtype=torch.int32, device=dev)
    band = (-1, 0, True)
    samples = [
        ("fwd", "attention_fwd", (q, k, v, None, 0.0, 0, 0, -1, -1, False, 0.3)),
        ("fwd_fmask_causal", "attention_fwd", (q, k, v, fmask, 0.0, 0, 0, *band, 0.3)),
        ("fwd_bmask_dropout", "attention_fwd", (q, k, v, bmask, 0.3, 5, 0, 2, 1, False, 0.3)),
        ("varlen_fwd", "varlen_attention_fwd", (qv, kv, vv, cq, ck, 5, 6, 0.0, 0, 0, *band, 0.3)),
        ("fwd_default_scale", "attention_fwd", (q, k, v, None, 0.0, 0, 0, *band, None)),
        (
            "varlen_fwd_default_scale",
            "varlen_attention_fwd",
            (qv, kv, vv, cq, ck, 5, 6, 0.0, 0, 0, *band, None),
        ),
    ]
    if grad:
        return samples
    out, lse = torch.ops.fastdl.attention_fwd(q, k, v, fmask, 0.0, 0, 0, *band, 0.3)
    vout, vlse = torch.ops.fastdl.varlen_attention_fwd(
        qv, kv, vv, cq, ck, 5, 6, 0.0, 0, 0, *band, 0.3
    )
    g, gv = torch.randn_like(out), torch.randn_like(vout)
    rest = (0.0, 0, 0, *band, 0.3)
    return [
        *samples,
        ("bwd", "attention_bwd", (g, q, k, v, fmask, out, lse, *rest, [True, True, True, True])),
        ("bwd_q_only", "attention_bwd", (g, q, k, v, None, out, lse, *rest, [True] + [False] * 3)),
        (
            "varlen_bwd",
            "varlen_attention_bwd",
            (gv, qv, kv, vv, cq, ck, 5, 6, vout, vlse, *rest, [True, False, True]),
        ),
    ]


IDS = [s[0] for s in _samples("cpu", False)]
GRAD_IDS = [s[0] for s in _samples("cpu", True)]


@on_backends
@pytest.mark.parametrize("sample", IDS)
def test_opcheck(backend, sample):
    _, op, args = next(s for s in _samples(backend.device, False) if s[0] == sample)
    torch.library.opcheck(getattr(backend.ops(A), op), args)


@on_backends
@pytest.mark.parametrize("sample", GRAD_IDS)
def test_opcheck_requires_grad(backend, sample):
    _, op, args = next(s for s in _samples(backend.device, True) if s[0] == sample)
    torch.library.opcheck(getattr(backend.ops(A), op), args)


# ---------------------------------------------------------------- gradcheck (float64, CPU)

GRADCHECK = {
    "plain": {},
    "causal_gqa": {"is_causal": True, "enable_gqa": True},
    "float_mask": {"mask": True},
    "window_bottom_right": {"window": (2, 1), "causal_alignment": "bottom_right"},
    "dropout": {"dropout_p": 0.3, "seed": 11},
}


@pytest.mark.skipif(_ext._C is None, reason="needs the built extension")
@pytest.mark.parametrize("case", list(GRADCHECK))
def test_gradcheck(case):
    kw = dict(GRADCHECK[case])
    hk = 1 if kw.get("enable_gqa") else 2
    q = _t(1, 2, 4, 5, dtype=torch.float64, grad=True)
    k, v = (_t(1, hk, 6, 5, dtype=torch.float64, grad=True) for _ in range(2))
    args = [q, k, v]
    if kw.pop("mask", False):
        args.append(_t(2, 4, 6, dtype=torch.float64, grad=True))
    with fastdl.backend(NATIVE_CPU.name):
        assert torch.autograd.gradcheck(
            lambda *a: fastdl.scaled_dot_product_attention(*a, **kw), args
        )


@pytest.mark.skipif(_ext._C is None, reason="needs the built extension")
def test_gradcheck_varlen():
    q = _t(7, 2, 5, dtype=torch.float64, grad=True)
    k, v = (_t(9, 1, 5, dtype=torch.float64, grad=True) for _ in range(2))
    cq, ck = torch.tensor([0, 3, 3, 7]), torch.tensor([0, 5, 6, 9])
    assert torch.autograd.gradcheck(
        lambda *a: fastdl.varlen_attention(*a, cq, ck, 4, 5, is_causal=True, dropout_p=0.2, seed=1),
        (q, k, v),
    )


# ---------------------------------------------------------------- compile, determinism, ISA


@on_backends
def test_compile(backend):
    dev = backend.device
    q, k, v = (_t(2, 2, 9, 16, dev=dev, grad=True) for _ in range(3))
    mask = _t(9, 9, dev=dev, grad=True)
    cq = torch.tensor([0, 4, 9], device=dev)
    qv = _t(9, 2, 16, dev=dev, grad=True)

    def f(q, k, v, mask, qv):
        a = fastdl.scaled_dot_product_attention(q, k, v, mask, is_causal=True, window=(3, 0))
        b = fastdl.varlen_attention(qv, qv, qv, cq, cq, 5, 5)
        return a.sum() + b.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    args = (q, k, v, mask, qv)
    expected, got = f(*args), compiled(*args)
    torch.testing.assert_close(got, expected)
    g1 = torch.autograd.grad(f(*args), args)
    g2 = torch.autograd.grad(compiled(*args), args)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


@on_backends
def test_compile_dynamic_head_dim(backend):
    """torch.compile(dynamic=True) keeps head_dim symbolic: the default scale 1 / sqrt(E) goes to
    the ops as None and is computed there (a float computed from the symbolic E was specialized:
    one graph per head_dim). One graph serves E = 16, 24 and 40, forward and backward, matching
    float64."""
    from torch._dynamo.testing import CompileCounterWithBackend

    dev = backend.device
    cq = torch.tensor([0, 4, 9], device=dev)

    def fn(q, k, v, qv):
        a = fastdl.scaled_dot_product_attention(q, k, v, is_causal=True)
        return a.square().sum() + fastdl.varlen_attention(qv, qv, qv, cq, cq, 5, 5).square().sum()

    def ref(q, k, v, qv):
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).square().sum()
        for s0, s1 in ((0, 4), (4, 9)):  # varlen: each sequence on its own
            x = qv[s0:s1].transpose(0, 1)
            a = a + F.scaled_dot_product_attention(x, x, x).square().sum()
        return a

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
    frames = []
    for e in (16, 24, 40):
        args = [_t(*s, e, dev=dev, grad=True) for s in ((2, 2, 7), (2, 2, 9), (2, 2, 9), (9, 2))]
        y = compiled(*args)
        grads = torch.autograd.grad(y, args)
        args64 = [a.detach().double().requires_grad_() for a in args]
        y64 = ref(*args64)
        for got, want in zip((y, *grads), (y64, *torch.autograd.grad(y64, args64)), strict=True):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
        frames.append(counter.frame_count)
    assert frames[0] == frames[-1]  # compiled for the first head_dim only


@on_backends
def test_compile_dropout_draws_its_seed_in_the_graph(backend):
    """Dropout with no seed draws one per call (a .item(), data-dependent under torch.compile,
    which the ops take as a SymInt): fullgraph compiles, each call draws a new mask, and a given
    seed gives eager's mask."""
    dev = backend.device
    q, k, v = (_t(2, 2, 9, 16, dev=dev, grad=True) for _ in range(3))

    def f(q, k, v, seed=None):
        return fastdl.scaled_dot_product_attention(q, k, v, dropout_p=0.3, seed=seed)

    def g(qv, seed=None):
        return fastdl.varlen_attention(qv, qv, qv, cq, cq, 5, 5, dropout_p=0.3, seed=seed)

    cq = torch.tensor([0, 4, 9], device=dev)
    qv = _t(9, 2, 16, dev=dev, grad=True)
    torch._dynamo.reset()
    for fn, args in ((f, (q, k, v)), (g, (qv,))):
        compiled = torch.compile(fn, fullgraph=True)
        first, second = compiled(*args), compiled(*args)
        assert not torch.equal(first, second)
        torch.autograd.grad(first.sum(), args)
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(*args, 7), fn(*args, 7))


@pytest.mark.skipif(_ext._C is None, reason="needs the built extension")
def test_deterministic_any_thread_count():
    q, k, v = (_t(2, 4, 150, 32, grad=True) for _ in range(3))
    mask = _t(4, 150, 150, grad=True)

    def run():
        out = fastdl.scaled_dot_product_attention(q, k, v, mask, dropout_p=0.1, seed=3)
        return (out, *torch.autograd.grad(out, (q, k, v, mask), torch.ones_like(out)))

    first = run()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, run(), single, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.skipif(_ext._C is None, reason="needs the built extension")
@pytest.mark.parametrize("isa", ISAS)
def test_cpu_isas(isa):
    q, k, v = (_t(1, 2, 70, 24, grad=True) for _ in range(3))
    exact = torch.nn.functional.scaled_dot_product_attention(
        *(t.detach().double() for t in (q, k, v)), is_causal=True
    )
    previous = _ext._C.cpu_isa()
    fastdl.set_cpu_isa(isa)
    try:
        out = fastdl.scaled_dot_product_attention(q, k, v, is_causal=True)
        gq = torch.autograd.grad(out.sum(), q)[0]
    finally:
        fastdl.set_cpu_isa(previous)
    assert (out.double() - exact).abs().max() < 2e-6
    assert torch.isfinite(gq).all()


_CPU_FLAGS = (
    pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
)


def _bf16_run(fn, leaves, g, *args, **kw):
    out = fn(*leaves, *args, **kw)
    return [out, *torch.autograd.grad(out, leaves, g)]


@pytest.mark.skipif(_ext._C is None, reason="needs the built extension")
@pytest.mark.parametrize("isa", BF16_ISAS)
def test_cpu_isas_bfloat16(isa):
    """bfloat16 under every ISA: with AVX512-BF16, S = Q K^T and dP = dO V^T multiply the
    bfloat16 inputs (gemm_bf16), read in place through their strides (a (B, L, H, D) layout
    transposed, GQA, an additive mask, causal; and varlen); elsewhere everything runs widened.
    Both within twice torch's bfloat16 error, and equal to each other up to the final rounding."""
    torch.manual_seed(0)
    q = torch.randn(2, 45, 4, 40).to(torch.bfloat16).transpose(1, 2)  # (B, H, L, D) view
    k, v = (torch.randn(2, 2, 37, 40).to(torch.bfloat16) for _ in range(2))
    mask = torch.randn(2, 1, 45, 37).to(torch.bfloat16)
    g = torch.randn(2, 4, 45, 40).to(torch.bfloat16)
    cases = {
        "mask": {"attn_mask": mask, "enable_gqa": True},
        "causal": {"is_causal": True, "enable_gqa": True},
    }
    previous = _ext._C.cpu_isa()
    fastdl.set_cpu_isa(isa)
    try:
        native = _ext._C._gemm_bf16_native()
    finally:
        fastdl.set_cpu_isa(previous)
    assert native == (isa in ("avx512", "amx") and "avx512_bf16" in _CPU_FLAGS)
    for name, kw in cases.items():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        fastdl.set_cpu_isa(isa)
        try:
            ours = _bf16_run(fastdl.scaled_dot_product_attention, leaves, g, **kw)
        finally:
            fastdl.set_cpu_isa(previous)
        fastdl.set_cpu_isa("avx2" if "avx2" in BF16_ISAS else "scalar")
        try:
            widened = _bf16_run(fastdl.scaled_dot_product_attention, leaves, g, **kw)
        finally:
            fastdl.set_cpu_isa(previous)
        lowp = _bf16_run(F.scaled_dot_product_attention, leaves, g, **kw)
        leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        kw64 = {**kw, "attn_mask": mask.double()} if "attn_mask" in kw else kw
        exact = _bf16_run(F.scaled_dot_product_attention, leaves64, g.double(), **kw64)
        for i, (a, w, lp, e) in enumerate(zip(ours, widened, lowp, exact, strict=True)):
            err = (a.double() - e).abs().max().item()
            base = (lp.double() - e).abs().max().item()
            assert err <= 2 * base + 1e-6, f"{name} {i}: {err} vs torch {base}"
            tol = 2**-7 * e.abs().max().item()
            assert (a.double() - w.double()).abs().max().item() <= tol, f"{name} {i}"
    # varlen: two sequences of 30 and 15 queries against 20 and 17 keys.
    cu_q, cu_k = torch.tensor([0, 30, 45]), torch.tensor([0, 20, 37])
    qv = torch.randn(45, 4, 32).to(torch.bfloat16)
    kv, vv = (torch.randn(37, 2, 32).to(torch.bfloat16) for _ in range(2))
    leaves = [t.requires_grad_() for t in (qv, kv, vv)]
    gv = torch.randn(45, 4, 32).to(torch.bfloat16)
    runs = []
    for which in (isa, "scalar"):
        fastdl.set_cpu_isa(which)
        try:
            runs.append(_bf16_run(fastdl.varlen_attention, leaves, gv, cu_q, cu_k, 30, 20))
        finally:
            fastdl.set_cpu_isa(previous)
    for a, w in zip(*runs, strict=True):
        assert (a.double() - w.double()).abs().max().item() <= 2**-7 * w.double().abs().max().item()
