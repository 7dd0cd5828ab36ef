"""Clocks and memory gauges for the benchmark: wall time on the CPU, CUDA events on the GPU."""

import statistics
import time
from typing import Callable, Optional

import torch


def _resident_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in bytes (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_memory_bytes(fn: Callable[[], None], device: torch.device) -> Optional[int]:
    """Memory that one call of ``fn`` needs above what is already held: allocator peak on CUDA,
    peak resident set size on the CPU (Linux resets it when "5" is written to clear_refs)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        before = _resident_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return None
    fn()
    return _resident_bytes("VmHWM") - before


def milliseconds_per_call(fn: Callable[[], None], device: torch.device, calls: int) -> float:
    """Mean time of ``calls`` back-to-back calls: CUDA events on the GPU, perf_counter on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - began) * 1e3 / calls


def calls_for(fn: Callable[[], None], device: torch.device, target_ms: float) -> int:
    """How many back-to-back calls fill about ``target_ms`` (one at least, 200 at most)."""
    once = milliseconds_per_call(fn, device, 1)
    return max(1, min(200, int(target_ms / max(once, 1e-3))))


def median(values: list) -> float:
    return statistics.median(values)


def gemm_peak_tflops(
    device: torch.device, dtype: torch.dtype, rounds: int = 5, size: Optional[int] = None
) -> float:
    """The machine's measured matrix-multiply rate for ``dtype``, in TFLOP/s (best of rounds of
    ``size``-square products; by default 8192 on a GPU, 2048 on the CPU)."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    fn = lambda: torch.mm(a, b)  # noqa: E731
    fn()
    calls = calls_for(fn, device, 200.0)
    best_ms = min(milliseconds_per_call(fn, device, calls) for _ in range(rounds))
    return 2 * size**3 / best_ms / 1e9
