"""Gradient checkpointing: peak memory and throughput of training steps with and without it, same micro-batch.

Each configuration runs in a fresh process, so the peak is its own: on CUDA
torch.cuda.max_memory_allocated, on CPU the process's peak resident memory (which includes the
~300 MB of the Python and torch runtime).

    python benchmarks/bench_memory.py --preset tiny --batch 8
    python benchmarks/bench_memory.py --preset 124M --batch 8 --device cuda     # the 8 GB claim
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from examplegpt import GPT, GPTConfig
from examplegpt.config import PRESETS
from examplegpt.device import autocast, pick_dtype
from examplegpt.distributed import apply_activation_checkpointing
from examplegpt.optim import parameter_groups


def child(args) -> None:
    device = torch.device(args.device)
    dtype = pick_dtype("auto", device)
    torch.manual_seed(0)
    config = GPTConfig(**PRESETS[args.preset])
    model = GPT(config).to(device)
    if args.checkpointing:
        apply_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4, fused=True)
    x = torch.randint(0, config.vocab_size, (args.batch, config.max_seq_len), device=device)
    times = []
    for i in range(args.steps + 1):
        start = time.perf_counter()
        with autocast(device, dtype):
            _, loss = model(x, x, return_logits=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens_per_sec = args.batch * config.max_seq_len / sorted(times)[len(times) // 2]
    print(json.dumps({"peak_mb": peak, "tokens_per_sec": tokens_per_sec, "dtype": str(dtype)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpointing", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checkpointing is not None:
        return child(args)
    results = {}
    for checkpointing in (0, 1):
        command = [sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch), "--steps",
                   str(args.steps), "--device", args.device, "--checkpointing", str(checkpointing)]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[checkpointing] = json.loads(out.strip().splitlines()[-1])
    what = "peak allocated" if args.device == "cuda" else "peak resident"
    print(f"preset {args.preset}, micro-batch {args.batch}, {args.device}, {results[0]['dtype']}")
    print(f"| checkpointing | {what} memory (MB) | tokens/s |")
    print("|---|---:|---:|")
    for checkpointing, r in results.items():
        print(f"| {'on' if checkpointing else 'off'} | {r['peak_mb']:,.0f} | {r['tokens_per_sec']:,.0f} |")
    cost = 1 - results[1]["tokens_per_sec"] / results[0]["tokens_per_sec"]
    print(f"memory saved: {results[0]['peak_mb'] - results[1]['peak_mb']:,.0f} MB; throughput cost: {cost:.0%}")


if __name__ == "__main__":
    main()
