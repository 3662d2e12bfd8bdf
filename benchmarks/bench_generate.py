"""Generation speed: examplegpt.generate.generate (KV cache) against transformers' GPT2LMHeadModel.generate, same weights.

Greedy decoding (or, with --sample, temperature 0.8 and top-p 0.9 on both sides), KV cache on in both,
a 16-token prompt and 256 new tokens. Reported per batch size: time to first token (prefill + one
sample) and decode tokens/s (the other 255 steps, per sequence and summed over the batch), median of
the repeats, the two runs alternating. Then the LM head's product alone, as ExampleGPT's decoder runs
it (on CPU with the packed weights of `examplegpt/cpu_inference.py`), and its share of our decode step.
On CPU the first call packs the weights once; its time to first token is printed on its own.

    python benchmarks/bench_generate.py                 # CPU, 6 layers, 384 wide
    python benchmarks/bench_generate.py --device cuda --layers 12 --d-model 768
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
from timing import timed

from examplegpt.cpu_inference import fast_cpu_inference
from examplegpt.generate import generate
from examplegpt.weights import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both models' weights")
    parser.add_argument("--sample", action="store_true", help="temperature 0.8, top-p 0.9 instead of greedy")
    args = parser.parse_args()

    import transformers

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=args.d_model, n_head=args.heads, n_layer=args.layers)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_model(folder).eval().to(device, getattr(torch, args.dtype))
    hf.to(device, getattr(torch, args.dtype))
    n = args.new_tokens
    mode = "top-p 0.9, temperature 0.8" if args.sample else "greedy"
    # transformers' own default adds top-k 50; 0 turns it off, as ours is off by default
    hf_sampling = dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=0) if args.sample else dict(do_sample=False)
    ours_sampling = dict(temperature=0.8, top_p=0.9) if args.sample else dict(temperature=0)
    print(f"GPT-2 {args.layers} layers x {args.d_model}, {args.prompt_tokens}-token prompt, {n} new tokens, {mode},"
          f" {device}, {args.dtype}, torch {torch.__version__}, transformers {transformers.__version__}")  # fmt: skip
    print("| batch | model | time to first token (ms) | decode tokens/s per sequence | decode tokens/s, batch |")
    print("|---:|---|---:|---:|---:|")
    for batch in args.batches:
        prompt = torch.randint(0, 50257, (batch, args.prompt_tokens), device=device)
        runs = {
            "huggingface": lambda k: hf.generate(
                prompt, max_new_tokens=k, min_new_tokens=k, use_cache=True, pad_token_id=0, **hf_sampling
            ),  # fmt: skip
            "examplegpt": lambda k: generate(ours, prompt, k, **ours_sampling),
        }
        if batch == args.batches[0] and device.type == "cpu":
            packing = timed(lambda: runs["examplegpt"](1), device)
            print(f"| {batch} | examplegpt, first call | {packing * 1000:.1f} (packs the weights) | | |")
        same = torch.equal(runs["huggingface"](32), runs["examplegpt"](32)) if not args.sample else "sampled"
        first = {name: [] for name in runs}
        whole = {name: [] for name in runs}
        with torch.inference_mode():
            for _ in range(args.repeats):
                for name, run in runs.items():
                    first[name].append(timed(lambda: run(1), device))
                    whole[name].append(timed(lambda: run(n), device))
        rates = {}
        for name in runs:
            ttft = statistics.median(first[name])
            rates[name] = (n - 1) / (statistics.median(whole[name]) - ttft)
            print(f"| {batch} | {name} | {ttft * 1000:.1f} | {rates[name]:,.0f} | {rates[name] * batch:,.0f} |")
        print(f"| {batch} | ratio | | {rates['examplegpt'] / rates['huggingface']:.2f}x | (same tokens: {same}) |")
        h = torch.randn(batch, args.d_model, device=device, dtype=ours.lm_head.weight.dtype)  # (B, C)
        with torch.inference_mode(), fast_cpu_inference(ours):
            head = statistics.median(timed(lambda: ours.lm_head(h), device) for _ in range(20))
        share = head * rates["examplegpt"]
        print(f"| {batch} | LM head alone | | {head * 1000:.2f} ms | {share:.0%} of our decode step |")


if __name__ == "__main__":
    main()
