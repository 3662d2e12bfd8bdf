"""What Muon's Newton-Schulz iterations cost on this CPU in bf16 (torch.optim.Muon) and in float32 (Float32Muon).

`train --optimizer muon` iterates in float32 on a CPU without native bf16 (`muon.muon_class`). This measures
why, at the quick start's model (configs/shakespeare.toml: 4 x 128; batch 8 x 128, --batch 6 for the config's):
the iterations for the 16 hidden matrices of one step, then one whole training step (forward, fused loss, backward, Muon + AdamW;
AdamW alone beside them), each side in turn, round by round, in CPU seconds of this process (a shared machine's load moves both alike).

    python benchmarks/bench_muon.py               # 10 rounds
    python benchmarks/bench_muon.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from machine import describe_machine  # benchmarks/machine.py, beside this script
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

from examplegpt import GPT, GPTConfig, TrainConfig
from examplegpt.muon import Float32Muon, orthogonalize
from examplegpt.optim import MuonWithAdamW, hidden_matrices, muon_split, parameter_groups
from examplegpt.reproducibility import pin_cpu_arithmetic

NS = ((DEFAULT_A, DEFAULT_B, DEFAULT_C), 5, EPS)
QUICK_START = GPTConfig(d_model=128, num_heads=4, num_layers=4, d_ff=512, max_seq_len=128)


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def training_step(muon: type[torch.optim.Muon] | None, batch: int):
    """One step of the quick start's training: Muon of class `muon` and AdamW, or AdamW alone (None)."""
    torch.manual_seed(0)
    model = GPT(QUICK_START)
    cfg = TrainConfig(optimizer="muon")
    muon_groups, adamw_groups = muon_split(model, cfg)
    adamw = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)
    if muon is None:
        optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), **adamw)
    else:
        muon_optimizer = muon(muon_groups, lr=cfg.muon_learning_rate, momentum=cfg.muon_momentum, nesterov=True)
        optimizer = MuonWithAdamW(muon_optimizer, torch.optim.AdamW(adamw_groups, **adamw))
    x = torch.randint(0, QUICK_START.vocab_size, (batch, QUICK_START.max_seq_len))

    def step():
        model(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def compare(sides: dict, rounds: int) -> dict[str, float]:
    """Median CPU seconds per call of each side, calling them in turn, `rounds` times after one warm-up."""
    times = {name: [] for name in sides}
    for fn in sides.values():
        fn()
    for _ in range(rounds):
        for name, fn in sides.items():
            times[name].append(cpu_seconds(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="1: on a busy machine, waiting threads spin and count")
    args = parser.parse_args()
    pin_cpu_arithmetic()
    torch.set_num_threads(args.threads)
    print(describe_machine())
    print(f"threads {torch.get_num_threads()}, median CPU ms of {args.rounds} alternating rounds")

    updates = [torch.randn(p.shape) for p in hidden_matrices(GPT(QUICK_START))]  # 16 matrices
    iterations = compare(
        {
            "bf16 (torch.optim.Muon)": lambda: [_zeropower_via_newtonschulz(u, *NS) for u in updates],
            "float32 (Float32Muon)": lambda: [orthogonalize(u, *NS, torch.float32) for u in updates],
        },
        args.rounds,
    )
    steps = compare(
        {"bf16 (torch.optim.Muon)": training_step(torch.optim.Muon, args.batch),
         "float32 (Float32Muon)": training_step(Float32Muon, args.batch),
         "AdamW alone": training_step(None, args.batch)},
        args.rounds,
    )  # fmt: skip
    adamw = steps["AdamW alone"]
    print("| Newton-Schulz in | iterations, 16 matrices (ms) | training step (ms) | step / AdamW's |")
    print("|---|---:|---:|---:|")
    for name in iterations:
        print(f"| {name} | {iterations[name] * 1e3:.1f} | {steps[name] * 1e3:.0f} | {steps[name] / adamw:.2f}x |")
    print(f"| (AdamW alone) | | {adamw * 1e3:.0f} | 1.00x |")
    bf16, fp32 = iterations.values()
    print(
        f"| bf16 / float32 | {bf16 / fp32:.1f}x | {steps['bf16 (torch.optim.Muon)'] / steps['float32 (Float32Muon)']:.2f}x | |"
    )


if __name__ == "__main__":
    main()
