"""GPU timing for the micro-benchmarks: CUDA events around repeated calls, after warm-up calls."""

import torch


def milliseconds(step, repeats: int = 10, warmup: int = 3) -> float:
    """Mean time of `step()` in milliseconds, measured with CUDA events after `warmup` untimed calls (compilation,
    allocator and autotuning happen there)."""
    for _ in range(warmup):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats
