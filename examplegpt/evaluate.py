"""Perplexity the way papers report it: every token scored once, by a sliding window over a whole split.

With window W (the model's context) and stride S, the windows start at 0, S, 2S, ...; each scores
only the targets that no earlier window scored, so after the first window every token is predicted
from at least W - S tokens of context. S = W gives plain non-overlapping chunks; smaller S gives
more context per token at more compute.

What is scored is the text and only the text: every token of it exactly once, the first with an
<|endoftext|> as its context; the <|endoftext|> the cache puts between documents is context for
the next document, never a target (it is not in the text, and where a document ends is not
something the text says).

Training's validation loss is scored here too (`validation_windows`, `evaluate_loss`): a fixed, seeded
set of whole windows, the same for every run, so that the val losses of any two runs compare.

Reported: the mean loss per token and its perplexity; for corpora with known text, the word-level
perplexity exp(total NLL / words), where words are the whitespace-separated words of the text (the
convention of GPT-2's zero-shot WikiText-103 figure, 37.50 for the 117M model), and bits per byte.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import DataConfig, EvaluateConfig
from .cpu_inference import fast_cpu_inference, packing_report
from .data import HOLDOUT_SEED, check_cache, open_split, prepare, tokenize_local_text
from .device import autocast, inference_precision, pick_device, prepare_for_inference
from .distributed import SINGLE_PROCESS, World, mean_over_ranks
from .errors import UserError
from .loss import CHUNK_ROWS, IGNORE_INDEX, loss_and_gradients
from .model import GPT
from .quantize import many_rows_per_call
from .tokenizer import EOT_ID, TOKENIZER_ID
from .weights import load_model, model_from_state, read_torch_file


def window_plan(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) per window: inputs tokens[start:end] predict tokens[start+1:end+1];
    targets at positions >= first_scored are the ones this window scores."""
    plan, scored_up_to, start = [], 1, 0  # token 0 has no context and is never a target
    last_target = n_tokens - 1
    while scored_up_to <= last_target:
        end = min(start + window, last_target)  # inputs [start, end), targets [start + 1, end + 1)
        plan.append((start, end, scored_up_to))
        scored_up_to = end + 1
        start += stride
    return plan


PROGRESS_AFTER_SECONDS = 3.0  # a shorter evaluation shows no progress bar at all


def progress_bar(batches: range, enabled: bool) -> tqdm:
    """The batches, counted on stderr once the evaluation has run PROGRESS_AFTER_SECONDS: redrawn
    in place on a terminal, every 30 s into a log file or pipe (where each redraw stays)."""
    terminal = sys.stderr.isatty()
    return tqdm(
        batches,
        desc="evaluating",
        unit="batch",
        file=sys.stderr,
        disable=not enabled,
        delay=PROGRESS_AFTER_SECONDS,
        mininterval=0.1 if terminal else 30.0,
        maxinterval=10.0 if terminal else 30.0,  # tqdm's monitor would redraw every 10 s into the log as well
        dynamic_ncols=terminal,
    )


# Per-token losses are added as whole multiples of LOSS_QUANTUM (2**-32 nats, far below any digit a
# perplexity shows): integer sums do not depend on their order, so the total is the same bits whatever
# the batch size (float sums of batches round differently for each way of grouping the tokens).
LOSS_QUANTUM = 2.0**-32


def quantized_sum(losses: torch.Tensor) -> int | float:
    """The sum of `losses` in units of LOSS_QUANTUM, as an integer; a float where one is not finite."""
    losses = losses.double()
    if not torch.isfinite(losses).all():  # a diverged model: its (non-finite) float sum, as it is
        return losses.sum().item() / LOSS_QUANTUM
    return int(torch.round(losses / LOSS_QUANTUM).to(torch.int64).sum())


