"""The training loop: AdamW with warmup + cosine, gradient accumulation, mixed precision, checkpoints that resume exactly.

One optimizer step consumes `batch_size` windows (a global batch), split over data-parallel ranks
and then into micro-batches. Everything a step depends on is a function of the step number, the
seed and the saved state, which is why a resumed run retraces an uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import (
    CHECKPOINT_FORMAT,
    atomic_torch_save,
    checkpoint_path,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
)
from .config import DataConfig, GPTConfig, TrainConfig
from .data import HOLDOUT_SEED, TokenWindows, open_split, prepare
from .device import autocast, peak_flops, pick_device, pick_dtype
from .distributed import (
    World,
    apply_activation_checkpointing,
    barrier,
    init_world,
    mean_over_ranks,
    shutdown,
    wrap_data_parallel,
)
from .errors import UserError
from .metrics import MetricsLog, plot_runs
from .model import GPT
from .optim import flops_per_token, lr_at, make_optimizer
from .tokenizer import TOKENIZER_ID
from .weights import load_model, save_model_file

MAX_NONFINITE_IN_A_ROW = 3
SINGLE_PROCESS = World()
CPU_MICRO_BATCH = 8  # on CPU, larger micro-batches do not raise throughput, only memory


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its step, saves a checkpoint and exits cleanly."""

    def __init__(self) -> None:
        self.signal: str | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name


@contextlib.contextmanager
def claim_out_dir(out_dir: Path):
    """Hold an exclusive lock on out_dir for the run: two runs writing one folder would overwrite each other's
    checkpoints. The operating system drops the lock when the process ends, kill -9 included."""
    try:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / ".lock", "a+")
    except OSError as e:
        raise UserError(f"cannot write to the output folder {out_dir}: {e.strerror}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise UserError(
                f"another training run (pid {lock.read().strip() or '?'}) is writing to {out_dir}:"
                " wait for it to end or choose another --out-dir"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def find_micro_batch(model: GPT, per_rank: int, seq_len: int, device: torch.device, dtype: torch.dtype) -> int:
    """The largest micro-batch dividing `per_rank` whose forward + backward fits in GPU memory."""
    candidates = [b for b in range(per_rank, 0, -1) if per_rank % b == 0]
    if device.type != "cuda":
        return next(b for b in candidates if b <= CPU_MICRO_BATCH)
    for b in candidates:
        try:
            x = torch.zeros(b, seq_len, dtype=torch.long, device=device)
            with autocast(device, dtype):
                _, loss = model(x, x)
            loss.backward()
            model.zero_grad(set_to_none=True)
            return b
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    raise UserError(f"even a micro-batch of 1 sequence of {seq_len} tokens does not fit in GPU memory")


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, val: TokenWindows, batches: int, device: torch.device, dtype: torch.dtype
) -> float:
    """Mean loss over a fixed, seeded set of validation windows (the same at every evaluation)."""
    model.eval()
    losses = []
    for index in range(min(batches, val.batches_per_epoch)):
        x, y = val.batch(0, index)
        with autocast(device, dtype):
            _, loss = model(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
        losses.append(loss.item())
    model.train()
    return float(np.mean(losses))


def model_state(model: GPT, world: World, fsdp: bool) -> dict:
    if fsdp and world.size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def optimizer_state(model: GPT, optimizer: torch.optim.Optimizer, world: World, fsdp: bool) -> dict:
    if fsdp and world.size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_states(model: GPT, optimizer: torch.optim.Optimizer, state: dict, world: World, fsdp: bool) -> None:
    if fsdp and world.size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])


def train(model_cfg: GPTConfig, data_cfg: DataConfig, cfg: TrainConfig, resume_state: dict | None = None) -> int:
    """Run training as configured; returns the process exit status."""
    device = pick_device(cfg.device)
    world = init_world(device.type)
    try:
        with claim_out_dir(Path(cfg.out_dir)) if world.is_main else contextlib.nullcontext():
            status = run(model_cfg, data_cfg, cfg, resume_state, world, device)
        # Ranks leave together: a rank that tore gloo down while rank 0 still wrote the final model
        # was once seen to abort (SIGABRT) in CI.
        barrier(world)
    finally:
        shutdown(world)
    return status


