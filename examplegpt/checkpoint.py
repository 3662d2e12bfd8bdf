"""Checkpoints: the original README's file names, finding the newest, pruning old ones, refusing model files;
and where a run starts: a checkpoint it resumes, or a model it is initialised from.

A checkpoint is a plain dict of tensors and Python data (loadable with `weights_only=True`):
model, optimizer, gradient scaler, step, data-loader position, RNG states, the resolved config
and the tokenizer hash. `train.py` decides what goes in; this module names, finds and checks the
files, which `weights.atomic_torch_save` writes (a kill leaves the old file or the new one).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import TrainConfig
from .errors import UserError
from .model import GPT
from .weights import load_model, read_torch_file

CHECKPOINT_FORMAT = "examplegpt-checkpoint"
CHECKPOINT_KEYS = {"model", "model_config", "config", "optimizer", "scaler", "step", "epoch", "rng"}
CHECKPOINT_NAME = re.compile(r"checkpoint_epoch(\d+)_batch(\d+)\.pt$")


def checkpoint_path(out_dir: str | Path, epoch: int, batch: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"checkpoint_epoch{epoch}_batch{batch}.pt"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in out_dir/checkpoints, oldest first (by epoch, then batch)."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    by_position = {}
    for p in folder.iterdir():
        match = CHECKPOINT_NAME.match(p.name)
        if match:
            by_position[(int(match[1]), int(match[2]))] = p
    return [by_position[key] for key in sorted(by_position)]


def checkpoint_position(steps_done: int, batches_per_epoch: int) -> tuple[int, int]:
    """Steps done -> (epoch, batch), 1-based as the original README names checkpoints: the last batch
    of epoch 1 is (1, batches_per_epoch), not (2, 0)."""
    epoch, index = divmod(steps_done, batches_per_epoch)
    return (epoch + 1, index) if index else (epoch, batches_per_epoch)


def later_checkpoints(out_dir: str | Path, position: tuple[int, int]) -> list[Path]:
    """The checkpoints in out_dir/checkpoints past (epoch, batch) `position`, oldest first."""
    return [p for p in list_checkpoints(out_dir) if position_of(p) > position]


def position_of(path: Path) -> tuple[int, int]:
    match = CHECKPOINT_NAME.match(path.name)
    return int(match[1]), int(match[2])


def resolve_resume(resume: str, out_dir: str | Path) -> Path:
    """The checkpoint that `--resume` names: 'auto' is the newest in out_dir."""
    if resume != "auto":
        return Path(resume)
    found = list_checkpoints(out_dir)
    if not found:
        raise UserError(f"--resume auto: no checkpoint in {Path(out_dir) / 'checkpoints'}")
    return found[-1]


def load_checkpoint(path: str | Path) -> dict:
    state = read_torch_file(path)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is a model file, not a training checkpoint: it cannot be resumed")
    missing = sorted(CHECKPOINT_KEYS - set(state))
    if missing:
        raise UserError(f"{path} is not a complete training checkpoint (no {missing[0]})")
    return state


def prune_checkpoints(out_dir: str | Path, keep_last: int) -> None:
    for old in list_checkpoints(out_dir)[:-keep_last]:
        old.unlink(missing_ok=True)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# Saved settings a resumed run does not inherit: they said how that run started, not how this one does.
NOT_INHERITED = ("resume", "init_from", "eval_batches")  # eval_batches: older runs' name, now eval_windows
SCHEDULE = ("num_epochs", "max_steps", "learning_rate", "warmup_steps", "min_lr_ratio")  # what shapes the LR schedule


@dataclass
class Start:
    """Where a training run starts: a checkpoint to resume (its saved state), a model to fine-tune, or
    (neither) random weights."""

    resume_state: dict | None = None
    pretrained: GPT | None = None
    init_from: str | None = None  # where `pretrained` was read from

    def base_config(self) -> dict | None:
        """The settings the run's config file and flags apply to: a resumed run's saved ones, or the shape of
        the --init-from model; None for a fresh run (the defaults)."""
        if self.resume_state is not None:
            saved = self.resume_state["config"]
            return {**saved, "train": {k: v for k, v in saved["train"].items() if k not in NOT_INHERITED}}
        if self.pretrained is not None:
            return {"model": {k: v for k, v in asdict(self.pretrained.config).items() if k != "dropout"}}
        return None

    def check(self, name: str, values: dict) -> None:
        """`cli.resolve`'s check: the model settings, before they are validated."""
        if name == "model":
            self.check_model_shape(values)

    def check_model_shape(self, model: dict) -> None:
        """Refuse a shape (model settings) that the checkpoint being resumed, or the --init-from model, does
        not have: one line with both values."""
        if self.resume_state is not None:
            fixed, source = (
                self.resume_state["model_config"],
                "the checkpoint was trained with another model configuration",
            )
        elif self.pretrained is not None:
            fixed = {k: v for k, v in asdict(self.pretrained.config).items() if k != "dropout"}
            source = f"the --init-from model {self.init_from} has another shape (leave the shape flags out)"
        else:
            return
        differ = [f"{k}={fixed[k]} (this run: {v})" for k, v in model.items() if k in fixed and fixed[k] != v]
        if differ:
            raise UserError(f"{source}: {', '.join(differ)}")

    def schedule_changes(self, cfg: TrainConfig) -> str | None:
        """What a resumed run changes of the checkpoint's learning-rate schedule, in one line (None: nothing)."""
        saved = self.resume_state["config"]["train"] if self.resume_state is not None else {}
        changed = [
            f"{k} {saved[k]} -> {getattr(cfg, k)}" for k in SCHEDULE if k in saved and saved[k] != getattr(cfg, k)
        ]
        if not changed:
            return None
        return f"resumed with another learning-rate schedule than the checkpoint's: {', '.join(changed)}"


def load_start(resume: str | None, init_from: str | None, out_dir: str | Path) -> Start:
    """Read what a run starts from: the checkpoint `resume` names ('auto': the newest in out_dir), or the
    model `init_from` names. The one place either is read; the CLI reads it before the other settings,
    which apply over it."""
    if resume and init_from:
        raise UserError(
            "--init-from starts a new run from a model's weights and --resume continues a run from its"
            " checkpoint: pass one of the two"
        )
    if resume:
        return Start(resume_state=load_checkpoint(resolve_resume(resume, out_dir)))
    if list_checkpoints(out_dir):  # a new run here would mix its files with those of the run before it
        raise UserError(
            f"{out_dir} already holds a run's checkpoints: continue it with --resume, or start the new run"
            " in another --out-dir"
        )
    if init_from:
        return Start(pretrained=load_model(init_from), init_from=init_from)
    return Start()
