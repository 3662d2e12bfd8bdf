"""Muon against AdamW: validation loss at equal steps and at equal wall time, over a small learning-rate
sweep, several seeds, two model shapes and two corpora, in one process.

    python benchmarks/bench_optimizers.py --out runs/optimizers \\
        --train-file ../shared/data/wikitext-2/valid.txt --val-file ../shared/data/wikitext-2/test.txt
    python benchmarks/bench_optimizers.py --smoke --out /tmp/optimizers      # CPU, under a minute

Every run is the training step of `examplegpt.train` (its accumulation, clipping, LR schedule and
`make_optimizer`) on a fresh model, evaluated on the fixed validation windows every `--eval-every`
steps. Runs go seed by seed, so a run cut short by `--time-budget-s` (or Ctrl-C) still has every
configuration at the seeds done; results.json and results.md are rewritten after each run, curves.png
at the end. Imports nothing beyond torch, numpy and matplotlib (no datasets, no network).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import describe_machine  # noqa: E402
from examplegpt.config import PRESETS, GPTConfig, TrainConfig  # noqa: E402
from examplegpt.data import TokenWindows  # noqa: E402
from examplegpt.data.corpus import BUNDLED  # noqa: E402
from examplegpt.device import pick_device, pick_dtype  # noqa: E402
from examplegpt.evaluate import evaluate_loss, validation_windows  # noqa: E402
from examplegpt.model import GPT  # noqa: E402
from examplegpt.optim import lr_at, make_optimizer, set_learning_rates  # noqa: E402
from examplegpt.tokenizer import encode_ordinary_array  # noqa: E402
from examplegpt.train import accumulate_gradients  # noqa: E402

SHAPES = {
    "tiny": PRESETS["tiny"],  # 4 x 192
    "6x384": dict(d_model=384, num_heads=6, num_layers=6, d_ff=1536, max_seq_len=256),
}
SMOKE_SHAPE = dict(d_model=32, num_heads=2, num_layers=2, d_ff=64, max_seq_len=32)
# Peak learning rates: AdamW's for every parameter; Muon's for the blocks' matrices (their AdamW part runs
# at --muon-adamw-lr). Grids around what each recipe uses at this scale (nanoGPT's Shakespeare, modded-nanogpt).
LR_GRID = {"adamw": (1e-3, 3e-3, 1e-2), "muon": (0.01, 0.02, 0.04)}


def read_text(path: Path) -> str:
    if path.suffix == ".gz":
        import gzip

        return gzip.decompress(path.read_bytes()).decode("utf-8")
    return path.read_text(encoding="utf-8", errors="replace")


def corpora(args: argparse.Namespace) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (train tokens, validation tokens). Tiny Shakespeare's last 10% validates it (as nanoGPT's)."""
    text = read_text(BUNDLED["shakespeare"])
    tokens = encode_ordinary_array(text[:80_000] if args.smoke else text)  # smoke: about 20,000 tokens
    cut = int(len(tokens) * 0.9)
    found = {"shakespeare": (tokens[:cut], tokens[cut:])}
    if args.train_file and args.val_file:
        found["wikitext-2"] = (
            encode_ordinary_array(read_text(Path(args.train_file))),
            encode_ordinary_array(read_text(Path(args.val_file))),
        )
    return found


def train_once(
    args, shape: dict, data: tuple[np.ndarray, np.ndarray], optimizer_name: str, lr: float, seed: int, adamw_lr: float
):
    """One run; returns its record: final val loss, train time, and the curve [(step, train seconds, val loss)].
    `lr` is the peak LR of the optimizer named; a Muon run's AdamW part runs at `adamw_lr`."""
    device, dtype = args.device, args.dtype
    model_cfg = GPTConfig(**shape)
    muon = optimizer_name == "muon"
    cfg = TrainConfig(
        optimizer=optimizer_name,
        learning_rate=adamw_lr if muon else lr,
        muon_learning_rate=lr if muon else 0.02,
        warmup_steps=args.warmup_steps,
        max_steps=args.steps,
        batch_size=args.batch_size,
        seed=seed,
        device=device.type,
    )
    torch.manual_seed(seed)
    model = GPT(model_cfg).to(device)
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    seq_len = model_cfg.max_seq_len
    train_tokens, val_tokens = data
    loader = TokenWindows(train_tokens, seq_len, args.batch_size, seed, 0, 1)
    val_windows = validation_windows(val_tokens, seq_len, args.eval_windows)
    micro = min(args.batch_size, args.micro_batch_size)

    def validate() -> float:
        loss = evaluate_loss(model, val_windows, micro, device, dtype)
        return loss if math.isfinite(loss) else math.inf

    curve = [(0, 0.0, validate())]
    train_seconds = 0.0
    for step in range(args.steps):
        sync(device)
        started = time.perf_counter()
        lr_now = lr_at(step, cfg.learning_rate, cfg.warmup_steps, args.steps, cfg.min_lr_ratio)
        set_learning_rates(optimizer, lr_now, cfg)
        epoch, index = divmod(step, loader.batches_per_epoch)
        x, y = (torch.from_numpy(a) for a in loader.batch(epoch, index))
        accumulate_gradients(model, x, y, micro, device, dtype, scaler)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        train_seconds += time.perf_counter() - started
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, train_seconds, validate()))
            if curve[-1][2] == math.inf:  # diverged: the rest of the run says nothing
                break
    return dict(val_loss=curve[-1][2], train_seconds=train_seconds, curve=curve)


