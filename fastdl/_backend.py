"""Which kernels run a CUDA tensor: the hand-written CUDA ones ("native"), Triton ("triton"),
or "auto", the faster of the two as measured (AUTO below, from bench/results).

CPU tensors always run the C++ kernels, except that with TRITON_INTERPRET=1 and the backend
set to "triton" they run the Triton kernels through the interpreter (how the tests cover them).
"""

import os

import torch

from fastdl import _checks, _ext

BACKENDS = ("native", "triton", "auto")
# The faster CUDA backend per family, for (float32, 16-bit float) tensors, as measured by
# `python -m bench --device cuda` on an H200 (bench/results/h200.json, 2026-12-04): Triton's
# tensor-core tiles win attention and dense conv2d in bfloat16 (fastdl/ops/conv.py keeps
# depthwise and transposed convs native), the CUDA kernels win in float32 (and everywhere for
# norm, whose fused backward is 1.5-2x faster). rnn and graph were not measured yet: native.
AUTO = {
    "norm": ("native", "native"),
    "attention": ("native", "triton"),
    "conv": ("native", "triton"),
    "rnn": ("native", "native"),
    "graph": ("native", "native"),
    "int8": ("native", "native"),
}


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"fastdl.backend: expected one of {BACKENDS}, got {name!r}")
    return name


_current = _validate(os.environ.get("FASTDL_BACKEND", "auto"))


def get_backend() -> str:
    """The backend in force: 'native', 'triton' or 'auto'."""
    return _current


class backend:
    """Set the CUDA backend, as a setter (``fastdl.backend("triton")``) or for a block
    (``with fastdl.backend("native"): ...``), restoring the previous one on exit."""

    def __init__(self, name: str):
        global _current
        self._previous = _current
        _current = _validate(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _current
        _current = self._previous
        return False


def resolve(family: str, device_type: str, dtype: torch.dtype | None = None) -> str:
    """'native' or 'triton' for a tensor of this device type (and dtype), under the backend in
    force."""
    if device_type != "cuda":
        return "triton" if _current == "triton" and _ext.TRITON_INTERPRET else "native"
    if _current != "auto":
        return _current
    choice = AUTO[family][dtype in (torch.float16, torch.bfloat16)]
    if choice == "native" and not _ext.native_cuda() and _ext.HAS_TRITON:
        return "triton"
    return choice


def namespace(family: str, op: str, x: torch.Tensor, native, triton, triton_slow: bool = False):
    """The ops (a family's NATIVE or TRITON namespace) that run ``x`` under the backend in force;
    under "auto", a call the family's Triton kernels are measured slow for (``triton_slow``)
    stays on the CUDA kernels."""
    _checks.no_forward_ad(op, x)
    choice = resolve(family, x.device.type, x.dtype)
    if choice == "triton" and triton_slow and _current == "auto" and _ext.native_cuda():
        choice = "native"
    if choice == "triton":
        if triton is None:
            raise RuntimeError(f"{op}: the Triton backend needs triton (pip install triton)")
        return triton
    _ext.require_native(op)
    return native
