"""Benchmark cases, each defined once and shared by the runner and the pytest-benchmark suites.

A case names an op, its shape and dtype, builds its inputs, and gives the fastdl call and the
torch eager baseline with one signature. The second baseline is ``torch.compile`` of the eager
one; the eager one run on float64 copies of the inputs is the reference for the error column.
One module per family (bench/cases/<family>.py), each with a ``CASES`` list.
"""

import importlib
import importlib.util
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch

import fastdl

FAMILIES = ("norm", "attention", "conv", "rnn", "graph", "int8", "models", "patch")
BASELINES = ("eager", "compile")
# The fastdl backends to time on each device type (fastdl.backend names).
BACKENDS = {"cpu": ("native",), "cuda": ("native", "triton")}


class Inputs(NamedTuple):
    args: tuple  # positional arguments of the fastdl call and of the baselines
    grad: torch.Tensor | None  # gradient flowing into the first output (fwd+bwd cases)


@dataclass(frozen=True)
class Target:
    """What the case must reach: speed-ups over the baselines, fraction of the machine's peak
    (copy bandwidth for memory-bound cases, fp32 GEMM rate for compute-bound ones)."""

    eager: float | None = None
    compile: float | None = None
    peak: float | None = None


@dataclass(frozen=True)
class Case:
    """One benchmark: ``fastdl(*args)`` against ``eager(*args)`` on ``make(case, device).args``."""

    family: str
    op: str
    mode: str  # "fwd", or "fwd+bwd": gradients for every input that requires grad
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[["Case", torch.device], Inputs]
    fastdl: Callable[..., Any]
    eager: Callable[..., Any]
    # Memory-bound cases: full-size tensors read or written by an ideal fused kernel
    # (parameters and statistics are negligible); compute-bound ones give their FLOPs instead.
    traffic: int = 0
    flops: int = 0
    variant: str = ""
    target: Target | None = None
    compiled: bool = True  # whether torch.compile of the eager baseline is a candidate

    @property
    def label(self) -> str:
        return " ".join(filter(None, (self.op, self.mode, self.variant)))

    @property
    def shape_str(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def dtype_str(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def name(self) -> str:
        return "-".join(
            filter(None, (self.op, self.mode, self.variant, self.shape_str, self.dtype_str))
        )

    @property
    def bytes(self) -> int:
        return self.traffic * math.prod(self.shape) * self.dtype.itemsize

    def run(self, fn: Callable[..., Any], inputs: Inputs) -> Any:
        """One call of fn on the inputs: the forward (under no_grad, as inference runs: no
        autograd graph is recorded), or the forward and the input gradients."""
        if self.mode == "fwd":
            with torch.no_grad():
                return fn(*inputs.args)
        out = fn(*inputs.args)
        first = out[0] if isinstance(out, tuple) else out
        wrt = [a for a in inputs.args if isinstance(a, torch.Tensor) and a.requires_grad]
        return (out, *torch.autograd.grad(first, wrt, inputs.grad))

    def reference(self, inputs: Inputs) -> Any:
        """The eager baseline computed in float64 from the same input values."""
        args = tuple(_float64(a) for a in inputs.args)
        grad = None if inputs.grad is None else inputs.grad.double()
        return self.run(self.eager, Inputs(args, grad))


def _float64(a: Any) -> Any:
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        return a
    return a.detach().double().requires_grad_(a.requires_grad)


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _tensors(o)


def max_error(out: Any, ref: Any) -> float:
    """Largest error over every output tensor (outputs and gradients), each relative to the
    largest magnitude of its reference: max |out - ref| / max |ref|. Scale-free, so that an
    output of order 1 and a parameter gradient summed over thousands of rows compare alike."""
    worst = 0.0
    for o, r in zip(_tensors(out), _tensors(ref), strict=True):
        if o.shape != r.shape:
            raise RuntimeError(f"output shape {list(o.shape)}, reference {list(r.shape)}")
        if r.numel():
            r = r.detach()
            scale = r.abs().max().item() or 1.0
            worst = max(worst, (o.detach().double() - r).abs().max().item() / scale)
    return worst


def candidates(
    case: Case, device_type: str, with_compile: bool = True
) -> dict[str, Callable[[Inputs], Any]]:
    """The callables to time, each taking the case's inputs: ``fastdl:<backend>`` for each
    fastdl backend of the device, then the baselines ``eager`` and (when ``with_compile``)
    ``compile``."""

    def under(name: str) -> Callable[..., Any]:
        def call(*args):
            with fastdl.backend(name):
                return case.fastdl(*args)

        return call

    fns = {f"fastdl:{b}": under(b) for b in BACKENDS[device_type]}
    fns["eager"] = case.eager
    # Cases share eager functions (one code object per op), so graphs compiled for earlier
    # cases would pile up against dynamo's recompile limit: each case starts afresh.
    torch._dynamo.reset()
    if with_compile and case.compiled:
        fns["compile"] = torch.compile(case.eager, dynamic=False)
    return {name: partial(case.run, fn) for name, fn in fns.items()}


def families() -> tuple[str, ...]:
    """The families that have cases so far."""
    return tuple(f for f in FAMILIES if importlib.util.find_spec(f"bench.cases.{f}") is not None)


def select(family: str | None = None, substring: str | None = None) -> list[Case]:
    """Cases of one family (or all), whose name contains substring (case-insensitive)."""
    chosen = families() if family is None else (family,)
    cases = [c for f in chosen for c in importlib.import_module(f"bench.cases.{f}").CASES]
    if substring:
        cases = [c for c in cases if substring.lower() in c.name.lower()]
    return cases
