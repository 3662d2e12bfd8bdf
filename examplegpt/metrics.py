"""What a run records: metrics.jsonl, the loss.png plot, and (optionally) Weights & Biases."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


class MetricsLog:
    """Appends one JSON line per record to out_dir/metrics.jsonl and mirrors it to wandb when asked."""

    def __init__(self, out_dir: Path, config: dict, use_wandb: bool, project: str, resume_step: int | None = None):
        self.path = out_dir / "metrics.jsonl"
        if resume_step is not None:
            self.truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh log
        self.wandb = start_wandb(project, config) if use_wandb else None

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


def start_wandb(project: str, config: dict):
    """A wandb run, offline when there are no credentials; None (with one line) when wandb is missing."""
    try:
        import wandb
    except ImportError:
        print("wandb is not installed (pip install wandb): going on without it", file=sys.stderr)
        return None
    if os.environ.get("WANDB_MODE") is None and not (os.environ.get("WANDB_API_KEY") or has_netrc_login()):
        os.environ["WANDB_MODE"] = "offline"
        print("wandb: no credentials found, logging offline (sync later with `wandb sync`)", file=sys.stderr)
    try:
        return wandb.init(project=project, config=config)
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
