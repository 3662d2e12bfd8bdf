"""Checkpoints: the original README's file names, finding the newest, pruning old ones, refusing model files.

A checkpoint is a plain dict of tensors and Python data (loadable with `weights_only=True`):
model, optimizer, gradient scaler, step, data-loader position, RNG states, the resolved config
and the tokenizer hash. `train.py` decides what goes in; this module names, finds and checks the
files, which `weights.atomic_torch_save` writes (a kill leaves the old file or the new one).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import UserError
from .weights import read_torch_file

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
