"""Wall-clock timing shared by the benchmarks: device work counts only once it has finished."""

from __future__ import annotations

import statistics
import threading
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


def nvml_reader(device: torch.device) -> Callable[[], tuple[float, float]] | None:
    """A function that reads ``device``'s SM clock (MHz) and power draw (W) through NVML
    (``torch.cuda.clock_rate``, ``torch.cuda.power_draw``), or None off CUDA or where NVML
    cannot be read (no ``pynvml``)."""
    if device.type != "cuda":
        return None

    def read() -> tuple[float, float]:
        return float(torch.cuda.clock_rate(device)), torch.cuda.power_draw(device) / 1000

    try:
        read()
    except Exception:  # NVML missing or refused: report nothing rather than fail a run
        return None
    return read


class DeviceSampler:
    """While entered, read the device's SM clock and power every ``interval`` seconds on a
    thread: what the GPU ran at during timed runs (one that reaches its power limit lowers
    its clock, and every kernel slows). ``medians()`` is empty where ``read`` is None."""

    def __init__(self, read: Callable[[], tuple[float, float]] | None, interval: float = 0.1):
        self.read = read
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> DeviceSampler:
        if self.read is not None:
            self._thread = threading.Thread(target=self._sample, name="device-sampler")
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.samples.append(self.read())
            except Exception:  # NVML gone meanwhile: keep what was read
                return

    def medians(self) -> dict[str, float]:
        """The median SM clock (``sm_clock_mhz``) and power (``power_w``) sampled, and how
        many samples; empty without any."""
        if not self.samples:
            return {}
        return {
            "sm_clock_mhz": statistics.median(clock for clock, _ in self.samples),
            "power_w": statistics.median(power for _, power in self.samples),
            "samples": len(self.samples),
        }
