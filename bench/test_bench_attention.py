"""pytest-benchmark suite of the attention cases (bench/cases/attention.py)."""

from bench import cases

CASES = cases.select("attention")


def test_attention(bench_case, case, candidate):
    bench_case(case, candidate)
