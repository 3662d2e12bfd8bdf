"""Sampling from a GPT with a key/value cache, and the filters that shape each step's distribution.

The prompt is run once (prefill) and fills the cache; each new token then costs one position.
When the cache is full (max_seq_len), the last half of the context is run again from position 0
(a sliding window), so generation can go on for any length. The sampler avoids PyTorch's CPU sort
and multinomial (see `sort_descending` and `sample_from`), which do more work than sampling needs:
a decode step of a small model is short enough that they would cost as much as the model itself.
`generate` runs the model as it is; the `generate` command applies the CPU accelerator
(`cpu_inference.py`) around it unless told `--no-fast-cpu`.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from .config import GenerateConfig
from .cpu_inference import fast_cpu_inference, kv_cache_dtype
from .device import inference_dtype, pick_device
from .errors import UserError
from .kv_cache import KVCache
from .model import GPT
from .tokenizer import EOT_ID, encode, get_tokenizer
from .weights import load_model

# Called with each step's new tokens (B,); may return a bool mask (B,) of samples to stop.
StepCallback = Callable[[torch.Tensor], "torch.Tensor | None"]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: logits (B, V) of tokens already seen (B, V bool) are made less likely (in float32)."""
    logits = logits.float()
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    # a tiny penalty (1e-40) overflows float32 to inf: inf - inf later is NaN, sampled as the last token id
    largest = torch.finfo(torch.float32).max
    return torch.where(seen, penalised.clamp(max=largest), logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (and any tied with the k-th); the rest become -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches p.

    Tokens tied with the last one kept are kept too, so the result does not depend on sort order.
    """
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    sorted_probs = sort_descending(probs)  # (B, V)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the tokens ranked above
    needed = mass_before < p  # (B, V): this token is needed to reach p
    # the most likely token is always needed, even for a p that is 0 in float32 (mass_before is never < 0)
    last_needed = (needed.sum(dim=-1, keepdim=True) - 1).clamp_(min=0)  # (B, 1), index into the sorted order
    threshold = sorted_probs.gather(-1, last_needed)  # (B, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def sort_descending(values: torch.Tensor) -> torch.Tensor:
    """The values of each row (B, V), largest first, without their indices."""
    if values.device.type == "cpu":
        # torch.sort also sorts the indices, which top-p does not need; NumPy sorts the values alone,
        # with SIMD, many times faster for a row of the vocabulary (BENCHMARKS.md).
        return torch.from_numpy(np.flip(np.sort(values.detach().numpy(), axis=-1), axis=-1).copy())
    return torch.sort(values, dim=-1, descending=True).values


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of probs (B, V), drawn by inverting the cumulative distribution: (B,).

    Same distribution as torch.multinomial(probs, 1), which draws a random variate per token of the
    vocabulary where one per row is enough (much faster on CPU: BENCHMARKS.md).
    """
    cdf = probs.cumsum(dim=-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]  # (B, 1)
    # the first token whose cumulative probability passes u; a zero-probability token never is
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    return logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits (B, V) / temperature, in float32, as transformers computes it, unless that overflows.

    A tiny temperature can push a logit to +-inf, and then inf - inf = NaN in the softmax. Subtracting each
    row's maximum first keeps it finite (the best token's logit is 0, the others go to -inf: greedy in the
    limit); it is done only then, because the subtraction can round two near logits into a tie that the
    filters would then both keep. A temperature below float32's smallest normal number is computed as that
    number: it would round to 0 (and 0 / 0 is NaN), and the distribution is greedy there already."""
    logits = logits.float()
    temperature = max(temperature, torch.finfo(torch.float32).tiny)
    scaled = logits / temperature
    if torch.isinf(scaled).sum() == torch.isinf(logits).sum():  # nothing overflowed
        return scaled
    return (logits - logits.max(dim=-1, keepdim=True).values) / temperature


def filter_logits(
    logits: torch.Tensor,
    temperature: float = 0.8,
    top_p: float = 0.9,
    top_k: int | None = None,
    min_p: float | None = None,
) -> torch.Tensor:
    """logits (B, V) scaled by temperature (> 0) and filtered, in transformers' order (temperature,
    top-k, top-p, min-p): float32, the dropped tokens at -inf."""
    logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    if min_p is not None:
        logits = min_p_filter(logits, min_p)
    return logits


def next_token_probs(
    logits: torch.Tensor,
    temperature: float = 0.8,
    top_p: float = 0.9,
    top_k: int | None = None,
    min_p: float | None = None,
) -> torch.Tensor:
    """The distribution (B, V) that sampling draws from at temperature > 0."""
    return torch.softmax(filter_logits(logits, temperature, top_p, top_k, min_p), dim=-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.8,
    top_p: float = 0.9,
    top_k: int | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits (B, V): greedy at temperature 0, else sampled after the filters."""
    if temperature == 0:
        return logits.float().argmax(dim=-1)  # on CPU a bfloat16 argmax is several times slower than a float32 copy's
    return sample_from(next_token_probs(logits, temperature, top_p, top_k, min_p), generator)  # (B,)


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """Dropout off inside the block; the model's own mode (training or not) again after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.inference_mode()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_p: float = 0.9,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Continue each row of `idx` (B, T) by up to `max_new_tokens`: returns (B, T + new).

    With `eos_id`, a row that produces it is finished (and padded with eos_id from then on);
    generation ends early when every row is finished, by eos or by `on_step`'s mask. Dropout is off
    while sampling, and the model is left in the mode it came in.
    """
    with evaluating(model):
        config = model.config
        B, T = idx.shape
        context = config.max_seq_len
        cache = KVCache.allocate(config, B, idx.device, kv_cache_dtype(idx.device, next(model.parameters()).dtype))
        tokens = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)  # (B, T + new)
        tokens[:, :T] = idx
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros(B, config.vocab_size, dtype=torch.bool, device=idx.device)
            seen.scatter_(1, idx, True)

        logits = model.logits(model.hidden_states(idx[:, -context:], cache)[:, -1])  # (B, V)
        end = T
        for _ in range(max_new_tokens):
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            next_token = sample_next(logits, temperature, top_p, top_k, min_p, generator)  # (B,)
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
                window = tokens[:, end - context // 2 : end]  # (B, context // 2)
                logits = model.logits(model.hidden_states(window, cache)[:, -1])
            else:
                logits = model.logits(model.hidden_states(next_token[:, None], cache)[:, -1])  # (B, V)
        return tokens[:, :end]


class TextStream:
    """Turns tokens into text one at a time, never splitting a UTF-8 character across two pieces."""

    def __init__(self) -> None:
        self._bytes_of = get_tokenizer().decode_single_token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""

    def push(self, token: int) -> str:
        """The new complete text that `token` finishes (possibly empty)."""
        piece = self._decoder.decode(self._bytes_of(token))
        self.text += piece
        return piece

    def flush(self) -> str:
        piece = self._decoder.decode(b"", final=True)
        self.text += piece
        return piece


# --- the `generate` command -------------------------------------------------------------------


def read_prompt(prompt: str) -> str:
    """The prompt text: '-', or no --prompt with a piped stdin, reads stdin (which must be UTF-8)."""
    if prompt == "-" or (not prompt and not sys.stdin.isatty()):
        try:
            prompt = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"the prompt on stdin is not valid UTF-8 (byte {e.start})") from None
    if not prompt:
        raise UserError("the prompt is empty: pass --prompt TEXT (or pipe text on stdin)")
    return prompt


