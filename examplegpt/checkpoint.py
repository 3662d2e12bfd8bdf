"""Checkpoints: the original README's file names, finding the newest, pruning old ones, refusing model files
and damaged ones; and where a run starts: a checkpoint it resumes (with the settings it fixes), or a model it
is initialised from.

A checkpoint is a plain dict of tensors and Python data (loadable with `weights_only=True`):
model, optimizer, gradient scaler, step, data-loader position, RNG states, the resolved config
and the tokenizer hash. `train.py` decides what goes in; this module names, finds and checks the
files, which `weights.atomic_torch_save` writes (a kill leaves the old file or the new one).
"""

from __future__ import annotations

import contextlib
import os
import re
import zipfile
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
    return checkpoints_in(Path(out_dir) / "checkpoints")


def checkpoints_in(folder: Path) -> list[Path]:
    """The checkpoint files in `folder`, oldest first (by epoch, then batch)."""
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
    """The state of the checkpoint at `path`. One that cannot be resumed is refused in one line that says why
    (damaged: truncated or corrupt) and names the newest earlier checkpoint beside it that can be: going back
    to it redoes the steps after it, so that is the user's choice, never made for them."""
    try:
        return read_checkpoint(path)
    except UserError as e:
        path = Path(path)
        if not CHECKPOINT_NAME.match(path.name):
            raise
        problem = str(e)  # read_checkpoint's: damage it found, or why the file does not read
        earlier = newest_readable_before(path)
        if earlier is None:
            raise UserError(problem) from None
        raise UserError(
            f"{problem}; the newest complete checkpoint before it is {earlier}: to continue from there,"
            f" pass --resume {earlier}"
        ) from None


def read_checkpoint(path: str | Path) -> dict:
    # torch.load does not check the archive's checksums: damage inside a tensor would be resumed from silently
    problem = damage(Path(path))
    if problem:
        raise UserError(problem)
    state = read_torch_file(path)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is a model file, not a training checkpoint: it cannot be resumed")
    missing = sorted(CHECKPOINT_KEYS - set(state))
    if missing:
        raise UserError(f"{path} is not a complete training checkpoint (no {missing[0]})")
    return state


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint file itself, if it is damaged: a torch file is a zip archive whose index
    sits at its end (a file cut short has none) and whose entries carry checksums. None when the archive is
    whole, or when the file cannot be opened (the reader then says why)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if not head:
            return f"{path} is damaged (truncated: it is empty) and cannot be resumed"
        if not zipfile.is_zipfile(path):
            if head == b"PK\x03\x04":  # a zip archive's start without its end
                return f"{path} is damaged (truncated) and cannot be resumed"
            return f"{path} is damaged (corrupt: not a checkpoint's format) and cannot be resumed"
        with zipfile.ZipFile(path) as archive:
            failed = archive.testzip()  # the first entry whose checksum fails
    except (OSError, zipfile.BadZipFile):
        return None  # unreadable for another reason (permissions, ...): the reader's message says it
    if failed is not None:
        return f"{path} is damaged (corrupt: {failed} fails its checksum) and cannot be resumed"
    return None


def newest_readable_before(path: Path) -> Path | None:
    """The newest checkpoint beside `path` and earlier than it that reads as a complete checkpoint."""
    earlier = [p for p in checkpoints_in(path.parent) if position_of(p) < position_of(path)]
    for candidate in reversed(earlier):
        try:
            read_checkpoint(candidate)
        except UserError:
            continue
        return candidate
    return None


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
# What a resumed run keeps from its checkpoint (with the model's shape and the optimizer), by config: the batches
# and the seed that orders them, the text they come from and the validation windows. Another value of one of
# these would not continue the run: it would start another one from the checkpoint's weights.
FIXED = {
    "data": ("data", "data_config", "text_column", "train_split", "val_split", "val_fraction"),
    "train": ("batch_size", "seed", "eval_windows"),
}
# What a resumed run may change, each named in a warning: the learning-rate schedule, then the optimizer's
# other settings. The rest (device, precision, micro-batch, intervals, ...) says how it runs, not what it learns.
SCHEDULE = ("num_epochs", "max_steps", "learning_rate", "warmup_steps", "min_lr_ratio", "muon_learning_rate")
OPTIMIZER_SETTINGS = ("weight_decay", "beta1", "beta2", "grad_clip", "muon_momentum", "muon_weight_decay")


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
        """Refuse the settings of config `name` (model, data or train) that the start fixes: the shape of the
        checkpoint or the --init-from model, and what else a resumed checkpoint fixes. `cli.resolve` calls it
        before the settings are validated (a refusal names the cause, not its consequence)."""
        if name == "model":
            self.check_model_shape(values)
        elif self.resume_state is not None:
            self.check_fixed_settings(name, values)

    def check_fixed_settings(self, name: str, values: dict) -> None:
        """Refuse a data or train setting that a resumed run cannot change (FIXED, the optimizer): one line
        with the flag, the checkpoint's value and this run's."""
        saved = self.resume_state["config"].get(name, {})
        if name == "train":
            optimizer = saved.get("optimizer", "adamw")
            if values.get("optimizer", "adamw") != optimizer:
                raise UserError(f"the checkpoint was trained with --optimizer {optimizer}: resume with that one")
        differ = [
            f"--{k.replace('_', '-')} {saved[k]} (this run: {values[k]})"
            for k in FIXED.get(name, ())
            if k in saved and k in values and not same_setting(k, saved[k], values[k])
        ]
        if differ:
            raise UserError(
                f"the checkpoint was trained with {', '.join(differ)}: a resume keeps the checkpoint's data, data"
                " order and validation windows (it may change only the schedule and the optimizer's settings);"
                f" leave {'that flag' if len(differ) == 1 else 'those flags'} out, or start a new run in another"
                " --out-dir"
            )

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
        changed = self.changes(cfg, SCHEDULE)
        return changed and f"resumed with another learning-rate schedule than the checkpoint's: {changed}"

    def optimizer_changes(self, cfg: TrainConfig) -> str | None:
        """What a resumed run changes of the optimizer's other settings, in one line (None: nothing)."""
        changed = self.changes(cfg, OPTIMIZER_SETTINGS)
        return changed and f"resumed with other optimizer settings than the checkpoint's: {changed}"

    def changes(self, cfg: TrainConfig, names: tuple[str, ...]) -> str | None:
        """'name saved -> now' for each of the train settings `names` that cfg changes, or None (Muon's only
        when it trains with Muon)."""
        saved = self.resume_state["config"]["train"] if self.resume_state is not None else {}
        used = [k for k in names if cfg.optimizer == "muon" or not k.startswith("muon_")]
        changed = [f"{k} {saved[k]} -> {getattr(cfg, k)}" for k in used if k in saved and saved[k] != getattr(cfg, k)]
        return ", ".join(changed) or None


def same_setting(name: str, saved: object, given: object) -> bool:
    """Whether a resumed run's setting is the checkpoint's: equal, or for --data two spellings of one file
    (ts.txt and ./ts.txt)."""
    if saved == given:
        return True
    if name == "data" and isinstance(saved, str) and isinstance(given, str):
        with contextlib.suppress(OSError):
            return os.path.samefile(saved, given)
    return False


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
    if init_from:
        return Start(pretrained=load_model(init_from), init_from=init_from)
    return Start()
