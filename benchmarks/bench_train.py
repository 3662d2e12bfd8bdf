"""Training throughput: ExampleGPT's training step against Hugging Face's GPT2LMHeadModel, side by side.

Both do the same step: forward, cross-entropy, backward, AdamW (same hyper-parameters, same
shapes, same weights). Reported: median tokens/s over the timed steps and the ratio.

CPU:  python benchmarks/bench_train.py --preset tiny --steps 10
      python benchmarks/bench_train.py --layers 6 --d-model 384 --heads 6 --seq-len 256 --batch 8
GPU:  python benchmarks/bench_train.py --sweep   (124M, seq 1024, bf16: compile x checkpointing x micro-batch)
"""

from __future__ import annotations

import argparse
import statistics

import torch
from timing import time_steps

from examplegpt import GPT, GPTConfig
from examplegpt.config import PRESETS
from examplegpt.device import autocast, peak_flops
from examplegpt.distributed import apply_activation_checkpointing
from examplegpt.optim import flops_per_token, parameter_groups


def ours_step(config, batch, device, dtype, checkpointing=False, compile=False, fused=False):
    torch.manual_seed(0)
    model = GPT(config).to(device)
    if checkpointing:
        apply_activation_checkpointing(model)
    forward = torch.compile(model) if compile else model
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), fused=fused or None)
    x = torch.randint(0, config.vocab_size, (batch, config.max_seq_len), device=device)

    def step():
        with autocast(device, dtype):
            _, loss = forward(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def hf_step(config, batch, device, dtype):
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_embd=config.d_model, n_head=config.num_heads, n_layer=config.num_layers,
        n_inner=config.d_ff, n_positions=config.max_seq_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(hf_config).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))
    x = torch.randint(0, config.vocab_size, (batch, config.max_seq_len), device=device)

    def step():
        with autocast(device, dtype):
            loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def cpu_comparison(args) -> None:
    config = GPTConfig(**PRESETS[args.preset]) if args.preset else GPTConfig(
        d_model=args.d_model, num_heads=args.heads, num_layers=args.layers, d_ff=4 * args.d_model,
        max_seq_len=args.seq_len,
    )  # fmt: skip
    device, dtype = torch.device("cpu"), torch.float32
    tokens = args.batch * config.max_seq_len
    steps = {"huggingface": hf_step(config, args.batch, device, dtype)[1],
             "examplegpt": ours_step(config, args.batch, device, dtype, fused=True)[1]}  # fmt: skip
    times = {name: [] for name in steps}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    for _ in range(args.steps):  # alternate, so that both see the same noise of a shared machine
        for name, step in steps.items():
            times[name].extend(time_steps(step, 1, 0, device))
    results = {name: tokens / statistics.median(t) for name, t in times.items()}
    for name, value in results.items():
        print(f"{name:>12}: {value:,.0f} tokens/s (median of {args.steps} steps, {tokens} tokens each)")
    print(f"ratio examplegpt / huggingface: {results['examplegpt'] / results['huggingface']:.2f}x")
    print(f"config: {config} batch {args.batch}, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads")


def sweep(args) -> None:
    """Our training step alone over compile x checkpointing x micro-batch: tokens/s, MFU, peak memory.

    On CUDA: the 124M model at sequence length 1024 in bf16. On CPU (to test the script): --preset's
    model in fp32, without MFU or memory figures."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    config = GPTConfig(**PRESETS[args.preset or "124M"])
    peak = peak_flops(device)
    model = GPT(config)
    fpt = flops_per_token(model.num_parameters(False), config.num_layers, config.d_model, config.max_seq_len)
    del model
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{name} | torch {torch.__version__} | peak {peak / 1e12 if peak else 0:.0f} TFLOP/s | {dtype}")
    print(
        f"model {args.preset or '124M'}, sequence {config.max_seq_len}; FLOPs per token 6N + 12*L*d*T = {fpt / 1e6:.0f} M"
    )
    print("| compile | checkpointing | micro-batch | tokens/s | MFU | peak memory (GiB) |")
    print("|---|---|---:|---:|---:|---:|")
    for compile in args.compile_options:
        for checkpointing in args.checkpointing_options:
            for batch in args.micro_batches:
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    _, step = ours_step(config, batch, device, dtype, bool(checkpointing), bool(compile), fused=True)
                    times = time_steps(step, args.steps, args.warmup, device)
                except torch.cuda.OutOfMemoryError:
                    print(f"| {compile} | {checkpointing} | {batch} | out of memory | | |")
                    continue
                tps = batch * config.max_seq_len / statistics.median(times)
                mfu = f"{tps * fpt / peak:.1%}" if peak else "n/a"
                memory = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if cuda else "n/a"
                print(
                    f"| {bool(compile)} | {bool(checkpointing)} | {batch} | {tps:,.0f} | {mfu} | {memory} |", flush=True
                )
                del step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sweep", action="store_true", help="our step alone over compile/checkpointing/micro-batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--compile-options", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--checkpointing-options", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    sweep(args) if args.sweep else cpu_comparison(args)


if __name__ == "__main__":
    main()
