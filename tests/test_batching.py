"""Continuous batching: every request gets what `generate` gives it alone, whoever else is in the batch."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from examplegpt import GPT
from examplegpt.batching import BatchEngine, QueueFull, SamplingParams, TokenEvent
from examplegpt.generate import generate
from examplegpt.kv_cache import KVCache
from examplegpt.tokenizer import EOT_ID

from .conftest import eos_only_model, peaked_model

TIMEOUT = 120  # seconds any one wait may take: a bound, not a measurement


@pytest.fixture(scope="module")
def model():
    return peaked_model(max_seq_len=64)


def prompt_of(length: int, seed: int) -> list[int]:
    return torch.randint(0, 50257, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


class Collector:
    """The events of one request, and a flag once its final event has come."""

    def __init__(self) -> None:
        self.events: list[TokenEvent] = []
        self.done = threading.Event()
        self.then: list = []  # callbacks (count, fn): fn() runs when this request has `count` events

    def __call__(self, event: TokenEvent) -> None:
        self.events.append(event)
        for count, fn in self.then:
            if len(self.events) == count:
                fn()
        if event.finish_reason is not None:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [e.token for e in self.events if e.token is not None]

    @property
    def finish_reason(self) -> str | None:
        return self.events[-1].finish_reason if self.events else None

    def wait(self) -> Collector:
        assert self.done.wait(TIMEOUT), "the request did not finish in time"
        return self


def expected_greedy(model: GPT, prompt: list[int], max_tokens: int) -> list[int]:
    out = generate(model, torch.tensor([prompt]), max_tokens, temperature=0, eos_id=EOT_ID)
    return out[0, len(prompt) :].tolist()


@pytest.fixture
def engine_of():
    engines = []

    def make(model, **kwargs) -> BatchEngine:
        engine = BatchEngine(model, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown(drain=False)
        assert engine.join(TIMEOUT)


def test_rows_at_different_lengths_decode_as_each_would_alone(model):
    """The cache itself: three rows prefilled to different lengths, then one forward pass for all three."""
    prompts = [prompt_of(n, seed) for n, seed in [(5, 1), (17, 2), (30, 3)]]
    cache = KVCache.allocate(model.config, 3)
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            model.hidden_states(torch.tensor([prompt]), cache.rows(row, row + 1))
        assert cache.lengths.tolist() == [5, 17, 30]
        nxt = torch.tensor([[11], [22], [33]])  # (3, 1)
        batched = model.logits(model.hidden_states(nxt, cache)[:, -1])  # (3, V)
        for row, prompt in enumerate(prompts):
            alone, _ = model(torch.tensor([prompt + [nxt[row, 0].item()]]))
            torch.testing.assert_close(batched[row], alone[0, -1], rtol=1e-4, atol=1e-4)


def test_concurrent_greedy_requests_each_equal_generate_alone(model, engine_of):
    """Different prompt and output lengths; some arrive while others decode; long prompts are prefilled in
    chunks; two outgrow the 64-token context and slide."""
    engine = engine_of(model, max_batch=4, max_queue=8, prefill_chunk=8)
    specs = [(3, 20), (10, 5), (25, 30), (40, 50), (12, 1), (7, 70), (33, 12)]  # (prompt length, max_tokens)
    prompts = [prompt_of(n, seed) for seed, (n, _) in enumerate(specs)]
    collectors = [Collector() for _ in specs]

    def submit(i: int) -> None:
        engine.submit(prompts[i], SamplingParams(max_tokens=specs[i][1], temperature=0), collectors[i])

    # requests 3..6 arrive while request 0 decodes: at its 2nd, 4th, 6th and 8th token
    for k, i in enumerate(range(3, 7)):
        collectors[0].then.append((2 + 2 * k, lambda i=i: submit(i)))
    for i in range(3):
        submit(i)
    engine.start()
    for i, (_, max_tokens) in enumerate(specs):
        got = collectors[i].wait()
        assert got.tokens == expected_greedy(model, prompts[i], max_tokens), f"request {i}"
        assert got.finish_reason == ("stop" if got.tokens[-1] == EOT_ID else "length")
        assert all(e.finish_reason is None for e in got.events[:-1])


def test_a_long_prefill_does_not_freeze_the_decoding_rows(model, engine_of):
    engine = engine_of(model, max_batch=2, prefill_chunk=8)
    first, second = Collector(), Collector()
    submitted_at = []

    def submit_second() -> None:
        submitted_at.append(len(first.events))
        engine.submit(prompt_of(40, 5), SamplingParams(max_tokens=3, temperature=0), second)

    first.then.append((3, submit_second))
    second.then.append((1, lambda: submitted_at.append(len(first.events))))
    engine.submit(prompt_of(4, 6), SamplingParams(max_tokens=30, temperature=0, stop_at_eos=False), first)
    engine.start()
    first.wait(), second.wait()
    # 40 prompt tokens in chunks of 8: five steps, each of which also gave the first request a token
    assert submitted_at[1] - submitted_at[0] >= 4


def test_seeded_sampling_is_reproducible_alone_and_in_company(model, engine_of):
    prompt = prompt_of(9, 7)
    params = SamplingParams(max_tokens=25, temperature=1.0, top_p=0.95, seed=1234, stop_at_eos=False)
    engine = engine_of(model, max_batch=4)
    engine.start()
    alone = Collector()
    engine.submit(prompt, params, alone)
    alone.wait()
    reference = generate(model, torch.tensor([prompt]), 25, temperature=1.0, top_p=0.95,
                         generator=torch.Generator().manual_seed(1234))  # fmt: skip
    assert alone.tokens == reference[0, 9:].tolist()  # the same draws from the same generator as `generate`

    company = [Collector() for _ in range(4)]
    engine.submit(prompt_of(20, 8), SamplingParams(max_tokens=30, temperature=0.7, top_k=40), company[0])
    engine.submit(prompt, params, company[1])
    engine.submit(prompt_of(3, 9), SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.3), company[2])
    engine.submit(prompt, dataclasses.replace(params, seed=99), company[3])
    for c in company:
        c.wait()
    assert company[1].tokens == alone.tokens
    assert company[3].tokens != alone.tokens  # another seed, another sample


def test_requests_sampled_alike_in_one_call_each_get_the_tokens_of_generate(model, engine_of):
    """Rows with one sampling rule are chosen in one call (each from its own seed's generator, with its own
    repetition penalty's tokens seen): each request's tokens are still those `generate` gives it alone."""
    settings = dict(temperature=1.0, top_p=0.9, repetition_penalty=1.3)
    prompts = [prompt_of(6, 20 + i) for i in range(3)] + [prompt_of(11, 23)]
    engine = engine_of(model, max_batch=4)
    collectors = [Collector() for _ in prompts]
    for seed, (prompt, collector) in enumerate(zip(prompts, collectors)):
        engine.submit(prompt, SamplingParams(max_tokens=12, seed=seed, stop_at_eos=False, **settings), collector)
    engine.start()
    for seed, (prompt, collector) in enumerate(zip(prompts, collectors)):
        alone = generate(model, torch.tensor([prompt]), 12, generator=torch.Generator().manual_seed(seed), **settings)
        assert collector.wait().tokens == alone[0, len(prompt) :].tolist()


def test_per_request_repetition_penalty_equals_generate(model, engine_of):
    prompt = prompt_of(6, 10)
    engine = engine_of(model)
    plain, penalised = Collector(), Collector()
    engine.submit(prompt, SamplingParams(max_tokens=20, temperature=0, stop_at_eos=False), plain)
    engine.submit(prompt, SamplingParams(max_tokens=20, temperature=0, repetition_penalty=5.0), penalised)
    engine.start()
    expected = generate(model, torch.tensor([prompt]), 20, temperature=0, repetition_penalty=5.0, eos_id=EOT_ID)
    assert penalised.wait().tokens == expected[0, 6:].tolist()
    assert plain.wait().tokens == expected_greedy(model, prompt, 20)


def test_cancel_frees_the_row_at_the_next_step(model, engine_of):
    engine = engine_of(model, max_batch=1, max_queue=1)
    first, second = Collector(), Collector()
    request = engine.submit(prompt_of(5, 11), SamplingParams(max_tokens=50, temperature=0), first)
    first.then.append((3, request.cancel))
    engine.submit(prompt_of(5, 12), SamplingParams(max_tokens=4, temperature=0, stop_at_eos=False), second)
    engine.start()
    first.wait(), second.wait()
    assert len(first.events) == 4 and first.events[-1] == TokenEvent(None, finish_reason="cancelled")
    assert second.finish_reason == "length" and len(second.tokens) == 4
    request.cancel()  # after the end: nothing more is sent
    assert engine.stats == {"running": 0, "queued": 0}


def test_queue_full_past_max_batch_plus_max_queue_then_all_are_served(model, engine_of):
    engine = engine_of(model, max_batch=2, max_queue=3)
    collectors = [Collector() for _ in range(5)]
    for c in collectors:
        engine.submit(prompt_of(4, 13), SamplingParams(max_tokens=3, temperature=0), c)
    assert engine.stats == {"running": 0, "queued": 5}  # not started: nothing holds a row yet
    with pytest.raises(QueueFull):
        engine.submit(prompt_of(4, 13), SamplingParams(max_tokens=3), Collector())
    engine.start()
    assert all(len(c.wait().tokens) == 3 for c in collectors)
    engine.submit(prompt_of(4, 13), SamplingParams(max_tokens=3), Collector()).cancel()  # room again


def test_a_cancelled_request_makes_room_at_once(model, engine_of):
    # A client whose answer ended at a stop string cancels it and may send its next request before the
    # engine's next step frees the row: that request must not be refused as if the server were full.
    engine = engine_of(model, max_batch=1, max_queue=1)
    first, second, third = Collector(), Collector(), Collector()
    cancelled = engine.submit(prompt_of(4, 13), SamplingParams(max_tokens=3, temperature=0), first)
    engine.submit(prompt_of(4, 14), SamplingParams(max_tokens=3, temperature=0), second)
    with pytest.raises(QueueFull):
        engine.submit(prompt_of(4, 15), SamplingParams(max_tokens=3), Collector())
    cancelled.cancel()
    assert engine.stats == {"running": 0, "queued": 1}
    engine.submit(prompt_of(4, 15), SamplingParams(max_tokens=3, temperature=0), third)
    with pytest.raises(QueueFull):  # the cancelled one makes room for one request, not more
        engine.submit(prompt_of(4, 16), SamplingParams(max_tokens=3), Collector())
    engine.start()
    assert first.wait().finish_reason == "cancelled"
    assert len(second.wait().tokens) == 3 and len(third.wait().tokens) == 3


def test_shutdown_with_drain_finishes_everything_and_refuses_new_work(model, engine_of):
    engine = engine_of(model, max_batch=2, max_queue=4)
    collectors = [Collector() for _ in range(4)]
    for i, c in enumerate(collectors):
        engine.submit(prompt_of(3 + i, 14 + i), SamplingParams(max_tokens=10, temperature=0, stop_at_eos=False), c)
    engine.start()
    engine.shutdown(drain=True)
    with pytest.raises(QueueFull):
        engine.submit(prompt_of(3, 1), SamplingParams(max_tokens=3), Collector())
    assert engine.join(TIMEOUT)
    assert all(c.wait().finish_reason == "length" and len(c.tokens) == 10 for c in collectors)


def test_shutdown_without_drain_cancels_the_live_requests(model, engine_of):
    engine = engine_of(model, max_batch=1, max_queue=4)
    collectors = [Collector() for _ in range(3)]
    for c in collectors:
        engine.submit(prompt_of(4, 15), SamplingParams(max_tokens=1000, temperature=0, stop_at_eos=False), c)
    collectors[0].then.append((2, lambda: engine.shutdown(drain=False)))
    engine.start()
    assert engine.join(TIMEOUT)
    assert [c.wait().finish_reason for c in collectors] == ["cancelled"] * 3
    assert len(collectors[0].tokens) == 2 and collectors[1].tokens == []


def test_eos_ends_a_request_unless_told_otherwise(engine_of):
    model = eos_only_model()
    engine = engine_of(model)
    stops, runs_on = Collector(), Collector()
    engine.submit([5, 6], SamplingParams(max_tokens=10, temperature=0), stops)
    engine.submit([5, 6], SamplingParams(max_tokens=4, temperature=0, stop_at_eos=False), runs_on)
    engine.start()
    assert stops.wait().events == [TokenEvent(EOT_ID, finish_reason="stop")]
    assert runs_on.wait().tokens == [EOT_ID] * 4 and runs_on.finish_reason == "length"


def test_logprobs_are_the_models_log_softmax(model, engine_of):
    prompt = prompt_of(8, 16)
    engine = engine_of(model)
    got = Collector()
    engine.submit(prompt, SamplingParams(max_tokens=5, temperature=0, logprobs=3, stop_at_eos=False), got)
    engine.start()
    got.wait()
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt + got.tokens[:-1]]))
    expected = torch.log_softmax(logits[0, len(prompt) - 1 :].double(), dim=-1)  # (5, V)
    for step, event in enumerate(got.events):
        assert event.logprob == pytest.approx(expected[step, event.token].item(), abs=1e-3)
        top = torch.topk(expected[step], 3)
        assert list(event.top_logprobs) == top.indices.tolist()  # most likely first; greedy picked the first
        assert list(event.top_logprobs.values()) == pytest.approx(top.values.tolist(), abs=1e-3)


def test_a_prompt_longer_than_the_context_keeps_its_last_tokens(model, engine_of):
    prompt = prompt_of(100, 17)  # context 64: the last 63 tokens are kept
    engine = engine_of(model)
    got = Collector()
    engine.submit(prompt, SamplingParams(max_tokens=6, temperature=0), got)
    engine.start()
    assert got.wait().tokens == expected_greedy(model, prompt[-63:], 6)


def test_a_failing_listener_ends_only_its_own_request(model, engine_of):
    engine = engine_of(model)
    good = Collector()

    def bad(event: TokenEvent) -> None:
        raise RuntimeError("the client went away")

    engine.submit(prompt_of(5, 18), SamplingParams(max_tokens=8, temperature=0), bad)
    engine.submit(prompt_of(5, 19), SamplingParams(max_tokens=8, temperature=0, stop_at_eos=False), good)
    engine.start()
    assert len(good.wait().tokens) == 8
    for _ in range(100):  # the bad request is dropped at the engine's next step
        if engine.stats["running"] == 0:
            break
        threading.Event().wait(0.05)
    assert engine.stats == {"running": 0, "queued": 0}


@pytest.mark.parametrize(
    "make",
    [
        lambda: SamplingParams(max_tokens=0),
        lambda: SamplingParams(max_tokens=5, temperature=-1),
        lambda: SamplingParams(max_tokens=5, top_p=-0.1),
        lambda: SamplingParams(max_tokens=5, top_k=-1),
        lambda: SamplingParams(max_tokens=5, repetition_penalty=0),
    ],
)
def test_bad_sampling_params_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_bad_prompts_are_refused(model):
    engine = BatchEngine(model)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams(max_tokens=3), Collector())
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([50257], SamplingParams(max_tokens=3), Collector())


@pytest.mark.parametrize("fail_at_call", [1, 3])  # the first sampling ends a prefill; the third, a decode step
def test_a_failing_engine_ends_every_live_request_with_an_error(model, engine_of, fail_at_call, capsys):
    """Whatever step the failure comes in, each request gets its final "error" event (none waits forever),
    new work is refused, and the failure is one line on stderr, not a thread's traceback."""
    engine = engine_of(model, max_batch=2, max_queue=2)
    calls = []

    def failing_choose(requests, logits):
        calls.append(1)
        if len(calls) >= fail_at_call:
            raise RuntimeError("sampling broke")
        return [0] * len(requests)

    engine.choose = failing_choose  # an instance attribute: the engine calls it once a step for rows alike
    collectors = [Collector() for _ in range(3)]
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=1)
    for collector in collectors:
        engine.submit(prompt_of(4, 0), params, collector)
    engine.start()
    for collector in collectors:
        assert collector.wait().finish_reason == "error"
    assert engine.join(TIMEOUT) and isinstance(engine.error, RuntimeError)
    with pytest.raises(QueueFull):
        engine.submit(prompt_of(4, 0), params, Collector())
    err = capsys.readouterr().err
    assert "sampling broke" in err and "Traceback" not in err
