"""Where bf16 autocast starts to pay on this CPU: the training step in fp32 and in bf16, by model width.

`train --amp` on CPU trains in bf16 only where `device.cpu_prefers_bf16` says so (native bf16 units and
a wide enough model). This measures the rule's ground: for each width, our full training step (forward,
fused loss, backward, AdamW) in fp32 and under `torch.autocast("cpu", bfloat16)`, alternating step by
step so both sides see the same machine; median tokens/s, the ratio, and what the rule picks here.

    python benchmarks/bench_cpu_bf16.py                         # 4 layers at widths 128..768, then 124M
    python benchmarks/bench_cpu_bf16.py --widths 256 512 --layers 2 --steps 3
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_train import ours_step  # benchmarks/bench_train.py: our training step, as the other benchmarks time it
from machine import describe_machine  # benchmarks/machine.py, beside this script
from timing import time_steps

from examplegpt import GPTConfig
from examplegpt.config import PRESETS
from examplegpt.device import cpu_prefers_bf16
from examplegpt.reproducibility import pin_cpu_arithmetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 256, 384, 512, 768])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--no-124m", action="store_true", help="leave out GPT-2 124M's shape")
    args = parser.parse_args()
    pin_cpu_arithmetic()
    print(describe_machine())
    configs = [
        (f"{args.layers} x {w}", GPTConfig(d_model=w, num_heads=max(1, w // 64), num_layers=args.layers,
                                           d_ff=4 * w, max_seq_len=args.seq_len))
        for w in args.widths
    ]  # fmt: skip
    if not args.no_124m:
        configs.append(("124M (12 x 768)", GPTConfig(**{**PRESETS["124M"], "max_seq_len": args.seq_len})))
    tokens = args.batch * args.seq_len
    print(f"batch {args.batch} x {args.seq_len} tokens, median of {args.steps} alternating steps per side")
    print("| model | fp32 tokens/s | bf16 tokens/s | bf16 / fp32 | `train --amp` picks here |")
    print("|---|---:|---:|---:|---|")
    for name, config in configs:
        steps = {
            dtype: ours_step(config, args.batch, torch.device("cpu"), dtype)[1]
            for dtype in (torch.float32, torch.bfloat16)
        }
        times = {dtype: [] for dtype in steps}
        for step in steps.values():
            step()  # the first step allocates the optimizer's state
        for _ in range(args.steps):
            for dtype, step in steps.items():
                times[dtype].extend(time_steps(step, 1, 0, torch.device("cpu")))
        fp32, bf16 = (tokens / statistics.median(times[d]) for d in (torch.float32, torch.bfloat16))
        picked = "bf16" if cpu_prefers_bf16(config.d_model) else "fp32"
        print(f"| {name} | {fp32:,.0f} | {bf16:,.0f} | {bf16 / fp32:.2f}x | {picked} |", flush=True)


if __name__ == "__main__":
    main()
