"""pytest-benchmark suite of the model cases (bench/cases/models.py)."""

from bench import cases

CASES = cases.select("models")


def test_models(bench_case, case, candidate):
    bench_case(case, candidate)
