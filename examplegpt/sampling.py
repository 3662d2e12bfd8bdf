"""How the next token is chosen: the sampling settings, and the pure filters that apply them.

`SamplingParams` is the one definition of every sampling setting: its default, its range (the
field's metadata) and its help (the docstring under it). The `generate` command's flags
(config.GenerateConfig), the batching engine's requests and the HTTP API's request body are all
made from it, so a new setting is written here and used in the filters below, nowhere else.

The filters work on a batch of logits (B, V) in transformers' order: repetition penalty,
temperature, top-k, top-p, min-p; then one draw per row. A decode step of a small model is short
enough that PyTorch's CPU kernels for these row-wide ops would cost as much as the model itself,
so on CPU the sampler avoids the slow ones: its sort ranks values without indices and only as many
as top-p needs (`largest_first`), its draw inverts the cumulative distribution (`sample_from`), and
argmax, comparisons and masking run in NumPy (`greedy`, `drop_below`). Each gives exactly what the
plain PyTorch op gives; the tests compare them.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field

import numpy as np
import torch


def within(**bounds: float) -> dict:
    """A field's metadata: the range its value must lie in, in pydantic's words (ge, gt, le, lt)."""
    return {"range": bounds}


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen, and when it ends. Defaults are OpenAI's (the HTTP API's);
    the `generate` command and function start from GENERATE_DEFAULTS instead."""

    max_tokens: int = field(default=16, metadata=within(ge=1))
    """Number of new tokens to generate."""
    temperature: float = field(default=1.0, metadata=within(ge=0))
    """Sampling temperature; 0 is greedy decoding."""
    top_p: float = field(default=1.0, metadata=within(ge=0, le=1))
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p (1: off; 0 keeps only the most likely, as in transformers)."""
    top_k: int | None = field(default=None, metadata=within(ge=0))
    """Keep only the k most likely tokens (0 or none: off, the default)."""
    min_p: float | None = field(default=None, metadata=within(ge=0, le=1))
    """Drop tokens less likely than min_p times the most likely one (0 or none: off, the default)."""
    repetition_penalty: float = field(default=1.0, metadata=within(gt=0))
    """Divide the positive logits (multiply the negative ones) of tokens already present by this (1 = off)."""
    seed: int | None = field(default=None, metadata=within(ge=0, lt=2**63))
    """Seed for reproducible sampling: the same seed gives the same text (each request draws from a generator of its own; on CPU its low 32 bits count)."""
    stop_at_eos: bool = True
    """<|endoftext|> ends the text."""
    logprobs: int | None = field(default=None, metadata=within(ge=0))
    """Report each chosen token's log-probability and the `logprobs` most likely tokens' (of the model's own distribution)."""

    def __post_init__(self) -> None:
        problem = out_of_range(self)
        if problem:
            raise ValueError(problem)


# The settings that end a request or say what it reports: each front end names and bounds them its own way
# (`generate --max-new-tokens --ignore-eos`; the API's max_tokens, ignore_eos, logprobs up to 5).
REQUEST_SETTINGS = ("max_tokens", "stop_at_eos", "logprobs")
# The rest choose each token: the `generate` command and the API take every one of them as they are.
TOKEN_SETTINGS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name not in REQUEST_SETTINGS)
# Defaults of the `generate` command and function: a small model's text reads better a little cooler than OpenAI's 1.0.
GENERATE_DEFAULTS = {"temperature": 0.8, "top_p": 0.9}


COMPARE = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}


def out_of_range(settings: object) -> str | None:
    """The first field of a dataclass whose value lies outside its `within` range, as a sentence; None if none.

    Written so that NaN is out of every range; infinity is refused too, also where a range is open-ended
    (temperature >= 0): no setting means anything there."""
    for f in dataclasses.fields(settings):
        bounds, value = f.metadata.get("range"), getattr(settings, f.name)
        if bounds is None or value is None:
            continue
        if not all(COMPARE[kind](value, bound) for kind, bound in bounds.items()):
            return f"{f.name} must be {describe_range(bounds)}, got {value}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{f.name} must be a finite number {describe_range(bounds)}, got {value}"
    return None


