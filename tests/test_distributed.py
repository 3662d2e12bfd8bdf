"""Data-parallel training launched the way users launch it (torchrun, gloo on CPU)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import REPO, final_weights, losses, run_cli, train_args, why_workers_failed

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built"),
    pytest.mark.slow,  # torchrun subprocesses
]

STEPS = ["--batch-size", "8", "--micro-batch-size", "2", "--val-fraction", "0.1"]


def torchrun(*args, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"]
    command += ["-m", "examplegpt", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return command, env


def children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def kill_launcher_and_workers(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once, as a machine crash would.

    torchrun starts every worker in a session of its own, so killing the launcher's process group
    leaves the workers running on (and writing checkpoints) as orphans.
    """
    workers = children(proc.pid)
    for pid in [proc.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    while not all(is_gone(pid) for pid in workers):
        time.sleep(0.05)  # orphans are reaped by init, not by us: wait until they are gone


def is_gone(pid: int) -> bool:
    """Exited: no longer in /proc, or a zombie waiting for init to reap it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "zombie" in status.split("State:")[1].splitlines()[0].lower()


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(corpus, tmp_path, mode):
    one = tmp_path / "one"
    assert run_cli(*train_args(corpus, one, *STEPS, "--max-steps", "6", "--micro-batch-size", "4")).returncode == 0
    two = tmp_path / "two"
    extra = ["--fsdp"] if mode == "fsdp" else []
    command, env = torchrun(*train_args(corpus, two, *STEPS, "--max-steps", "6", *extra))
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, why_workers_failed(proc.stderr)
    assert "x2" in proc.stdout and proc.stdout.count("step 6/6") == 1  # only rank 0 prints
    assert max_difference(final_weights(one), final_weights(two)) < 1e-5
    for (s1, l1, v1), (s2, l2, v2) in zip(losses(one), losses(two)):
        assert s1 == s2 and (l1 is None or abs(l1 - l2) < 1e-5)
        assert v1 is None or abs(v1 - v2) < 1e-5  # the same validation set, whatever the number of processes


def test_kill_and_resume_under_two_processes(corpus, tmp_path):
    steps = [*STEPS, "--max-steps", "24", "--checkpoint-interval", "4"]
    straight = tmp_path / "straight"
    command, env = torchrun(*train_args(corpus, straight, *steps))
    assert subprocess.run(command, env=env, capture_output=True, timeout=300).returncode == 0

    killed = tmp_path / "killed"
    command, env = torchrun(*train_args(corpus, killed, *steps))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "checkpoints" / "checkpoint_epoch1_batch4.pt"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_launcher_and_workers(proc)
    assert first.exists() and not (killed / "gpt_model.pt").exists()

    command, env = torchrun(*train_args(corpus, killed, *steps, "--resume", "auto"))
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    difference = max_difference(final_weights(straight), final_weights(killed))
    assert difference < 1e-6, (difference, resumed.stdout[-1500:])
    assert [s for s, _, _ in losses(straight)] == [s for s, _, _ in losses(killed)]