def run(
    model_cfg: GPTConfig, data_cfg: DataConfig, cfg: TrainConfig, resume_state: dict | None, world: World, device
) -> int:
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
    if device.type == "cuda":  # TF32 matmuls on Ampere and newer: ~free speed for fp32 parts
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = pick_dtype(cfg.precision, device, cfg.use_amp)
    out_dir = Path(cfg.out_dir)

    if resume_state is None and cfg.resume:
        resume_state = load_checkpoint(resolve_resume(cfg.resume, out_dir))
    if resume_state is not None:
        saved = resume_state["model_config"]
        differ = [f"{k}={saved[k]} (this run: {v})" for k, v in asdict(model_cfg).items() if saved.get(k) != v]
        if differ:
            raise UserError(f"the checkpoint was trained with another model configuration: {', '.join(differ)}")
    torch.manual_seed(cfg.seed)
    if cfg.init_from and resume_state is None:
        pretrained = load_model(cfg.init_from)
        model_cfg = GPTConfig(**{**asdict(pretrained.config), "dropout": model_cfg.dropout})
        model = GPT(model_cfg)
        model.load_state_dict(pretrained.state_dict())
        world.print(f"initialised from {cfg.init_from} (optimizer fresh)")
    else:
        model = GPT(model_cfg)

    # Rank 0 builds the token cache; the others wait, then find it complete.
    if world.is_main:
        folder = prepare(data_cfg, min_tokens=model_cfg.max_seq_len + 1, verbose=True)
    barrier(world)
    if not world.is_main:
        folder = prepare(data_cfg, min_tokens=model_cfg.max_seq_len + 1)
    seq_len = model_cfg.max_seq_len
    loader = TokenWindows(open_split(folder, "train"), seq_len, cfg.batch_size, cfg.seed, world.rank, world.size)

    model.to(device)
    per_rank = cfg.batch_size // world.size
    if cfg.use_checkpointing:
        apply_activation_checkpointing(model)
    micro = cfg.micro_batch_size or find_micro_batch(model, per_rank, seq_len, device, dtype)
    if per_rank % micro:
        raise UserError(f"the per-process batch ({per_rank}) must be a multiple of micro_batch_size ({micro})")
    accum_steps = per_rank // micro
    val_tokens = open_split(folder, "val")
    val_windows = (len(val_tokens) - 1) // seq_len
    if val_windows >= world.size:  # each rank evaluates its own share (a small split gives smaller batches)
        val_rows = min(micro * world.size, val_windows // world.size * world.size)
        val = TokenWindows(val_tokens, seq_len, val_rows, HOLDOUT_SEED, world.rank, world.size)
    else:  # fewer windows than ranks: every rank evaluates the same ones
        val = TokenWindows(val_tokens, seq_len, min(micro, val_windows), HOLDOUT_SEED)

    compiled = torch.compile(model) if cfg.compile else model
    wrapped = wrap_data_parallel(compiled, world, device, cfg.fsdp)
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    total_steps = loader.batches_per_epoch * cfg.num_epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    start_step = 0
    full_config = {"model": asdict(model_cfg), "data": asdict(data_cfg), "train": asdict(cfg)}
    if resume_state is not None:
        load_states(model, optimizer, resume_state, world, cfg.fsdp)
        scaler.load_state_dict(resume_state["scaler"])
        set_rng_state(resume_state["rng"], device)
        start_step = resume_state["step"]
        world.print(f"resumed from step {start_step} (epoch {resume_state['epoch']})")

    tokens_per_step = cfg.batch_size * seq_len
    n_params = model.num_parameters()
    flops_step = flops_per_token(model.num_parameters(False), model_cfg.num_layers, model_cfg.d_model, seq_len)
    peak = peak_flops(device)
    world.print(json.dumps(full_config))
    world.print(
        f"model {n_params:,} parameters | device {device} x{world.size} | {str(dtype).removeprefix('torch.')}"
        f" | batch {cfg.batch_size} x {seq_len} = {tokens_per_step:,} tokens per step"
        f" (micro-batch {micro}, {accum_steps} accumulation steps) | {total_steps} steps"
        f" | checkpointing {'on' if cfg.use_checkpointing else 'off'} | compile {'on' if cfg.compile else 'off'}"
    )

    metrics = None
    if world.is_main:
        metrics = MetricsLog(
            out_dir, full_config, cfg.use_wandb, cfg.wandb_project, start_step if resume_state else None
        )
    stop = StopFlag()
    nonfinite_in_a_row = 0
    skipped = resume_state.get("nonfinite_skips", 0) if resume_state else 0
    started = time.perf_counter()
    window_start, window_tokens = time.perf_counter(), 0
    bar = tqdm(total=total_steps, initial=start_step, unit="step", disable=not (world.is_main and sys.stderr.isatty()))
    wrapped.train()
    step = start_step

    def save_checkpoint() -> None:
        epoch, index = divmod(step, loader.batches_per_epoch)
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": model_state(model, world, cfg.fsdp),
            "model_config": asdict(model_cfg),
            "config": full_config,
            "optimizer": optimizer_state(model, optimizer, world, cfg.fsdp),
            "scaler": scaler.state_dict(),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": index,
            "rng": rng_state(device),
            "nonfinite_skips": skipped,
            "tokenizer": TOKENIZER_ID,
            "world_size": world.size,
        }
        if world.is_main:
            # steps done -> (epoch, batch) in the original README's 1-based names
            path = checkpoint_path(out_dir, epoch + 1 if index else epoch, index or loader.batches_per_epoch)
            atomic_torch_save(state, path)
            if cfg.keep_last:
                prune_checkpoints(out_dir, cfg.keep_last)

    while step < total_steps:
        epoch, index = divmod(step, loader.batches_per_epoch)
        lr = lr_at(step, cfg.learning_rate, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = (torch.from_numpy(a) for a in loader.batch(epoch, index))  # (per_rank, T) each
        if device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        loss = accumulate_gradients(wrapped, x, y, micro, device, dtype, scaler, world, cfg.fsdp)
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        if not torch.isfinite(norm) and not scaler.is_enabled():
            optimizer.zero_grad(set_to_none=True)
            nonfinite_in_a_row += 1
            skipped += 1
            world.print(f"step {step + 1}: loss or gradient is not finite, step skipped ({skipped} so far)")
            if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                bar.close()
                raise UserError(
                    f"{nonfinite_in_a_row} steps in a row had a non-finite loss: stopped; "
                    f"the last good checkpoint is in {out_dir / 'checkpoints'} (lower --learning-rate?)"
                )
            step += 1
            continue
        nonfinite_in_a_row = 0
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_tokens += tokens_per_step
        bar.update(1)

        if step % cfg.log_interval == 0 or step == total_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - window_start
            train_loss = mean_over_ranks(loss.item(), world, device)
            tokens_per_sec = window_tokens / elapsed
            record = dict(
                step=step,
                epoch=epoch + 1,
                train_loss=train_loss,
                lr=lr,
                grad_norm=norm.item(),
                tokens_per_sec=tokens_per_sec,
                elapsed=time.perf_counter() - started,
            )
            mfu = ""
            if peak:
                record["mfu"] = tokens_per_sec * flops_step / (peak * world.size)
                mfu = f" | mfu {record['mfu']:.1%}"
            line = (
                f"step {step}/{total_steps} | loss {train_loss:.4f} | lr {lr:.2e} | norm {norm.item():.2f}"
                f" | dt {elapsed / (window_tokens / tokens_per_step) * 1000:.0f}ms | tok/s {tokens_per_sec:,.0f}{mfu}"
            )
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_sec:,.0f}")
            if world.is_main:
                (bar.write if not bar.disable else print)(line)
                metrics.log(record)
            window_start, window_tokens = time.perf_counter(), 0

        if step % cfg.eval_interval == 0 or step == total_steps:
            val_loss = mean_over_ranks(evaluate_loss(wrapped, val, cfg.eval_batches, device, dtype), world, device)
            world.print(f"step {step}: val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 50)):.2f}")
            if world.is_main:
                metrics.log(dict(step=step, epoch=epoch + 1, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50))))
                plot_runs([out_dir], out_dir / "loss.png")

        if step % cfg.checkpoint_interval == 0 or step == total_steps or stop.signal:
            save_checkpoint()
        if step % cfg.eval_interval == 0 or step % cfg.checkpoint_interval == 0:
            window_start = time.perf_counter()  # keep evaluation and saving out of the throughput figure
        if stop.signal:
            bar.close()
            world.print(
                f"{stop.signal}: stopped after step {step}, checkpoint saved; "
                f"continue with: python example.py train --resume auto --out-dir {out_dir}"
            )
            if metrics:
                metrics.close()
            return 0

    bar.close()
    weights = model_state(model, world, cfg.fsdp)  # collective under FSDP: every rank takes part
    if world.is_main:
        extra = {"tokenizer": TOKENIZER_ID, "config": full_config}
        save_model_file(model, out_dir / "gpt_model.pt", extra, weights)
        metrics.close()
        world.print(f"done: {out_dir / 'gpt_model.pt'} ({skipped} non-finite steps skipped)")
    return 0


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
