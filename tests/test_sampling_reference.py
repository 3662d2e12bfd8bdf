"""The sampler's filters against transformers' logits processors, which nobody here wrote.

transformers applies, in this order: RepetitionPenaltyLogitsProcessor, then TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper. Ours must keep the same tokens and give them the
same probabilities, with one documented difference: where top-p's threshold falls inside a group of
tied tokens, transformers keeps the ones its sort happens to put first and we keep the whole group
(so the result does not depend on sort order).
"""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from examplegpt.sampling import SamplingParams, apply_repetition_penalty, choose_next, filter_logits, next_token_probs

from .conftest import examples

logits_process = pytest.importorskip("transformers.generation.logits_process")

INF = float("inf")
# A small pool of values makes ties common; -inf entries are tokens some earlier step ruled out.
POOL = st.sampled_from([-INF, -7.5, -2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.25, 9.0])
VALUE = st.one_of(POOL, st.floats(-30, 30, allow_nan=False, width=32))


@st.composite
def logit_rows(draw) -> torch.Tensor:
    """(B, V) logits, each row with at least one finite entry; float32 or bfloat16."""
    vocab = draw(st.integers(2, 48))
    rows = draw(st.integers(1, 6))
    values = draw(st.lists(st.lists(VALUE, min_size=vocab, max_size=vocab), min_size=rows, max_size=rows))
    logits = torch.tensor(values, dtype=torch.float32)
    assume(torch.isfinite(logits).any(dim=-1).all())
    if draw(st.booleans()):
        logits = logits.to(torch.bfloat16)
    return logits


