"""Evaluation throughput: ExampleGPT's sliding-window scorer against the same computation through transformers.

Same weights (a random GPT-2 made with transformers, 6 layers x 384 unless told), same token stream,
same window and stride, same batch; every token is scored once. ExampleGPT runs twice: as `evaluate`
runs it (inside the CPU accelerator, `fast_cpu_inference`) and as `evaluate --no-fast-cpu` does (plain
PyTorch), so the accelerator's gain or loss on long sequences shows beside the peer. Reported: tokens
scored per second (median of alternating repeats) and the losses (which must agree).

    python benchmarks/bench_evaluate.py --tokens 20000
    python benchmarks/bench_evaluate.py --layers 12 --d-model 768 --heads 12 --tokens 8000   # GPT-2 124M's shape
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from machine import describe_machine  # benchmarks/machine.py, beside this script

from examplegpt import load_model
from examplegpt.cpu_inference import fast_cpu_inference, packing_report
from examplegpt.evaluate import sliding_window_nll, window_plan
from examplegpt.reproducibility import pin_cpu_arithmetic


@torch.no_grad()
def hf_sliding_window_nll(model, tokens: np.ndarray, window: int, stride: int, batch_size: int) -> tuple[float, int]:
    """The protocol of examplegpt.evaluate, written against a transformers model (the usual HF recipe, batched)."""
    plan = window_plan(len(tokens), window, stride)
    total, count = 0.0, 0
    for first in range(0, len(plan), batch_size):
        batch = plan[first : first + batch_size]
        x = torch.zeros(len(batch), window, dtype=torch.long)
        y = torch.full((len(batch), window), -100, dtype=torch.long)
        for row, (start, end, scored_from) in enumerate(batch):
            chunk = torch.from_numpy(tokens[start : end + 1].astype(np.int64))
            x[row, : end - start] = chunk[:-1]
            keep = scored_from - (start + 1)
            y[row, keep : end - start] = chunk[1 + keep :]
        logits = model(x).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="sum").item()
        count += int((y != -100).sum())
    return total, count


def score_as_the_command_does(
    model, tokens: np.ndarray, stride: int, batch_size: int, fast_cpu: bool
) -> tuple[float, int]:
    """sliding_window_nll as `evaluate` runs it: inside the CPU accelerator, or (fast_cpu=False) without it."""
    with fast_cpu_inference(model) if fast_cpu else contextlib.nullcontext():
        return sliding_window_nll(model, tokens, stride, batch_size, torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    args = parser.parse_args()

    import transformers

    pin_cpu_arithmetic()  # as every command does, before the first product
    print(describe_machine())
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=args.d_model, n_head=args.heads, n_layer=args.layers, n_positions=args.window
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_model(folder).eval().requires_grad_(False)
    tokens = np.random.default_rng(0).integers(0, 50257, args.tokens).astype(np.uint16)
    stride = args.window // 2
    runs = {
        "huggingface": lambda: hf_sliding_window_nll(hf, tokens, args.window, stride, args.batch),
        "examplegpt": lambda: score_as_the_command_does(ours, tokens, stride, args.batch, fast_cpu=True),
        "plain": lambda: score_as_the_command_does(ours, tokens, stride, args.batch, fast_cpu=False),
    }
    rates = {name: [] for name in runs}
    losses = {}
    for _ in range(args.repeats):  # alternating, so both see the same machine noise
        for name, run in runs.items():
            start = time.perf_counter()
            total, count = run()
            rates[name].append(count / (time.perf_counter() - start))
            losses[name] = total / count
    print(f"{args.layers} layers x {args.d_model}, window {args.window}, stride {stride}, batch {args.batch}, "
          f"{args.tokens} tokens, CPU fp32")  # fmt: skip
    names = {"huggingface": "transformers", "examplegpt": "examplegpt (evaluate)", "plain": "examplegpt --no-fast-cpu"}
    for name in runs:
        print(f"{names[name]:>24}: {np.median(rates[name]):,.0f} tokens/s, loss {losses[name]:.6f}")
    rate = {name: np.median(rates[name]) for name in runs}
    print(f"examplegpt / transformers: {rate['examplegpt'] / rate['huggingface']:.2f}x; "
          f"accelerated / plain: {rate['examplegpt'] / rate['plain']:.2f}x")  # fmt: skip
    print("the trials' choices:\n  " + "\n  ".join(packing_report()))


if __name__ == "__main__":
    main()
