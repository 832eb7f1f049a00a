"""The wall clock of the benchmarks: seconds of one call, the device's queued work included."""

from __future__ import annotations

import time

import torch


def seconds(fn, device: torch.device) -> float:
    """Seconds ``fn()`` takes, synchronising CUDA before and after (its kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
