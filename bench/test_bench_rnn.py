"""pytest-benchmark suite of the recurrent cases (bench/cases/rnn.py)."""

from bench import cases

CASES = cases.select("rnn")


def test_rnn(bench_case, case, candidate):
    bench_case(case, candidate)
