"""Shared fixtures: tiny random models (ours and Hugging Face's) and two ways to run the real CLI."""

from __future__ import annotations

import fcntl
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from examplegpt import GPT, GPTConfig
from examplegpt.cli import main
from examplegpt.reproducibility import pin_cpu_arithmetic
from examplegpt.weights import read_torch_file

REPO = Path(__file__).resolve().parent.parent
# The Hugging Face hub and datasets never go to the network from a test, even on a connected machine.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def pytest_configure(config) -> None:
    os.environ.update(OFFLINE)  # before huggingface_hub is imported: it reads them once
    # No test reads or writes the user's saved weight-layout decisions (saved_layouts.py), nor one another's:
    # each trial runs in the test that wants it (the tests of saving name a file of their own).
    os.environ["EXAMPLEGPT_LAYOUT_CACHE"] = ""
    # One PyTorch thread, here and (through the environment) in every command a test starts: the test models
    # are tiny, so a second thread only adds waits, and many of them where another test worker or a busy
    # machine holds the other core. The tests about threads start their processes with machine_threads().
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    pin_cpu_arithmetic()  # as every command does: in-process tests compute what the commands compute
    global FAST_LOOP
    FAST_LOOP = "not slow" in (config.option.markexpr or "")


FAST_LOOP = False  # pytest -m "not slow": the loop run after each change; CI runs everything


def examples(full_run: int) -> int:
    """How many examples a property test draws: all of them in a full run, a fifth in the fast loop."""
    return max(50, full_run // 5) if FAST_LOOP else full_run


def machine_threads(env: dict[str, str]) -> dict[str, str]:
    """`env` without the suite's OMP_NUM_THREADS: a process that uses the threads PyTorch picks by default."""
    return {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}


@pytest.fixture(autouse=True)
def cpu_to_itself_if_alone(request, tmp_path_factory):
    """Under pytest-xdist (`-n 2`), a test marked `alone` (it compares speeds) runs while no other worker runs one.

    A readers-writer lock on a file the workers share: every test holds it shared, an `alone` test alone; the
    turnstile lets an `alone` test waiting for it go before the tests that come after it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    shared = tmp_path_factory.getbasetemp().parent  # the run's folder, above each worker's own
    alone = request.node.get_closest_marker("alone") is not None
    with open(shared / "cpu.turnstile", "a") as turnstile, open(shared / "cpu.lock", "a") as cpu:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(cpu, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield  # both locks go with the files


# Fixtures that start `examplegpt serve` as a subprocess: a test that uses one is slow, wherever it is written.
SERVER_FIXTURES = {"server", "small_server"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # `alone` tests first: each waits for the other worker's running test to end, which at the start is a
    # short one, and later may be a drill of minutes (every worker sorts alike, as xdist requires)
    items.sort(key=lambda item: item.get_closest_marker("alone") is None)


def tiny_config(**overrides) -> GPTConfig:
    values = dict(d_model=64, num_heads=4, num_layers=2, d_ff=256, max_seq_len=128)
    values.update(overrides)
    return GPTConfig(**values)


def peaked_model(max_seq_len: int) -> GPT:
    """A random tiny model with 8x larger weights: peaked distributions, so greedy has no near-ties
    that rounding (a kernel's summation order, bfloat16) could flip."""
    torch.manual_seed(0)
    model = GPT(tiny_config(max_seq_len=max_seq_len)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8)
    return model


def eos_only_model() -> GPT:
    """A tiny model whose every next token is <|endoftext|>: its final hidden state is e_0, and only
    <|endoftext|>'s embedding scores on it."""
    from examplegpt.tokenizer import EOT_ID

    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[EOT_ID, 0] = 100.0
    return model


@pytest.fixture
def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> Path:
    """A randomly initialised transformers GPT-2, saved with save_pretrained.

    initializer_range 0.2 (not 0.02) spreads the logits, so greedy decoding has no near-ties
    that float rounding could flip between two correct implementations.
    """
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=50257, n_embd=64, n_head=4, n_layer=2, n_positions=128, initializer_range=0.2
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf_gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def run_cli(*args: str, stdin: str | bytes | None = None, cwd: Path | None = None, timeout: float = 300):
    """Run `python -m examplegpt ARGS` the way a user does; returns the CompletedProcess (text output)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline", WANDB_SILENT="true", **OFFLINE)
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run(
        [sys.executable, "-m", "examplegpt", *args],
        input=data if data is not None else b"",
        capture_output=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )
    proc.stdout = proc.stdout.decode("utf-8", errors="replace")
    proc.stderr = proc.stderr.decode("utf-8", errors="replace")
    return proc


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `main(ARGS)` in this process, as `run_cli` runs the command: returns a CompletedProcess.

    For what a subprocess adds nothing to (bad input, output format): no interpreter and torch to start."""

    def run(*args: str, stdin: str | bytes = b"") -> subprocess.CompletedProcess:
        data = stdin.encode() if isinstance(stdin, str) else stdin
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def why_workers_failed(stderr: str) -> str:
    """What a failed torchrun printed that says why: its workers' own error lines (a worker killed by a signal
    leaves them far above torchrun's closing summary), then the summary's end."""
    said = [line for line in stderr.splitlines() if any(w in line for w in ("Error", "error", "what()", "terminate"))]
    return "\n".join(said[:20]) + "\n...\n" + stderr[-1500:]


def assert_one_line_error(proc, *words: str) -> None:
    """Non-zero exit, exactly one line on stderr, no traceback, mentioning `words`."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


def make_text(n_words: int, seed: int) -> str:
    """Seeded sentences of common English words, one per line."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(n_words // 12)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_text(6000, 5))
    return path


# A training run small enough for a subprocess test: the model, and the flags around it.
MICRO_MODEL = ["--d-model", "32", "--num-heads", "2", "--num-layers", "2", "--d-ff", "64", "--max-seq-len", "32"]


def train_args(corpus, out_dir, *extra):
    return [
        "train", *MICRO_MODEL, "--data", str(corpus), "--cache-dir", str(out_dir.parent / "cache"),
        "--out-dir", str(out_dir), "--batch-size", "4", "--micro-batch-size", "2", "--learning-rate", "3e-3",
        "--warmup-steps", "2", "--log-interval", "1", "--eval-interval", "4", "--eval-windows", "4",
        "--device", "cpu", "--no-amp", *extra,
    ]  # fmt: skip


def losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in records]


def final_weights(out_dir):
    return read_torch_file(out_dir / "gpt_model.pt")["model"]


def kill_once_written(proc: subprocess.Popen, path: Path, timeout: float = 240) -> None:
    """SIGKILL `proc` as soon as `path` (a checkpoint it writes) exists: the kill -9 of the resume drills."""
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def fresh_process(monkeypatch) -> None:
    """The CPU accelerator's state as a new process starts: nothing decided, nothing on trial, nothing met."""
    from examplegpt import cpu_inference

    for name in ("_speedups", "_trials", "_earlier"):
        monkeypatch.setattr(cpu_inference, name, {})
    for name in ("_saved", "_merged", "_used", "_met", "_unsaved", "_short"):
        monkeypatch.setattr(cpu_inference, name, set())