def generate_command(cfg: GenerateConfig) -> int:
    device = pick_device(cfg.device)
    model = load_model(cfg.checkpoint, map_location="cpu")
    model.to(device=device, dtype=inference_dtype(cfg.precision, device)).eval().requires_grad_(False)
    if cfg.compile and device.type == "cuda":
        model.hidden_states = torch.compile(model.hidden_states, dynamic=True)
    prompts = iter(sys.stdin.readline, "") if cfg.interactive else [read_prompt(cfg.prompt)]
    with fast_cpu_inference(model) if cfg.fast_cpu else contextlib.nullcontext():  # packed once per command
        for prompt in prompts:
            prompt = prompt.rstrip("\n") if cfg.interactive else prompt
            if prompt:
                run_prompt(model, prompt, cfg, device)
    return 0


def run_prompt(model: GPT, prompt: str, cfg: GenerateConfig, device: torch.device) -> None:
    ids = encode(prompt)
    context = model.config.max_seq_len
    if len(ids) > context - 1:
        print(f"warning: the prompt has {len(ids)} tokens; keeping the last {context - 1}", file=sys.stderr)
        ids = ids[-(context - 1) :]
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)  # (B, T)
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    streams = [TextStream() for _ in range(cfg.num_samples)]
    stream_live = cfg.num_samples == 1 and not cfg.json
    holdback = max((len(s) for s in cfg.stop), default=1) - 1  # chars that might begin a stop text
    printed = 0
    # A row that ended (by eos or a stop text) may still be given tokens while other rows go on: they are
    # not its text, and not counted.
    ended = [False] * cfg.num_samples
    new_tokens = [0] * cfg.num_samples
    if stream_live:
        print(prompt, end="", flush=True)

    def on_step(step_tokens: torch.Tensor) -> torch.Tensor:
        nonlocal printed
        stop = torch.zeros(len(streams), dtype=torch.bool, device=step_tokens.device)
        for row, (stream, token) in enumerate(zip(streams, step_tokens.tolist())):
            if ended[row] or (token == EOT_ID and not cfg.ignore_eos):
                ended[row] = True
                stop[row] = True
                continue
            stream.push(token)
            new_tokens[row] += 1
            ended[row] = stop[row] = any(s in stream.text for s in cfg.stop)
        if stream_live and not stop[0]:
            visible = len(streams[0].text) - holdback
            if visible > printed:
                print(streams[0].text[printed:visible], end="", flush=True)
                printed = visible
        return stop

    start = time.perf_counter()
    generate(
        model,
        idx,
        cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        min_p=cfg.min_p,
        repetition_penalty=cfg.repetition_penalty,
        eos_id=None if cfg.ignore_eos else EOT_ID,
        generator=generator,
        on_step=on_step,
    )
    seconds = time.perf_counter() - start
    texts = [cut_at_stop(stream.text + stream.flush(), cfg.stop) for stream in streams]
    if stream_live:
        print(texts[0][printed:], flush=True)
    for i, text in enumerate(texts):
        if cfg.json:
            record = dict(prompt=prompt, text=text, tokens=new_tokens[i], tokens_per_second=new_tokens[i] / seconds)
            print(json.dumps(record, ensure_ascii=False), flush=True)
        elif not stream_live:
            print(("" if i == 0 else "\n----------\n") + prompt + text, flush=True)


def cut_at_stop(text: str, stops: list[str]) -> str:
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text
