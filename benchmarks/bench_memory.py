"""Gradient checkpointing: peak memory and throughput of training steps with and without it, same micro-batch.

Each configuration runs in a fresh process, so the peak is its own: on CUDA
torch.cuda.max_memory_allocated, on CPU the process's peak resident memory (which includes the
~300 MB of the Python and torch runtime). After the timed steps, one more step runs under PyTorch's
MemTracker, which counts the bytes of live tensors (weights, optimizer state, activations, gradients,
temporaries) whatever the device: on CPU, the least a GPU allocator would have to hold for the step.

    python benchmarks/bench_memory.py --preset tiny --batch 8
    python benchmarks/bench_memory.py --preset 124M --batch 8 --precision bf16  # the 8 GB claim, counted on CPU
    python benchmarks/bench_memory.py --preset 124M --batch 8 --device cuda     # the 8 GB claim on a GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch.distributed._tools.mem_tracker import MemTracker

import examplegpt.loss
from examplegpt import GPT, GPTConfig
from examplegpt.config import PRESETS
from examplegpt.device import autocast, pick_dtype
from examplegpt.distributed import apply_activation_checkpointing
from examplegpt.optim import parameter_groups


def child(args) -> None:
    examplegpt.loss.CHUNK_ROWS = args.loss_chunk_rows
    device = torch.device(args.device)
    dtype = pick_dtype(args.precision, device)
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
            _, loss = model(x, x)
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

    tracker = MemTracker()
    tracker.track_external(model, optimizer, x)
    with tracker:
        with autocast(device, dtype):
            _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    # keyed by the tensors' own device ("cuda:0" when asked for "cuda")
    peaks = tracker.get_tracker_snapshot("peak")
    tensors = next(stats["Total"] for where, stats in peaks.items() if where.type == device.type) / 2**20
    print(json.dumps({"peak_mb": peak, "tensor_mb": tensors, "tokens_per_sec": tokens_per_sec, "dtype": str(dtype)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="as train's --precision; bf16 on CPU mirrors a GPU run's autocast")  # fmt: skip
    parser.add_argument("--loss-chunk-rows", type=int, default=examplegpt.loss.CHUNK_ROWS,
                        help="rows of logits the fused loss makes at a time")  # fmt: skip
    parser.add_argument("--checkpointing", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checkpointing is not None:
        return child(args)
    results = {}
    for checkpointing in (0, 1):
        command = [sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch), "--steps",
                   str(args.steps), "--device", args.device, "--precision", args.precision,
                   "--loss-chunk-rows", str(args.loss_chunk_rows), "--checkpointing", str(checkpointing)]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[checkpointing] = json.loads(out.strip().splitlines()[-1])
    what = "peak allocated" if args.device == "cuda" else "peak resident"
    print(f"preset {args.preset}, micro-batch {args.batch}, {args.device}, {results[0]['dtype']},"
          f" loss chunks of {args.loss_chunk_rows} rows")  # fmt: skip
    print(f"| checkpointing | {what} memory (MB) | live tensors at peak (MB) | tokens/s |")
    print("|---|---:|---:|---:|")
    for checkpointing, r in results.items():
        print(
            f"| {'on' if checkpointing else 'off'} | {r['peak_mb']:,.0f} | {r['tensor_mb']:,.0f}"
            f" | {r['tokens_per_sec']:,.0f} |"
        )
    cost = 1 - results[1]["tokens_per_sec"] / results[0]["tokens_per_sec"]
    saved = results[0]["tensor_mb"] - results[1]["tensor_mb"]
    print(f"live tensors saved: {saved:,.0f} MB; throughput cost: {cost:.0%}")


if __name__ == "__main__":
    main()
