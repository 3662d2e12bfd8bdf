"""The training loop: AdamW with warmup + cosine, gradient accumulation, mixed precision, checkpoints that resume exactly.

One optimizer step consumes `batch_size` windows (a global batch), split over data-parallel ranks
and then into micro-batches. Everything a step depends on is a function of the step number, the
seed and the saved state, which is why a resumed run retraces an uninterrupted one bit for bit.

`train` reads as the run's story: set up, build, restore, then for each step: step, log, evaluate,
save. Each of those is a function below.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_path,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
)
from .config import DataConfig, GPTConfig, TrainConfig, describe, save_config
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
from .loss import IGNORE_INDEX
from .metrics import MetricsLog, plot_runs
from .model import GPT
from .optim import flops_per_token, lr_at, make_optimizer, set_learning_rates, torch_optimizers
from .reproducibility import make_cuda_deterministic
from .tokenizer import TOKENIZER_ID
from .weights import atomic_torch_save, load_model, save_model_file

MAX_NONFINITE_IN_A_ROW = 3
SINGLE_PROCESS = World()
CPU_MICRO_BATCH = 8  # on CPU, larger micro-batches do not raise throughput, only memory


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


@contextlib.contextmanager
def claim_out_dir(out_dir: Path):
    """Hold an exclusive lock on out_dir for the run: two runs writing one folder would overwrite each other's
    checkpoints. The operating system drops the lock when the process ends, kill -9 included.

    The lock file lives in the run's own checkpoints/ folder and is removed when the run ends; a run
    refused before it wrote anything leaves no folder it created behind."""
    folder = out_dir / "checkpoints"
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = take_lock(folder / ".lock")
    except OSError as e:
        raise UserError(f"cannot write to the output folder {out_dir}: {e.strerror}") from None
    except UserError:
        remove_if_empty(created)
        raise
    finished = False
    try:
        yield
        finished = True
    finally:
        with lock:
            Path(lock.name).unlink(missing_ok=True)  # while still holding it: see take_lock
        if not finished:
            remove_if_empty(created)


def take_lock(path: Path):
    """The open lock file at `path`, locked, with our pid in it; UserError if another run holds it."""
    while True:
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise UserError(
                f"another training run (pid {holder}) is writing to {path.parent.parent}:"
                " wait for it to end or choose another --out-dir"
            ) from None
        # The run that held it may have removed the file just before we locked it: lock the new one then.
        if path.exists() and os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
            break
        lock.close()
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


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


def validation_windows(tokens: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """The validation set: `count` non-overlapping windows of seq_len + 1 tokens (all of them if the split
    has fewer), chosen by a fixed seed: (N, seq_len + 1). It depends on nothing else (not the micro-batch,
    the number of processes or the device), so val losses of any two runs are comparable."""
    available = (len(tokens) - 1) // seq_len
    if available < 1:
        raise UserError(f"the validation split has {len(tokens):,} tokens: fewer than one window of {seq_len + 1}")
    chosen = np.random.default_rng(HOLDOUT_SEED).permutation(available)[:count]
    return np.stack([tokens[w * seq_len : w * seq_len + seq_len + 1] for w in chosen]).astype(np.int64)


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    windows: np.ndarray,
    micro: int,
    device: torch.device,
    dtype: torch.dtype,
    world: World = SINGLE_PROCESS,
) -> float:
    """Mean loss per token over `windows` (N, T + 1). Each rank scores every world.size-th window.

    Every forward pass has `micro` rows and every rank runs as many (FSDP's passes are collective): shares
    are padded with windows whose targets are all ignored."""
    share = windows[world.rank :: world.size]  # (n, T + 1)
    largest_share = -(-len(windows) // world.size)
    rows = -(-largest_share // micro) * micro
    padded = np.concatenate([share, np.repeat(windows[:1], rows - len(share), axis=0)])  # (rows, T + 1)
    x = torch.from_numpy(padded[:, :-1])
    y = torch.from_numpy(padded[:, 1:]).clone()
    y[len(share) :] = IGNORE_INDEX
    model.eval()
    total = 0.0  # sum of per-window mean losses: every real window has T targets
    for start in range(0, rows, micro):
        with autocast(device, dtype):
            _, loss = model(x[start : start + micro].to(device), y[start : start + micro].to(device))
        real = min(len(share), start + micro) - start  # windows of this rank's share in this pass
        if real > 0:
            total += loss.item() * real
    model.train()
    return mean_over_ranks(total, world, device) * world.size / len(windows)


def model_state(model: GPT, world: World, fsdp: bool) -> dict:
    if fsdp and world.size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def optimizer_state(model: GPT, optimizer: torch.optim.Optimizer, world: World, fsdp: bool) -> dict:
    if fsdp and world.size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, torch_optimizers(optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_states(model: GPT, optimizer: torch.optim.Optimizer, state: dict, world: World, fsdp: bool) -> None:
    if fsdp and world.size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model,
            torch_optimizers(optimizer),
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])


def load_resume_state(cfg: TrainConfig) -> dict | None:
    """The checkpoint that cfg.resume names ('auto': the newest in out_dir), or None for a fresh run.
    The one place a run's checkpoint is read; the CLI calls it too, to start from the saved settings."""
    if not cfg.resume:
        return None
    return load_checkpoint(resolve_resume(cfg.resume, cfg.out_dir))


def checkpoint_position(steps_done: int, batches_per_epoch: int) -> tuple[int, int]:
    """Steps done -> (epoch, batch), 1-based as the original README names checkpoints: the last batch
    of epoch 1 is (1, batches_per_epoch), not (2, 0)."""
    epoch, index = divmod(steps_done, batches_per_epoch)
    return (epoch + 1, index) if index else (epoch, batches_per_epoch)


@dataclass
class Run:
    """What one training run holds, built once by `build` and read by every step."""

    model_cfg: GPTConfig
    data_cfg: DataConfig
    cfg: TrainConfig
    world: World
    device: torch.device
    dtype: torch.dtype
    out_dir: Path
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


@dataclass
class Counters:
    """What changes from step to step besides the weights: saved in checkpoints where it matters."""

    steps_done: int
    nonfinite_skips: int = 0
    nonfinite_in_a_row: int = 0
    window_start: float = 0.0  # throughput is measured over the steps since the last log line
    window_tokens: int = 0


def train(model_cfg: GPTConfig, data_cfg: DataConfig, cfg: TrainConfig, resume_state: dict | None = None) -> int:
    """Run training as configured; returns the process exit status.

    `resume_state` is the checkpoint cfg.resume names, when the caller has read it already (see
    `load_resume_state`); otherwise it is read here."""
    device = pick_device(cfg.device)
    if cfg.deterministic and device.type == "cuda":
        make_cuda_deterministic()
    world = init_world(device.type)
    try:
        with claim_out_dir(Path(cfg.out_dir)) if world.is_main else contextlib.nullcontext():
            status = run(model_cfg, data_cfg, cfg, resume_state, world, device)
        barrier(world)  # ranks leave together: none tears the process group down while rank 0 still writes
    finally:
        shutdown(world)
    return status


def run(
    model_cfg: GPTConfig,
    data_cfg: DataConfig,
    cfg: TrainConfig,
    resume_state: dict | None,
    world: World,
    device: torch.device,
) -> int:
    device, dtype = set_up(cfg, world, device, model_cfg.d_model)
    if resume_state is None:
        resume_state = load_resume_state(cfg)
    r = build(model_cfg, data_cfg, cfg, resume_state, world, device, dtype)
    counters = restore(r, resume_state)
    announce(r, counters.steps_done)
    with contextlib.ExitStack() as on_exit:  # the one way out: progress bar, metrics log, signals, on every path
        stop = StopFlag()
        on_exit.callback(stop.restore)
        bar = on_exit.enter_context(
            tqdm(
                total=r.total_steps,
                initial=counters.steps_done,
                unit="step",
                disable=not (world.is_main and sys.stderr.isatty()),
            )
        )
        metrics = None
        if world.is_main:
            resumed_at = counters.steps_done if resume_state else None
            metrics = MetricsLog(r.out_dir, r.full_config, cfg.use_wandb, cfg.wandb_project, resumed_at)
            on_exit.callback(metrics.close)
        started = counters.window_start = time.perf_counter()
        r.step_model.train()
        while counters.steps_done < r.total_steps:
            step = counters.steps_done  # 0-based index of the step about to run
            lr = lr_at(step, cfg.learning_rate, cfg.warmup_steps, r.total_steps, cfg.min_lr_ratio)
            loss, norm = train_step(r, step, lr, counters)
            counters.steps_done = done = step + 1
            bar.update(1)
            if loss is not None and (done % cfg.log_interval == 0 or done == r.total_steps):
                log_step(r, done, lr, loss, norm, counters, time.perf_counter() - started, bar, metrics)
            if done % cfg.eval_interval == 0 or done == r.total_steps:
                evaluate(r, done, metrics)
            if done % cfg.checkpoint_interval == 0 or done == r.total_steps or stop.signal:
                save_checkpoint(r, counters)
            if done % cfg.eval_interval == 0 or done % cfg.checkpoint_interval == 0:
                counters.window_start = time.perf_counter()  # keep evaluation and saving out of the throughput
            if stop.signal:
                world.print(
                    f"{stop.signal}: stopped after step {done}, checkpoint saved; "
                    f"continue with: python example.py train --resume auto --out-dir {r.out_dir}"
                )
                return 0
    save_final_model(r, counters)
    return 0


# --- set up, build, restore ------------------------------------------------------------------------


def set_up(cfg: TrainConfig, world: World, device: torch.device, d_model: int) -> tuple[torch.device, torch.dtype]:
    """This rank's device and the compute dtype (on CPU it depends on the model's width: see pick_dtype)."""
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
    if device.type == "cuda":  # TF32 matmuls on Ampere and newer: ~free speed for fp32 parts
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, pick_dtype(cfg.precision, device, cfg.use_amp, d_model)


def build(
    model_cfg: GPTConfig,
    data_cfg: DataConfig,
    cfg: TrainConfig,
    resume_state: dict | None,
    world: World,
    device: torch.device,
    dtype: torch.dtype,
) -> Run:
    """The model, the data, the optimizer: everything but the state a checkpoint restores."""
    if resume_state is not None:
        saved = resume_state["model_config"]
        differ = [f"{k}={saved[k]} (this run: {v})" for k, v in asdict(model_cfg).items() if saved.get(k) != v]
        if differ:
            raise UserError(f"the checkpoint was trained with another model configuration: {', '.join(differ)}")
        saved_optimizer = resume_state["config"]["train"].get("optimizer", "adamw")
        if saved_optimizer != cfg.optimizer:
            raise UserError(f"the checkpoint was trained with --optimizer {saved_optimizer}: resume with that one")
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
    seq_len = model_cfg.max_seq_len
    if world.is_main:
        folder = prepare(data_cfg, min_tokens=seq_len + 1, verbose=True)
    barrier(world)
    if not world.is_main:
        folder = prepare(data_cfg, min_tokens=seq_len + 1)
    loader = TokenWindows(open_split(folder, "train"), seq_len, cfg.batch_size, cfg.seed, world.rank, world.size)
    val_windows = validation_windows(open_split(folder, "val"), seq_len, cfg.eval_windows)

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
    if cfg.warmup_steps >= total_steps and world.is_main:
        last_lr = lr_at(total_steps - 1, cfg.learning_rate, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
        if cfg.warmup_steps > total_steps:
            outcome = f"never reaches {cfg.learning_rate:g} (it ends at {last_lr:.2e})"
        else:
            outcome = f"reaches {cfg.learning_rate:g} only at the last step and never decays"
        print(
            f"warning: the run has {total_steps} steps and warmup_steps is {cfg.warmup_steps}: the learning rate"
            f" {outcome}; lower --warmup-steps",
            file=sys.stderr,
        )
    return Run(
        model_cfg=model_cfg,
        data_cfg=data_cfg,
        cfg=cfg,
        world=world,
        device=device,
        dtype=dtype,
        out_dir=Path(cfg.out_dir),
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
    )


def restore(r: Run, resume_state: dict | None) -> Counters:
    """Put the checkpoint's weights, optimizer, scaler and RNG back; the counters to continue from."""
    if resume_state is None:
        return Counters(steps_done=0)
    load_states(r.model, r.optimizer, resume_state, r.world, r.cfg.fsdp)
    r.scaler.load_state_dict(resume_state["scaler"])
    set_rng_state(resume_state["rng"], r.device)
    steps_done = resume_state["step"]
    epoch, batch = checkpoint_position(steps_done, r.loader.batches_per_epoch)
    r.world.print(f"resumed from step {steps_done} (epoch {epoch}, batch {batch})")
    return Counters(steps_done=steps_done, nonfinite_skips=resume_state.get("nonfinite_skips", 0))


def announce(r: Run, steps_done: int) -> None:
    """The resolved configuration and one line of what the run is about to do."""
    cfg, seq_len = r.cfg, r.model_cfg.max_seq_len
    if r.world.is_main:
        r.world.print(f"configuration (saved in {save_config(r.full_config, r.out_dir)}):")
    r.world.print(describe(r.full_config))
    accumulation = cfg.batch_size // r.world.size // r.micro
    with_padding = sum(p.numel() for p in r.model.parameters())
    r.world.print(
        f"model {r.model.num_parameters():,} parameters ({with_padding:,} with the vocabulary's padding rows)"
        f" | device {r.device} x{r.world.size}"
        f" | {str(r.dtype).removeprefix('torch.')} | batch {cfg.batch_size} x {seq_len} ="
        f" {cfg.batch_size * seq_len:,} tokens per step (micro-batch {r.micro},"
        f" {accumulation} accumulation step{'' if accumulation == 1 else 's'}) | {r.total_steps} steps"
        f" | validation {len(r.val_windows)} windows | checkpointing {'on' if cfg.use_checkpointing else 'off'}"
        f" | compile {'on' if cfg.compile else 'off'}"
    )


# --- one step, and what follows it ---------------------------------------------------------------------


def train_step(r: Run, step: int, lr: float, counters: Counters) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One optimizer step (step is 0-based): (mean loss, gradient norm), or (None, None) when the loss or
    gradient was not finite and the step was skipped (the weights unchanged)."""
    set_learning_rates(r.optimizer, lr, r.cfg)
    epoch, index = divmod(step, r.loader.batches_per_epoch)
    x, y = (torch.from_numpy(a) for a in r.loader.batch(epoch, index))  # (per_rank, T) each
    if r.device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    loss = accumulate_gradients(r.step_model, x, y, r.micro, r.device, r.dtype, r.scaler, r.world, r.cfg.fsdp)
    r.scaler.unscale_(r.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(r.model.parameters(), r.cfg.grad_clip or math.inf)
    if not torch.isfinite(norm) and not r.scaler.is_enabled():
        r.optimizer.zero_grad(set_to_none=True)
        counters.nonfinite_in_a_row += 1
        counters.nonfinite_skips += 1
        r.world.print(
            f"step {step + 1}: loss or gradient is not finite, step skipped ({counters.nonfinite_skips} so far)"
        )
        if counters.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
            raise UserError(
                f"{counters.nonfinite_in_a_row} steps in a row had a non-finite loss: stopped; "
                f"the last good checkpoint is in {r.out_dir / 'checkpoints'} (lower --learning-rate?)"
            )
        return None, None
    counters.nonfinite_in_a_row = 0
    r.scaler.step(r.optimizer)
    r.scaler.update()
    r.optimizer.zero_grad(set_to_none=True)
    counters.window_tokens += r.cfg.batch_size * r.model_cfg.max_seq_len
    return loss, norm


def log_step(
    r: Run,
    done: int,
    lr: float,
    loss: torch.Tensor,
    norm: torch.Tensor,
    counters: Counters,
    elapsed_total: float,
    bar: tqdm,
    metrics: MetricsLog | None,
) -> None:
    """One line and one metrics record: loss, LR, gradient norm, throughput (and MFU where the peak is known)."""
    if r.device.type == "cuda":
        torch.cuda.synchronize()
    tokens_per_step = r.cfg.batch_size * r.model_cfg.max_seq_len
    elapsed = time.perf_counter() - counters.window_start
    train_loss = mean_over_ranks(loss.item(), r.world, r.device)
    tokens_per_sec = counters.window_tokens / elapsed
    record = dict(
        step=done,
        epoch=(done - 1) // r.loader.batches_per_epoch + 1,
        train_loss=train_loss,
        lr=lr,
        grad_norm=norm.item(),
        tokens_per_sec=tokens_per_sec,
        elapsed=elapsed_total,
    )
    mfu = ""
    if r.peak_flops:
        record["mfu"] = tokens_per_sec * r.flops_per_token / (r.peak_flops * r.world.size)
        mfu = f" | mfu {record['mfu']:.1%}"
    line = (
        f"step {done}/{r.total_steps} | loss {train_loss:.4f} | lr {lr:.2e} | norm {norm.item():.2f}"
        f" | dt {elapsed / (counters.window_tokens / tokens_per_step) * 1000:.0f}ms | tok/s {tokens_per_sec:,.0f}{mfu}"
    )
    bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_sec:,.0f}")
    if r.world.is_main:
        (bar.write if not bar.disable else print)(line)
        metrics.log(record)
    counters.window_start, counters.window_tokens = time.perf_counter(), 0


def evaluate(r: Run, done: int, metrics: MetricsLog | None) -> None:
    """Validation loss and perplexity on the fixed validation windows; the loss plot redrawn."""
    val_loss = evaluate_loss(r.step_model, r.val_windows, r.micro, r.device, r.dtype, r.world)
    val_ppl = math.exp(min(val_loss, 50))
    r.world.print(f"step {done}: val loss {val_loss:.4f} | val ppl {val_ppl:.2f}")
    if r.world.is_main:
        epoch = (done - 1) // r.loader.batches_per_epoch + 1
        metrics.log(dict(step=done, epoch=epoch, val_loss=val_loss, val_ppl=val_ppl))
        plot_runs([r.out_dir], r.out_dir / "loss.png")


def save_checkpoint(r: Run, counters: Counters) -> None:
    """Everything the next step depends on, written atomically (collective under FSDP: every rank calls it)."""
    steps_done = counters.steps_done
    epoch, index = divmod(steps_done, r.loader.batches_per_epoch)
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": model_state(r.model, r.world, r.cfg.fsdp),
        "model_config": asdict(r.model_cfg),
        "config": r.full_config,
        "optimizer": optimizer_state(r.model, r.optimizer, r.world, r.cfg.fsdp),
        "scaler": r.scaler.state_dict(),
        "step": steps_done,
        "epoch": epoch,
        "batch_in_epoch": index,
        "rng": rng_state(r.device),
        "nonfinite_skips": counters.nonfinite_skips,
        "tokenizer": TOKENIZER_ID,
        "world_size": r.world.size,
    }
    if r.world.is_main:
        atomic_torch_save(
            state, checkpoint_path(r.out_dir, *checkpoint_position(steps_done, r.loader.batches_per_epoch))
        )
        if r.cfg.keep_last:
            prune_checkpoints(r.out_dir, r.cfg.keep_last)


def save_final_model(r: Run, counters: Counters) -> None:
    weights = model_state(r.model, r.world, r.cfg.fsdp)  # collective under FSDP: every rank takes part
    if r.world.is_main:
        extra = {"tokenizer": TOKENIZER_ID, "config": r.full_config}
        save_model_file(r.model, r.out_dir / "gpt_model.pt", extra, weights)
        r.world.print(f"done: {r.out_dir / 'gpt_model.pt'} ({counters.nonfinite_skips} non-finite steps skipped)")


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
