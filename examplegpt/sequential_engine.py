"""A stand-in for the continuous-batching engine (`batching.py`): the same interface, one request at a time.

Requests wait in a bounded queue and run one after another through `generate`, on one background
thread; nothing is batched. `serve` uses it only where `batching.py` is missing.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .generate import generate
from .model import GPT
from .tokenizer import EOT_ID


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True
    logprobs: int | None = None  # not computed here: events carry no logprobs


@dataclass
class TokenEvent:
    token: int | None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None  # "stop" (eos), "length", "cancelled"


class QueueFull(Exception):
    """max_batch requests running and max_queue waiting."""


class Request:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[TokenEvent], None]) -> None:
        self.prompt_ids, self.params, self.on_event = prompt_ids, params, on_event
        self.cancelled = False

    def cancel(self) -> None:
        """Stop at the next step (or before starting); a final event with finish_reason "cancelled" follows."""
        self.cancelled = True


class SequentialEngine:
    """Runs the requests it is given one at a time, in order, on its own thread."""

    batches = False  # what /health reports, and what the tests look at before testing batching

    def __init__(self, model: GPT, max_batch: int = 16, max_queue: int = 64) -> None:
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.waiting: collections.deque[Request] = collections.deque()
        self.current: Request | None = None
        self.changed = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self.loop, name="sequential-engine", daemon=True)

    @property
    def stats(self) -> dict[str, int]:
        return {"running": int(self.current is not None), "queued": len(self.waiting)}

    def start(self) -> None:
        self.thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[TokenEvent], None]) -> Request:
        with self.changed:
            if self.stopping or int(self.current is not None) + len(self.waiting) >= self.max_batch + self.max_queue:
                raise QueueFull
            request = Request(prompt_ids, params, on_event)
            self.waiting.append(request)
            self.changed.notify()
        return request

    def shutdown(self, drain: bool = True) -> None:
        with self.changed:
            self.stopping = True
            for request in self.waiting if not drain else ():
                request.cancel()
            self.changed.notify()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the engine's thread to end (after `shutdown`); True if it has."""
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def loop(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.waiting or self.stopping)
                if not self.waiting:
                    return
                self.current = self.waiting.popleft()
            try:
                self.run(self.current)
            finally:
                with self.changed:
                    self.current = None

    def run(self, request: Request) -> None:
        p = request.params
        ids = request.prompt_ids[-(self.model.config.max_seq_len - 1) :]  # as `generate` keeps a long prompt
        generator = None if p.seed is None else torch.Generator().manual_seed(p.seed)
        produced, finish = 0, None

        def on_step(token: torch.Tensor) -> torch.Tensor:  # token: (1,)
            nonlocal produced, finish
            if request.cancelled:
                finish = "cancelled"
                return torch.tensor([True])
            produced += 1
            t = int(token[0])
            if p.stop_at_eos and t == EOT_ID:
                finish = "stop"
            elif produced == p.max_tokens:
                finish = "length"
            request.on_event(TokenEvent(t, finish_reason=finish))
            return torch.tensor([finish is not None])

        if not request.cancelled:
            generate(
                self.model, torch.tensor([ids]), p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                top_k=p.top_k, min_p=p.min_p, repetition_penalty=p.repetition_penalty,
                eos_id=EOT_ID if p.stop_at_eos else None, generator=generator, on_step=on_step,
            )  # fmt: skip
        if finish in (None, "cancelled"):
            request.on_event(TokenEvent(None, finish_reason="cancelled"))
