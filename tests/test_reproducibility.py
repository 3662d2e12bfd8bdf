"""Same seed, same bits, checked where it can break: across fresh processes and memory addresses.

Bit-equality inside one process proves little: the ways two runs of a command can round differently
(how a library splits a product between threads, which code path an address's alignment selects) are
fixed for the life of a process. So the training runs here are separate processes, each with an
environment of another size (which moves the stack and what is allocated after it), and the loss is
checked with its inputs placed at offsets inside larger buffers."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from examplegpt.loss import fused_linear_cross_entropy
from examplegpt.reproducibility import cpu_arithmetic_is_pinned

from .conftest import MICRO_MODEL, OFFLINE, REPO, final_weights, kill_once_written, losses, machine_threads, make_text


def weights_hash(out_dir) -> str:
    weights = final_weights(out_dir)
    return hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()


def environment(shift: int, **extra: str) -> dict[str, str]:
    """Every thread of the machine (one thread hides what threads can change), unless `extra` says otherwise."""
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline", **OFFLINE, ADDRESS_SHIFT="x" * shift)
    return dict(machine_threads(env), **extra)


def launch(args, shift: int, stdout=subprocess.DEVNULL, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "examplegpt", *args], env=environment(shift, **extra_env),
                            stdout=stdout, stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """The standard output of a process that must succeed."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-2000:]
    return out


FIRST_LOSS_GRADIENTS = """
import hashlib, torch
from examplegpt.reproducibility import pin_cpu_arithmetic
pin_cpu_arithmetic()
from examplegpt.loss import loss_and_gradients
torch.manual_seed(0)
h, w, t = torch.randn(1024, 192), torch.randn(50304, 192) * 0.02, torch.randint(0, 50257, (1024,))
_, grad_h, grad_w = loss_and_gradients(h, w, t, 50257, 1024, with_grads=True)
print(hashlib.sha256(grad_h.numpy().tobytes() + grad_w.numpy().tobytes()).hexdigest())
"""


@pytest.mark.slow
def test_the_fused_loss_s_first_gradients_are_the_same_bits_in_every_fresh_process():
    """Found in CI on a 2-core Xeon: MKL's vector math (torch.exp) set itself up on two threads at once in a
    process's first backward, and the first gradients differed in their last bits in half of the processes."""
    hashes = set()
    for shift in range(8):
        proc = subprocess.run([sys.executable, "-c", FIRST_LOSS_GRADIENTS], env=environment(41 * shift + 3),
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        hashes.add(proc.stdout.strip())
    assert len(hashes) == 1, hashes


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


def loss_and_grads(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab_size: int, dtype: torch.dtype):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
        loss = fused_linear_cross_entropy(h[None], w, targets[None], vocab_size)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: oneDNN's products, not MKL's
@pytest.mark.parametrize("offset_h, offset_w, offset_t", [(1, 0, 0), (0, 1, 0), (3, 5, 1), (15, 7, 3), (8, 15, 15)])
def test_fused_loss_is_bit_identical_whatever_its_inputs_alignment(offset_h, offset_w, offset_t, dtype):
    """GPT-2's vocabulary (padded) and a full 1,024-row chunk; offsets of 4 to 60 bytes."""
    g = torch.Generator().manual_seed(0)
    rows, width, vocab, padded = 1024, 64, 50257, 50304
    h = torch.randn(rows, width, generator=g)
    w = torch.randn(padded, width, generator=g) * 0.05
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::7] = -100  # some rows not scored
    h, w = h.to(dtype), w.to(dtype)  # (in the inputs' dtype: the products see them where they are)
    aligned = loss_and_grads(h, w, targets, vocab, dtype)
    shifted = loss_and_grads(at_offset(h, offset_h), at_offset(w, offset_w), at_offset(targets, offset_t), vocab, dtype)
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


