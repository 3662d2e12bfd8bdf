"""What a training run is, and how one is set up or restored from its checkpoint.

A `Trainer` holds what `build_trainer` sets up once (the model as written and as stepped, the data,
the optimizer, the micro-batch size, the step count) and where the run stands (steps done, the loss
since the last log line, the non-finite steps skipped). `train.py` drives it; nothing here runs a step.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Start, checkpoint_position, set_rng_state
from .config import DataConfig, GPTConfig, TrainConfig, describe, save_config
from .data import TokenWindows, open_split, prepare
from .device import find_micro_batch, peak_flops, pick_dtype
from .distributed import World, apply_activation_checkpointing, barrier, load_states, wrap_data_parallel
from .errors import UserError
from .evaluate import validation_windows
from .model import GPT
from .optim import flops_per_token, make_optimizer, warmup_warning
from .run_folder import set_aside_abandoned_branch


@dataclass
class Trainer:
    """One training run: what `build_trainer` sets up once (model, data, optimizer), and where the run stands."""

    model_cfg: GPTConfig
    cfg: TrainConfig
    world: World
    device: torch.device
    dtype: torch.dtype
    full_config: dict  # the resolved settings, saved with every checkpoint and the final model
    model: GPT  # the module itself: its parameters, state dict and optimizer groups
    step_model: torch.nn.Module  # the same model as forward and backward run it: compiled and/or wrapped for DDP/FSDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: TokenWindows
    val_windows: np.ndarray  # (N, seq_len + 1): the fixed validation set
    micro: int  # rows per forward pass
    total_steps: int
    flops_per_token: int  # training FLOPs per token, for the MFU figure
    peak_flops: float | None  # the device's peak FLOP/s, where known
    loss_since_log: torch.Tensor  # () on the device: the sum of the losses of the finite steps since the last log line
    steps_since_log: int = 0
    steps_done: int = 0
    nonfinite_skips: int = 0  # saved in checkpoints
    nonfinite_in_a_row: int = 0

    def mean_loss_since_log(self) -> torch.Tensor:
        """The train loss a log line reports: the mean over the steps since the last one (as Hugging Face's
        Trainer logs it), less noisy than one step's loss."""
        mean = self.loss_since_log / self.steps_since_log
        self.loss_since_log, self.steps_since_log = torch.zeros((), device=self.device), 0
        return mean

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)


