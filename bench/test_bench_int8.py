"""pytest-benchmark suite of the int8 cases (bench/cases/int8.py)."""

from bench import cases

CASES = cases.select("int8")


def test_int8(bench_case, case, candidate):
    bench_case(case, candidate)
