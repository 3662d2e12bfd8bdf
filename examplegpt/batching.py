"""Continuous batching: many requests decoded together, each joining and leaving the batch on its own.

One thread runs a loop of steps (`run`): the caller's, or one of the engine's own (`start`). Each step:

1. drops the requests that were cancelled since the last step (their rows are free at once);
2. admits waiting requests while rows are free (at most `max_batch` requests hold a row);
3. prefills: runs up to `prefill_chunk` prompt tokens of the admitted requests (a long prompt in
   chunks over several steps), so that the rows already decoding wait one chunk, not a whole prompt,
   for their next token. When no row is decoding, a whole prompt runs at once. Requests admitted
   together with prompts of the same length are prefilled together, as one batch;
4. decodes: one forward pass gives every decoding row its next token, each row at its own length
   and position in the key/value cache (`kv_cache.py`); a request that is done leaves the batch.

A request's tokens are exactly those `generate` gives for its prompt alone (greedy; with a seed,
the same draws from the same generator), up to float rounding: a batched matrix product may add in
another order than a single row's, which moves logits in their last bits and can flip a near-tie.

The context. A prompt longer than the context keeps its last (max_seq_len - 1) tokens, as the
`generate` command does. A request whose prompt and output outgrow the context slides, as
`generate` does: its row is run again from position 0 on the last half of the context (as a
prefill), and decoding goes on, so `max_tokens` is never cut short by the context.

Events. `on_event` is called on the engine's thread, once per new token; the last call has
`finish_reason` set: "stop" (the token is <|endoftext|>, when `stop_at_eos`), "length" (the
token is the `max_tokens`-th), "cancelled" (after `Request.cancel()` or `shutdown(drain=False)`;
token None), or "error" (the engine failed; token None; the engine then stops). Logprobs are of
the model's own distribution: log-softmax of its logits before repetition penalty, temperature and
filters.

The model's weights are used as they are: on CPU, wrap the engine's run in
`cpu_inference.fast_cpu_inference(model, long_run=True)` for packed weights, as `serve` does.

Which thread. On CPU, run the engine on the thread that has run the model so far (`run_beside`; the
`serve` command: the main thread, which loaded, packed and warmed it up), not on a new one (`start`).
PyTorch's OpenMP runtime (GNU libgomp) gives each thread that runs a parallel op a pool of its own,
and once the pools hold more threads than there are CPUs, every pool sleeps between ops instead of
spinning: a second thread running the model halves the speed of both on a small machine (issue 24).
"""

from __future__ import annotations

import collections
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from . import cpu_inference
from .cpu_inference import PASSES_TO_DECIDE, PROBE_ROWS, kv_cache_dtype, on_trial, rows_measured
from .kv_cache import KVCache
from .model import GPT
from .sampling import SamplingParams, choose_next, token_rule
from .text import crop_prompt, logprobs_of, window_after_slide
from .tokenizer import EOT_ID


@dataclass
class TokenEvent:
    token: int | None  # None only on a final event that brings no token ("cancelled", "error")
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None  # None while running; "stop", "length", "cancelled" or "error"


class QueueFull(Exception):
    """The engine holds max_batch running and max_queue waiting requests, or is shutting down."""


class Request:
    """One submitted prompt: the handle `submit` returns, and the engine's record of it."""

    def __init__(
        self, prompt: list[int], params: SamplingParams, on_event: Callable[[TokenEvent], None], device: torch.device
    ) -> None:
        self.params = params
        self.on_event = on_event
        self.tokens = list(prompt)  # the prompt, then each new token: the window to run again after a slide
        self.new_tokens = 0
        self.cancelled = False  # set by any thread; read by the engine at its next step
        self.finished = False  # the final event was sent
        # on the engine's device, where the draws are made (as `generate` makes a seed's generator)
        self.generator = None if params.seed is None else torch.Generator(device).manual_seed(params.seed)
        self.seen: torch.Tensor | None = None  # (1, V) bool: tokens the repetition penalty applies to

    def cancel(self) -> None:
        """Stop this request: its row is freed at the engine's next step, and a final "cancelled" event sent."""
        self.cancelled = True


