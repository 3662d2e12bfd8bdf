"""Generation speed: ExampleGPT at each --precision against transformers and CTranslate2, same weights.

One random GPT-2 of the given shape is saved as a Hugging Face folder (what `python example.py export`
writes); ExampleGPT loads it and prepares it as the `generate` command does (device.prepare_for_inference,
then the CPU accelerator around the run), transformers loads the folder, and CTranslate2 converts it
with its transformers converter (int8 and float32). Greedy decoding (or, with --sample, temperature 0.8
and top-p 0.9), KV cache on everywhere, the same 16-token prompt. Per batch size: time to first token
(prefill + one sample) and decode tokens/s (the other steps, per sequence and summed over the batch),
median of interleaved rounds (every side once per round, so a change in the machine's load hits all).

At batch 1 a decode step reads every weight once, so its speed is bounded by the read bandwidth over
the weights' bytes: the header prints that limit per precision, and each row its share of it.
CTranslate2 is optional (`pip install ctranslate2`): where it is missing the run says so and skips it.

    python benchmarks/bench_generate.py                                        # 6 layers x 384, fp32
    python benchmarks/bench_generate.py --layers 12 --d-model 768 --heads 12 --precisions fp32 int8 bf16
    python benchmarks/bench_generate.py --device cuda --layers 12 --d-model 768 --heads 12
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import tempfile
from pathlib import Path

import torch
from machine import describe_machine, read_bandwidth_gbs
from timing import timed

from examplegpt import generate, load_model
from examplegpt.cpu_inference import fast_cpu_inference
from examplegpt.device import prepare_for_inference
from examplegpt.quantize import weight_bytes
from examplegpt.tokenizer import write_hf_tokenizer_files
from examplegpt.weights import save_hf_folder

CT2_COMPUTE_TYPES = {"int8": "int8", "fp32": "float32"}


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
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16", "int8"],
                        help="ExampleGPT's --precision sides (transformers runs fp32, or bf16 on CUDA)")  # fmt: skip
    parser.add_argument("--ct2", nargs="*", default=["int8", "fp32"], choices=list(CT2_COMPUTE_TYPES),
                        help="CTranslate2 sides (CPU only; none: leave it out)")  # fmt: skip
    parser.add_argument("--sample", action="store_true", help="temperature 0.8, top-p 0.9 instead of greedy")
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this PyTorch sees no CUDA GPU")

    import transformers

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=args.d_model, n_head=args.heads, n_layer=args.layers)
    hf_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hf = transformers.GPT2LMHeadModel(config).eval()
    mode = "top-p 0.9, temperature 0.8" if args.sample else "greedy"
    print(f"GPT-2 {args.layers} layers x {args.d_model}, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens,"
          f" {mode}, {device}, transformers {transformers.__version__}")  # fmt: skip
    print(describe_machine(device))
    bandwidth = read_bandwidth_gbs(gib=0.5) if device.type == "cpu" else None
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "hf"
        hf.save_pretrained(folder)
        base = load_model(str(folder)).eval()
        save_hf_folder(base, folder)  # the files `python example.py export` writes, for CTranslate2
        write_hf_tokenizer_files(folder)
        ours = {p: prepare_for_inference(copy.deepcopy(base), p, device) for p in args.precisions}
        ct2 = load_ctranslate2(folder, Path(scratch), args.ct2) if device.type == "cpu" and args.ct2 else {}
        if device.type != "cpu" and args.ct2:
            print("CTranslate2's rows are left out: this benchmark runs it on CPU only")
        hf.to(device, hf_dtype)
        if bandwidth:
            limits = ", ".join(f"{p} {bandwidth * 1e9 / weight_bytes(m):.1f} tok/s ({weight_bytes(m) / 1e6:.0f} MB)"
                               for p, m in ours.items())  # fmt: skip
            print(f"read bandwidth {bandwidth:.1f} GB/s; batch-1 limit (bandwidth / weight bytes per token): {limits}"
                  " (CTranslate2's share is taken against ExampleGPT's limit at the same precision)")  # fmt: skip
        print("| batch | side | time to first token (ms) | decode tokens/s per sequence | decode tokens/s, batch | share of bandwidth limit |")  # fmt: skip
        print("|---:|---|---:|---:|---:|---:|")
        with torch.inference_mode(), contextlib.ExitStack() as run:
            if device.type == "cpu":  # the accelerator, once per run; steady state: copies made once chosen
                for model in ours.values():
                    run.enter_context(fast_cpu_inference(model, long_run=True))
            for batch in args.batches:
                time_batch(batch, args, hf, ours, ct2, device, bandwidth)


def load_ctranslate2(folder: Path, scratch: Path, compute_types: list[str]) -> dict:
    """CTranslate2 generators for the exported folder, converted by its transformers converter; {} where missing."""
    try:
        import ctranslate2
    except ImportError:
        print("CTranslate2 is not installed (pip install ctranslate2): its rows are left out")
        return {}
    vocabulary = json.loads((folder / "vocab.json").read_text())
    token_of = {i: token for token, i in vocabulary.items()}
    generators = {}
    for precision in compute_types:
        out = scratch / f"ct2_{precision}"
        converter = ctranslate2.converters.TransformersConverter(str(folder))
        converter.convert(
            str(out), quantization=None if precision == "fp32" else CT2_COMPUTE_TYPES[precision], force=True
        )
        generator = ctranslate2.Generator(str(out), device="cpu", compute_type=CT2_COMPUTE_TYPES[precision],
                                          intra_threads=torch.get_num_threads())  # fmt: skip
        generators[precision] = (generator, token_of)
    print(f"CTranslate2 {ctranslate2.__version__}: {', '.join(generators)}")
    return generators


def ct2_generate(generator, token_of: dict, prompt: torch.Tensor, k: int, sample: bool) -> torch.Tensor:
    start = [[token_of[i] for i in row] for row in prompt.tolist()]
    sampling = dict(sampling_topk=0, sampling_topp=0.9, sampling_temperature=0.8) if sample else dict(sampling_topk=1)
    results = generator.generate_batch(start, max_length=k, min_length=k, include_prompt_in_result=False, **sampling)
    return torch.tensor([r.sequences_ids[0] for r in results])  # (B, k)


def time_batch(batch: int, args, hf, ours: dict, ct2: dict, device: torch.device, bandwidth: float | None) -> None:
    n = args.new_tokens
    prompt = torch.randint(0, 50257, (batch, args.prompt_tokens), device=device)
    hf_sampling = dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=0) if args.sample else dict(do_sample=False)
    ours_sampling = dict(temperature=0.8, top_p=0.9) if args.sample else dict(temperature=0)
    runs = {
        "huggingface": lambda k: hf.generate(
            prompt, max_new_tokens=k, min_new_tokens=k, use_cache=True, pad_token_id=0, **hf_sampling
        )[:, -k:],
    }
    for precision, model in ours.items():
        runs[f"examplegpt {precision}"] = lambda k, m=model: generate(m, prompt, k, **ours_sampling)[:, -k:]
    for precision, (generator, token_of) in ct2.items():
        runs[f"ctranslate2 {precision}"] = lambda k, g=generator, t=token_of: ct2_generate(
            g, t, prompt.cpu(), k, args.sample
        )
    first_ours = next(iter(ours))
    check = {name: run(32).cpu() for name, run in runs.items()}
    first = {name: [] for name in runs}
    whole = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            first[name].append(timed(lambda: run(1), device))
            whole[name].append(timed(lambda: run(n), device))
    rates = {}
    for name in runs:
        ttft = statistics.median(first[name])
        rates[name] = (n - 1) / max(statistics.median(whole[name]) - ttft, 1e-9)
        share = ""
        precision = name.split()[-1]
        if bandwidth and batch == 1 and precision in ours:
            share = f"{rates[name] / (bandwidth * 1e9 / weight_bytes(ours[precision])):.0%}"
        same = "" if args.sample or name == "huggingface" else f" (same 32 greedy tokens as transformers: {torch.equal(check[name], check['huggingface'])})"  # fmt: skip
        print(
            f"| {batch} | {name}{same} | {ttft * 1000:.1f} | {rates[name]:,.1f} | {rates[name] * batch:,.1f} | {share} |"
        )
    same = "sampled" if args.sample else torch.equal(check["huggingface"], check[f"examplegpt {first_ours}"])
    ratio = rates[f"examplegpt {first_ours}"] / rates["huggingface"]
    print(f"| {batch} | ratio | | {ratio:.2f}x | (examplegpt {first_ours} / transformers; same tokens: {same}) | |")
    for precision in ct2:
        if precision in ours:
            print(f"| {batch} | examplegpt {precision} / ctranslate2 {precision} | | "
                  f"{rates[f'examplegpt {precision}'] / rates[f'ctranslate2 {precision}']:.2f}x | | |")  # fmt: skip


if __name__ == "__main__":
    main()
