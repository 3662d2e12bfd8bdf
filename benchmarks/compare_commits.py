"""Before and after: this checkout's training step and evaluation against another checkout's, side by side.

A refactor should not make the code slower. Each measurement runs in a fresh process with the
other checkout (or this one) first on PYTHONPATH, the two alternating round by round so both see
the same machine noise; reported: the median of each and the ratio this / other. The model is
random (6 layers x 384 and the `tiny` preset), so only speed and agreement are compared.

    git worktree add --detach /tmp/seed e44a0f9
    python benchmarks/compare_commits.py --other /tmp/seed --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

THIS = Path(__file__).resolve().parents[1]

# Our training step as benchmarks/bench_train.py builds it in the checkout under test: tokens/s.
TRAIN = r"""
import statistics, sys, torch
sys.path.insert(0, sys.argv[1] + "/benchmarks")
from bench_train import ours_step
from timing import time_steps
from examplegpt import GPTConfig
from examplegpt.config import PRESETS
shape = sys.argv[2]
config = GPTConfig(**PRESETS["tiny"]) if shape == "tiny" else GPTConfig(
    d_model=384, num_heads=6, num_layers=6, d_ff=1536, max_seq_len=256)
_, step = ours_step(config, 8, torch.device("cpu"), torch.float32, fused=True)
seconds = time_steps(step, 8, 1, torch.device("cpu"))
print(8 * config.max_seq_len / statistics.median(seconds), "-")
"""

# sliding_window_nll as the `evaluate` command runs it in the checkout under test (with the CPU
# accelerator where that checkout applies it from outside): tokens scored/s and the loss.
EVALUATE = r"""
import contextlib, inspect, statistics, sys, time, numpy as np, torch
from examplegpt import GPT, GPTConfig
import examplegpt.evaluate as evaluate
from examplegpt.cpu_inference import fast_cpu_inference
switched_on_inside = "fast_cpu_inference" in inspect.getsource(evaluate.sliding_window_nll)  # older checkouts
accelerated = (lambda model: contextlib.nullcontext()) if switched_on_inside else fast_cpu_inference
torch.manual_seed(0)
config = GPTConfig(d_model=384, num_heads=6, num_layers=6, d_ff=1536, max_seq_len=256)
model = GPT(config).eval().requires_grad_(False)
tokens = np.random.default_rng(0).integers(0, 50257, 6000).astype(np.uint16)
rates = []
for _ in range(3):
    start = time.perf_counter()
    with accelerated(model):
        total, count = evaluate.sliding_window_nll(model, tokens, 128, 8, torch.device("cpu"))
    rates.append(count / (time.perf_counter() - start))
print(statistics.median(rates), total / count)
"""


def measure(code: str, checkout: Path, *args: str) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    out = subprocess.run([sys.executable, "-c", code, str(checkout), *args], env=env, cwd=checkout,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    rate, agreement = out.split()[-2:]
    return float(rate), agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", required=True, type=Path, help="a checkout of the commit to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    checkouts = {"other": args.other.resolve(), "this": THIS}
    measurements = {
        "train step, tiny (tokens/s)": (TRAIN, "tiny"),
        "train step, 6x384 (tokens/s)": (TRAIN, "6x384"),
        "evaluation, 6x384 (tokens/s)": (EVALUATE,),
    }
    print(f"this: {THIS}   other: {checkouts['other']}   {args.rounds} rounds, alternating")
    for name, (code, *extra) in measurements.items():
        rates: dict[str, list[float]] = {side: [] for side in checkouts}
        agreement = {}
        for round_ in range(args.rounds):
            order = list(checkouts) if round_ % 2 == 0 else list(reversed(checkouts))
            for side in order:
                rate, agreement[side] = measure(code, checkouts[side], *extra)
                rates[side].append(rate)
        other, this = statistics.median(rates["other"]), statistics.median(rates["this"])
        same = "" if agreement["this"] == "-" else f"   loss {agreement['other']} vs {agreement['this']}"
        print(f"{name:<30} other {other:8.0f}   this {this:8.0f}   this/other {this / other:.2f}{same}", flush=True)
        print(f"{'':<30} rounds: other {[round(r) for r in rates['other']]}, this {[round(r) for r in rates['this']]}")


if __name__ == "__main__":
    main()