@dataclass
class Prefill:
    """Requests whose tokens (equal in number) are being run into a cache of their own, chunk by chunk."""

    requests: list[Request]
    tokens: torch.Tensor  # (k, T): what goes into the cache (the prompt, or after a slide the window)
    cache: KVCache  # (k rows of T positions)
    done: int = 0  # tokens already in the cache


class BatchEngine:
    """Continuous batching over one model (see the module docstring). Thread-safe: `submit`, `cancel`,
    `stats` and `shutdown` may be called from any thread; the model runs on the engine's own thread."""

    def __init__(self, model: GPT, max_batch: int = 16, max_queue: int = 64, prefill_chunk: int = 64) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be at least 1, max_queue at least 0")
        if model.config.max_seq_len < 2:
            raise ValueError("the model's context must hold at least 2 tokens")
        self.model = model.eval()
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        weight = model.lm_head.weight
        self.device = weight.device
        self.cache_dtype = kv_cache_dtype(weight.device, weight.dtype)
        self.cache = KVCache.allocate(model.config, max_batch, self.device, self.cache_dtype)
        self.error: BaseException | None = None
        # the engine thread's own state
        self.decoding: list[Request] = []  # row i of self.cache holds decoding[i]
        self.prefilling: collections.deque[Prefill] = collections.deque()
        # shared with the submitting threads, under self.lock
        self.lock = threading.Condition()
        self.waiting: collections.deque[Request] = collections.deque()
        self.live: set[Request] = set()  # submitted and not finished
        self.accepting = True
        self.draining = True  # what to do with live requests once shutdown() is called
        self.thread: threading.Thread | None = None  # the one that runs the loop, once `run` or `start` is called
        self.stopped = threading.Event()  # the loop has ended

    @property
    def stats(self) -> dict[str, int]:
        """Requests holding a row ("running": decoding or prefilling) and requests waiting for one ("queued");
        a cancelled request counts in neither, though the engine frees it only at its next step."""
        with self.lock:
            queued = sum(not r.cancelled for r in self.waiting)
            return {"running": self.active() - queued, "queued": queued}

    def active(self) -> int:
        """Live requests not cancelled: what fills the engine's max_batch + max_queue (under self.lock).
        A cancelled one does not: its row is freed at the next step, before any waiting request is admitted,
        so a client whose answer ended at a stop string may send its next request at once."""
        return sum(not r.cancelled for r in self.live)

    def start(self) -> None:
        """Run the engine on a thread of its own (once; nothing if a thread runs it already)."""
        with self.lock:
            if self.thread is not None:
                return
            self.thread = threading.Thread(target=self.run, name="batch-engine", daemon=True)
        self.thread.start()

    def warm_up(self) -> None:
        """Run the model once at each size the engine's steps take (decoding 1, 2, 3, ... max_batch rows; a prompt
        chunk of 2, 4, ... prefill_chunk tokens, and a whole prompt of PROBE_ROWS, which stands for every longer
        one), on the calling thread, the one that will `run` the engine: what a first step at a size costs
        (`cpu_inference`'s trials of weight layouts, oneDNN's kernels and the memory they keep) is paid here, not
        by the first requests. Every row count: a full batch meets the others only as it drains, and with packed
        weights each new one keeps 1-2 MB for good. A size runs again until its layout trials have decided (the
        LM head's takes 64 passes, more where the machine's other work made a trial start again), the sizes in
        turn: were one size's trials to finish before the next size's begin, the copies they did not choose
        would be freed, and made again for the next. A trial keeps each number of rows' timings apart: after the
        first passes, only the most rows of each trial's range (16 of 9-16) run again. Then every size runs once
        more, in the layouts chosen."""
        context = self.model.config.max_seq_len
        chunks = [tokens for tokens in powers_of_two_up_to(min(self.prefill_chunk, context)) if tokens > 1]
        sizes = [(rows, 1) for rows in range(1, self.max_batch + 1)]
        sizes += [(1, tokens) for tokens in sorted({*chunks, min(PROBE_ROWS, context - 1)}) if tokens > 1]
        with torch.inference_mode():
            for _ in range(1 + cpu_inference.PLAIN_PASSES):  # (the passes a size runs plain, and its trials' first)
                for rows, tokens in sizes:
                    self.run_once(rows, tokens)
            blocks, head = self.model.transformer.h, self.model.lm_head  # the head multiplies one row a sequence
            blocks_most = most_of_each_range(rows * tokens for rows, tokens in sizes)
            head_most = most_of_each_range(rows for rows, _ in sizes)
            for _ in range(PASSES_TO_DECIDE - 1):
                undecided = [
                    (rows, tokens)
                    for rows, tokens in sizes
                    if (rows * tokens in blocks_most and on_trial(rows * tokens, blocks))
                    or (rows in head_most and on_trial(rows, head))
                ]
                if not undecided:
                    break
                for rows, tokens in undecided:
                    self.run_once(rows, tokens)
            for rows, tokens in sizes:
                self.run_once(rows, tokens)

    def run_once(self, rows: int, tokens: int) -> None:
        """The model over `rows` rows of `tokens` tokens, into a cache of its own."""
        cache = KVCache.allocate(self.model.config, rows, self.device, self.cache_dtype, max_len=tokens)
        ids = torch.zeros(rows, tokens, dtype=torch.long, device=self.device)  # (rows, tokens)
        self.model.logits(self.model.hidden_states(ids, cache)[:, -1])  # (rows, V)

    def run_beside(self, front: Callable[[], None]) -> None:
        """Run `front` (what submits the requests: the HTTP server, a benchmark's clients) on a thread of its own
        and the engine on this one, the thread that loaded and warmed up the model ("Which thread" above),
        until `front` returns; then shut the engine down (cancelling what is left) and return."""

        def front_then_shutdown() -> None:
            try:
                front()
            finally:
                self.shutdown(drain=False)

        thread = threading.Thread(target=front_then_shutdown, name="front")
        thread.start()
        self.run()
        thread.join()

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[TokenEvent], None]) -> Request:
        """Queue a prompt (token ids); raises QueueFull past max_batch + max_queue live requests, or after shutdown."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        request = Request(crop_prompt(prompt_ids, self.model.config.max_seq_len), params, on_event, self.device)
        with self.lock:
            if not self.accepting:
                raise QueueFull("the engine is shutting down")
            if self.active() >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self.max_batch + self.max_queue} requests are live")
            self.waiting.append(request)
            self.live.add(request)
            self.lock.notify()
        return request

    def shutdown(self, drain: bool = True) -> None:
        """Stop accepting requests. drain=True: the live ones run to their end; else they are cancelled.
        The engine's thread ends after that; `join` waits for it."""
        with self.lock:
            self.accepting = False
            self.draining = self.draining and drain
            self.lock.notify()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the engine's loop to end (after `shutdown`); True if it has, or never ran."""
        return self.thread is None or self.stopped.wait(timeout)

    # --- the engine's thread ------------------------------------------------------------------

    def run(self) -> None:
        """The engine's loop, on the calling thread, until `shutdown` and the end of the live requests."""
        with self.lock:
            if self.thread not in (None, threading.current_thread()):
                raise RuntimeError("the engine already runs on another thread")
            self.thread = threading.current_thread()
        try:
            with torch.inference_mode():
                while self.wait_for_work():
                    self.step()
        except BaseException as e:  # every live request must still get its final event
            self.error = e
            with self.lock:
                self.accepting = False
            for request in self.decoding + [r for job in self.prefilling for r in job.requests] + list(self.waiting):
                self.finish(request, TokenEvent(None, finish_reason="error"))
            # one line, not the thread's traceback: the server keeps answering (with errors) and says why
            print(f"error: the batching engine stopped: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            self.stopped.set()

    def wait_for_work(self) -> bool:
        """Block until there is something to do; False when the engine should end."""
        with self.lock:
            while not (self.waiting or self.decoding or self.prefilling or not self.accepting):
                self.lock.wait()
            if not self.accepting and not self.draining:
                for request in self.waiting:
                    request.cancelled = True
                for request in self.decoding + [r for job in self.prefilling for r in job.requests]:
                    request.cancelled = True
            return bool(self.live) or self.accepting

    def step(self) -> None:
        self.drop_cancelled()
        self.admit()
        self.prefill()
        if self.decoding:
            self.decode()

    def drop_cancelled(self) -> None:
        with self.lock:
            waiting = [r for r in self.waiting if r.cancelled]
            for request in waiting:
                self.waiting.remove(request)
        for request in waiting:
            self.finish(request, TokenEvent(None, finish_reason="cancelled"))
        for job in list(self.prefilling):
            keep = [not r.cancelled for r in job.requests]
            if all(keep):
                continue
            for request, kept in zip(job.requests, keep):
                if not kept:
                    self.finish(request, TokenEvent(None, finish_reason="cancelled"))
            if not any(keep):
                self.prefilling.remove(job)
                continue
            rows = torch.tensor(keep).nonzero().squeeze(1)
            job.requests = [r for r, kept in zip(job.requests, keep) if kept]
            job.tokens = job.tokens[rows.to(job.tokens.device)]
            job.cache = select_rows(job.cache, rows)
        for request in self.decoding:
            if request.cancelled and not request.finished:
                self.finish(request, TokenEvent(None, finish_reason="cancelled"))
        self.release_finished_rows()

    def admit(self) -> None:
        """Move waiting requests into prefill while rows are free; those of equal prompt length go as one batch."""
        with self.lock:
            free = self.max_batch - len(self.decoding) - sum(len(job.requests) for job in self.prefilling)
            admitted = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        groups: dict[int, list[Request]] = {}
        for request in admitted:
            groups.setdefault(len(request.tokens), []).append(request)
        for length, requests in groups.items():
            # as many rows at once as the chunk budget holds (at least one)
            per_batch = max(1, self.prefill_chunk // length)
            for first in range(0, len(requests), per_batch):
                batch = requests[first : first + per_batch]
                self.start_prefill(batch, [r.tokens for r in batch])

    def start_prefill(self, requests: list[Request], tokens: list[list[int]], front: bool = False) -> None:
        """Queue requests for prefill: `tokens` (one list per request, all of one length) go into a new cache.
        `front`: before the others (a sliding row, which already holds a row of the batch)."""
        for request in requests:
            if request.params.repetition_penalty != 1.0 and request.seen is None:
                request.seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
                request.seen[0, request.tokens] = True
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)  # (k, T)
        cache = KVCache.allocate(self.model.config, len(requests), self.device, self.cache_dtype, ids.shape[1])
        job = Prefill(requests, ids, cache)
        if front:
            self.prefilling.appendleft(job)
        else:
            self.prefilling.append(job)

    def prefill(self) -> None:
        """Run up to prefill_chunk tokens of prompts (all of the first one, when no row is decoding)."""
        budget = self.prefill_chunk
        while self.prefilling and (budget > 0 or not self.decoding):
            job = self.prefilling[0]
            k, T = job.tokens.shape
            take = T - job.done
            if self.decoding:
                take = min(take, max(1, budget // k))
            h = self.model.hidden_states(job.tokens[:, job.done : job.done + take], job.cache)  # (k, take, C)
            job.done += take
            budget -= k * take
            if job.done < T:
                continue
            logits = self.model.logits(h[:, -1])  # (k, V)
            self.next_tokens(job.requests, logits)
            # only now: should sampling fail, the job's requests are still found (and ended) in self.prefilling
            self.prefilling.popleft()
            for row, request in enumerate(job.requests):
                if not request.finished:
                    self.cache.copy_row(len(self.decoding), job.cache, row)
                    self.decoding.append(request)

    def decode(self) -> None:
        """One new token for every decoding row."""
        rows = self.cache.rows(0, len(self.decoding))
        last = torch.tensor([[r.tokens[-1]] for r in self.decoding], dtype=torch.long, device=self.device)  # (n, 1)
        logits = self.model.logits(self.model.hidden_states(last, rows)[:, -1])  # (n, V)
        self.next_tokens(self.decoding, logits)
        context = self.model.config.max_seq_len
        full = [r for r, length in zip(self.decoding, rows.lengths.tolist()) if length == context and not r.finished]
        self.release_finished_rows(also=full)
        for request in full:  # slide, as `generate` does: run the last half of the context again from position 0
            self.start_prefill(
                [request], [request.tokens[window_after_slide(len(request.tokens), context)]], front=True
            )

    def next_tokens(self, requests: list[Request], logits: torch.Tensor) -> list[int]:
        """Sample each request's next token from its row of logits (k, V), send the events; returns the tokens."""
        tokens = [0] * len(requests)
        rows_of_rule: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            rows_of_rule.setdefault(token_rule(request.params), []).append(i)
        for rows in rows_of_rule.values():
            alike = logits if len(rows) == len(requests) else logits[torch.tensor(rows, device=logits.device)]
            for i, token in zip(rows, self.choose([requests[i] for i in rows], alike)):
                tokens[i] = token
        for i, (request, token) in enumerate(zip(requests, tokens)):
            request.tokens.append(token)
            request.new_tokens += 1
            if request.seen is not None:
                request.seen[0, token] = True
            event = TokenEvent(token)
            if request.params.logprobs is not None:
                event.logprob, event.top_logprobs = logprobs_of(logits[i], token, request.params.logprobs)
            if request.params.stop_at_eos and token == EOT_ID:
                event.finish_reason = "stop"
            elif request.new_tokens == request.params.max_tokens:
                event.finish_reason = "length"
            if event.finish_reason is not None:
                self.finish(request, event)
            else:
                self.send(request, event)
        return tokens

    def choose(self, requests: list[Request], logits: torch.Tensor) -> list[int]:
        """The next token of each of `requests`, which share one `token_rule`, from their rows of logits (k, V):
        one call for them all, each row drawn from its request's own generator."""
        params = requests[0].params
        seen = None if params.repetition_penalty == 1.0 else torch.cat([r.seen for r in requests])  # (k, V)
        return choose_next(logits, params, seen, [r.generator for r in requests]).tolist()

    def release_finished_rows(self, also: list[Request] = ()) -> None:
        """Free the rows of finished requests (and of `also`): the last row moves into each hole."""
        leaving = set(map(id, also))
        i = 0
        while i < len(self.decoding):
            request = self.decoding[i]
            if request.finished or id(request) in leaving:
                last = len(self.decoding) - 1
                if i != last:
                    self.cache.copy_row(i, self.cache, last)
                    self.decoding[i] = self.decoding[last]
                self.decoding.pop()
            else:
                i += 1

    def send(self, request: Request, event: TokenEvent) -> None:
        try:
            request.on_event(event)
        except Exception:  # a listener's failure ends its own request, not the engine
            request.cancelled = True

    def finish(self, request: Request, event: TokenEvent) -> None:
        if request.finished:
            return
        request.finished = True
        with self.lock:
            self.live.discard(request)
        self.send(request, event)


def most_of_each_range(counts: Iterable[int]) -> set[int]:
    """The largest of `counts` in each range of numbers of rows one layout trial stands for (9-16: 16)."""
    most: dict[int, int] = {}
    for count in counts:
        measured = rows_measured(count)
        most[measured] = max(most.get(measured, 0), count)
    return set(most.values())


def powers_of_two_up_to(n: int) -> list[int]:
    """1, 2, 4, ... below n, then n."""
    return [2**i for i in range(n.bit_length()) if 2**i < n] + [n]


def select_rows(cache: KVCache, rows: torch.Tensor) -> KVCache:
    """A new cache holding only `rows` (a 1-D index) of `cache`."""
    keys = [layer.k[rows.to(layer.k.device)] for layer in cache.layers]
    values = [layer.v[rows.to(layer.v.device)] for layer in cache.layers]
    return KVCache(keys, values, cache.lengths[rows])
