"""The parts of a CPU decode step, each timed alone: PyTorch's default against what ExampleGPT uses instead.

- a Linear's product, nn.Linear's weight (MKL) against the weight packed in oneDNN's layout
  (`examplegpt/cpu_inference.py`): the LM head of the benchmarks' 6-layer model (384 x 50,304) and
  a block's c_attn (384 x 1,152);
  and the packed layout oneDNN picks for 64 rows (ours) against the one for a single row;
- attention of one bfloat16 query over a cache of keys held in bfloat16, against a float32 cache
  (what ExampleGPT keeps for a bfloat16 model on CPU);
- over one row of 50,257 probabilities: torch.sort against `sort_descending`, torch.multinomial
  against `sample_from`.

Medians of repeated calls on the same inputs: the weights may stay partly in cache, so these are
lower bounds on each part's time inside a whole step (bench_generate.py times whole steps).

    python benchmarks/bench_decode_parts.py
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timing import time_steps

from examplegpt.cpu_inference import ROWS_HINT, fast_cpu_inference
from examplegpt.sampling import sample_from, sort_descending


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(time_steps(fn, repeats, warmup=5, device=torch.device("cpu"))) * 1000


def row(name: str, default: float, ours: float) -> None:
    print(f"| {name} | {default:.3f} | {ours:.3f} | {default / ours:.1f}x |")


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| part | PyTorch default (ms) | ExampleGPT (ms) | speed-up |")
    print("|---|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        for name, (d_in, d_out) in {"LM head": (384, 50304), "c_attn": (384, 1152)}.items():
            linear = torch.nn.Linear(d_in, d_out, bias=False).to(dtype)
            for rows in (1, 8):
                x = torch.randn(rows, d_in, dtype=dtype)  # (rows, d_in)
                default = median_ms(lambda: linear(x), args.repeats)
                with fast_cpu_inference(linear):
                    packed = median_ms(lambda: linear(x), args.repeats)
                row(f"{name} {d_in} x {d_out}, {rows} row(s), {str(dtype)[6:]}, packed weight", default, packed)
    # the layout oneDNN picks from its rows hint (cpu_inference.ROWS_HINT = 64) against a hint of 1
    weight = torch.randn(50304, 384)  # (vocab, d_model)
    hinted = {hint: torch.ops.mkldnn._reorder_linear_weight(weight, hint) for hint in (1, ROWS_HINT)}
    for rows in (1, 8):
        x = torch.randn(rows, 384)
        hint_1, hint_64 = (median_ms(lambda: torch.ops.mkldnn._linear_pointwise(x, hinted[h], None, "none", [], ""),
                                     args.repeats) for h in (1, ROWS_HINT))  # fmt: skip
        row(f"LM head, {rows} row(s), float32, packed for {ROWS_HINT} rows (default: packed for 1)", hint_1, hint_64)
    for keys in (141, 1000):
        q = torch.randn(8, 6, 1, 64, dtype=torch.bfloat16)  # (B, nh, 1, hs)
        k, v = torch.randn(2, 8, 6, keys, 64, dtype=torch.bfloat16)  # (B, nh, keys, hs) each
        k32, v32 = k.float(), v.float()
        bf16 = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
        fp32 = median_ms(lambda: F.scaled_dot_product_attention(q.float(), k32, v32).bfloat16(), args.repeats)
        row(f"attention, batch 8, 6 heads, 1 bfloat16 query over {keys} cached keys: float32 cache", bf16, fp32)
    probs = torch.softmax(torch.randn(1, 50257), dim=-1)  # (1, V)
    row("sort 50,257 probabilities: `sort_descending`", median_ms(lambda: torch.sort(probs, descending=True),
        args.repeats), median_ms(lambda: sort_descending(probs), args.repeats))  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    row("draw from 50,257 probabilities: `sample_from`", median_ms(lambda: torch.multinomial(probs, 1, generator=generator),
        args.repeats), median_ms(lambda: sample_from(probs, generator), args.repeats))  # fmt: skip


if __name__ == "__main__":
    main()
