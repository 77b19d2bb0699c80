"""The pytest-benchmark suites over the cases of bench/cases/ (``pytest bench/ --benchmark-only``,
``--bench-device cuda`` on a GPU). A test times one candidate of one case (fastdl under a
backend, torch eager, torch.compile); its group puts a case's candidates side by side."""

import time

import pytest
import torch

from bench import cases, timing


def pytest_addoption(parser):
    parser.addoption(
        "--bench-device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="device of the benchmark cases (default: cpu)",
    )


def pytest_configure(config):
    timing.steady_allocator()  # as python -m bench does: see bench/timing.py


def pytest_generate_tests(metafunc):
    """A suite module lists its CASES; its test takes (case, candidate), case-major so that
    one case's inputs are built once and freed before the next case's."""
    if {"case", "candidate"} <= set(metafunc.fixturenames):
        device_type = metafunc.config.getoption("--bench-device")
        mine = [f"fastdl:{b}" for b in cases.BACKENDS[device_type]]
        pairs = [
            (c, n)
            for c in metafunc.module.CASES
            for n in mine + [b for b in cases.BASELINES if b != "compile" or c.compiled]
        ]
        metafunc.parametrize(("case", "candidate"), pairs, ids=[f"{c.name}-{n}" for c, n in pairs])


class _Current:
    """The inputs and candidates of the case being timed: one case at a time, the tensors are
    large."""

    def __init__(self, device: torch.device):
        self.device, self.name, self.inputs, self.fns = device, None, None, None
        self.flush = timing.cache_flusher(device)

    def get(self, case: cases.Case):
        if case.name != self.name:
            self.inputs = self.fns = None  # free the last case's tensors before the next's
            self.inputs = case.make(case, self.device)
            self.fns = cases.candidates(case, self.device.type)
            self.name = case.name
        return self.inputs, self.fns

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@pytest.fixture(scope="session")
def current(request) -> _Current:
    device = torch.device(request.config.getoption("--bench-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: torch sees no CUDA device")
    return _Current(device)


@pytest.fixture
def bench_case(benchmark, current):
    """bench_case(case, candidate): time that candidate on the case's inputs, flushing the
    caches before each call (untimed) as the runner does; rounds fit the runner's budget."""

    def run(case: cases.Case, candidate: str) -> None:
        inputs, fns = current.get(case)
        fn = fns[candidate]

        def call():
            fn(inputs)
            current.sync()

        def setup():
            current.flush()
            current.sync()

        call()  # compiles (torch.compile) or fails here, outside the timing
        t0 = time.perf_counter()
        call()
        rounds = timing.FULL.reps(time.perf_counter() - t0)
        benchmark.group = case.name
        benchmark.extra_info.update(bytes=case.bytes, flops=case.flops, dtype=case.dtype_str)
        benchmark.pedantic(call, setup=setup, rounds=rounds)

    return run
