"""Benchmark scripts that run in the suite on CPU with a small model, so they cannot rot unseen."""

import subprocess
import sys

from .conftest import REPO


def test_training_sweep_runs_on_cpu():
    command = [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--sweep", "--device", "cpu",
               "--preset", "tiny", "--micro-batches", "1", "2", "--compile-options", "0", "--steps", "2",
               "--warmup", "1"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| False")]
    assert len(rows) == 4  # checkpointing off/on x micro-batch 1, 2
    assert all(float(row.split("|")[4].replace(",", "")) > 0 for row in rows)


def test_memory_benchmark_counts_what_checkpointing_saves():
    command = [sys.executable, str(REPO / "benchmarks" / "bench_memory.py"), "--preset", "tiny", "--batch", "8",
               "--steps", "1"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("|")[1].strip(): line.split("|") for line in proc.stdout.splitlines() if line.startswith("| o")}
    live = {name: float(row[3].replace(",", "")) for name, row in rows.items()}  # MB of live tensors at the peak
    # the tiny model's weights and AdamW state alone are ~130 MB: a peak below that would count nothing
    assert live.keys() == {"off", "on"} and 130 < live["on"] < live["off"]