def build_trainer(
    model_cfg: GPTConfig,
    data_cfg: DataConfig,
    cfg: TrainConfig,
    start: Start,
    world: World,
    device: torch.device,
) -> Trainer:
    """The model, the data, the optimizer; then the checkpoint's state put back, when resuming."""
    device, dtype = set_up(cfg, world, device, model_cfg.d_model)
    for name, settings in (("model", model_cfg), ("data", data_cfg), ("train", cfg)):
        start.check(name, asdict(settings))  # what the checkpoint fixes (the CLI checked it; a Python caller not)
    torch.manual_seed(cfg.seed)
    model = initial_model(model_cfg, start, world)
    loader, val_windows = training_data(data_cfg, cfg, model_cfg.max_seq_len, world)
    seq_len = model_cfg.max_seq_len
    model.to(device)
    per_rank = cfg.batch_size // world.size
    if cfg.use_checkpointing:
        apply_activation_checkpointing(model)
    micro = cfg.micro_batch_size or find_micro_batch(model, per_rank, seq_len, device, dtype)
    if per_rank % micro:
        raise UserError(f"the per-process batch ({per_rank}) must be a multiple of micro_batch_size ({micro})")
    step_model = wrap_data_parallel(torch.compile(model) if cfg.compile else model, world, device, cfg.fsdp)
    total_steps = loader.batches_per_epoch * cfg.num_epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    if world.is_main and (
        warning := warmup_warning(cfg.learning_rate, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    ):
        print(f"warning: {warning}", file=sys.stderr)
    trainer = Trainer(
        model_cfg=model_cfg,
        cfg=cfg,
        world=world,
        device=device,
        dtype=dtype,
        full_config={"model": asdict(model_cfg), "data": asdict(data_cfg), "train": asdict(cfg)},
        model=model,
        step_model=step_model,
        optimizer=make_optimizer(model, cfg, device),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        loader=loader,
        val_windows=val_windows,
        micro=micro,
        total_steps=total_steps,
        flops_per_token=flops_per_token(model.num_parameters(False), model_cfg.num_layers, model_cfg.d_model, seq_len),
        peak_flops=peak_flops(device),
        loss_since_log=torch.zeros((), device=device),
    )
    if start.resume_state is not None:
        restore(trainer, start)
    announce(trainer)
    return trainer


def initial_model(model_cfg: GPTConfig, start: Start, world: World) -> GPT:
    """A fresh model: random, or the --init-from weights (a checkpoint's state comes later, in `restore`)."""
    model = GPT(model_cfg)
    if start.pretrained is not None:
        model.load_state_dict(start.pretrained.state_dict())
        world.print(f"initialised from {start.init_from} (optimizer fresh)")
    return model


def training_data(
    data_cfg: DataConfig, cfg: TrainConfig, seq_len: int, world: World
) -> tuple[TokenWindows, np.ndarray]:
    """This rank's training batches and the fixed validation windows. Rank 0 builds the token cache; the
    others wait, then find it complete."""
    if world.is_main:
        folder = prepare(data_cfg, min_tokens=seq_len + 1, verbose=True)
    barrier(world)
    if not world.is_main:
        folder = prepare(data_cfg, min_tokens=seq_len + 1)
    loader = TokenWindows(open_split(folder, "train"), seq_len, cfg.batch_size, cfg.seed, world.rank, world.size)
    return loader, validation_windows(open_split(folder, "val"), seq_len, cfg.eval_windows)


def set_up(cfg: TrainConfig, world: World, device: torch.device, d_model: int) -> tuple[torch.device, torch.dtype]:
    """This rank's device and the compute dtype (on CPU it depends on the model's width: see pick_dtype)."""
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
    if device.type == "cuda":  # TF32 matmuls on Ampere and newer: ~free speed for fp32 parts
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, pick_dtype(cfg.precision, device, cfg.use_amp, d_model)


def restore(trainer: Trainer, start: Start) -> None:
    """Put the checkpoint's weights, optimizer, scaler, RNG and counters back; set aside the checkpoints of a
    branch this resume abandons, and say if the learning-rate schedule or the optimizer's settings changed."""
    resume_state, world = start.resume_state, trainer.world
    steps_done = resume_state["step"]
    if steps_done > trainer.total_steps:
        raise UserError(
            f"the checkpoint is at step {steps_done}, past the {trainer.total_steps} steps of this run:"
            " raise --max-steps or --num-epochs, or resume an earlier checkpoint"
        )
    position = checkpoint_position(steps_done, trainer.loader.batches_per_epoch)
    if world.is_main and (moved := set_aside_abandoned_branch(trainer.out_dir, position)):
        print(moved)
    for changed in (start.schedule_changes(trainer.cfg), start.optimizer_changes(trainer.cfg)):
        if world.is_main and changed:
            print(f"warning: {changed}", file=sys.stderr)
    load_states(trainer.model, trainer.optimizer, resume_state, trainer.world, trainer.cfg.fsdp)
    trainer.scaler.load_state_dict(resume_state["scaler"])
    set_rng_state(resume_state["rng"], trainer.device)
    trainer.steps_done = steps_done
    trainer.nonfinite_skips = resume_state.get("nonfinite_skips", 0)
    loss_sum, trainer.steps_since_log = resume_state.get("loss_since_log", (0.0, 0))
    trainer.loss_since_log = torch.tensor(loss_sum, device=trainer.device)
    world.print(f"resumed from step {steps_done} (epoch {position[0]}, batch {position[1]})")


def announce(trainer: Trainer) -> None:
    """The resolved configuration (also saved in the run folder) and one line of what the run is about to do."""
    cfg, seq_len = trainer.cfg, trainer.model_cfg.max_seq_len
    if trainer.world.is_main:
        trainer.world.print(f"configuration (saved in {save_config(trainer.full_config, trainer.out_dir)}):")
    trainer.world.print(describe(trainer.full_config))
    accumulation = cfg.batch_size // trainer.world.size // trainer.micro
    with_padding = sum(p.numel() for p in trainer.model.parameters())
    trainer.world.print(
        f"model {trainer.model.num_parameters():,} parameters ({with_padding:,} with the vocabulary's padding rows)"
        f" | device {trainer.device} x{trainer.world.size}"
        f" | {str(trainer.dtype).removeprefix('torch.')} | batch {cfg.batch_size} x {seq_len} ="
        f" {cfg.batch_size * seq_len:,} tokens per step (micro-batch {trainer.micro},"
        f" {accumulation} accumulation step{'' if accumulation == 1 else 's'}) | {trainer.total_steps} steps"
        f" | validation {len(trainer.val_windows)} windows | checkpointing {'on' if cfg.use_checkpointing else 'off'}"
        f" | compile {'on' if cfg.compile else 'off'}"
    )
