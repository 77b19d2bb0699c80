"""Measure one case: its error against float64, then every candidate timed interleaved."""

import time
from functools import partial

import torch

from bench import cases, timing

# How each fastdl backend is shown, per device type.
BACKEND_LABELS = {"cpu": {"native": "c++"}, "cuda": {"native": "cuda", "triton": "triton"}}


def _one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 160 else text[:159] + "…"


def _target_checks(target: cases.Target | None, traffic: int, speedup: dict, fraction):
    """[(label, met)] per requirement of the target; a missing figure does not meet it."""
    if target is None:
        return []
    checks = []
    for base in cases.BASELINES:
        need = getattr(target, base)
        if need is not None:
            got = speedup.get(base)
            checks.append((f"{base[0]}≥{need:g}", got is not None and got >= need))
    if target.peak is not None:
        peak = "bw" if traffic else "gemm"
        checks.append(
            (f"{peak}≥{target.peak:.0%}", fraction is not None and fraction >= target.peak)
        )
    return checks


def _rate_unit(case) -> str:
    if case.traffic:
        return "GB/s"
    return "GOP/s" if case.family == "int8" else "GFLOP/s"


def _row(case, backend, device_type, times, errors, failed, peaks, extra) -> dict:
    mine = f"fastdl:{backend}"
    t = times.get(mine)
    speedup = {b: times[b] / t for b in cases.BASELINES if t and b in times}
    rate = fraction = None
    if t and case.traffic:
        rate = case.bytes / t / 1e9
        fraction = rate / peaks["copy_gbps"]
    elif t and case.flops:
        rate = case.flops / t / 1e9
        peak = peaks.get("int8_gops") if case.family == "int8" else peaks["gemm_gflops"]
        fraction = peak and rate / peak
    checks = _target_checks(case.target, case.traffic, speedup, fraction)
    return {
        "case": case.name,
        "family": case.family,
        "label": case.label,
        "shape": case.shape_str,
        "dtype": case.dtype_str,
        "backend": BACKEND_LABELS[device_type][backend],
        "time_ms": {"fastdl": t and t * 1e3}
        | {b: times[b] * 1e3 for b in cases.BASELINES if b in times},
        "speedup": speedup,
        "bytes": case.bytes,
        "flops": case.flops,
        "rate": rate,
        "rate_unit": _rate_unit(case),
        "peak_fraction": fraction,
        "rel_error": {"fastdl": errors.get(mine)}
        | {b: errors[b] for b in cases.BASELINES if b in errors},
        "target": case.target and {k: v for k, v in vars(case.target).items() if v is not None},
        "target_checks": checks,
        "target_met": all(met for _, met in checks) if checks else None,
        "failed": {k: v for k, v in failed.items() if k == mine or k in cases.BASELINES},
        **extra,
    }


def measure(
    case: cases.Case,
    device: torch.device,
    plan: timing.Plan,
    peaks: dict,
    with_compile: bool = True,
) -> list[dict]:
    """One row per fastdl backend of the device, sharing the baselines' timings (without the
    torch.compile baseline unless ``with_compile``)."""
    inputs = case.make(case, device)
    ref = case.reference(inputs)
    ready, errors, failed, first_s = {}, {}, {}, {}
    for name, fn in cases.candidates(case, device.type, with_compile).items():
        try:
            t0 = time.perf_counter()
            out = fn(inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_s[name] = time.perf_counter() - t0
            errors[name] = cases.max_error(out, ref)
        except Exception as e:  # a failing candidate is reported in its row, the run goes on
            failed[name] = _one_line(e)
            continue
        ready[name] = partial(fn, inputs)
        del out
    del ref
    times, reps = timing.interleaved(ready, device, plan) if ready else ({}, 0)
    extra = {"reps": reps, "compile_s": first_s.get("compile")}
    return [
        _row(case, b, device.type, times, errors, failed, peaks, extra)
        for b in cases.BACKENDS[device.type]
    ]
