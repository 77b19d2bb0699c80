"""The machine a run measures: a short name for its results file, versions, and its peaks
(copy bandwidth, fp32 GEMM rate, int8 multiply-add rate) measured in the same run, against which
the rows report their fraction of peak."""

import datetime
import os
import platform
import re

import torch

import fastdl
from bench import timing

# Large enough that no cache holds them: src + dst of 2 x 256 MiB (1 GiB each on a GPU).
COPY_BYTES = {"cpu": 256 * 2**20, "cuda": 2**30}
# Square fp32 GEMM sizes that run near the rate of large ones without taking long.
GEMM_N = {"cpu": 2048, "cuda": 8192}


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` of /proc/cpuinfo, None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {_cores()} cores"


def slug(device: torch.device) -> str:
    """'h200' for an NVIDIA H200; 'intel-xeon-gold-6430-2c' for a CPU: model and core count, and
    'avx2' after the model where the CPU has no AVX-512 (a VM's model name may be just "AMD
    EPYC" for a Zen 3 with AVX2 and a Zen 4 with AVX-512, whose kernels differ)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).removeprefix("NVIDIA ")
        suffix = ""
    else:
        flags = (_cpuinfo("flags") or "").split()
        name = _cpu_model() + (" avx2" if "avx2" in flags and "avx512f" not in flags else "")
        suffix = f"-{_cores()}c"
    name = re.sub(r"\((R|TM)\)|\bCPU\b|\bProcessor\b|@.*$", " ", name, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + suffix


def versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "fastdl": fastdl.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
    }
    if torch.version.cuda:
        info["cuda"] = torch.version.cuda
    return info


def describe(device: torch.device) -> dict:
    """The header of a results file, less the peaks."""
    info = {
        "machine": slug(device),
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    if device.type == "cpu":
        info["cpu_isa"] = fastdl.cpu_isa() if fastdl._ext._C is not None else None
    return info


def peaks(device: torch.device, plan: timing.Plan) -> dict:
    """Copy bandwidth in GB/s (bytes read + written by ``dst.copy_(src)``), fp32 GEMM rate
    in GFLOP/s (``torch.mm`` at the float32 matmul precision in force) and the int8 peak in
    GOP/s (see _int8_peak)."""
    numel = COPY_BYTES[device.type] // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    n = GEMM_N[device.type]
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    t, _ = timing.interleaved(
        {"copy": lambda: dst.copy_(src), "mm": lambda: torch.mm(a, b)}, device, plan
    )
    return {
        "copy_gbps": 2 * src.numel() * src.element_size() / t["copy"] / 1e9,
        "gemm_gflops": 2 * n**3 / t["mm"] / 1e9,
        "gemm_precision": torch.get_float32_matmul_precision(),
        "int8_gops": _int8_peak(device),
    }


def _int8_peak(device: torch.device) -> float | None:
    """The int8 multiply-add peak in GOP/s on every thread: fastdl's register-only loop of the
    instruction its CPU GEMM is built on (AVX512-VNNI vpdpbusd); None on CUDA and where the CPU
    kernels have none (AVX2, scalar)."""
    if device.type != "cpu" or fastdl._ext._C is None:
        return None
    return fastdl._ext._C._int8_peak_gops() or None
