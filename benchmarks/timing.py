"""Wall-clock timing shared by the benchmark scripts: synchronised on CUDA, so queued GPU work is counted."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds that one call of fn() takes, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_steps(step: Callable[[], object], steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds per call of step() for `steps` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    return [timed(step, device) for _ in range(steps)]