def best_adamw_lr(runs: list[dict], shape: str, data: str, grid: list[float]) -> float:
    """The AdamW LR with the lowest mean val loss so far on (shape, data): a Muon run's AdamW part runs at it,
    so the two recipes differ only in the blocks' matrices. Runs go seed by seed, AdamW's grid before Muon's,
    so from the first seed on it is known."""
    done = [r for r in runs if (r["shape"], r["data"], r["optimizer"]) == (shape, data, "adamw")]
    by_lr = {lr: [r["val_loss"] for r in done if r["lr"] == lr] for lr in grid}
    scored = {lr: statistics.fmean(v) for lr, v in by_lr.items() if v and all(map(math.isfinite, v))}
    return min(scored, key=scored.get) if scored else grid[len(grid) // 2]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN for a single value; inf if any run diverged)."""
    if any(not math.isfinite(v) for v in values):
        return math.inf, math.inf
    if len(values) < 2:
        return values[0], math.nan
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def loss_at_time(curve: list, seconds: float) -> float:
    """Validation loss at `seconds` of training, linear between evaluations (the last one past the end)."""
    times, vals = [c[1] for c in curve], [c[2] for c in curve]
    if seconds >= times[-1]:
        return vals[-1]
    return float(np.interp(seconds, times, vals))


def summarize(runs: list[dict]) -> dict:
    """Per (shape, data, optimizer, lr): mean +- SE at equal steps; the best LR per optimizer; equal time."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["shape"], run["data"], run["optimizer"], run["lr"]), []).append(run)
    table = []
    for (shape, data, opt, lr), members in groups.items():
        mean, error = mean_and_error([m["val_loss"] for m in members])
        seconds = statistics.fmean(m["train_seconds"] for m in members)
        table.append(dict(shape=shape, data=data, optimizer=opt, lr=lr, seeds=len(members), mean=mean, se=error,
                          train_seconds=seconds, adamw_lr=members[0].get("adamw_lr")))  # fmt: skip
    best, equal_time = [], []
    for shape, data in dict.fromkeys((t["shape"], t["data"]) for t in table):
        winners = {}
        for opt in LR_GRID:
            rows = [t for t in table if (t["shape"], t["data"], t["optimizer"]) == (shape, data, opt)]
            if rows:  # the most seeds first, then the lowest loss
                winners[opt] = min(rows, key=lambda t: (-t["seeds"], t["mean"]))
                best.append(winners[opt])
        if len(winners) < 2:
            continue
        members = {
            opt: groups[(shape, data, opt, row["lr"])] for opt, row in winners.items()
        }  # the runs at each optimizer's best LR
        budget = min(statistics.median(m["train_seconds"] for m in runs) for runs in members.values())
        entry = dict(shape=shape, data=data, seconds=budget)
        for opt, runs_at_best in members.items():
            mean, error = mean_and_error([loss_at_time(m["curve"], budget) for m in runs_at_best])
            entry[opt] = dict(lr=winners[opt]["lr"], mean=mean, se=error, seeds=len(runs_at_best))
        equal_time.append(entry)
    return dict(table=table, best=best, equal_time=equal_time)


def verdict(a: dict, b: dict) -> str:
    """'muon', 'adamw' or 'tie': lower by more than twice the combined standard error."""
    gap, error = b["mean"] - a["mean"], math.hypot(a["se"], b["se"])
    if not math.isfinite(gap) or not math.isfinite(error):  # a diverged run, or a single seed
        return "n/a"
    return "muon" if gap > 2 * error else "adamw" if -gap > 2 * error else "within 2 SE"


def markdown(summary: dict, header: dict) -> str:
    lines = [
        f"# Muon vs AdamW ({header['device']}, {header['steps']} steps of {header['batch_size']} sequences)",
        "",
        f"Machine: {header['machine']}. Seeds: {header['seeds']}. {header['status']}.",
        "",
        "## Equal steps: mean validation loss +- standard error over seeds",
        "",
        "| shape | data | optimizer | peak LR | seeds | val loss | train s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in sorted(summary["table"], key=lambda t: (t["shape"], t["data"], t["optimizer"], t["lr"])):
        lr = f"{t['lr']:g}" + (f" (AdamW part {t['adamw_lr']:g})" if t["adamw_lr"] else "")
        lines.append(f"| {t['shape']} | {t['data']} | {t['optimizer']} | {lr} | {t['seeds']} "
                     f"| {t['mean']:.4f} +- {t['se']:.4f} | {t['train_seconds']:.1f} |")  # fmt: skip
    lines += ["", "## Best LR per optimizer, and equal wall time", ""]
    lines += [
        "| shape | data | AdamW (best LR) | Muon (best LR) | lower | at equal time: seconds | AdamW | Muon | lower |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for e in summary["equal_time"]:
        key = (e["shape"], e["data"])
        a, m = (
            next(b for b in summary["best"] if (b["shape"], b["data"], b["optimizer"]) == (*key, o)) for o in LR_GRID
        )
        lines.append(
            f"| {e['shape']} | {e['data']} | {a['mean']:.4f} +- {a['se']:.4f} ({a['lr']:g}) "
            f"| {m['mean']:.4f} +- {m['se']:.4f} ({m['lr']:g}) | {verdict(m, a)} | {e['seconds']:.1f} "
            f"| {e['adamw']['mean']:.4f} +- {e['adamw']['se']:.4f} | {e['muon']['mean']:.4f} +- {e['muon']['se']:.4f} "
            f"| {verdict(e['muon'], e['adamw'])} |"
        )
    return "\n".join(lines) + "\n"


def write_results(out: Path, runs: list[dict], header: dict) -> dict:
    summary = summarize(runs)
    (out / "results.json").write_text(json.dumps(dict(header=header, runs=runs, **summary), indent=1))
    (out / "results.md").write_text(markdown(summary, header))
    return summary


def plot_curves(out: Path, runs: list[dict], summary: dict) -> None:
    """Validation loss against step for each optimizer at its best LR (mean over seeds), one panel per
    (shape, data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(e["shape"], e["data"]) for e in summary["equal_time"]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (shape, data) in zip(axes[0], panels):
        for best in (b for b in summary["best"] if (b["shape"], b["data"]) == (shape, data)):
            members = [r for r in runs if (r["shape"], r["data"], r["optimizer"], r["lr"]) ==
                       (shape, data, best["optimizer"], best["lr"])]  # fmt: skip
            length = min(len(r["curve"]) for r in members)
            steps = [c[0] for c in members[0]["curve"][:length]]
            mean = [statistics.fmean(r["curve"][i][2] for r in members) for i in range(length)]
            ax.plot(steps[1:], mean[1:], marker="o", markersize=3, label=f"{best['optimizer']} (lr {best['lr']:g})")
        ax.set_title(f"{shape}, {data}")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="folder for results.json, results.md and curves.png")
    p.add_argument("--train-file", help="a second corpus to train on (e.g. ../shared/data/wikitext-2/valid.txt)")
    p.add_argument("--val-file", help="its validation text (e.g. ../shared/data/wikitext-2/test.txt)")
    p.add_argument("--shapes", default="tiny,6x384", help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--optimizers", default="adamw,muon")
    p.add_argument("--adamw-lrs", default=",".join(map(str, LR_GRID["adamw"])))
    p.add_argument("--muon-lrs", default=",".join(map(str, LR_GRID["muon"])))
    p.add_argument(
        "--muon-adamw-lr",
        type=float,
        default=None,
        help="AdamW's LR for the rest of a Muon run (default: AdamW's best)",
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seq-len", type=int, default=None, help="context length (default: each shape's, 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--warmup-steps", type=int, default=15)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--time-budget-s", type=float, default=None, help="start no run that would end after this")
    p.add_argument("--smoke", action="store_true", help="a tiny CPU version: one small shape, 2 LRs, 2 seeds")
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.seeds, args.steps, args.batch_size, args.eval_every = "smoke", 2, 4, 4, 2
        args.adamw_lrs, args.muon_lrs, args.warmup_steps, args.eval_windows = "3e-3,1e-2", "0.02,0.04", 2, 8
        args.device = "cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.device = pick_device(args.device)
    shapes = {"smoke": SMOKE_SHAPE} if args.smoke else {name: SHAPES[name] for name in args.shapes.split(",")}
    if args.seq_len:
        shapes = {name: {**shape, "max_seq_len": args.seq_len} for name, shape in shapes.items()}
    args.dtype = pick_dtype("auto", args.device, True, min(s["d_model"] for s in shapes.values()))
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    data = corpora(args)
    lrs = {"adamw": [float(x) for x in args.adamw_lrs.split(",")], "muon": [float(x) for x in args.muon_lrs.split(",")]}
    plan = [
        (seed, shape, name, opt, lr)
        for seed in range(args.seeds)
        for shape in shapes
        for name in data
        for opt in args.optimizers.split(",")
        for lr in lrs[opt]
    ]
    header = dict(
        device=str(args.device) + (f" ({torch.cuda.get_device_name()})" if args.device.type == "cuda" else ""),
        machine=describe_machine(args.device),
        dtype=str(args.dtype),
        steps=args.steps, batch_size=args.batch_size, seeds=args.seeds, eval_every=args.eval_every,
        muon_adamw_lr=args.muon_adamw_lr, shapes={k: shapes[k] for k in shapes},
        tokens={k: [len(v[0]), len(v[1])] for k, v in data.items()}, status="running",
    )  # fmt: skip
    print(f"{len(plan)} runs: {', '.join(shapes)} x {', '.join(data)} x {lrs} x {args.seeds} seeds", flush=True)
    # A few untimed steps of each shape and optimizer first: CUDA's kernels and workspaces are set up once,
    # and the first timed run would otherwise pay for them.
    warm_up = argparse.Namespace(**{**vars(args), "steps": 2, "eval_every": 2, "eval_windows": 1})
    for shape in shapes:
        for opt in args.optimizers.split(","):
            train_once(warm_up, shapes[shape], next(iter(data.values())), opt, lrs[opt][0], 0, lrs["adamw"][0])
    runs: list[dict] = []
    muon_adamw_lr: dict[tuple[str, str], float] = {}
    last_seconds: dict[str, float] = {}  # wall seconds of the latest run of each shape: the next one's estimate
    status = "complete"
    try:
        for seed, shape, name, opt, lr in plan:
            elapsed = time.perf_counter() - started
            estimate = last_seconds.get(shape, 0.0) * 1.2
            if args.time_budget_s is not None and elapsed + estimate > args.time_budget_s:
                status = f"stopped by --time-budget-s {args.time_budget_s:g} after {len(runs)} of {len(plan)} runs"
                break
            if (shape, name) not in muon_adamw_lr:  # fixed at the first Muon run: the same for every seed
                muon_adamw_lr[shape, name] = args.muon_adamw_lr or best_adamw_lr(runs, shape, name, lrs["adamw"])
            adamw_lr = muon_adamw_lr[shape, name]
            run_started = time.perf_counter()
            record = train_once(args, shapes[shape], data[name], opt, lr, seed, adamw_lr)
            last_seconds[shape] = time.perf_counter() - run_started
            runs.append(dict(shape=shape, data=name, optimizer=opt, lr=lr, seed=seed, **record))
            if opt == "muon":
                runs[-1]["adamw_lr"] = adamw_lr
            print(f"[{time.perf_counter() - started:6.1f}s] {shape} {name} {opt} lr {lr:g} seed {seed}:"
                  f" val {record['val_loss']:.4f} ({record['train_seconds']:.1f}s training)", flush=True)  # fmt: skip
            write_results(out, runs, header)
    except KeyboardInterrupt:
        status = f"interrupted after {len(runs)} of {len(plan)} runs"
    header["status"] = status
    header["wall_seconds"] = round(time.perf_counter() - started, 1)
    summary = write_results(out, runs, header)
    plot_curves(out, runs, summary)
    print((out / "results.md").read_text())
    print(f"{status}; wrote {out}/results.json, results.md, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
