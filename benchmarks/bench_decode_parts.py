"""The parts of a CPU decode step, each timed alone: PyTorch's default against what ExampleGPT uses instead.

- a Linear's product, nn.Linear's weight (MKL) against the weight packed in oneDNN's layout
  (`examplegpt/cpu_inference.py`): the LM head of the benchmarks' 6-layer model (384 x 50,304) and
  a block's c_attn (384 x 1,152);
  and the packed layout oneDNN picks for 64 rows (ours) against the one for a single row;
- attention of one bfloat16 query over a cache of keys held in bfloat16, against a float32 cache
  (what ExampleGPT keeps for a bfloat16 model on CPU);
- over one row of 50,257 probabilities: torch.sort against `largest_first`, torch.multinomial
  against `sample_from`;
- choosing the next token from rows of 50,257 logits (`sampling.py`), each pair in alternating
  calls: greedy (torch.argmax against `greedy`); top-p 0.9 (the whole row sorted with torch.sort,
  against `top_p_filter`) on a row shaped like a trained model's (Zipf: a nucleus of about 60
  tokens) and on a random model's nearly flat row (where the whole row is ranked); and a whole
  sampling step at `generate`'s defaults (temperature 0.8, top-p 0.9) as transformers' logits
  warpers and torch.multinomial take it, against `choose_next`.

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
from timing import time_steps, timed

from examplegpt.cpu_inference import ROWS_HINT, fast_cpu_inference
from examplegpt.sampling import SamplingParams, choose_next, greedy, largest_first, sample_from, top_p_filter


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
                with fast_cpu_inference(linear, layout="packed"):
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
    row("sort 50,257 probabilities: `largest_first`", median_ms(lambda: torch.sort(probs, descending=True),
        args.repeats), median_ms(lambda: largest_first(probs, probs.shape[-1]), args.repeats))  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    row("draw from 50,257 probabilities: `sample_from`", median_ms(lambda: torch.multinomial(probs, 1, generator=generator),
        args.repeats), median_ms(lambda: sample_from(probs, generator), args.repeats))  # fmt: skip
    next_token_rows(args.repeats)


def paired_ms(default: Callable[[], object], ours: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Medians (ms) of the two, called in turn: a busy machine's drift moves both."""
    for _ in range(5):
        default(), ours()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, kept in zip((default, ours), times):
            kept.append(timed(fn, torch.device("cpu")))
    return statistics.median(times[0]) * 1000, statistics.median(times[1]) * 1000


def plain_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Top-p as PyTorch's own ops give it: the whole row sorted with its indices."""
    probs = torch.softmax(logits, dim=-1)
    ranked = torch.sort(probs, dim=-1, descending=True).values
    last = ((ranked.cumsum(-1) - ranked < p).sum(-1, keepdim=True) - 1).clamp(min=0)
    return logits.masked_fill(probs < ranked.gather(-1, last), float("-inf"))


def next_token_rows(repeats: int) -> None:
    vocab = 50257
    ranks = torch.randperm(vocab, generator=torch.Generator().manual_seed(0)) + 1
    zipf = -1.2 * torch.log(ranks.float())[None, :]  # (1, V): a trained model's shape; at temperature 0.8, Zipf 1.5
    flat = torch.randn(1, vocab) * 0.5  # (1, V): a random model's
    for rows in (1, 8):
        logits = zipf.repeat(rows, 1) + 0.1 * torch.randn(rows, vocab)  # (rows, V)
        row(
            f"greedy, {rows} row(s): `greedy`",
            *paired_ms(lambda: logits.argmax(dim=-1), lambda: greedy(logits), repeats),
        )
    for name, logits in (("a trained model's (Zipf) row", zipf / 0.8), ("a random model's flat row", flat / 0.8)):
        row(f"top-p 0.9 of {name}: `top_p_filter`",
            *paired_ms(lambda: plain_top_p(logits, 0.9), lambda: top_p_filter(logits, 0.9), repeats))  # fmt: skip
    try:
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
    except ImportError:
        print("(transformers is not installed: no row for its sampling step)")
        return
    warpers, ids = (TemperatureLogitsWarper(0.8), TopPLogitsWarper(0.9)), torch.zeros(1, 1, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)

    def transformers_step() -> torch.Tensor:
        scores = zipf
        for warper in warpers:
            scores = warper(ids, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)

    params = SamplingParams(temperature=0.8, top_p=0.9)
    row("a sampling step at temperature 0.8, top-p 0.9 (trained model's row): transformers' warpers, `choose_next`",
        *paired_ms(transformers_step, lambda: choose_next(zipf, params, generator=generator), repeats))  # fmt: skip


if __name__ == "__main__":
    main()
