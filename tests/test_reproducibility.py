"""Same seed, same bits, checked where it can break: across fresh processes and memory addresses.

Bit-equality inside one process proves little: the ways two runs of a command can round differently
(how a library splits a product between threads, which code path an address's alignment selects) are
fixed for the life of a process. So the training runs here are separate processes, each with an
environment of another size (which moves the stack and what is allocated after it), and the loss is
checked with its inputs placed at offsets inside larger buffers."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from examplegpt.loss import fused_linear_cross_entropy
from examplegpt.reproducibility import cpu_arithmetic_is_pinned

from .conftest import OFFLINE, REPO, final_weights, kill_once_written, machine_threads, make_text


def weights_hash(out_dir) -> str:
    weights = final_weights(out_dir)
    return hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()


def launch(args, shift: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline", **OFFLINE, ADDRESS_SHIFT="x" * shift)
    env = machine_threads(env)  # every thread of the machine: one thread hides what threads can change
    return subprocess.Popen([sys.executable, "-m", "examplegpt", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.slow
def test_fresh_processes_and_a_kill_and_resume_give_one_weight_hash(tmp_path):
    """The shapes that exposed a difference on a 2-core AVX-512 Xeon: the tiny preset at batch 8 x 128,
    one 1,024-row chunk of the fused loss per micro-batch, both threads of the machine."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(20000, 7))

    def args(out, *extra):
        return ["train", "--preset", "tiny", "--max-seq-len", "128", "--data", str(corpus), "--cache-dir",
                str(tmp_path / "cache"), "--out-dir", str(out), "--batch-size", "8", "--max-steps", "6",
                "--num-epochs", "100", "--checkpoint-interval", "3", "--eval-interval", "1000", "--log-interval", "1",
                "--learning-rate", "2e-3", "--warmup-steps", "2", "--no-checkpointing", "--no-amp", "--seed", "1",
                "--device", "cpu", *extra]  # fmt: skip

    straight = [tmp_path / f"straight{i}" for i in range(3)]
    for i, out in enumerate(straight):
        proc = launch(args(out), shift=37 * i + 1)
        assert proc.wait(timeout=600) == 0, proc.stderr.read()

    killed = tmp_path / "killed"
    proc = launch(args(killed), shift=501)
    first = killed / "checkpoints" / "checkpoint_epoch1_batch3.pt"
    kill_once_written(proc, first, timeout=600)
    assert first.exists() and not (killed / "gpt_model.pt").exists()
    resumed = launch(args(killed, "--resume", "auto"), shift=999)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()

    hashes = {weights_hash(out) for out in [*straight, killed]}
    assert len(hashes) == 1, hashes


def at_offset(x: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of x that starts `offset` elements into a larger buffer (4 * offset bytes off alignment, for float32)."""
    buffer = torch.zeros(x.numel() + 64, dtype=x.dtype)
    view = buffer[offset : offset + x.numel()].view(x.shape)
    view.copy_(x)
    return view


def loss_and_grads(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab_size: int):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fused_linear_cross_entropy(h[None], w, targets[None], vocab_size)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("offset_h, offset_w, offset_t", [(1, 0, 0), (0, 1, 0), (3, 5, 1), (15, 7, 3), (8, 15, 15)])
def test_fused_loss_is_bit_identical_whatever_its_inputs_alignment(offset_h, offset_w, offset_t):
    """GPT-2's vocabulary (padded) and a full 1,024-row chunk; offsets of 4 to 60 bytes."""
    g = torch.Generator().manual_seed(0)
    rows, width, vocab, padded = 1024, 64, 50257, 50304
    h = torch.randn(rows, width, generator=g)
    w = torch.randn(padded, width, generator=g) * 0.05
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::7] = -100  # some rows not scored
    aligned = loss_and_grads(h, w, targets, vocab)
    shifted = loss_and_grads(at_offset(h, offset_h), at_offset(w, offset_w), at_offset(targets, offset_t), vocab)
    for a, b in zip(aligned, shifted):
        assert torch.equal(a, b)


@pytest.mark.slow  # a fresh interpreter: pinning must come before the process's first product
@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="no MKL in this PyTorch build: nothing to pin")
def test_every_command_pins_cpu_arithmetic_before_its_first_product():
    code = ("from examplegpt import cli; from examplegpt.reproducibility import cpu_arithmetic_is_pinned;"
            "cli.main(['plot', '/nonexistent-run']); print(cpu_arithmetic_is_pinned())")  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.strip() == "True", proc.stderr


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="no MKL in this PyTorch build: nothing to pin")
def test_the_test_process_is_pinned_too():
    """conftest pins this process first, so in-process tests compute what the commands compute."""
    assert cpu_arithmetic_is_pinned()
