"""The compiled extension fastdl._C and the optional Triton dependency, loaded without fuss.

fastdl imports cleanly without either; an op that needs a missing backend says which one and
how to get it.
"""

import importlib.util
import os

try:
    from fastdl import _C
except ImportError as e:  # the extension is not built: only the Triton backend can work
    _C = None
    _C_ERROR = str(e)
else:
    _C_ERROR = ""

HAS_TRITON = importlib.util.find_spec("triton") is not None
# Triton kernels run on CPU tensors through the interpreter when this is set before import.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_native(op: str) -> None:
    if _C is None:
        raise RuntimeError(
            f"{op}: the C++/CUDA extension fastdl._C is not built ({_C_ERROR}); run `make build` "
            "or `pip install -e . --no-build-isolation`, or use fastdl.backend('triton') on CUDA"
        )


def native_cuda() -> bool:
    return _C is not None and _C.has_cuda()


def cpu_isa() -> str:
    """The CPU ISA the C++ kernels use now: 'amx' (AVX-512 kernels, the bfloat16 GEMMs on AMX
    tiles), 'avx512', 'avx2' or 'scalar'."""
    require_native("fastdl.cpu_isa")
    return _C.cpu_isa()


def set_cpu_isa(name: str) -> None:
    """Lower the CPU ISA the C++ kernels use (e.g. 'avx512' keeps the bfloat16 GEMMs off AMX tiles,
    'avx2' tests the AVX2 path on an AVX-512 CPU), or restore it."""
    require_native("fastdl.set_cpu_isa")
    _C.set_cpu_isa(name)


def available_backends() -> dict[str, str]:
    """Each backend and whether it can run here, with the reason when it cannot."""
    import torch

    cuda = torch.cuda.is_available()
    triton_state = "missing (pip install triton)"
    if HAS_TRITON:
        if cuda:
            triton_state = "available (CUDA)"
        elif TRITON_INTERPRET:
            triton_state = "available (interpreter on CPU tensors, TRITON_INTERPRET=1)"
        else:
            triton_state = "installed, no GPU (set TRITON_INTERPRET=1 to run it on CPU tensors)"
    if _C is None:
        cpu_state = cuda_state = f"missing (fastdl._C not built: {_C_ERROR})"
    else:
        cpu_state = f"available (ISA {_C.cpu_isa()}, best {_C.best_cpu_isa()})"
        if not _C.has_cuda():
            cuda_state = (
                "missing (fastdl._C built without CUDA: torch has no CUDA or FASTDL_NO_CUDA)"
            )
        else:
            cuda_state = "available" if cuda else "built, no GPU visible"
    return {"cpu (C++)": cpu_state, "cuda (native .cu)": cuda_state, "triton": triton_state}