def transformers_scores(logits, seen_ids, penalty, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """transformers' processors in transformers' order, on the float32 values of `logits`; top-p widened
    to the whole tie at its threshold (our documented rule)."""
    scores = logits.float().clone()
    if penalty != 1.0:
        scores = logits_process.RepetitionPenaltyLogitsProcessor(penalty)(seen_ids, scores)
    scores = logits_process.TemperatureLogitsWarper(temperature)(seen_ids, scores)
    if top_k is not None:
        scores = logits_process.TopKLogitsWarper(top_k)(seen_ids, scores)
    if top_p < 1.0:
        before = scores
        probs = torch.softmax(before, dim=-1)
        sorted_probs = probs.sort(dim=-1, descending=True).values
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        assume(((mass_before - top_p).abs() > 1e-5).all())  # away from the threshold, where rounding decides
        scores = logits_process.TopPLogitsWarper(top_p)(seen_ids, before)
        kept = torch.isfinite(scores)
        threshold = torch.where(kept, probs, INF).min(dim=-1, keepdim=True).values  # (B, 1)
        scores = torch.where(probs >= threshold, before, scores)  # the whole tie at the threshold
    if min_p is not None:
        probs = torch.softmax(scores, dim=-1)
        cut = min_p * probs.max(dim=-1, keepdim=True).values
        assume(((probs - cut).abs() > 1e-6 * cut + 1e-30).all())
        scores = logits_process.MinPLogitsWarper(min_p)(seen_ids, scores)
    return scores


@settings(max_examples=examples(400), deadline=None)
@given(
    logits=logit_rows(),
    temperature=st.one_of(st.sampled_from([0.05, 0.5, 1.0, 2.0, 50.0]), st.floats(0.01, 100.0)),
    top_k=st.one_of(st.none(), st.integers(1, 60)),
    top_p=st.one_of(st.just(1.0), st.floats(0.01, 1.0)),
    min_p=st.one_of(st.none(), st.floats(0.0, 1.0)),
    penalty=st.one_of(st.just(1.0), st.floats(0.1, 5.0)),
    data=st.data(),
)
def test_filters_keep_what_transformers_keeps_with_the_same_probabilities(
    logits, temperature, top_k, top_p, min_p, penalty, data
):
    B, V = logits.shape
    seen_ids = torch.tensor(
        data.draw(st.lists(st.lists(st.integers(0, V - 1), min_size=3, max_size=3), min_size=B, max_size=B))
    )
    seen = torch.zeros(B, V, dtype=torch.bool).scatter_(1, seen_ids, True)

    expected = torch.softmax(transformers_scores(logits, seen_ids, penalty, temperature, top_k, top_p, min_p), -1)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    ours = next_token_probs(apply_repetition_penalty(logits, seen, penalty), params)

    assert torch.equal(ours > 1e-30, expected > 1e-30)  # the same kept set
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


def test_thousands_of_rows_of_a_real_sized_vocabulary_match_transformers():
    """Bulk: 2,000 rows of 2,000 logits in one batch, each filter and their combination."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 2000, generator=generator) * 3
    logits[::7, ::5] = -INF
    seen_ids = torch.randint(0, 2000, (2000, 20), generator=generator)
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, seen_ids, True)
    for temperature, top_k, top_p, min_p, penalty in [
        (0.7, None, 1.0, None, 1.0),
        (1.0, 40, 1.0, None, 1.0),
        (1.0, None, 0.9, None, 1.0),
        (1.0, None, 1.0, 0.05, 1.0),
        (1.0, None, 1.0, None, 1.3),
        (0.8, 50, 0.9, 0.02, 1.2),
    ]:
        scores = logits.clone()
        if penalty != 1.0:
            scores = logits_process.RepetitionPenaltyLogitsProcessor(penalty)(seen_ids, scores)
        warpers = [logits_process.TemperatureLogitsWarper(temperature)]
        if top_k is not None:
            warpers.append(logits_process.TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(logits_process.TopPLogitsWarper(top_p))
        if min_p is not None:
            warpers.append(logits_process.MinPLogitsWarper(min_p))
        for warper in warpers:
            scores = warper(seen_ids, scores)
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
        ours = filter_logits(apply_repetition_penalty(logits, seen, penalty), params)
        kept = torch.isfinite(ours) == torch.isfinite(scores)
        # continuous random values: a row may differ only where rounding puts a token on top-p's threshold
        assert kept.all(dim=-1).float().mean() > 0.999, (temperature, top_k, top_p, min_p, penalty)
        same = kept.all(dim=-1)
        torch.testing.assert_close(torch.softmax(ours[same], -1), torch.softmax(scores[same], -1), rtol=1e-4, atol=1e-6)


# 5e-324, 1e-300 and 1e-46 are below float32's range
@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-46, 1e-40, 1e-30, 1e-12, 1e-6])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tiny_temperature_is_greedy_in_the_limit(temperature, top_p, dtype):
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 500, generator=generator) * 4).to(dtype)
    logits[:, 7] = -INF
    params = SamplingParams(temperature=temperature, top_p=top_p)
    probs = next_token_probs(logits, params)
    assert torch.isfinite(probs).all()
    best = logits.float().argmax(dim=-1)
    expected = torch.zeros_like(probs).scatter_(1, best[:, None], 1.0)
    tied = logits.float() == logits.float().max(dim=-1, keepdim=True).values
    expected = torch.where(tied.sum(-1, keepdim=True) > 1, tied / tied.sum(-1, keepdim=True), expected)
    torch.testing.assert_close(probs, expected)
    picks = choose_next(logits, params, generator=generator)
    assert tied.gather(1, picks[:, None]).all()


def test_top_p_keeps_a_whole_tie_at_its_threshold():
    """The documented rule, exactly: four tokens of 1/4 each and top_p 0.5 keep all four."""

    def kept(logits: torch.Tensor, top_p: float) -> list[bool]:
        return torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=top_p)))[0].tolist()

    assert kept(torch.zeros(1, 4), 0.5) == [True, True, True, True]
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0, -INF]])  # probabilities 1/2, 1/4, 1/4, 0
    assert kept(logits, 0.6) == [True, True, True, False]
