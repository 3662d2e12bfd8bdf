"""Benchmark scripts that run in the suite on CPU with a small model, so they cannot rot unseen."""

import importlib.util
import os
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow  # each runs a benchmark script in a subprocess


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


def test_generation_benchmark_runs_and_matches_transformers_tokens():
    command = [sys.executable, str(REPO / "benchmarks" / "bench_generate.py"), "--layers", "1", "--d-model", "64",
               "--heads", "2", "--new-tokens", "8", "--repeats", "1", "--batches", "1", "2"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    ratios = [line for line in proc.stdout.splitlines() if "| ratio |" in line]
    assert len(ratios) == 2 and all("same tokens: True" in line for line in ratios)
    assert all(float(line.split("|")[4].strip().rstrip("x")) > 0 for line in ratios)


def test_evaluation_benchmark_scores_alike_with_and_without_the_accelerator_and_as_transformers():
    command = [sys.executable, str(REPO / "benchmarks" / "bench_evaluate.py"), "--layers", "1", "--d-model", "64",
               "--heads", "2", "--window", "32", "--batch", "2", "--tokens", "200", "--repeats", "1"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("CPU ")  # the machine first
    losses = [float(line.rsplit("loss ", 1)[1]) for line in proc.stdout.splitlines() if "tokens/s, loss" in line]
    assert len(losses) == 3  # transformers, evaluate as run, evaluate --no-fast-cpu
    assert max(losses) - min(losses) < 1e-4, proc.stdout
    assert "accelerated / plain: " in proc.stdout


def test_the_weight_copies_benchmark_measures_what_the_accelerator_assumes():
    from examplegpt.cpu_inference import COPY_COST

    command = [sys.executable, str(REPO / "benchmarks" / "bench_weight_copies.py"), "--small", "--rounds", "1"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("CPU ")  # the machine first
    rows = [line.split("|") for line in lines if line[2:3].isdigit()]  # | 192 x 64 | ...
    assert len(rows) == 2 and all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)
    assert f"the accelerator takes packed {COPY_COST['packed']}, transposed {COPY_COST['transposed']}" in lines[-1]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal where there is no GPU")
@pytest.mark.parametrize("script", ["bench_generate.py", "bench_serve.py"])
def test_generation_benchmarks_refuse_cuda_without_a_gpu_in_one_line(script):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--device", "cuda"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("--device cuda: this PyTorch sees no CUDA GPU")


def test_serve_benchmark_refuses_to_pin_the_server_to_every_cpu_the_clients_could_use():
    every_cpu = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_serve.py"), "--server-cpus", every_cpu],
                          capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no CPU is left for the clients" in proc.stderr.strip().splitlines()[-1]


def test_decode_parts_benchmark_times_every_part():
    command = [sys.executable, str(REPO / "benchmarks" / "bench_decode_parts.py"), "--repeats", "3"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    with_transformers = importlib.util.find_spec("transformers") is not None  # its sampling step is one more row
    assert len(rows) == 1 + 18 + with_transformers  # the header and the parts
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows[1:])


def test_linear_kernel_benchmark_times_every_kernel_it_finds():
    command = [sys.executable, str(REPO / "benchmarks" / "bench_linear_kernels.py"), "--small", "--repeats", "2"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    totals = proc.stdout.split("every Linear of one decode step")[1]
    lines = [line.split("|") for line in totals.splitlines() if line.startswith("| ") and "rows |" not in line]
    rows = {cells[1].strip(): [float(ms) for ms in cells[2:4]] for cells in lines}  # ms at 1 and 8 rows
    assert {"fp32 F.linear", "fp32 packed", "int8 weight-only", "int8 x int8 fbgemm"} <= rows.keys()
    assert all(ms > 0 for pair in rows.values() for ms in pair)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--clients", "1", "-1"], "--clients"),
        (["--prompt-tokens", "x"], "--prompt-tokens"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_serve_benchmark_refuses_counts_below_one_in_one_line(flags, named):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_serve.py"), *flags],
                          capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    expected = f"argument {named}: expected a whole number of at least 1, got {flags[-1]!r}"
    assert proc.stderr.strip().splitlines()[-1].endswith(expected)


def test_serve_benchmark_without_aiohttp_says_how_to_install_it():
    hide_aiohttp = ("import runpy, sys; sys.modules['aiohttp'] = None; sys.path.insert(0, 'benchmarks'); "
                    "runpy.run_path('benchmarks/bench_serve.py', run_name='__main__')")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", hide_aiohttp], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "bench_serve.py reads the streams with aiohttp, which is not installed: pip install -e '.[dev]'"
    ]
