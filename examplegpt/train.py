"""The training loop: AdamW with warmup + cosine, gradient accumulation, mixed precision, checkpoints that resume exactly.

One optimizer step consumes `batch_size` windows (a global batch), split over data-parallel ranks
and then into micro-batches. Everything a step depends on is a function of the step number, the
seed and the saved state, which is why a resumed run retraces an uninterrupted one bit for bit.

Read top-down: `train` and its loop (`fit`), then one step (`train_step` -> `accumulate_gradients`),
then what follows a step (the log line, evaluation, saving). What a run holds, and how it is built or
restored from its checkpoint, is `trainer.py`.
"""

from __future__ import annotations

import contextlib
import math
import signal
from dataclasses import asdict
from pathlib import Path

import torch

from .checkpoint import (
    CHECKPOINT_FORMAT,
    Start,
    checkpoint_path,
    checkpoint_position,
    load_start,
    prune_checkpoints,
    rng_state,
)
from .config import DataConfig, GPTConfig, TrainConfig
from .device import autocast, pick_device
from .distributed import (
    SINGLE_PROCESS,
    World,
    barrier,
    init_world,
    mean_over_ranks,
    model_state,
    optimizer_state,
    shutdown,
)
from .errors import UserError
from .evaluate import evaluate_loss
from .metrics import MetricsLog, TrainingLog
from .optim import lr_at, set_learning_rates
from .reproducibility import make_cuda_deterministic
from .run_folder import claim_out_dir, refuse_an_earlier_run
from .tokenizer import TOKENIZER_ID
from .trainer import Trainer, build_trainer
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
            if not cfg.resume:
                refuse_an_earlier_run(cfg.out_dir)  # every rank: none goes on to wait for a rank 0 that stopped
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
