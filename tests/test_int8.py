"""The int8 ops on every backend: quantization bit-exact against a float32 reference, the
int32 products exactly equal to int64 ones, the fused epilogue against float64, the CPU
kernels under every ISA, odd/empty/non-contiguous shapes, opcheck, torch.compile and every bad
input of the issue."""

import pathlib
import time

import pytest
import torch
from conftest import ISAS, NATIVE_CPU

import fastdl
from fastdl import _ext
from fastdl.ops import int8 as I8

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# (M, N, K): M = 1 (a GEMV), K not a multiple of 4 (499), N across panel edges (64, 130).
SHAPES = [(1, 1, 1), (1, 64, 499), (7, 130, 499), (17, 33, 64), (13, 70, 3)]
SHAPES_INTERPRETED = [(1, 5, 7), (7, 33, 37), (17, 16, 64)]


def ref_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented rule in float32: scale = max|x| / 127 (1 for a zero row), round half even."""
    xf = x.float()
    amax = xf.abs().amax(-1) if xf.shape[-1] else xf.new_zeros(xf.shape[:-1])
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / 127)
    q = torch.round(xf / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def ref_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.cpu().long() @ b.cpu().long()).int()


def randint8(*shape, device="cpu"):
    return torch.randint(-128, 128, shape, dtype=torch.int8, device=device)


def _shapes(backend):
    return SHAPES_INTERPRETED if backend.interpreted else SHAPES


# ---------------------------------------------------------------- quantization


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 499), (2, 3, 64), (0, 5), (3, 0)])
def test_quantize_per_token(backend, dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype).to(backend.device)
    if x.shape[0] > 1 and x.shape[-1]:
        x[1] = 0  # a zero row: scale 1, q 0
    q, scale = fastdl.quantize_per_token(x)
    rq, rs = ref_quantize(x.cpu())
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.shape == x.shape and scale.shape == x.shape[:-1]
    assert torch.equal(q.cpu(), rq) and torch.equal(scale.cpu(), rs)


def test_quantize_table(backend):
    # Half-way cases round to even; the largest magnitude maps to +-127; a zero row gets scale 1.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -127.0], [0.0] * 7], device=backend.device)
    q, scale = fastdl.quantize_per_token(x)
    assert q.cpu().tolist() == [[127, 0, 2, 2, 0, -2, -127], [0] * 7]
    assert scale.cpu().tolist() == [1.0, 1.0]


def test_quantize_non_finite_rows(backend):
    """A row with Inf gets an Inf scale and a row with NaN a NaN scale, and their values quantize
    to 0 (Triton clamped NaN to -127 first), so int8_linear gives NaN as float math would not
    hide: never a finite or wrong-signed value."""
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[1.0, inf, -2.0], [1.0, nan, -2.0]], device=backend.device)
    q, scale = fastdl.quantize_per_token(x)
    assert q.cpu().tolist() == [[0, 0, 0], [0, 0, 0]]
    assert scale[0].isinf() and scale[1].isnan()
    w = torch.tensor([[0, 1, 0]], dtype=torch.int8, device=backend.device)
    out = fastdl.int8_linear(x[:1] * torch.tensor([0.0, 1.0, 0.0], device=backend.device), w,
                             torch.ones(1, device=backend.device))  # fmt: skip
    assert out.isnan().all()


def test_quantize_non_contiguous(backend):
    x = torch.randn(40, 9, device=backend.device).t()  # (9, 40), column stride 9
    q, scale = fastdl.quantize_per_token(x)
    rq, rs = ref_quantize(x.cpu())
    assert torch.equal(q.cpu(), rq) and torch.equal(scale.cpu(), rs)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_quantize_per_channel(backend, axis):
    w = torch.randn(6, 10, device=backend.device)
    q, scale = fastdl.quantize_per_channel(w, axis)
    rq, rs = ref_quantize(w.cpu().movedim(axis, 0))  # one row per index of axis
    assert torch.equal(q.cpu(), rq.movedim(0, axis)) and torch.equal(scale.cpu(), rs)
    err = (q.float() * scale.view([-1 if d == axis % 2 else 1 for d in range(2)]) - w).abs()
    assert err.max() <= scale.max() / 2 + 1e-6


# ---------------------------------------------------------------- int8_matmul


def _b_layouts(k, n, device):
    """B as (K, N), as a transposed (N, K) view, and as a strided slice."""
    return {
        "kn": randint8(k, n, device=device),
        "transposed": randint8(n, k, device=device).t(),
        "strided": randint8(k, 2 * n, device=device)[:, ::2],
    }


def test_int8_matmul_exact(backend):
    for m, n, k in _shapes(backend):
        a = randint8(m, k, device=backend.device)
        for layout, b in _b_layouts(k, n, backend.device).items():
            c = fastdl.int8_matmul(a, b)
            assert c.dtype == torch.int32 and c.shape == (m, n)
            assert torch.equal(c.cpu(), ref_matmul(a, b)), (m, n, k, layout)


@pytest.mark.parametrize("k", [499, 500], ids=lambda k: f"k{k}")
def test_int8_matmul_extremes(backend, k):
    # -128 * -128 products (the u8 offset of VNNI and the int16 pairs of AVX2 must not
    # saturate), and non-contiguous A. On the CPU, K = 500 (a multiple of 4) reads int8 rows in
    # place, strided ones included; K = 499 copies them.
    k = k if not backend.interpreted else k - 462  # 37, 38
    for va, vb in ((-128, -128), (127, -128), (-128, 127)):
        a = torch.full((3, k), va, dtype=torch.int8, device=backend.device)
        b = torch.full((k, 20), vb, dtype=torch.int8, device=backend.device)
        assert torch.equal(fastdl.int8_matmul(a, b).cpu(), ref_matmul(a, b))
    dev = backend.device
    b = randint8(k, 9, device=dev)
    for a in (randint8(k, 5, device=dev).t(), randint8(5, 2 * k, device=dev)[:, :k]):
        assert torch.equal(fastdl.int8_matmul(a, b).cpu(), ref_matmul(a, b))


@pytest.mark.parametrize("m,n,k", [(0, 5, 7), (5, 0, 7), (5, 7, 0), (0, 0, 0)])
def test_int8_matmul_empty(backend, m, n, k):
    a, b = randint8(m, k, device=backend.device), randint8(k, n, device=backend.device)
    c = fastdl.int8_matmul(a, b)
    assert c.shape == (m, n) and torch.equal(c.cpu(), torch.zeros(m, n, dtype=torch.int32))
    bias = torch.randn(n, device=backend.device)
    out = fastdl.int8_matmul(a, b, bias=bias)
    assert torch.equal(out.cpu(), bias.cpu().expand(m, n))


def _dequant_ref(a, b, sa, sb, bias):
    out = ref_matmul(a, b).double()
    if sa is not None:
        out = out * sa.cpu().double().reshape(-1, 1)
    if sb is not None:
        out = out * sb.cpu().double().reshape(1, -1)
    return out if bias is None else out + bias.cpu().double()


# rtol per output dtype: float32 epilogue arithmetic, then one rounding to bf16/fp16.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}


@pytest.mark.parametrize("out_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("variant", ["scales_bias", "scales", "a_scale_2d", "bias_only"])
def test_int8_matmul_epilogue(backend, out_dtype, variant):
    for m, n, k in _shapes(backend):
        a, b = randint8(m, k, device=backend.device), randint8(n, k, device=backend.device).t()
        sa = torch.rand(m, device=backend.device) / 100 + 1e-3
        sb = torch.rand(n, device=backend.device) / 100 + 1e-3
        bias = torch.randn(n, device=backend.device)
        if variant == "scales":
            bias = None
        elif variant == "a_scale_2d":
            sa, sb = sa[:, None], sb[None, :]
        elif variant == "bias_only":  # unscaled: small values, so that float16 holds the product
            sa = sb = None
            a = a // 16
        out = fastdl.int8_matmul(a, b, sa, sb, bias, out_dtype=out_dtype)
        assert out.dtype == out_dtype and out.shape == (m, n)
        ref = _dequant_ref(a, b, sa, sb, bias)
        err = (out.cpu().double() - ref).abs().max().item()
        assert err <= RTOL[out_dtype] * ref.abs().max().item() + 1e-6, (m, n, k, err)


def test_int8_matmul_default_out_dtype(backend):
    a, b = randint8(3, 8, device=backend.device), randint8(8, 4, device=backend.device)
    s = torch.ones(3, device=backend.device)
    assert fastdl.int8_matmul(a, b).dtype == torch.int32
    assert fastdl.int8_matmul(a, b, a_scale=s).dtype == torch.float32
    assert torch.equal(fastdl.int8_matmul(a, b, out_dtype=torch.float32).cpu(),
                       ref_matmul(a, b).float())  # fmt: skip


def test_int8_matmul_deterministic(backend):
    a, b = randint8(9, 40, device=backend.device), randint8(40, 70, device=backend.device)
    s, t = torch.rand(9, device=backend.device) + 0.1, torch.rand(70, device=backend.device) + 0.1
    first = fastdl.int8_matmul(a, b, s, t)
    assert torch.equal(first, fastdl.int8_matmul(a, b, s, t))


# ---------------------------------------------------------------- every CPU ISA


@pytest.fixture(params=ISAS)
def isa(request, backend):
    before = fastdl.cpu_isa()
    fastdl.set_cpu_isa(request.param)
    yield request.param
    fastdl.set_cpu_isa(before)


@pytest.mark.parametrize("backend", [NATIVE_CPU], indirect=True, ids=str)
def test_isa_paths(backend, isa):
    assert fastdl.cpu_isa() == isa
    # K = 4100: several k blocks of the AVX-512 kernel (partial sums carried between them);
    # M = 1 over 5 panels, the last one partial: the GEMV path (4 panels at once, then 1).
    for m, n, k in [*SHAPES, (20, 200, 257), (5, 70, 4100), (1, 300, 4100)]:
        a = randint8(m, k)
        for b in _b_layouts(k, n, "cpu").values():
            assert torch.equal(fastdl.int8_matmul(a, b), ref_matmul(a, b)), (isa, m, n, k)
        # Scales of a real dequantization: the outputs fit in float16.
        sa, sb, bias = (torch.rand(m) + 0.5) / 64, (torch.rand(n) + 0.5) / 64, torch.randn(n)
        for dt in FLOATS:
            out = fastdl.int8_matmul(a, b, sa, sb, bias, out_dtype=dt)
            ref = _dequant_ref(a, b, sa, sb, bias)
            assert (out.double() - ref).abs().max() <= RTOL[dt] * ref.abs().max() + 1e-6
        x = torch.randn(m, k) * 2
        for dt in FLOATS:
            q, s = fastdl.quantize_per_token(x.to(dt))
            rq, rs = ref_quantize(x.to(dt))
            assert torch.equal(q, rq) and torch.equal(s, rs)


@pytest.mark.parametrize("backend", [NATIVE_CPU], indirect=True, ids=str)
def test_packed_weight_any_isa(backend):
    # One packed layout for every ISA: a weight packed under the best one serves them all.
    w, x = randint8(70, 260), torch.randn(5, 260)
    ws, bias = torch.rand(70) + 0.5, torch.randn(70)
    packed = I8.pack_weight(w)
    q, s = fastdl.quantize_per_token(x)
    ref = _dequant_ref(q, w.t(), s, ws, bias)
    before = fastdl.cpu_isa()
    try:
        for isa in ISAS:
            fastdl.set_cpu_isa(isa)
            out = I8.int8_linear(x, w, ws, bias, packed=packed)
            assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), isa
    finally:
        fastdl.set_cpu_isa(before)


@pytest.mark.parametrize("backend", [NATIVE_CPU], indirect=True, ids=str)
def test_peak_loop(backend, isa):
    # bench/'s int8 peak: measured on the VNNI kernels only, and above what their GEMM reaches.
    peak = _ext._C._int8_peak_gops()
    if isa != "avx512" or "avx512_vnni" not in pathlib.Path("/proc/cpuinfo").read_text():
        assert peak == 0
        return
    a, b = randint8(384, 2048), randint8(2048, 384)
    fastdl.int8_matmul(a, b)
    t0 = time.perf_counter()
    fastdl.int8_matmul(a, b)
    assert peak > 2 * 384 * 384 * 2048 / (time.perf_counter() - t0) / 1e9 / 2


@pytest.mark.parametrize("backend", [NATIVE_CPU], indirect=True, ids=str)
def test_large_output(backend, isa):
    # An output past 8 MiB: the AVX-512 epilogue writes it with non-temporal stores, full panels
    # only (N = 32 * 64 + 40 ends in a partial one), int32 and float32 alike.
    m, n, k = 1031, 2088, 5
    a, b = randint8(m, k), randint8(k, n)
    assert torch.equal(fastdl.int8_matmul(a, b), ref_matmul(a, b))
    sa, sb, bias = torch.rand(m) + 0.5, torch.rand(n) + 0.5, torch.randn(n)
    out = fastdl.int8_matmul(a, b, sa, sb, bias)
    ref = _dequant_ref(a, b, sa, sb, bias)
    assert (out.double() - ref).abs().max() <= RTOL[torch.float32] * ref.abs().max()


# ---------------------------------------------------------------- bad input


def test_bad_inputs(backend):
    dev = backend.device
    a, b = randint8(4, 8, device=dev), randint8(8, 5, device=dev)
    sa, sb = torch.ones(4, device=dev), torch.ones(5, device=dev)
    mm = fastdl.int8_matmul
    with pytest.raises(TypeError, match=r"a has dtype torch.float32; supported dtypes: int8"):
        mm(a.float(), b)
    with pytest.raises(TypeError, match=r"b has dtype torch.int32"):
        mm(a, b.int())
    with pytest.raises(RuntimeError, match=r"do not match in K"):
        mm(a, randint8(7, 5, device=dev))
    with pytest.raises(RuntimeError, match=r"a_scale must have shape \(4,\) or \[4, 1\]"):
        mm(a, b, torch.ones(5, device=dev), sb)
    with pytest.raises(RuntimeError, match=r"b_scale must have shape \(5,\) or \[1, 5\]"):
        mm(a, b, sa, torch.ones(5, 1, device=dev))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match=r"b_scale must be positive and finite"):
            mm(a, b, sa, torch.tensor([1.0, 1.0, bad, 1.0, 1.0], device=dev))
    with pytest.raises(RuntimeError, match=r"a_scale must be positive and finite"):
        mm(a, b, torch.zeros(4, device=dev), sb)
    with pytest.raises(TypeError, match=r"unsupported out_dtype torch.float64"):
        mm(a, b, sa, sb, out_dtype=torch.float64)
    with pytest.raises(TypeError, match=r"need a floating out_dtype"):
        mm(a, b, sa, sb, out_dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(5,\)"):
        mm(a, b, sa, sb, torch.ones(4, device=dev))
    with pytest.raises(RuntimeError, match=r"a_scale requires grad"):
        mm(a, b, sa.clone().requires_grad_(), sb)
    with pytest.raises(TypeError, match=r"x has dtype torch.int8; supported dtypes"):
        fastdl.quantize_per_token(a)
    with pytest.raises(RuntimeError, match=r"x requires grad"):
        fastdl.quantize_per_token(torch.randn(3, 4, device=dev, requires_grad=True))


def test_mixed_devices():
    a, b = randint8(4, 8), randint8(8, 5, device="meta")
    with pytest.raises(RuntimeError, match=r"b is on meta but x is on cpu"):
        fastdl.int8_matmul(a, b)
    with pytest.raises(RuntimeError, match=r"bias is on meta"):
        fastdl.int8_matmul(a, randint8(8, 5), bias=torch.ones(5, device="meta"))


# ---------------------------------------------------------------- op contract


def _opcheck_samples(dev):
    a, b = randint8(5, 37, device=dev), randint8(37, 9, device=dev)
    sa, sb = torch.rand(5, device=dev) + 0.1, torch.rand(9, device=dev) + 0.1
    bias = torch.randn(9, device=dev)
    w = randint8(9, 37, device=dev)
    return {
        "quantize": ("int8_quantize", (torch.randn(3, 2, 37, device=dev),)),
        "quantize_bf16": ("int8_quantize", (torch.randn(4, 37, device=dev).bfloat16(),)),
        "matmul": ("int8_matmul", (a, b, None, None, None, torch.int32)),
        "matmul_transposed_b": ("int8_matmul", (a, w.t(), None, None, None, torch.int32)),
        "matmul_epilogue": ("int8_matmul", (a, b, sa, sb, bias, torch.bfloat16)),
        "linear": ("linear", (torch.randn(2, 3, 37, device=dev), w, torch.rand(9) + 0.1, bias)),
    }


OPCHECK = [*_opcheck_samples("cpu"), "linear_requires_grad"]


@pytest.mark.parametrize("sample", OPCHECK)
def test_opcheck(backend, sample):
    grad = sample == "linear_requires_grad"
    op, args = _opcheck_samples(backend.device)[sample.removesuffix("_requires_grad")]
    if op == "linear":
        x, w, ws, bias = args
        x.requires_grad_(grad)
        bias.requires_grad_(grad)
        args = (x, w, I8.pack_weight(w), ws.to(x.device), bias, None)
        op = "int8_linear"
    torch.library.opcheck(getattr(backend.ops(I8), op), args)


@pytest.mark.parametrize("backend", [NATIVE_CPU], indirect=True, ids=str)
def test_opcheck_pack_weight(backend):
    torch.library.opcheck(I8.NATIVE.int8_pack_weight, (randint8(70, 37),))


def test_compile_fullgraph(backend):
    dev = backend.device
    a, b = randint8(5, 37, device=dev), randint8(9, 37, device=dev).t()
    sa, sb = torch.rand(5, device=dev) + 0.1, torch.rand(9, device=dev) + 0.1
    x = torch.randn(4, 37, device=dev)

    def fn(a, b, sa, sb, x):
        q, s = fastdl.quantize_per_token(x)
        return fastdl.int8_matmul(a, b), fastdl.int8_matmul(a, b, sa, sb), q, s

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    for got, want in zip(compiled(a, b, sa, sb, x), fn(a, b, sa, sb, x), strict=True):
        assert torch.equal(got, want)
