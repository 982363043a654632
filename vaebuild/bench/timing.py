"""Timing, shared by `vaebuild bench` and the scripts under benchmarks/ and scripts/.

`warmup` untimed calls, then `runs` timed calls; CUDA events on a GPU, `time.perf_counter` on a CPU;
median and p90 (nearest rank).
"""

import math
import statistics
import time


def time_calls(fn, device, warmup, runs):
    """Milliseconds of `runs` calls of `fn` after `warmup` untimed ones (CUDA events on a GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return times


def summarize(times):
    """median, p90 (nearest rank) and min of a list of milliseconds."""
    ordered = sorted(times)
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]
    return {"median_ms": statistics.median(ordered), "p90_ms": p90, "min_ms": ordered[0]}