@torch.no_grad()
def sliding_window_nll(
    model: GPT,
    tokens: np.ndarray,
    stride: int,
    batch_size: int,
    device: torch.device,
    separator: int | None = None,
    progress: bool = False,
) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of tokens[1:], and the number of tokens scored.

    Tokens equal to `separator` (the <|endoftext|> the cache puts between documents, which is no part
    of the text) are context only: never scored."""
    model.eval()
    window = model.config.max_seq_len
    plan = window_plan(len(tokens), window, stride)
    # One logits buffer for every batch: on CPU a fresh (rows, vocabulary) tensor per batch costs more in
    # page faults (system time) than the model's own work on a small model. The LM head's matrix is taken
    # once (an int8 head's converted back to float for the whole evaluation: quantize.Int8Linear.weight).
    rows = min(CHUNK_ROWS, batch_size * window)
    head_weight = model.lm_head.weight  # (V, C)
    logits_buffer = torch.empty(rows, head_weight.shape[0], dtype=torch.float32, device=device)
    total, count = 0, 0  # total in units of LOSS_QUANTUM
    for first in progress_bar(range(0, len(plan), batch_size), enabled=progress):
        batch = plan[first : first + batch_size]
        x = torch.zeros(len(batch), window, dtype=torch.long)  # (b, W), padded after the end
        y = torch.full((len(batch), window), -1, dtype=torch.long)  # -1: not scored here
        for row, (start, end, scored_from) in enumerate(batch):
            chunk = torch.from_numpy(tokens[start : end + 1].astype(np.int64))
            x[row, : end - start] = chunk[:-1]
            keep = scored_from - (start + 1)  # targets before this are scored by an earlier window
            y[row, keep : end - start] = chunk[1 + keep :]
        if separator is not None:
            y[y == separator] = -1
        x, y = x.to(device), y.to(device)
        scored = y != -1  # (b, W)
        h = model.hidden_states(x)  # (b, W, C), in the format the model was prepared in
        # the LM head and its log-softmax only where a token is scored, chunk by chunk
        token_losses = torch.empty(int(scored.sum()), dtype=torch.float32, device=device)  # (n,)
        loss_and_gradients(
            h[scored], head_weight, y[scored], model.config.vocab_size, rows, False, logits_buffer, token_losses
        )
        total += quantized_sum(token_losses)
        count += len(token_losses)
    return total * LOSS_QUANTUM, count


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


def load_for_eval(path: str) -> GPT:
    """The model, refusing one whose tokenizer is not ours (its token ids would mean other things)."""
    p = Path(path)
    if p.is_file():  # our file: read it once, and check its tokenizer before building the model
        state = read_torch_file(p)
        saved = state.get("tokenizer")
        if saved is not None and saved != TOKENIZER_ID:
            raise UserError(f"{path} was trained with tokenizer {saved}, not {TOKENIZER_ID}")
        model = model_from_state(state, p)
    else:
        model = load_model(path)
    if model.config.vocab_size != 50257:
        raise UserError(f"{path} has a vocabulary of {model.config.vocab_size}, not GPT-2's 50257 tokens")
    return model


WHOLE_TEXT = "whole text"  # what is scored of local text files: all of it, not a split


def split_tokens(data: DataConfig, split: str, min_tokens: int, scratch: Path) -> tuple[np.ndarray, dict, str]:
    """Tokens of the split to score, with its word and byte counts when known, and what was scored
    (the split's name, or WHOLE_TEXT)."""
    stats = tokenize_local_text(data, scratch / "eval.bin")
    if stats is not None:  # a local file or folder is scored whole, not a held-out part of it
        if stats["tokens"] - stats["documents"] < 1:
            raise UserError(f"{data.data} holds no text to score")
        return open_split(scratch, "eval"), stats, WHOLE_TEXT
    folder = prepare(data, min_tokens=min_tokens, verbose=True)
    name = {"validation": "val", "valid": "val"}.get(split, split)
    splits = check_cache(folder)["splits"]
    if name not in splits:
        raise UserError(f"{data.data} has no split {split!r} (it has {', '.join(splits)})")
    return open_split(folder, name), splits[name], split


def text_to_score(tokens: np.ndarray) -> np.ndarray:
    """The split with an <|endoftext|> in front: the context of its first token, as in training,
    where every document follows one."""
    return np.concatenate([np.asarray([EOT_ID], dtype=tokens.dtype), tokens])


def exp_or_inf(x: float) -> float:
    """e**x, or infinity past float64's range (a perplexity per word of a text with long words can be)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def evaluate_command(cfg: EvaluateConfig, data: DataConfig) -> int:
    device = pick_device(cfg.device)
    model = prepare_for_inference(load_for_eval(cfg.checkpoint), cfg.precision, device)
    window = model.config.max_seq_len
    stride = window // 2 if cfg.stride is None else cfg.stride
    if not 1 <= stride <= window:
        raise UserError(f"stride must be between 1 and the window ({window}), got {stride}")
    with tempfile.TemporaryDirectory() as scratch:
        tokens, stats, scored = split_tokens(data, cfg.split, window + 1, Path(scratch))
        text = text_to_score(tokens)
        passes = -(-len(window_plan(len(text), window, stride)) // cfg.batch_size)  # batches of windows
        start = time.perf_counter()
        accelerated = fast_cpu_inference(model, passes=passes) if cfg.fast_cpu else contextlib.nullcontext()
        with accelerated, many_rows_per_call(model):
            total, count = sliding_window_nll(model, text, stride, cfg.batch_size, device, EOT_ID, progress=True)
        seconds = time.perf_counter() - start
    if cfg.verbose:
        print("\n".join(f"cpu_inference: {line}" for line in packing_report(cfg.fast_cpu)), file=sys.stderr)
    result = {
        "checkpoint": cfg.checkpoint,
        "data": data.data,
        "split": scored,
        "precision": inference_precision(cfg.precision, device),  # what auto became here
        "window": window,
        "stride": stride,
        "tokens_scored": count,
        "loss": total / count,
        "perplexity": exp_or_inf(total / count),
        "tokens_per_second": count / seconds,
    }
    if stats.get("words"):
        result["words"] = stats["words"]
        result["word_perplexity"] = exp_or_inf(total / stats["words"])
        result["bits_per_byte"] = total / math.log(2) / stats["bytes"]
    if cfg.json:  # JSON has no infinity and no NaN (a diverged model's loss): null
        finite = {
            key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in result.items()
        }
        print(json.dumps(finite, allow_nan=False))
    else:
        for key, value in result.items():
            print(f"{key:>18}  {value:,.4f}" if isinstance(value, float) else f"{key:>18}  {value}")
    return 0
