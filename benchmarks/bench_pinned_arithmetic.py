"""What pinning MKL's arithmetic (examplegpt/reproducibility.py) costs a training step, and whether it holds.

Each round starts two fresh processes, one pinned and one not, alternating which goes first; each
times forward + backward + AdamW of the model at the given shape (fused loss) and hashes the
gradients. Reported: median step time per side, their ratio, and how many distinct gradient hashes
each side produced over the rounds (1 = the same bits in every process).

    python benchmarks/bench_pinned_arithmetic.py --rounds 4              # tiny preset, batch 8 x 128
    python benchmarks/bench_pinned_arithmetic.py --d-model 768 --layers 12 --heads 12 --batch 4 --seq 256
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import describe_machine

REPO = Path(__file__).resolve().parent.parent


def child(pinned: bool, cfg: dict, steps: int) -> None:
    sys.path.insert(0, str(REPO))
    from examplegpt.reproducibility import pin_cpu_arithmetic

    on = pin_cpu_arithmetic() if pinned else False
    import torch

    from examplegpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(d_model=cfg["d_model"], num_heads=cfg["heads"], num_layers=cfg["layers"],
                          d_ff=4 * cfg["d_model"], max_seq_len=cfg["seq"]))  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 50257, (cfg["batch"], cfg["seq"] + 1), generator=torch.Generator().manual_seed(1))
    times, first_grads = [], None
    for _ in range(steps):
        start = time.perf_counter()
        _, loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        if first_grads is None:
            first_grads = hashlib.sha256(b"".join(p.grad.numpy().tobytes() for p in model.parameters())).hexdigest()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    print(json.dumps({"pinned": on, "step_s": statistics.median(times[1:]), "grads": first_grads[:12]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--child", choices=["pinned", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = dict(d_model=args.d_model, layers=args.layers, heads=args.heads, batch=args.batch, seq=args.seq)
    if args.child:
        return child(args.child == "pinned", cfg, args.steps)
    print(describe_machine())
    results = {"pinned": [], "plain": []}
    for r in range(args.rounds):
        for side in ["pinned", "plain"] if r % 2 == 0 else ["plain", "pinned"]:
            cmd = [sys.executable, __file__, "--child", side, *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[side].append(json.loads(out))
    for side, rows in results.items():
        step = statistics.median(r["step_s"] for r in rows)
        print(f"{side:>6}: step {step * 1000:.1f} ms (rounds {[round(r['step_s'] * 1000, 1) for r in rows]}), "
              f"MKL pinned {rows[0]['pinned']}, distinct gradient hashes over {len(rows)} processes: "
              f"{len({r['grads'] for r in rows})}")  # fmt: skip
    ratio = statistics.median(r["step_s"] for r in results["pinned"]) / statistics.median(
        r["step_s"] for r in results["plain"]
    )
    print(f"pinned / plain step time: {ratio:.3f}")


if __name__ == "__main__":
    main()