def describe_range(bounds: dict) -> str:
    """'>= 0', 'in (0, 1]', ... for a `within` range."""
    low = next(((kind, b) for kind, b in bounds.items() if kind in ("ge", "gt")), None)
    high = next(((kind, b) for kind, b in bounds.items() if kind in ("le", "lt")), None)
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}"
    kind, bound = low or high
    return {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[kind] + f" {bound}"


# --- the filters ----------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: logits (B, V) of tokens already seen (B, V bool) are made less likely (in float32)."""
    logits = logits.float()
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    # a tiny penalty (1e-40) overflows float32 to inf: inf - inf later is NaN, sampled as the last token id
    largest = torch.finfo(torch.float32).max
    return torch.where(seen, penalised.clamp(max=largest), logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (and any tied with the k-th); the rest become -inf. k = 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = largest_first(logits, k)[..., -1:]  # (B, 1)
    return drop_below(logits, logits, kth)


# top-p on CPU ranks this many of the most likely tokens first (see ranked_sizes)
NUCLEUS_CANDIDATES = 1024
# float32 rounding of a cumulative sum near 1 is below 1e-7: a margin well above it
ROUNDING_MARGIN = 1e-6


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches p.

    Tokens tied with the last one kept are kept too, so the result does not depend on sort order.
    """
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    vocab = probs.shape[-1]
    for size in ranked_sizes(probs, p):
        ranked = largest_first(probs, size)  # (B, size)
        cumulative = ranked.cumsum(dim=-1)  # (B, size)
        # every token past the ranked ones has at least their mass before it (less rounding): none is needed
        if size == vocab or bool((cumulative[..., -1] >= p + ROUNDING_MARGIN).all()):
            break
    mass_before = cumulative - ranked  # probability of the tokens ranked above
    needed = mass_before < p  # (B, size): this token is needed to reach p
    # the most likely token is always needed, even for a p that is 0 in float32 (mass_before is never < 0)
    last_needed = (needed.sum(dim=-1, keepdim=True) - 1).clamp_(min=0)  # (B, 1), index into the ranked order
    threshold = ranked.gather(-1, last_needed)  # (B, 1)
    return drop_below(logits, probs, threshold)


def ranked_sizes(probs: torch.Tensor, p: float) -> tuple[int, ...]:
    """How many of the most likely tokens top-p ranks, in turn, until their mass reaches p: the whole row, or on
    CPU NUCLEUS_CANDIDATES first, since the nucleus is usually a small part of the vocabulary. Both give the
    same threshold: the ranked values are the same, and PyTorch's CPU cumsum adds each row in order, in float64."""
    vocab = probs.shape[-1]
    if probs.device.type != "cpu" or NUCLEUS_CANDIDATES >= vocab:
        return (vocab,)
    # a nearly flat row (a random model's): so few tokens cannot hold p, however likely the first
    if bool((probs.amax(dim=-1) * NUCLEUS_CANDIDATES < p).any()):
        return (vocab,)
    return (NUCLEUS_CANDIDATES, vocab)


def largest_first(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest of each row of values (B, V), largest first: (B, k), without their indices (NaN ranks first)."""
    if values.device.type != "cpu" or values.dtype != torch.float32:
        return torch.topk(values, k, dim=-1).values
    # torch.sort and torch.topk also rank the indices, which the filters do not need; NumPy partitions
    # and sorts the values alone, with SIMD, many times faster for a row of the vocabulary (BENCHMARKS.md)
    rows = values.numpy(force=True)  # a view; force: also of a tensor that requires grad or is a negated view
    vocab = rows.shape[-1]
    top = rows if k == vocab else np.partition(rows, vocab - k, axis=-1)[..., vocab - k :]
    return torch.from_numpy(np.flip(np.sort(top, axis=-1), axis=-1).copy())


def drop_below(logits: torch.Tensor, values: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """logits (B, V) with -inf where values (B, V) are below threshold (B, 1): the tokens a filter drops."""
    if values.device.type == "cpu" and values.dtype == threshold.dtype == torch.float32:
        # PyTorch's CPU comparison is several times slower than NumPy's (BENCHMARKS.md)
        below = torch.from_numpy(values.numpy(force=True) < threshold.numpy(force=True))  # (B, V)
    else:
        below = values < threshold
    return torch.where(below, float("-inf"), logits)


# What draws a batch's random numbers: one generator (or None: PyTorch's default) for every row in turn,
# or a list of one per row (the batching engine's requests, each with a seed of its own)
Generators = torch.Generator | None | list[torch.Generator | None]


def seed_of_sample(seed: int, sample: int) -> int:
    """The seed that sample number `sample` of a request seeded with `seed` draws from: seed + sample, wrapped
    into SamplingParams' range (`serve`'s n choices and `generate --num-samples` alike)."""
    return (seed + sample) % 2**63


def sample_from(probs: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """One index per row of probs (B, V), drawn by inverting the cumulative distribution: (B,).

    Same distribution as torch.multinomial(probs, 1), which draws a random variate per token of the
    vocabulary where one per row is enough (much faster on CPU: BENCHMARKS.md).
    """
    cdf = probs.cumsum(dim=-1)  # (B, V)
    if isinstance(generator, list):
        u = torch.cat([torch.rand(1, 1, generator=g, device=probs.device) for g in generator])  # (B, 1)
    else:
        u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)  # (B, 1)
    u = u * cdf[:, -1:]
    # the first token whose cumulative probability passes u; a zero-probability token never is
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    return drop_below(logits, probs, min_p * probs.amax(dim=-1, keepdim=True))


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
    # nothing overflowed: seen at once when the largest magnitude is finite (a reduction PyTorch does fast)
    if scaled.numel() == 0 or torch.isfinite(scaled.abs().amax()):
        return scaled
    # row by row, so that a row's result does not depend on the rows batched with it
    overflowed = torch.isinf(scaled).sum(dim=-1, keepdim=True) != torch.isinf(logits).sum(dim=-1, keepdim=True)
    if not overflowed.any():
        return scaled
    return torch.where(overflowed, (logits - logits.max(dim=-1, keepdim=True).values) / temperature, scaled)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (B, V) scaled by params.temperature (> 0) and filtered, in transformers' order (temperature,
    top-k, top-p, min-p): float32, the dropped tokens at -inf."""
    logits = apply_temperature(logits, params.temperature)
    if params.top_k:  # None or 0: off, as in transformers
        logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    if params.min_p is not None:
        logits = min_p_filter(logits, params.min_p)
    return logits


def next_token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution (B, V) that sampling draws from at temperature > 0."""
    return torch.softmax(filter_logits(logits, params), dim=-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row of logits (B, V): (B,); of tied tokens the first, and NaN ranks first."""
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()  # on CPU a bfloat16 argmax is several times slower than a float32 copy's
    if logits.device.type == "cpu":
        # NumPy's argmax is vectorised, PyTorch's CPU argmax is not (BENCHMARKS.md); they agree on ties and NaN
        array = logits.numpy(force=True)
        long_rows = array.ndim == 2 and array.shape[1] >= 4096 and array.strides[1] == array.itemsize
        if long_rows and not array.flags.c_contiguous:
            # rows of a vocabulary apart in memory (a model's logits cut from its padded vocabulary): argmax over
            # the whole array would first copy it; row by row reads each in place
            return torch.from_numpy(np.fromiter((row.argmax() for row in array), dtype=np.int64, count=len(array)))
        best = array.argmax(axis=-1)  # a NumPy scalar for one row (V,)
        return torch.from_numpy(np.asarray(best))
    return logits.argmax(dim=-1)


def choose_next(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """One token per row of logits (B, V) under `params`: greedy at temperature 0, else drawn after the
    filters; `seen` (B, V bool): the tokens the repetition penalty applies to. Each row is chosen as it
    would be alone (with, for a list of generators, its own): batching rows changes no row's token."""
    if seen is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return greedy(logits)
    return sample_from(next_token_probs(logits, params), generator)  # (B,)


def token_rule(params: SamplingParams) -> tuple:
    """What `choose_next` does with a row under `params`, less the seed: rows with equal rules (in the batching
    engine, requests with different seeds, lengths or stop settings) can be chosen in one call."""
    if params.temperature == 0:
        return (0.0, params.repetition_penalty)  # greedy: the filters do not matter
    return (params.temperature, params.top_k or 0, params.top_p, params.min_p, params.repetition_penalty)
