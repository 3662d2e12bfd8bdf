"""What machine a benchmark ran on: every table in BENCHMARKS.md names it, since figures move between CPU classes.
And the environment a benchmark hands the commands it starts on that machine."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from examplegpt.device import KERNEL_FLAGS, cpu_model, kernel_flags

REPO = Path(__file__).resolve().parent.parent


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and which of KERNEL_FLAGS it has."""
    return cpu_model(), kernel_flags()


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Best-of-`repeats` read bandwidth of this CPU in GB/s: `tensor.sum()` over `gib` GiB of float32."""
    x = torch.ones(int(gib * 2**30 / 4))
    x.sum()  # fault the pages in before timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def describe_machine(device: torch.device | str = "cpu") -> str:
    """One line: CPU model, ISA flags, cores, threads, PyTorch build, load average (and the GPU, on CUDA)."""
    model, flags = cpu_model_and_flags()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    line = (
        f"CPU {model} | flags {' '.join(flags) or 'none of ' + '/'.join(KERNEL_FLAGS)} | {os.cpu_count()} cores | "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads | load {load:.1f}"
    )
    if torch.device(device).type == "cuda":
        line += f" | GPU {torch.cuda.get_device_name()}"
    return line


def child_process_env(**extra: str) -> dict[str, str]:
    """This environment, with the repository first on PYTHONPATH and `extra` set, for a command a benchmark
    starts; what was on PYTHONPATH stays (packages carried onto a machine outside site-packages)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **extra)


if __name__ == "__main__":
    print(describe_machine())
    print(f"read bandwidth {read_bandwidth_gbs():.1f} GB/s")
