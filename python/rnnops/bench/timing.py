"""Timing: CUDA events on a GPU, ``time.perf_counter`` on the CPU; medians over repeats."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    """Seconds per call over ``len(samples)`` repeats after warm-up."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the machine was."""
        return (max(self.samples) - min(self.samples)) / self.median


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, repeats: int = 5,
            min_seconds: float = 0.0, max_seconds: float = float("inf")) -> Timing:
    """Time ``fn()`` after ``warmup`` calls: ``repeats`` times, more (up to 100) until
    ``min_seconds`` have been spent measuring, fewer (at least one) once ``max_seconds`` have."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    spent = 0.0
    while True:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            fn()
            seconds = time.perf_counter() - begin
        samples.append(seconds)
        spent += seconds
        enough = len(samples) >= repeats and spent >= min_seconds
        if enough or spent >= max_seconds or len(samples) >= 100:
            return Timing(samples)
