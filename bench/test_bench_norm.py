"""pytest-benchmark suite of the normalization cases (bench/cases/norm.py)."""

from bench import cases

CASES = cases.select("norm")


def test_norm(bench_case, case, candidate):
    bench_case(case, candidate)
