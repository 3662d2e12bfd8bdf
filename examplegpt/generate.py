"""Sampling from a GPT with a key/value cache: `generate`, the loop to read, and the `generate` command.

The prompt is run once (prefill) and fills the cache; each new token then costs one position.
When the cache is full (max_seq_len), the last half of the context is run again from position 0
(a sliding window), so generation can go on for any length. How each token is chosen is
`sampling.py`'s; the text side (streaming, stop strings, cropping) is `text.py`'s, shared with the
batching engine and the server. `generate` runs the model as it is; the `generate` command applies
the CPU accelerator (`cpu_inference.py`) around it unless told `--no-fast-cpu`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator

import torch

from .config import GenerateConfig
from .cpu_inference import fast_cpu_inference, kv_cache_dtype, packing_report, whole_number
from .device import pick_device, prepare_for_inference
from .errors import UserError
from .kv_cache import KVCache
from .model import GPT
from .sampling import GENERATE_DEFAULTS, TOKEN_SETTINGS, Generators, SamplingParams, choose_next, seed_of_sample
from .text import CompletionText, crop_prompt, window_after_slide
from .tokenizer import EOT_ID, encode
from .weights import load_model

# Called with each step's new tokens (B,); may return a bool mask (B,) of samples to stop.
StepCallback = Callable[[torch.Tensor], "torch.Tensor | None"]


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """Dropout off inside the block; the model's own mode (training or not) again after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    eos_id: int | None = None,
    generator: Generators = None,
    on_step: StepCallback | None = None,
    **settings,
) -> torch.Tensor:
    """Continue each row of `idx` (B, T), T >= 1, by up to `max_new_tokens`: returns (B, T + new).

    `settings` are SamplingParams' (temperature=0 is greedy), from GENERATE_DEFAULTS; a `seed` makes the
    generator when none is given; `generator` may also be a list, one for each row. With `eos_id`, a row
    that produces it is finished (and padded with eos_id from then on); generation ends early when every
    row is finished, by eos or by `on_step`'s mask. Dropout is off while sampling, and the model is left in
    the mode it came in. The tokens come back as an ordinary tensor (not an inference-mode one): a training
    step can take them as its batch.
    Raises ValueError for an `idx` that is not (B, T) with T >= 1, or a negative `max_new_tokens`.
    """
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be token ids of shape (B, T) with T >= 1, got shape {tuple(idx.shape)}")
    max_new_tokens = whole_number(max_new_tokens, "max_new_tokens")
    with torch.inference_mode():
        tokens = continue_rows(model, idx, max_new_tokens, eos_id, generator, on_step, settings)
    return tokens.clone()  # outside inference mode: an ordinary tensor


def continue_rows(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    eos_id: int | None,
    generator: Generators,
    on_step: StepCallback | None,
    settings: dict,
) -> torch.Tensor:
    """`generate`'s loop, under inference mode: (B, T + new) tokens."""
    params = SamplingParams(**{**GENERATE_DEFAULTS, **settings})
    if generator is None and params.seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(params.seed)
    with evaluating(model):
        config = model.config
        B, T = idx.shape
        context = config.max_seq_len
        # only the positions this call can fill: a whole context's zeros would cost more than a short reply
        positions = min(context, min(T, context) + max_new_tokens)
        cache_dtype = kv_cache_dtype(idx.device, next(model.parameters()).dtype)
        cache = KVCache.allocate(config, B, idx.device, cache_dtype, max_len=positions)
        tokens = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)  # (B, T + new)
        tokens[:, :T] = idx
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(B, config.vocab_size, dtype=torch.bool, device=idx.device)
            seen.scatter_(1, idx, True)

        logits = model.logits(model.hidden_states(idx[:, -context:], cache)[:, -1])  # (B, V)
        end = T
        for _ in range(max_new_tokens):
            next_token = choose_next(logits, params, seen, generator)  # (B,)
            if eos_id is not None:
                next_token = torch.where(finished, eos_id, next_token)
                finished |= next_token == eos_id
            tokens[:, end] = next_token
            end += 1
            if seen is not None:
                seen.scatter_(1, next_token[:, None], True)
            if on_step is not None:
                stop = on_step(next_token)
                if stop is not None:
                    finished |= stop
            if finished.all() or end == T + max_new_tokens:
                break
            if cache.lengths[0] == context:  # cache full: slide, keeping the last half of the context
                cache.lengths.zero_()  # start again from position 0
                window = tokens[:, window_after_slide(end, context)]  # (B, context // 2)
                logits = model.logits(model.hidden_states(window, cache)[:, -1])
            else:
                logits = model.logits(model.hidden_states(next_token[:, None], cache)[:, -1])  # (B, V)
        return tokens[:, :end]


# --- the `generate` command -------------------------------------------------------------------