# --- the other promises of equality, each across fresh processes ------------------------------------------

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # what torchrun gives each worker: the one-process run must match it
GLOBAL_BATCH = ["--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "6", "--seed", "1"]


def micro_train_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["train", *MICRO_MODEL, "--data", str(corpus), "--cache-dir", str(out.parent / "cache"), "--out-dir",
            str(out), "--learning-rate", "3e-3", "--warmup-steps", "2", "--log-interval", "1", "--eval-interval", "3",
            "--eval-windows", "8", "--val-fraction", "0.1", "--no-checkpointing", "--device", "cpu", "--no-amp",
            *GLOBAL_BATCH, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A micro model's run folder: 6 steps of 8 windows, 2 micro-batches of 4 in turn, in one process of one thread."""
    folder = tmp_path_factory.mktemp("trained")
    corpus = folder / "corpus.txt"
    corpus.write_text(make_text(6000, 5))
    finish(launch(micro_train_args(corpus, folder / "one"), shift=3, **ONE_THREAD))
    return folder


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_two_data_parallel_processes_give_the_weights_of_one_bit_for_bit(trained):
    """DDP on 2 processes (torchrun, gloo), each rank one of the micro-batches the single process runs in turn.

    Bit-identical, not only close: each rank computes its micro-batch's gradient as the single process
    does (same shapes, same thread count), and the all-reduce of 2 ranks adds 2 numbers (a + b = b + a
    exactly) and halves them (exact), as accumulation does. With more ranks, or other threads per
    process, the sums are grouped otherwise: close, not equal (docs/train.md)."""
    two = trained / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "examplegpt", *micro_train_args(trained / "corpus.txt", two)]  # fmt: skip
    proc = subprocess.run(command, env=environment(11, **ONE_THREAD), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "x2" in proc.stdout
    assert weights_hash(trained / "one") == weights_hash(two)
    # The logged losses are the same numbers averaged otherwise (float32 on one process, float64 over ranks).
    for (s1, l1, v1), (s2, l2, v2) in zip(losses(trained / "one"), losses(two), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-6) and v1 == pytest.approx(v2, abs=1e-6)


@pytest.mark.slow
def test_evaluate_gives_the_same_loss_whatever_its_batch_size(trained):
    """Separate processes with 1, 3 and 8 windows per forward pass.

    Plain PyTorch products (--no-fast-cpu): with packed weights, each process's timing probe chooses
    packed or plain per shape, and the two round differently (by about 1e-6 in the hidden states)."""
    text = trained / "eval.txt"
    text.write_text(make_text(800, 9))
    model = trained / "one" / "gpt_model.pt"
    args = ["evaluate", "-c", str(model), "--data", str(text), "--json", "--no-fast-cpu"]
    procs = [launch([*args, "--batch-size", str(b)], shift=5 * b, stdout=subprocess.PIPE) for b in (1, 3, 8)]
    results = [json.loads(finish(proc)) for proc in procs]
    assert len({r["tokens_scored"] for r in results}) == 1 and results[0]["tokens_scored"] > 500
    assert len({r["loss"] for r in results}) == 1, [r["loss"] for r in results]


def start_server(model: Path, shift: int) -> tuple[subprocess.Popen, str]:
    proc = launch(["serve", "-c", str(model), "--port", "0"], shift=shift, stdout=subprocess.PIPE)
    first_line = proc.stdout.readline()  # printed once it listens
    if not first_line:
        proc.kill()
        pytest.fail(f"the server did not start: {proc.stderr.read()[-2000:]}")
    return proc, next(word for word in first_line.split() if word.startswith("http://")).rstrip("/")


@pytest.mark.slow
def test_greedy_generate_and_the_server_give_the_same_tokens(trained):
    """The command in one process, the server in another, each with the packed-weights probe of its own.

    A model this briefly trained repeats its likeliest token under plain greedy decoding; the repetition
    penalty (deterministic too) makes it walk 24 different tokens, whose top-2 gaps here are at least
    1e-3: far above the 1e-6 by which packed and plain products of one row differ."""
    model = trained / "one" / "gpt_model.pt"
    prompt, length, penalty = "The history of the", 24, 2.0
    generated = launch(["generate", "-c", str(model), "-p", prompt, "-n", str(length), "--temperature", "0",
                        "--repetition-penalty", str(penalty), "--ignore-eos", "--json"], shift=7, stdout=subprocess.PIPE)  # fmt: skip
    server, url = start_server(model, shift=13)
    try:
        body = {"prompt": prompt, "max_tokens": length, "temperature": 0, "repetition_penalty": penalty,
                "ignore_eos": True, "logprobs": 1}  # fmt: skip
        reply = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)
    expected = json.loads(finish(generated))
    choice = reply["choices"][0]
    assert reply["usage"]["completion_tokens"] == expected["tokens"] == length
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"] == expected["text"]
    assert len(set(choice["logprobs"]["tokens"])) > length // 2  # not one token repeated
