"""Interleaved median timing of several candidates in one process.

Each repetition runs every candidate once, in an order rotated from one repetition to the next,
so that drift (clock boost, other load, thermal state) hits all of them alike; the figure kept
is the median. Before each call the cache is flushed, so that no candidate finds its inputs
cached by the one before (server CPUs have L3s of hundreds of MiB, as large as the cases) nor
pays for writing back its dirty lines. On CPU a call is timed with time.perf_counter; on CUDA
it is bracketed by CUDA events after zeroing a buffer larger than L2 (the method of
triton.testing.do_bench).

The process's glibc malloc is held in one state for the whole run (steady_allocator): left to
itself, whether a large host buffer is a fresh mapping (page faults, the kernel zeroing each
page) or reused heap depends on what the process allocated before, and torch's own NCHW 3x3
conv of the issue-4 layer took 45 ms in one state and 26 ms in the other (its 7x7 stem, whose
102 MB output glibc maps afresh above 32 MiB, 78 and 34 ms).
"""

import ctypes
import gc
import glob
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

GPU_FLUSH_BYTES = 256 * 2**20  # larger than the L2 of any current GPU (H100/H200: 50 MiB)
CPU_FLUSH_MAX_BYTES = 2**30


@dataclass(frozen=True)
class Plan:
    warmup: int  # rounds before timing (the first call also builds compiled graphs)
    min_reps: int
    max_reps: int
    budget_s: float  # timed rounds stop at max_reps or about this many seconds

    def reps(self, round_s: float) -> int:
        return max(self.min_reps, min(self.max_reps, int(self.budget_s / max(round_s, 1e-9))))


FULL = Plan(warmup=2, min_reps=5, max_reps=100, budget_s=8.0)
QUICK = Plan(warmup=1, min_reps=3, max_reps=3, budget_s=0.0)


# glibc's mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def steady_allocator() -> bool:
    """Hold glibc malloc steady for this process: every host buffer comes from the heap (no
    mmap'd chunks) and freed memory stays there (trimmed only beyond 1 GiB), so a buffer freed
    is reused by the next call of its size. By default glibc maps large buffers afresh, and
    below 32 MiB moves its thresholds with the sizes freed so far, so that the same call either
    reuses memory or maps and zeroes it anew, by history. True when applied (a glibc process);
    elsewhere nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**30))


def _cpu_cache_bytes() -> int:
    """The largest CPU cache (the last level), from sysfs; 256 MiB where it cannot be read."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=256 * 2**20)


def cache_flusher(device: torch.device) -> Callable[[], object]:
    """A call that evicts the data of the previous one from the caches."""
    if device.type == "cuda":
        buf = torch.empty(GPU_FLUSH_BYTES, dtype=torch.int8, device=device)
        return buf.zero_
    # Reading (not writing) twice the last-level cache: the flush's own lines stay clean, so
    # evicting them costs the next call nothing, while the dirty lines it evicts are written
    # back now. Written once here so that its pages are real, not the shared zero page.
    buf = torch.ones(min(2 * _cpu_cache_bytes(), CPU_FLUSH_MAX_BYTES) // 4)
    return buf.sum


def _rounds(fns: dict[str, Callable[[], object]], reps: int, device: torch.device, flush):
    names = list(fns)
    order = [names[r % len(names) :] + names[: r % len(names)] for r in range(reps)]
    if device.type == "cuda":
        events = {n: [] for n in names}
        for names_r in order:
            for n in names_r:
                flush()
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fns[n]()
                end.record()
                events[n].append((start, end))
        torch.cuda.synchronize(device)
        return {n: [s.elapsed_time(e) / 1e3 for s, e in ev] for n, ev in events.items()}
    samples = {n: [] for n in names}
    for names_r in order:
        for n in names_r:
            flush()
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append(time.perf_counter() - t0)
    return samples


def interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, plan: Plan = FULL
) -> tuple[dict[str, float], int]:
    """Median seconds per call of each candidate, and the number of timed repetitions.

    The repetition count fits the budget, estimated from the last warm-up round.
    """
    flush = cache_flusher(device)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one candidate's call would be charged to it
    try:
        warm = _rounds(fns, plan.warmup, device, flush)
        reps = plan.reps(sum(s[-1] for s in warm.values()))
        samples = _rounds(fns, reps, device, flush)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {n: statistics.median(s) for n, s in samples.items()}, reps
