"""pytest-benchmark suite of the patch cases (bench/cases/patch.py)."""

from bench import cases

CASES = cases.select("patch")


def test_patch(bench_case, case, candidate):
    bench_case(case, candidate)
