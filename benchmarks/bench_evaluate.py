"""Evaluation throughput: ExampleGPT's sliding-window scorer against the same computation through transformers.

Same weights (a random 6-layer GPT-2 made with transformers), same token stream, same window and
stride, same batch; both score every token once. Reported: tokens scored per second, and the two
losses (which must agree).

    python benchmarks/bench_evaluate.py --tokens 20000
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from examplegpt.evaluate import sliding_window_nll, window_plan
from examplegpt.weights import load_model


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=384, n_head=6, n_layer=6, n_positions=args.window)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_model(folder).eval()
    tokens = np.random.default_rng(0).integers(0, 50257, args.tokens).astype(np.uint16)
    stride = args.window // 2
    runs = {
        "huggingface": lambda: hf_sliding_window_nll(hf, tokens, args.window, stride, args.batch),
        "examplegpt": lambda: sliding_window_nll(ours, tokens, stride, args.batch, torch.device("cpu")),
    }
    rates = {name: [] for name in runs}
    losses = {}
    for _ in range(args.repeats):  # alternating, so both see the same machine noise
        for name, run in runs.items():
            start = time.perf_counter()
            total, count = run()
            rates[name].append(count / (time.perf_counter() - start))
            losses[name] = total / count
    print(f"6 layers x 384, window {args.window}, stride {stride}, batch {args.batch}, {args.tokens} tokens, CPU fp32")
    for name in runs:
        print(f"{name:>12}: {np.median(rates[name]):,.0f} tokens/s, loss {losses[name]:.6f}")
    print(f"ratio examplegpt / huggingface: {np.median(rates['examplegpt']) / np.median(rates['huggingface']):.2f}x")


if __name__ == "__main__":
    main()
