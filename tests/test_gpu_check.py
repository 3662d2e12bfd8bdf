"""benchmarks/gpu_check.py cannot rot: its --smoke run does every step on CPU, and the training path
works on a machine without the optional packages (the GPU image has no datasets, fastapi, uvicorn, wandb)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import OFFLINE, REPO

# Imports of these fail, as on a machine without them; then the CLI runs.
WITHOUT_OPTIONAL_PACKAGES = """
import sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"datasets", "fastapi", "uvicorn", "wandb", "starlette", "pydantic"}:
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, Missing())
from examplegpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run(command: list[str], cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), **OFFLINE)
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=1800)


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step(tmp_path):
    proc = run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)], tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    failed = {name: step.get("error") for name, step in report["steps"].items() if step["status"] != "ok"}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-2000:], proc.stderr[-2000:])
    expected = {"train_default", "memory", "fp16", "generate", "serve", "evaluate", "compile"}
    assert set(report["steps"]) == expected
    assert report["steps"]["fp16"]["losses_finite"]
    assert report["steps"]["serve"]["precision"] == "fp32"  # /v1/models names the precision it serves at
    assert report["steps"]["serve"]["seeded_sampling_repeats"] is True
    assert "| train_default | ok |" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_training_on_the_bundled_text_needs_no_optional_package(tmp_path):
    model = ["--d-model", "32", "--num-heads", "2", "--num-layers", "1", "--d-ff", "64", "--max-seq-len", "32"]
    args = ["train", *model, "--data", "shakespeare", "--cache-dir", str(tmp_path / "cache"), "--out-dir",
            str(tmp_path / "run"), "--batch-size", "2", "--max-steps", "1", "--eval-windows", "1", "--device", "cpu"]  # fmt: skip
    proc = run([sys.executable, "-c", WITHOUT_OPTIONAL_PACKAGES, *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "gpt_model.pt").is_file()
