"""The GPU benchmark script runs on CPU with a small model, so it cannot rot unseen."""

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
