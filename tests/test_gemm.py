"""The block GEMM of csrc/cpu/gemm.h (fastdl's own float32 kernels, the BLAS for float64, the
bfloat16 x bfloat16 -> float32 product) through its test hook fastdl._C._gemm, under every CPU
ISA (bfloat16 also on AMX tiles): odd sizes across the micro-tile (6 x 64 on AVX-512; AMX: 16
rows, 32 k) and k-block (512; bfloat16: 1024, in pairs) edges, both transposes, beta 0 over a
NaN-filled C, beta 1, alpha, padded leading dimensions, against float64. The conv, attention and
rnn tests cover it in use."""

import itertools
import pathlib

import pytest
import torch
from conftest import BF16_ISAS, ISAS

from fastdl import _ext

pytestmark = pytest.mark.skipif(_ext._C is None, reason="fastdl._C not built")

SIZES = (1, 5, 63, 64, 65, 200)


def operand(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows, cols) with unit column stride and a leading dimension larger than cols."""
    return torch.randn(rows, cols + 3, dtype=dtype)[:, :cols]


def check(m, n, k, ta, tb, beta, alpha, dtype=torch.float32):
    """bfloat16: a and b in bfloat16, c in float32 (their products are exact in float32)."""
    a = operand(k, m, dtype) if ta else operand(m, k, dtype)
    b = operand(n, k, dtype) if tb else operand(k, n, dtype)
    dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    c0 = operand(m, n, dtype)
    c = c0.clone() if beta else torch.full((m, n + 3), float("nan"), dtype=dtype)[:, :n]
    _ext._C._gemm(a, b, c, ta, tb, alpha, beta)
    a64, b64 = a.double(), b.double()
    want = alpha * ((a64.t() if ta else a64) @ (b64.t() if tb else b64)) + beta * c0.double()
    # fp32 rounding grows with the depth of the sums (DESIGN §4: ~1e-5 relative).
    torch.testing.assert_close(c.double(), want, rtol=1e-5, atol=1e-5 * max(k, 1) ** 0.5)


def _under(isa):
    previous = _ext.cpu_isa()
    _ext.set_cpu_isa(isa)
    yield isa
    _ext.set_cpu_isa(previous)


@pytest.fixture(params=ISAS)
def isa(request):
    yield from _under(request.param)


# The bfloat16 product also under "amx" (AMX tiles) where the CPU has them: 16-row tiles and
# 32-k steps, the rows and k past them on the AVX512-BF16 micro-tiles.
@pytest.fixture(params=BF16_ISAS)
def bf16_isa(request):
    yield from _under(request.param)


@pytest.mark.parametrize("ta,tb", list(itertools.product((False, True), repeat=2)))
@pytest.mark.parametrize("beta", (0.0, 1.0))
def test_odd_sizes(isa, ta, tb, beta):
    for m, n, k in itertools.product(SIZES, SIZES, SIZES):
        check(m, n, k, ta, tb, beta, 1.0)


# k past one k block (256) and split unevenly; n past one packed column chunk (256).
@pytest.mark.parametrize("m,n,k", [(7, 300, 513), (130, 70, 700), (6, 64, 256)])
@pytest.mark.parametrize("ta,tb", [(False, True), (True, False)])
def test_blocks(isa, m, n, k, ta, tb):
    check(m, n, k, ta, tb, 1.0, 0.5)


def test_alpha_and_empty_depth(isa):
    check(9, 70, 5, False, False, 0.0, -0.25)
    check(9, 70, 5, True, True, 1.0, 3.0)
    # k = 0: C = beta * C, so beta 0 clears a NaN-filled C.
    check(9, 70, 0, False, True, 0.0, 1.0)
    check(9, 70, 0, True, False, 1.0, 1.0)


def test_empty_output(isa):
    for m, n in ((0, 5), (5, 0)):
        check(m, n, 7, False, False, 0.0, 1.0)


@pytest.mark.parametrize("ta,tb", [(False, True), (True, False)])
def test_float64(ta, tb):
    check(65, 63, 200, ta, tb, 0.0, 0.5, torch.float64)
    check(5, 64, 1, ta, tb, 1.0, 1.0, torch.float64)


BF16_SIZES = (1, 2, 5, 33, 63, 64, 65, 130)


@pytest.mark.parametrize("ta,tb", list(itertools.product((False, True), repeat=2)))
@pytest.mark.parametrize("beta", (0.0, 1.0))
def test_bfloat16_odd_sizes(bf16_isa, ta, tb, beta):
    """Odd k leaves a last k without its pair (zero high halves on both sides)."""
    for m, n, k in itertools.product(BF16_SIZES, BF16_SIZES, BF16_SIZES):
        check(m, n, k, ta, tb, beta, 1.0 if k % 2 else -0.5, torch.bfloat16)


# k past one bfloat16 k block (1024), split unevenly and odd; n past a column chunk (256).
@pytest.mark.parametrize("m,n,k", [(7, 300, 2049), (130, 70, 1500), (6, 64, 1024), (3, 5, 0)])
@pytest.mark.parametrize("ta,tb", [(False, True), (True, False), (True, True)])
def test_bfloat16_blocks(bf16_isa, m, n, k, ta, tb):
    check(m, n, k, ta, tb, 1.0, 0.5, torch.bfloat16)
    check(m, n, k, ta, tb, 0.0, 1.0, torch.bfloat16)


def test_bfloat16_native_where_the_cpu_has_it(bf16_isa):
    """AVX512-BF16 (vdpbf16ps) runs under the AVX-512 ISA where the CPU has it; below it, the
    operands are widened for the float32 kernels (the tests above check both)."""
    flags = (
        pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
    )
    assert _ext._C._gemm_bf16_native() == (bf16_isa in ("avx512", "amx") and "avx512_bf16" in flags)


def test_amx_level():
    """ "amx" is AVX-512 with the bfloat16 GEMMs on AMX tiles: a level of its own where the CPU
    has them (set_cpu_isa("avx512") turns them off), a clear error elsewhere."""
    previous = _ext.cpu_isa()
    try:
        if "amx" in BF16_ISAS:
            _ext.set_cpu_isa("avx512")
            assert _ext.cpu_isa() == "avx512"
            _ext.set_cpu_isa("amx")
            assert _ext.cpu_isa() == "amx" and _ext._C._gemm_bf16_native()
        else:
            with pytest.raises(RuntimeError, match="does not support amx"):
                _ext.set_cpu_isa("amx")
            assert _ext.cpu_isa() == previous
    finally:
        _ext.set_cpu_isa(previous)
