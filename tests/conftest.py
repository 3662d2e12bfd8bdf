"""Shared fixtures: tiny random models (ours and Hugging Face's) and a way to run the real CLI."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examplegpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parent.parent


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
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline", WANDB_SILENT="true")
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
