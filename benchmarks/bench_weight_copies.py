"""What a copy of a weight costs the CPU accelerator, in one-row products by that weight, and what a product of
many rows costs: the figures behind `cpu_inference.COPY_COST` and `STREAMING_ROWS`.

For each weight shape of GPT-2 124M (or a small model's with --small), enough weights that they stream from
memory rather than a cache: the median time of a one-row `F.linear` by a weight; of copying it transposed
and packed (oneDNN's layout) into fresh memory, as a command's first copies are (every copy is kept until
the shape is done, so none reuses a freed one's pages); and of a product of r rows. A copy is worth
making at batch size b once the passes at b would have earned it back: copy time / (product time at b x
(1 - 1 / speed-up)) passes. The accelerator takes the copy's time as COPY_COST one-row products and a
product of r rows as at least max(1, r / STREAMING_ROWS) of them; the last line says whether this
machine's figures are within those.

    python benchmarks/bench_weight_copies.py
    python benchmarks/bench_weight_copies.py --small     # a quick check
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from machine import describe_machine  # benchmarks/machine.py, beside this script

from examplegpt.cpu_inference import COPY_COST, STREAMING_ROWS, _pack, can_pack

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072), (50304, 768)]  # (out, in): GPT-2 124M's
SMALL_SHAPES = [(192, 64), (64, 256)]
ROWS = (8, 16, 32, 64, 128, 512)
STREAM_BYTES = 400e6  # weights of one shape together: well past any L3 cache


def seconds_per_weight(weights: list[torch.Tensor], fn: Callable[[torch.Tensor], object], rounds: int) -> float:
    """The median over `rounds` (the first, which warms up, left out where there are three or more) of the time
    `fn` takes per weight, run over every weight."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for weight in weights:
            fn(weight)
        times.append((time.perf_counter() - start) / len(weights))
    return statistics.median(times[1:] if rounds >= 3 else times)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small model's shapes (a quick check)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each product")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(describe_machine())
    print("| weight (out x in) | one-row product (ms) | copy transposed (products) | copy packed (products) | "
          + " | ".join(f"{r} rows (products)" for r in ROWS) + " |")  # fmt: skip
    print("|---|---:|---:|---:|" + "---:|" * len(ROWS))
    copies = {"transposed": [], "packed": []}
    ratios = {r: [] for r in ROWS}
    for out_features, in_features in SMALL_SHAPES if args.small else SHAPES:
        count = max(2, int(STREAM_BYTES // (out_features * in_features * 4)))
        weights = [torch.randn(out_features, in_features) for _ in range(count)]
        one_row = torch.randn(1, in_features)
        product = seconds_per_weight(weights, lambda w: F.linear(one_row, w), args.rounds)
        kept = []  # every copy kept: each is made in fresh memory
        copy = {"transposed": seconds_per_weight(weights, lambda w: kept.append(w.t().contiguous()), 2) / product}
        if can_pack(weights[0]):
            copy["packed"] = seconds_per_weight(weights, lambda w: kept.append(_pack(w)), 2) / product
        kept.clear()
        rows = {}
        for r in ROWS:
            x = torch.randn(r, in_features)
            rows[r] = seconds_per_weight(weights, lambda w, x=x: F.linear(x, w), args.rounds) / product
            ratios[r].append(rows[r])
        for layout, cost in copy.items():
            copies[layout].append(cost)
        packed = f"{copy['packed']:.1f}" if "packed" in copy else "n/a"
        print(f"| {out_features} x {in_features} | {product * 1e3:.3f} | {copy['transposed']:.1f} | {packed} | "
              + " | ".join(f"{rows[r]:.1f}" for r in ROWS) + " |")  # fmt: skip
    worst_copy = {layout: max(costs) for layout, costs in copies.items() if costs}
    bound_holds = all(min(ratios[r]) >= max(1, r / STREAMING_ROWS) for r in ROWS)
    print(
        f"copies here: up to {', '.join(f'{layout} {cost:.1f}' for layout, cost in worst_copy.items())} one-row "
        f"products (the accelerator takes {', '.join(f'{k} {v}' for k, v in COPY_COST.items())}); a product of r "
        f"rows at least max(1, r / {STREAMING_ROWS}) one-row products: {'holds' if bound_holds else 'does not hold'} here"
    )


if __name__ == "__main__":
    main()