def read_prompt(prompt: str) -> str:
    """The prompt text: '-', or no --prompt with a piped stdin, reads stdin. Either way it must be UTF-8."""
    if prompt == "-" or (not prompt and not sys.stdin.isatty()):
        prompt = decode_prompt(sys.stdin.buffer.read(), "on stdin")
    else:
        # Python hands on command-line bytes that are not UTF-8 as lone surrogates (PEP 383): encoded back,
        # the first of them is where decoding fails
        prompt = decode_prompt(prompt.encode("utf-8", "surrogatepass"), "given by --prompt")
    if not prompt:
        raise UserError("the prompt is empty: pass --prompt TEXT (or pipe text on stdin)")
    return prompt


def decode_prompt(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"the prompt {source} is not valid UTF-8 (byte {e.start})") from None


def interactive_prompts() -> Iterator[str | None]:
    """Each line of stdin as a prompt, its newline dropped. A line that is not UTF-8 is refused in one
    line on stderr and yields None: the session goes on with the next line."""
    for number, line in enumerate(iter(sys.stdin.buffer.readline, b""), start=1):
        try:
            yield decode_prompt(line, f"on line {number} of stdin").rstrip("\n")
        except UserError as e:
            print(f"error: {e}; skipped", file=sys.stderr, flush=True)
            yield None


def generate_command(cfg: GenerateConfig) -> int:
    device = pick_device(cfg.device)
    model = prepare_for_inference(load_model(cfg.checkpoint, map_location="cpu"), cfg.precision, device)
    if cfg.compile and device.type == "cuda":
        model.hidden_states = torch.compile(model.hidden_states, dynamic=True)
    prompts = interactive_prompts() if cfg.interactive else [read_prompt(cfg.prompt)]
    refused = 0
    # copies made once per command; a prompt's passes are at most its new tokens (the prompt's own is one)
    passes = None if cfg.interactive else cfg.max_new_tokens
    with fast_cpu_inference(model, passes=passes) if cfg.fast_cpu else contextlib.nullcontext():
        for prompt in prompts:
            if prompt is None:
                refused += 1
            elif prompt:  # an empty line asks for nothing
                run_prompt(model, prompt, cfg, device)
    if cfg.verbose:
        print("\n".join(f"cpu_inference: {line}" for line in packing_report(cfg.fast_cpu)), file=sys.stderr)
    return 1 if refused else 0  # each refused line has had its error line


def run_prompt(model: GPT, prompt: str, cfg: GenerateConfig, device: torch.device) -> None:
    ids = encode(prompt)
    kept = crop_prompt(ids, model.config.max_seq_len)
    if len(kept) < len(ids):
        print(f"warning: the prompt has {len(ids)} tokens; keeping the last {len(kept)}", file=sys.stderr)
    idx = torch.tensor([kept] * cfg.num_samples, dtype=torch.long, device=device)  # (B, T)
    # A row that ended (by eos or a stop text) may still be given tokens while other rows go on: they are
    # not its text, and not counted.
    texts = [CompletionText(cfg.stop) for _ in range(cfg.num_samples)]
    stream_live = cfg.num_samples == 1 and not cfg.json
    if stream_live:
        print(prompt, end="", flush=True)

    def on_step(step_tokens: torch.Tensor) -> torch.Tensor:
        for text, token in zip(texts, step_tokens.tolist()):
            if token == EOT_ID and not cfg.ignore_eos:
                text.finish()
            text.push(token)  # (a finished text takes no more)
        if stream_live:
            print(texts[0].take(), end="", flush=True)
        return torch.tensor([text.finished for text in texts], device=step_tokens.device)

    start = time.perf_counter()
    settings = {name: getattr(cfg, name) for name in TOKEN_SETTINGS}
    # sample j draws from seed + j, as `serve` seeds choice j of n: sample 0 is what one sample would be
    seed = settings.pop("seed")
    generators = None
    if seed is not None:
        generators = [torch.Generator(device).manual_seed(seed_of_sample(seed, j)) for j in range(cfg.num_samples)]
    try:
        eos_id = None if cfg.ignore_eos else EOT_ID
        generate(model, idx, cfg.max_new_tokens, eos_id=eos_id, generator=generators, on_step=on_step, **settings)
    except BaseException:
        if stream_live:  # end the streamed line: the error (stderr, often the same terminal) starts on its own
            print(flush=True)
        raise
    seconds = time.perf_counter() - start
    for text in texts:
        text.finish()
    if stream_live:
        print(texts[0].take(), flush=True)
    batch_rate = sum(len(text.tokens) for text in texts) / seconds  # the samples are decoded together
    for i, text in enumerate(texts):
        if cfg.json:
            record = dict(prompt=prompt, text=text.text, tokens=len(text.tokens), batch_tokens_per_second=batch_rate)
            print(json.dumps(record, ensure_ascii=False), flush=True)
        elif not stream_live:
            print(("" if i == 0 else "\n----------\n") + prompt + text.text, flush=True)
