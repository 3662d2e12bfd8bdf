"""What a run records: the console lines and progress bar, metrics.jsonl, the loss.png plot, and (optionally)
Weights & Biases."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .distributed import World, mean_over_ranks


class TrainingLog:
    """What training reports: the progress bar; every log interval a console line and a metrics record (loss,
    LR, gradient norm, tokens/s, and MFU where the device's peak is known); every evaluation a line, a record
    and the loss plot redrawn. Only rank 0 writes; `metrics` is None on the others."""

    def __init__(
        self,
        metrics: MetricsLog | None,
        world: World,
        device: torch.device,
        *,
        steps: tuple[int, int],
        tokens_per_step: int,
        batches_per_epoch: int,
        flops_per_token: int,
        peak_flops: float | None,
    ) -> None:
        self.metrics, self.world, self.device = metrics, world, device
        (steps_done, self.total_steps), self.tokens_per_step = steps, tokens_per_step
        self.batches_per_epoch, self.flops_per_token, self.peak_flops = batches_per_epoch, flops_per_token, peak_flops
        self.bar = tqdm(
            total=self.total_steps, initial=steps_done, unit="step", disable=not (world.is_main and sys.stderr.isatty())
        )
        self.started = self.window_start = time.perf_counter()
        self.window_tokens = 0  # throughput is measured over the steps since the last log line

    def __enter__(self) -> TrainingLog:
        return self

    def __exit__(self, *exc) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.bar.close()

    def step_done(self, finite: bool) -> None:
        self.bar.update(1)
        if finite:
            self.window_tokens += self.tokens_per_step

    def restart_clock(self) -> None:
        """Leave what just happened (an evaluation, a checkpoint) out of the throughput."""
        self.window_start = time.perf_counter()

    def train_line(self, done: int, lr: float, loss: torch.Tensor, norm: torch.Tensor) -> None:
        """`loss`: the mean train loss over the steps since the last line; `norm`: this step's gradient norm."""
        elapsed_total = time.perf_counter() - self.started
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.window_start
        train_loss = mean_over_ranks(loss.item(), self.world, self.device)
        tokens_per_sec = self.window_tokens / elapsed
        record = dict(
            step=done,
            epoch=(done - 1) // self.batches_per_epoch + 1,
            train_loss=train_loss,
            lr=lr,
            grad_norm=norm.item(),
            tokens_per_sec=tokens_per_sec,
            elapsed=elapsed_total,
        )
        mfu = ""
        if self.peak_flops:
            record["mfu"] = tokens_per_sec * self.flops_per_token / (self.peak_flops * self.world.size)
            mfu = f" | mfu {record['mfu']:.1%}"
        step_ms = elapsed / (self.window_tokens / self.tokens_per_step) * 1000
        line = (
            f"step {done}/{self.total_steps} | loss {train_loss:.4f} | lr {lr:.2e} | norm {norm.item():.2f}"
            f" | dt {step_ms:.0f}ms | tok/s {tokens_per_sec:,.0f}{mfu}"
        )
        self.bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_sec:,.0f}")
        if self.world.is_main:
            (self.bar.write if not self.bar.disable else print)(line)
            self.metrics.log(record)
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def val_line(self, done: int, val_loss: float) -> None:
        val_ppl = math.exp(min(val_loss, 50))
        self.world.print(f"step {done}: val loss {val_loss:.4f} | val ppl {val_ppl:.2f}")
        if self.world.is_main:
            epoch = (done - 1) // self.batches_per_epoch + 1
            self.metrics.log(dict(step=done, epoch=epoch, val_loss=val_loss, val_ppl=val_ppl))
            plot_runs([self.metrics.path.parent], self.metrics.path.parent / "loss.png")


class MetricsLog:
    """Appends one JSON line per record to out_dir/metrics.jsonl and mirrors it to wandb when asked."""

    def __init__(self, out_dir: Path, config: dict, use_wandb: bool, project: str, resume_step: int | None = None):
        self.path = out_dir / "metrics.jsonl"
        if resume_step is not None:
            self.truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh log
        self.wandb = start_wandb(project, config, out_dir) if use_wandb else None

    def truncate_after(self, step: int) -> None:
        """On resume, drop records of steps the resumed run will redo, so the history has no duplicates."""
        if not self.path.exists():
            return
        kept = [record for record in read_metrics(self.path) if record["step"] <= step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(project: str, config: dict, out_dir: Path):
    """A wandb run, writing into out_dir/wandb with the run's other files (not the current folder), offline
    when there are no credentials; None (with one line) when wandb is missing."""
    try:
        import wandb
    except ImportError:
        print("wandb is not installed (pip install wandb): going on without it", file=sys.stderr)
        return None
    if os.environ.get("WANDB_MODE") is None and not (os.environ.get("WANDB_API_KEY") or has_netrc_login()):
        os.environ["WANDB_MODE"] = "offline"
        print("wandb: no credentials found, logging offline (sync later with `wandb sync`)", file=sys.stderr)
    try:
        return wandb.init(project=project, config=config, dir=str(out_dir))
    except Exception as e:  # never let tracking stop training
        print(f"wandb could not start ({type(e).__name__}): going on without it", file=sys.stderr)
        return None


def has_netrc_login() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a metrics.jsonl (or of the one in a run folder), skipping a line cut short by a kill."""
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_runs(run_dirs: list[Path], out: Path) -> None:
    """Train and validation loss against step for one or more runs, LR on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    lr_ax = ax.twinx()
    for i, run in enumerate(run_dirs):
        records = read_metrics(run)
        color = f"C{i}"
        label = run.name if len(run_dirs) > 1 else ""
        train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        lr = [(r["step"], r["lr"]) for r in records if "lr" in r]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.8, label=f"{label} train".strip())
        if val:
            ax.plot(*zip(*val), color=color, marker="o", linestyle="--", label=f"{label} val".strip())
        if lr:
            lr_ax.plot(*zip(*lr), color=color, alpha=0.25, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    lr_ax.set_ylabel("learning rate (faint)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
