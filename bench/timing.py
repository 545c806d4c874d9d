"""Wall-clock timing shared by the benchmarks: device work counts only once it has finished."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(work: Callable[[], Any], device: torch.device, repeats: int = 1) -> float:
    """Median wall time of ``work`` over ``repeats`` runs, after one untimed run (kernel
    selection, allocator)."""
    work()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        work()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)
