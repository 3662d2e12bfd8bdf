"""The sampler's CPU paths against PyTorch's own ops, which nobody here wrote.

On CPU the sampler ranks, compares and picks with NumPy, and top-p ranks only the most likely tokens
first (`sampling.py`): each must give exactly, bit for bit, what the plain PyTorch op gives, on ties,
infinities and NaN as well."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from examplegpt import sampling
from examplegpt.sampling import SamplingParams, choose_next, drop_below, greedy, largest_first, top_p_filter

from .conftest import examples

INF = float("inf")
# A small pool of values makes ties common; NaN and infinities are what a broken model can give.
POOL = st.sampled_from([-INF, INF, math.nan, -7.5, -1.0, 0.0, 0.5, 1.0, 3.25, 9.0])
VALUE = st.one_of(POOL, st.floats(-30, 30, allow_nan=False, width=32))


@st.composite
def rows(draw, finite: bool = False) -> torch.Tensor:
    """(B, V) float32 logits."""
    vocab = draw(st.integers(1, 40))
    count = draw(st.integers(1, 5))
    value = st.floats(-30, 30, allow_nan=False, width=32) if finite else VALUE
    values = draw(st.lists(st.lists(value, min_size=vocab, max_size=vocab), min_size=count, max_size=count))
    return torch.tensor(values, dtype=torch.float32)


def plain_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """The nucleus rule in plain PyTorch: the whole row sorted, the last token needed to reach p, and its ties."""
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    ranked = torch.sort(probs, dim=-1, descending=True).values
    mass_before = ranked.cumsum(dim=-1) - ranked
    last_needed = ((mass_before < p).sum(dim=-1, keepdim=True) - 1).clamp(min=0)
    return logits.masked_fill(probs < ranked.gather(-1, last_needed), -INF)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN included."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@settings(max_examples=examples(300), deadline=None)
@given(logits=rows(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), cut=st.booleans())
def test_greedy_picks_what_torch_argmax_picks(logits, dtype, cut):
    logits = logits.to(dtype)
    if cut:  # rows of a vocabulary apart in memory, as a model's logits cut from its padded vocabulary are
        wide = torch.full((len(logits), 5000), -INF, dtype=dtype)
        wide[:, -logits.shape[1] - 3 : -3] = logits  # the row's values at its end, past 4,096
        logits = wide[:, :-3]
    assert torch.equal(greedy(logits), logits.float().argmax(dim=-1))


@settings(max_examples=examples(300), deadline=None)
@given(values=rows(), data=st.data())
def test_largest_first_gives_torch_sorts_first_values(values, data):
    k = data.draw(st.integers(1, values.shape[-1]))
    ours = largest_first(values, k)
    # equal values (0.0 and -0.0 too, which the filters' comparisons cannot tell apart), NaN where NaN is
    exactly = {"rtol": 0, "atol": 0, "equal_nan": True}
    torch.testing.assert_close(ours, torch.sort(values, dim=-1, descending=True).values[:, :k], **exactly)
    torch.testing.assert_close(ours, torch.topk(values, k, dim=-1).values, **exactly)


@settings(max_examples=examples(300), deadline=None)
@given(values=rows(), data=st.data())
def test_drop_below_is_masked_fill(values, data):
    threshold = torch.tensor([[data.draw(VALUE)] for _ in range(values.shape[0])], dtype=torch.float32)
    logits = torch.randn(values.shape)
    assert same(drop_below(logits, values, threshold), logits.masked_fill(values < threshold, -INF))


@settings(max_examples=examples(400), deadline=None)
@given(logits=rows(finite=True), p=st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.5, 0.9, 0.95])), data=st.data())
def test_top_p_ranking_a_few_candidates_first_keeps_what_the_whole_sort_keeps(logits, p, data):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling, "NUCLEUS_CANDIDATES", data.draw(st.integers(1, logits.shape[-1])))
        assert same(top_p_filter(logits, p), plain_top_p(logits, p))


# spread 0.3 is ranked whole at once; 3.0 at p 0.9 ranks the candidates, then the whole row; 10.0 the candidates only
@pytest.mark.parametrize("spread", [0.3, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("p", [0.1, 0.9, 0.999])
def test_top_p_on_a_real_sized_vocabulary_matches_the_whole_sort(spread, p):
    logits = torch.randn(8, 50257, generator=torch.Generator().manual_seed(0)) * spread
    logits[::3, ::11] = -INF
    assert same(top_p_filter(logits, p), plain_top_p(logits, p))


def test_seeded_draws_at_the_generate_defaults_are_those_of_the_plain_ops():
    """The whole step: the same seed draws the same tokens as the filters written in plain PyTorch."""
    logits = torch.randn(64, 50257, generator=torch.Generator().manual_seed(1)) * 4
    params = SamplingParams(temperature=0.8, top_p=0.9)
    ours = choose_next(logits, params, generator=torch.Generator().manual_seed(7))
    probs = torch.softmax(plain_top_p(logits / 0.8, 0.9), dim=-1)
    assert torch.equal(ours, sampling.sample_from(probs, torch.Generator().manual_seed(7)))


def test_rows_of_any_rank_or_none_are_taken_as_plain_pytorch_takes_them():
    """Found by an audit: what the NumPy paths first refused or read along the wrong axis."""
    peaked = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 8
    assert torch.equal(greedy(peaked), peaked.argmax())  # one row, (V,): a 0-d index
    assert same(top_p_filter(peaked, 0.5), plain_top_p(peaked[None], 0.5)[0])
    # (1, 2, V): one row needs more than the candidates, the other a single token
    wide = torch.randn(50257, generator=torch.Generator().manual_seed(1)) * 0.5
    wide[0] += 8
    narrow = torch.full((50257,), -20.0)
    narrow[3] = 10.0
    stacked = torch.stack([wide, narrow])[None]
    assert same(top_p_filter(stacked, 0.5), plain_top_p(stacked[0], 0.5)[None])
    for empty in (torch.empty(0, 5000), torch.empty(2, 0)):  # no rows, or no vocabulary: nothing to choose
        assert choose_next(empty, SamplingParams(temperature=0.8)).numel() == 0
    negated = torch._neg_view(torch.randn(2, 7))  # a lazy view, which .numpy() refuses
    assert torch.equal(greedy(negated), negated.argmax(dim=-1))
    assert same(sampling.top_k_filter(negated, 2), negated.masked_fill(negated < negated.topk(2).values[:, -1:], -INF))
    grad = torch.randn(3, 9, requires_grad=True)
    assert torch.equal(greedy(grad), grad.argmax(dim=-1))
    near = torch.tensor([[1.0, 1.0 + 1e-12, 0.5], [1e300, 1e301, 0.0]], dtype=torch.float64)  # ties in float32
    assert torch.equal(greedy(near), near.argmax(dim=-1))


PARAMS = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 1e-30, 0.5, 1.0, 2.0]),
    top_k=st.sampled_from([None, 0, 1, 3]),
    top_p=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    min_p=st.sampled_from([None, 0.0, 0.2]),
    repetition_penalty=st.sampled_from([1.0, 1.3]),
)


@settings(max_examples=examples(300), deadline=None)
@given(logits=rows(), params=PARAMS, data=st.data())
def test_a_row_batched_with_others_gets_the_token_it_gets_alone(logits, params, data):
    """The batching engine chooses the tokens of requests alike in one call, each drawn from its own generator."""
    count, vocab = logits.shape
    seen = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=vocab, max_size=vocab),
                                           min_size=count, max_size=count)))  # fmt: skip
    seeds = data.draw(st.lists(st.integers(0, 2**32), min_size=count, max_size=count))
    batched = choose_next(logits, params, seen, [torch.Generator().manual_seed(s) for s in seeds])
    alone = [choose_next(logits[i : i + 1], params, seen[i : i + 1], torch.Generator().manual_seed(s))
             for i, s in enumerate(seeds)]  # fmt: skip
    assert torch.equal(batched, torch.cat(alone))


def test_real_sized_rows_batched_flat_and_peaked_get_their_tokens_alone():
    """At the `generate` defaults, a flat row in the batch sends every row down top-p's whole sort."""
    spread = torch.tensor([[0.3], [9.0]]).repeat(3, 1)  # (6, 1): flat, peaked, flat, ...
    logits = torch.randn(6, 50257, generator=torch.Generator().manual_seed(2)) * spread
    params = SamplingParams(temperature=0.8, top_p=0.9)
    batched = choose_next(logits, params, generator=[torch.Generator().manual_seed(i) for i in range(6)])
    alone = [choose_next(logits[i : i + 1], params, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    assert torch.equal(batched, torch.cat(alone))


def test_a_temperature_overflowing_one_row_leaves_the_others_as_they_are():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(3))
    logits[1, 7] = 3e38  # / 0.01 overflows to inf in this row only
    scaled = sampling.apply_temperature(logits, 0.01)
    for i in range(3):
        assert same(scaled[i : i + 1], sampling.apply_temperature(logits[i : i + 1], 0.01))
    assert same(scaled[0], logits[0] / 0.01) and scaled[1, 7] == 0  # the overflowing row: greedy in the limit
