"""pytest-benchmark suite of the graph cases (bench/cases/graph.py)."""

from bench import cases

CASES = cases.select("graph")


def test_graph(bench_case, case, candidate):
    bench_case(case, candidate)
