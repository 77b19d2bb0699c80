"""Backends the op-level tests run through, and per-test seeding.

Without CUDA the Triton kernels run on CPU tensors through the Triton interpreter; the
@triton.jit decorator reads TRITON_INTERPRET when the kernel module is imported, so it is set
here, before anything imports triton or fastdl.
"""

import os
from dataclasses import dataclass

import torch

CUDA = torch.cuda.is_available()
if CUDA:
    # The torch twins and references run in true float32: cuDNN's default TF32 (10-bit mantissa)
    # would be the very error the tests measure.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
else:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import fastdl  # noqa: E402
from fastdl import _ext  # noqa: E402

CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

# The CPU ISA levels fastdl.set_cpu_isa takes, lowest first; "amx" runs the AVX-512 kernels with
# the bfloat16 GEMMs on AMX tiles. ISAS: those this CPU has that pick a kernel table of their
# own; BF16_ISAS adds "amx" where the CPU has it, for the ops that reach the bfloat16 GEMM.
ISA_ORDER = ("scalar", "avx2", "avx512", "amx")
BF16_ISAS = ISA_ORDER[: ISA_ORDER.index(_ext._C.best_cpu_isa()) + 1] if _ext._C is not None else ()
ISAS = tuple(isa for isa in BF16_ISAS if isa != "amx")
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    """One way an op can run: fastdl.backend(name) with tensors on device."""

    name: str
    device: str
    dtypes: tuple[torch.dtype, ...]

    def __str__(self) -> str:
        return f"{self.name}-{self.device}"

    @property
    def interpreted(self) -> bool:
        """Triton on CPU tensors: the interpreter, so only small shapes."""
        return self.name == "triton" and self.device == "cpu"

    def ops(self, family):
        """The raw ops of this backend in ``family``, a fastdl.ops module (its NATIVE or TRITON
        namespace)."""
        return family.NATIVE if self.name == "native" else family.TRITON

    def missing(self) -> str | None:
        if self.name == "native":
            if _ext._C is None:
                return "needs the built extension"
            if self.device == "cuda" and not _ext.native_cuda():
                return "needs the built extension with CUDA"
        elif not _ext.HAS_TRITON:
            return "needs triton"
        return None


NATIVE_CPU = Backend("native", "cpu", CPU_DTYPES)
if CUDA:
    BACKENDS = (
        NATIVE_CPU,
        Backend("native", "cuda", GPU_DTYPES),
        Backend("triton", "cuda", GPU_DTYPES),
    )
else:
    BACKENDS = (NATIVE_CPU, Backend("triton", "cpu", GPU_DTYPES))


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def case_id(case) -> str:
    if isinstance(case, tuple):
        return "x".join(map(str, case))
    return str(case)


def cases(native, interpreted=None, dtypes=True):
    """pytest params (backend[, dtype], case) for ``@pytest.mark.parametrize("backend,dtype,case",
    ...)``: ``native`` cases for compiled backends, ``interpreted`` (default: the same) for Triton
    through the interpreter, each with every dtype the backend supports when ``dtypes`` (or the
    dtypes in ``dtypes`` that the backend supports, when it is a tuple)."""
    params = []
    for b in BACKENDS:
        for case in interpreted if (b.interpreted and interpreted is not None) else native:
            wanted = b.dtypes if dtypes is True else [d for d in dtypes or () if d in b.dtypes]
            for dt in wanted if dtypes else (None,):
                values = (b, dt, case) if dtypes else (b, case)
                ident = "-".join(filter(None, (str(b), dt and dtype_id(dt), case_id(case))))
                params.append(pytest.param(*values, id=ident))
    return params


def _parametrized(metafunc, name: str) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else names
        if name in names:
            return True
    return False


def pytest_generate_tests(metafunc):
    # A test that asks for `backend` without parametrizing it itself runs on every backend.
    if "backend" in metafunc.fixturenames and not _parametrized(metafunc, "backend"):
        metafunc.parametrize("backend", BACKENDS, ids=str, indirect=True)


@pytest.fixture
def backend(request):
    """The Backend of the test (put in force by _backend_in_force)."""
    return request.param


def backend_of(request) -> Backend | None:
    """The Backend a test is parametrized with, however it was (through the fixture above, or
    directly without indirect=); None for a test without one."""
    spec = getattr(request.node, "callspec", None)
    b = spec.params.get("backend") if spec is not None else None
    return b if isinstance(b, Backend) else None


@pytest.fixture(autouse=True)
def _backend_in_force(request):
    """fastdl.backend(name) for the test's `backend` parameter for its duration, so no test can
    run the native path on a row it labels triton; a missing backend skips the test."""
    b = backend_of(request)
    if b is None:
        yield
        return
    reason = b.missing()
    if reason:
        pytest.skip(reason)
    with fastdl.backend(b.name):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
