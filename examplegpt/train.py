"""The training loop: AdamW with warmup + cosine, gradient accumulation, mixed precision, checkpoints that resume exactly.

One optimizer step consumes `batch_size` windows (a global batch), split over data-parallel ranks
and then into micro-batches. Everything a step depends on is a function of the step number, the
seed and the saved state, which is why a resumed run retraces an uninterrupted one bit for bit.

Read top-down: `train` and its loop (`fit`), then one step (`train_step` -> `accumulate_gradients`),
then what follows a step (the log line, evaluation, saving), then how a `Trainer` is built and restored.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import (
    CHECKPOINT_FORMAT,
    Start,
    checkpoint_path,
    checkpoint_position,
    load_start,
    prune_checkpoints,
    rng_state,
    set_rng_state,
)
from .config import DataConfig, GPTConfig, TrainConfig, describe, save_config
from .data import TokenWindows, open_split, prepare
from .device import autocast, find_micro_batch, peak_flops, pick_device, pick_dtype
from .distributed import (
    SINGLE_PROCESS,
    World,
    apply_activation_checkpointing,
    barrier,
    init_world,
    load_states,
    mean_over_ranks,
    model_state,
    optimizer_state,
    shutdown,
    wrap_data_parallel,
)
from .errors import UserError
from .evaluate import evaluate_loss, validation_windows
from .metrics import MetricsLog, TrainingLog
from .model import GPT
from .optim import flops_per_token, lr_at, make_optimizer, set_learning_rates, warmup_warning
from .reproducibility import make_cuda_deterministic
from .run_folder import claim_out_dir, set_aside_abandoned_branch
from .tokenizer import TOKENIZER_ID
from .weights import atomic_torch_save, save_model_file

MAX_NONFINITE_IN_A_ROW = 3


def train(model_cfg: GPTConfig, data_cfg: DataConfig, cfg: TrainConfig, start: Start | None = None) -> int:
    """Run training as configured; returns the process exit status.

    `start` is the checkpoint cfg.resume names or the model cfg.init_from names, when the caller has read
    it already (see `load_start`: the CLI does, to apply its flags over a resumed run's settings)."""
    device = pick_device(cfg.device)
    if cfg.deterministic and device.type == "cuda":
        make_cuda_deterministic()
    world = init_world(device.type)
    try:
        with claim_out_dir(Path(cfg.out_dir)) if world.is_main else contextlib.nullcontext():
            start = start or load_start(cfg.resume, cfg.init_from, cfg.out_dir)
            trainer = build_trainer(model_cfg, data_cfg, cfg, start, world, device)
            status = fit(trainer, resumed=start.resume_state is not None)
        barrier(world)  # ranks leave together: none tears the process group down while rank 0 still writes
    finally:
        shutdown(world)
    return status


def fit(trainer: Trainer, resumed: bool) -> int:
    """The loop: step, log, evaluate, save, until the last step or a stop signal (which saves a checkpoint)."""
    cfg, total = trainer.cfg, trainer.total_steps
    if trainer.steps_done == total and (trainer.out_dir / "gpt_model.pt").exists():
        trainer.world.print(
            f"the run was already complete ({total} steps): {trainer.out_dir / 'gpt_model.pt'} left as it is"
            " (raise --max-steps or --num-epochs to train on)"
        )
        return 0
    with contextlib.ExitStack() as on_exit:  # the one way out: progress bar, metrics log, signals, on every path
        stop = StopFlag()
        on_exit.callback(stop.restore)
        log = on_exit.enter_context(training_log(trainer, resumed))
        trainer.step_model.train()
        while trainer.steps_done < total:
            step = trainer.steps_done  # 0-based index of the step about to run
            lr = lr_at(step, cfg.learning_rate, cfg.warmup_steps, total, cfg.min_lr_ratio)
            loss, norm = train_step(trainer, step, lr)
            trainer.steps_done = done = step + 1
            log.step_done(finite=loss is not None)
            if loss is not None and (done % cfg.log_interval == 0 or done == total):
                log.train_line(done, lr, trainer.mean_loss_since_log(), norm)
            if done % cfg.eval_interval == 0 or done == total:
                log.val_line(done, validation_loss(trainer))
            if done % cfg.checkpoint_interval == 0 or done == total or stop.signal:
                save_checkpoint(trainer)
            if done % cfg.eval_interval == 0 or done % cfg.checkpoint_interval == 0:
                log.restart_clock()  # keep evaluation and saving out of the throughput
            if stop.signal:
                trainer.world.print(
                    f"{stop.signal}: stopped after step {done}, checkpoint saved; "
                    f"continue with: python example.py train --resume auto --out-dir {trainer.out_dir}"
                )
                return 0
    save_final_model(trainer)
    return 0


# --- one step ----------------------------------------------------------------------------------------


def train_step(trainer: Trainer, step: int, lr: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One optimizer step (step is 0-based): (mean loss, gradient norm), or (None, None) when the loss or
    gradient was not finite and the step was skipped (the weights unchanged)."""
    optimizer, scaler, cfg, world = trainer.optimizer, trainer.scaler, trainer.cfg, trainer.world
    set_learning_rates(optimizer, lr, cfg)
    epoch, index = divmod(step, trainer.loader.batches_per_epoch)
    x, y = (torch.from_numpy(a) for a in trainer.loader.batch(epoch, index))  # (per_rank, T) each
    if trainer.device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    loss = accumulate_gradients(
        trainer.step_model, x, y, trainer.micro, trainer.device, trainer.dtype, scaler, world, cfg.fsdp
    )
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), cfg.grad_clip or math.inf)
    if not torch.isfinite(norm) and not scaler.is_enabled():
        optimizer.zero_grad(set_to_none=True)
        trainer.nonfinite_in_a_row += 1
        trainer.nonfinite_skips += 1
        world.print(f"step {step + 1}: loss or gradient is not finite, step skipped ({trainer.nonfinite_skips} so far)")
        if trainer.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
            raise UserError(
                f"{trainer.nonfinite_in_a_row} steps in a row had a non-finite loss: stopped; "
                f"the last good checkpoint is in {trainer.out_dir / 'checkpoints'} (lower --learning-rate?)"
            )
        return None, None
    trainer.nonfinite_in_a_row = 0
    trainer.loss_since_log += loss
    trainer.steps_since_log += 1
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm


def accumulate_gradients(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    micro: int,
    device: torch.device,
    dtype: torch.dtype,
    scaler: torch.amp.GradScaler,
    world: World = SINGLE_PROCESS,
    fsdp: bool = False,
) -> torch.Tensor:
    """Forward and backward over (x, y) (b, T) in micro-batches of `micro` rows: the gradients add up to
    those of the mean loss over all b rows. Returns that mean loss (detached)."""
    steps = x.shape[0] // micro
    loss_sum = torch.zeros((), device=device)
    for m in range(steps):
        xm = x[m * micro : (m + 1) * micro].to(device, non_blocking=True)  # (micro, T)
        ym = y[m * micro : (m + 1) * micro].to(device, non_blocking=True)
        with sync_gradients(model, world, fsdp, last=m == steps - 1), autocast(device, dtype):
            _, loss = model(xm, ym)
        scaler.scale(loss / steps).backward()
        loss_sum += loss.detach()
    return loss_sum / steps


def sync_gradients(model: torch.nn.Module, world: World, fsdp: bool, last: bool) -> contextlib.AbstractContextManager:
    """Gradient all-reduce on the last micro-step only: the earlier ones just accumulate locally."""
    if world.size == 1 or last:
        if fsdp and world.size > 1:
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if fsdp:
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return model.no_sync()


# --- what follows a step: the log line, evaluation, saving ----------------------------------------------


def training_log(trainer: Trainer, resumed: bool) -> TrainingLog:
    """The run's progress bar and log; on rank 0 its metrics.jsonl too (cut back to the step resumed from)."""
    cfg = trainer.cfg
    metrics = None
    if trainer.world.is_main:
        resumed_at = trainer.steps_done if resumed else None
        metrics = MetricsLog(trainer.out_dir, trainer.full_config, cfg.use_wandb, cfg.wandb_project, resumed_at)
    return TrainingLog(
        metrics,
        trainer.world,
        trainer.device,
        steps=(trainer.steps_done, trainer.total_steps),
        tokens_per_step=cfg.batch_size * trainer.model_cfg.max_seq_len,
        batches_per_epoch=trainer.loader.batches_per_epoch,
        flops_per_token=trainer.flops_per_token,
        peak_flops=trainer.peak_flops,
    )


def validation_loss(trainer: Trainer) -> float:
    """Mean loss per token on the run's fixed validation windows."""
    return evaluate_loss(
        trainer.step_model, trainer.val_windows, trainer.micro, trainer.device, trainer.dtype, trainer.world
    )


def save_checkpoint(trainer: Trainer) -> None:
    """Everything the next step depends on, written atomically (collective under FSDP: every rank calls it)."""
    model, world, fsdp, done = trainer.model, trainer.world, trainer.cfg.fsdp, trainer.steps_done
    epoch, index = divmod(done, trainer.loader.batches_per_epoch)
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": model_state(model, world, fsdp),
        "model_config": asdict(trainer.model_cfg),
        "config": trainer.full_config,
        "optimizer": optimizer_state(model, trainer.optimizer, world, fsdp),
        "scaler": trainer.scaler.state_dict(),
        "step": done,
        "epoch": epoch,
        "batch_in_epoch": index,
        "rng": rng_state(trainer.device),
        "nonfinite_skips": trainer.nonfinite_skips,
        # the logged train loss is a mean over the log interval: the part of it before this step
        "loss_since_log": (
            mean_over_ranks(trainer.loss_since_log.item(), world, trainer.device),
            trainer.steps_since_log,
        ),
        "tokenizer": TOKENIZER_ID,
        "world_size": world.size,
    }
    if world.is_main:
        position = checkpoint_position(done, trainer.loader.batches_per_epoch)
        atomic_torch_save(state, checkpoint_path(trainer.out_dir, *position))
        if trainer.cfg.keep_last:
            prune_checkpoints(trainer.out_dir, trainer.cfg.keep_last)


def save_final_model(trainer: Trainer) -> None:
    weights = model_state(trainer.model, trainer.world, trainer.cfg.fsdp)  # collective under FSDP: all ranks call it
    if trainer.world.is_main:
        path, extra = trainer.out_dir / "gpt_model.pt", {"tokenizer": TOKENIZER_ID, "config": trainer.full_config}
        save_model_file(trainer.model, path, extra, weights)
        trainer.world.print(f"done: {path} ({trainer.nonfinite_skips} non-finite steps skipped)")


# --- building a run, and restoring one from its checkpoint ---------------------------------------------


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
    start.check_model_shape(asdict(model_cfg))
    if start.resume_state is not None:
        saved_optimizer = start.resume_state["config"]["train"].get("optimizer", "adamw")
        if saved_optimizer != cfg.optimizer:
            raise UserError(f"the checkpoint was trained with --optimizer {saved_optimizer}: resume with that one")
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
    branch this resume abandons, and say if the learning-rate schedule changed."""
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
    if world.is_main and (changed := start.schedule_changes(trainer.cfg)):
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


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its step, saves a checkpoint and exits cleanly."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        """Give the signals back to their previous handlers (a Python caller's Ctrl-C works again)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
