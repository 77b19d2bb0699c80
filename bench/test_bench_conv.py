"""pytest-benchmark suite of the convolution cases (bench/cases/conv.py)."""

from bench import cases

CASES = cases.select("conv")


def test_conv(bench_case, case, candidate):
    bench_case(case, candidate)
