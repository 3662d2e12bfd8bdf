"""`examplegpt serve`: an OpenAI-compatible completions server over the continuous-batching engine, and a playground.

The HTTP side (FastAPI on uvicorn) runs on one asyncio event loop; the model runs on the engine's own
thread (`batching.BatchEngine`), which decodes every admitted request together, one token per step.
Each choice of a request (n choices per prompt) is one engine request. The engine calls back from its
thread with each new token; the callback only hands the event to the event loop, where the text is
decoded, stop strings are looked for (the engine knows only <|endoftext|> and max_tokens) and the
answer is written: one JSON object, or server-sent events in OpenAI's format ending with `data: [DONE]`.

Every failure a client can cause is answered with OpenAI's error object,
`{"error": {"message", "type", "param", "code"}}`, and the right status; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Annotated

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .batching import BatchEngine, QueueFull, SamplingParams, TokenEvent
from .config import ServeConfig
from .cpu_inference import fast_cpu_inference
from .device import pick_device
from .errors import UserError
from .generate import TextStream
from .tokenizer import EOT_ID, encode, get_tokenizer

MAX_BODY_BYTES = 8 * 2**20  # a request body past this is refused before it is read (413)
MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_LOGPROBS = 5  # OpenAI's limit on `logprobs` for completions
RETRY_AFTER_SECONDS = 1
DISCONNECT_CHECK_SECONDS = 0.25  # how often a non-streaming request looks for its client having left


# --- errors -------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered to the client as OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem pydantic found in a request body, as one sentence naming the field."""
    errors = exc.errors()
    error = errors[0]
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = location[0] if location else None
    if error["type"] == "json_invalid":
        reason = error.get("ctx", {}).get("error", "parse error")
        return APIError(400, f"the request body is not valid JSON ({reason})", code="invalid_json")
    if not location:
        if error["type"] == "missing":
            return APIError(400, "the request body is empty: send a JSON object", code="invalid_json")
        return APIError(
            400, f"the request body must be a JSON object, got {error.get('input')!r:.80}", code="invalid_json"
        )
    if error["type"] == "extra_forbidden":
        return APIError(400, f"unknown field '{param}'", param=param, code="unknown_field")
    if error["type"] == "missing":
        return APIError(400, f"missing required field '{param}'", param=param, code="missing_field")
    # a field of several types (prompt, stop) has an error per type: a broken constraint says more than a wrong type
    same_field = [e for e in errors if [str(p) for p in e["loc"] if p != "body"][:1] == [param]]
    error = next((e for e in same_field if not e["type"].endswith("_type")), error)
    message = error["msg"] if len(same_field) == 1 or error is not errors[0] else "not a valid value"
    if len(same_field) > 1 and message == "not a valid value":
        kinds = sorted({str(e["loc"][2]) for e in same_field if len(e["loc"]) > 2})
        message += f" (expected {' or '.join(kinds)})"
    return APIError(
        400, f"{param}: {message}, got {json.dumps(error.get('input'))[:80]}", param=param, code="invalid_value"
    )


# --- the request ----------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions: OpenAI's fields, and ExampleGPT's sampling extras."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    user: str | None = None
    # OpenAI fields that ExampleGPT does not implement: accepted only at their neutral value.
    echo: bool = False
    best_of: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    # ExampleGPT's extras (as in `examplegpt generate`)
    top_k: Annotated[int, Field(ge=1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    ignore_eos: bool = False

    def refuse_unsupported(self) -> None:
        unsupported = {
            "echo": self.echo,
            "best_of": self.best_of not in (None, 1),
            "frequency_penalty": self.frequency_penalty != 0,
            "presence_penalty": self.presence_penalty != 0,
            "logit_bias": bool(self.logit_bias),
            "suffix": self.suffix is not None,
        }
        for name, used in unsupported.items():
            if used:
                hint = " (repetition_penalty is supported)" if name.endswith("_penalty") else ""
                raise APIError(400, f"{name} is not supported by this server{hint}", param=name, code="unsupported")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(s == "" for s in stops):
            raise APIError(400, "stop: a stop string must not be empty", param="stop", code="invalid_value")
        return stops


def prompt_token_lists(prompt: str | list, vocab_size: int) -> list[list[int]]:
    """The prompts of a request as token id lists. An empty prompt starts from <|endoftext|>, GPT-2's document start."""
    if isinstance(prompt, str):
        lists = [encode(prompt)]
    elif not prompt:
        raise APIError(400, "prompt: the list of prompts is empty", param="prompt", code="invalid_value")
    elif isinstance(prompt[0], str):
        lists = [encode(p) for p in prompt]
    elif isinstance(prompt[0], int):
        lists = [list(prompt)]
    else:
        lists = [list(p) for p in prompt]
    for ids in lists:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise APIError(
                400, f"prompt: token id {bad[0]} is not in [0, {vocab_size})", param="prompt", code="invalid_value"
            )
    return [ids or [EOT_ID] for ids in lists]


# --- one completion: its choices and their text ---------------------------------------------------


def token_text(token: int) -> str:
    """A token as text for logprobs; a token that is part of a UTF-8 character is shown as OpenAI does, `bytes:\\xNN`."""
    raw = get_tokenizer().decode_single_token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class Choice:
    """One completion of one prompt as it arrives: the text decoded so far, the part of it already sent,
    stop strings looked for in it, and the logprobs of its tokens."""

    def __init__(self, index: int, stops: list[str], logprobs: int | None, ignore_eos: bool = False) -> None:
        self.index = index
        self.eos_is_text = ignore_eos  # else <|endoftext|> ends the choice and is not part of its text
        self.stops = stops
        # text that might be the beginning of a stop string is held back until it is known not to be
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.stream = TextStream()
        self.text = ""
        self.sent = 0  # characters of self.text already streamed
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.finish_sent = False  # streaming: the chunk with finish_reason has gone out
        self.logprobs = (
            None if logprobs is None else {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        )
        self.logprobs_sent = 0
        self.request = None  # the engine's Request

    def add(self, event: TokenEvent) -> bool:
        """Take one event from the engine; True when a stop string ended this choice (its request should be cancelled)."""
        if self.finish_reason is not None:  # cut at a stop string: what the engine still sends is not wanted
            return False
        if event.token is not None and (event.token != EOT_ID or self.eos_is_text):
            offset = len(self.text)
            self.tokens.append(event.token)
            self.text += self.stream.push(event.token)
            if self.logprobs is not None:
                self.add_logprobs(event, offset)
            if self.cut_at_stop(offset):
                return True
        if event.finish_reason is not None:
            self.text += self.stream.flush()
            self.finish_reason = event.finish_reason
            self.cut_at_stop(0)
        return False

    def add_logprobs(self, event: TokenEvent, offset: int) -> None:
        top = event.top_logprobs or {}
        self.logprobs["tokens"].append(token_text(event.token))
        self.logprobs["token_logprobs"].append(event.logprob)
        self.logprobs["top_logprobs"].append({token_text(t): lp for t, lp in top.items()})
        self.logprobs["text_offset"].append(offset)

    def cut_at_stop(self, searched_up_to: int) -> bool:
        """End the text before the first stop string found in it; the part before `searched_up_to` was searched already."""
        hits = [i for s in self.stops if (i := self.text.find(s, max(0, searched_up_to - len(s) + 1))) >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.finish_reason = "stop"
        if self.logprobs is not None:  # drop the tokens that begin at or after the cut
            keep = sum(1 for o in self.logprobs["text_offset"] if o < len(self.text))
            for values in self.logprobs.values():
                del values[keep:]
        return True

    def take_text(self) -> str:
        """The text not streamed yet that is safe to send (none that could still become a stop string)."""
        end = len(self.text) if self.finish_reason is not None else max(self.sent, len(self.text) - self.holdback)
        piece = self.text[self.sent : end]
        self.sent = end
        return piece

    def take_logprobs(self) -> dict | None:
        if self.logprobs is None:
            return None
        start, self.logprobs_sent = self.logprobs_sent, len(self.logprobs["tokens"])
        return {key: values[start:] for key, values in self.logprobs.items()}


class Completion:
    """One /v1/completions call in flight: its choices in the engine and the events they send back.

    The engine calls `on_event` from its own thread; the event is queued onto the event loop, and
    applied there by `next_change`, so choices are only ever touched by the loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, choices: list[Choice], state: ServerState) -> None:
        self.loop = loop
        self.choices = choices
        self.state = state
        self.events: asyncio.Queue[tuple[Choice, TokenEvent]] = asyncio.Queue()

    def submit(self, engine: BatchEngine, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        """Hand every choice to the engine; if it is full, none of them (503)."""
        try:
            for choice, ids, p in zip(self.choices, prompts, params):
                choice.request = engine.submit(ids, p, lambda event, c=choice: self.on_event(c, event))
        except QueueFull:
            self.cancel()
            if engine.error is not None:  # not busy but broken: retrying will not help
                raise APIError(500, "the model failed earlier and the server cannot generate: restart it",
                               type="server_error", code="engine_failed") from None  # fmt: skip
            stats = engine.stats
            raise APIError(
                503,
                f"the server is busy ({stats['running']} requests decoding, {stats['queued']} waiting): retry shortly",
                type="server_error",
                code="overloaded",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None

    def on_event(self, choice: Choice, event: TokenEvent) -> None:  # on the engine's thread
        if event.token is not None:
            self.state.tokens_generated += 1  # written by this one thread only
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is exiting
            self.loop.call_soon_threadsafe(self.events.put_nowait, (choice, event))

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    async def next_change(self, timeout: float | None = None) -> Choice | None:
        """Wait for the next event (up to `timeout` seconds) and apply it: the choice it changed, None if none came."""
        try:
            choice, event = await asyncio.wait_for(self.events.get(), timeout)
        except TimeoutError:
            return None
        if choice.add(event):
            choice.request.cancel()
        return choice

    def cancel(self) -> None:
        """Cancel every choice still decoding: the engine frees its row at the next step."""
        for choice in self.choices:
            if choice.request is not None and choice.finish_reason is None:
                choice.request.cancel()


# --- the app -------------------------------------------------------------------------------------


class ServerState:
    """What the routes share: the engine, the model's facts, and the completions in flight."""

    def __init__(self, engine: BatchEngine, config: ServeConfig, model_id: str, model_config) -> None:
        self.engine = engine
        self.config = config
        self.model_id = model_id
        self.context = model_config.max_seq_len
        self.vocab_size = model_config.vocab_size
        self.created = int(time.time())
        self.in_flight: set[Completion] = set()
        self.tokens_generated = 0  # by the engine since the start, for every request
        self.draining = False

    def start_draining(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop taking requests; let those in flight finish for drain_seconds, then cut them short."""
        if self.draining:
            return
        self.draining = True
        loop.call_later(self.config.drain_seconds, self.cut_in_flight)

    def cut_in_flight(self) -> None:
        for completion in list(self.in_flight):
            completion.cancel()


class Guard:
    """Refuse a huge body before reading it; answer a bug of ours with a 500 error object, not a traceback.

    Plain ASGI, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware hides the client's
    disconnection from `Request.is_disconnected()`, which a non-streaming request relies on."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if b"transfer-encoding" in headers and b"content-length" not in headers:  # a body of no stated size
            response = APIError(411, "send the request body with a Content-Length header", code="length_required")
            return await response.response()(scope, receive, send)
        length = headers.get(b"content-length", b"0").decode("latin-1")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            response = APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes").response()
            return await response(scope, receive, send)
        started = False

        async def send_noting_start(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except Exception as e:
            print(f"error: {scope['method']} {scope['path']}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            if not started:  # else the answer is under way: all there is to do is end it, which the server does
                await APIError(500, "internal server error", type="server_error").response()(scope, receive, send)


def create_app(engine: BatchEngine, config: ServeConfig, model_id: str, model_config) -> FastAPI:
    state = ServerState(engine, config, model_id, model_config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.shutdown(drain=False)  # the streams have ended (or been cut) by now: nothing is left to drain
        engine.join(timeout=10)

    app = FastAPI(title="ExampleGPT", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, code=kind, headers=exc.headers).response()

    app.add_middleware(Guard)

    def check_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise APIError(
                401,
                "missing or incorrect API key: send it as 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    authorized = [Depends(check_api_key)]

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(resources.files("examplegpt").joinpath("playground.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        stats = engine.stats
        return {
            "status": "error" if engine.error is not None else "draining" if state.draining else "ok",
            "model": model_id,
            "running": stats["running"],
            "queued": stats["queued"],
            "tokens_generated": state.tokens_generated,
            "max_batch": config.max_batch,
            "max_queue": config.max_queue,
        }

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": state.created, "owned_by": "examplegpt",
                "max_model_len": state.context}  # fmt: skip

    @app.get("/v1/models", dependencies=authorized)
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=authorized)
    async def get_model(name: str) -> dict:
        if name != model_id:
            raise APIError(
                404, f"no model '{name}': this server serves '{model_id}'", param="model", code="model_not_found"
            )
        return model_card()

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions() -> None:
        raise APIError(
            404,
            "this server serves a GPT-2 base model, which is not trained to chat: "
            "use POST /v1/completions with a prompt (client.completions.create)",
            code="unsupported_endpoint",
        )

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: CompletionRequest, request: Request):
        if state.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})  # fmt: skip
        body.refuse_unsupported()
        stops = body.stops()
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens > config.max_tokens_limit:
            raise APIError(400, f"max_tokens: at most {config.max_tokens_limit} on this server, got {max_tokens}",
                           param="max_tokens", code="invalid_value")  # fmt: skip
        prompts = prompt_token_lists(body.prompt, state.vocab_size)
        capacity = config.max_batch + config.max_queue
        if len(prompts) * body.n > capacity:
            raise APIError(
                400,
                f"n: {len(prompts)} prompt(s) x n={body.n} is {len(prompts) * body.n} completions; this server takes "
                f"at most {capacity} at once (max_batch + max_queue)",
                param="n",
                code="invalid_value",
            )
        # the engine keeps the last (context - 1) tokens of a longer prompt, as `generate` does
        prompts = [ids[-(state.context - 1) :] for ids in prompts]
        choices, choice_prompts, params = [], [], []
        for i, ids in enumerate(prompts):
            for j in range(body.n):
                choices.append(Choice(i * body.n + j, stops, body.logprobs, body.ignore_eos))
                choice_prompts.append(ids)
                params.append(sampling_params(body, max_tokens, j))
        completion = Completion(asyncio.get_running_loop(), choices, state)
        completion.submit(engine, choice_prompts, params)
        state.in_flight.add(completion)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}  # fmt: skip
        usage_of = lambda: usage(prompts, choices)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = stream_events(completion, state, head, usage_of if include_usage else None)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        try:
            checked = time.monotonic()
            while not completion.done:
                await completion.next_change(timeout=DISCONNECT_CHECK_SECONDS)
                # a client that left is noticed within DISCONNECT_CHECK_SECONDS, and its rows freed; checked by the
                # clock, not only when no event comes, since tokens keep coming for as long as it decodes
                if time.monotonic() - checked >= DISCONNECT_CHECK_SECONDS:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return JSONResponse({})
        finally:
            completion.cancel()
            state.in_flight.discard(completion)
        if any(c.finish_reason == "error" for c in choices):
            raise APIError(500, "the model failed while generating", type="server_error")
        body_choices = [
            {"text": c.text, "index": c.index, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
            for c in choices
        ]
        return {**head, "choices": body_choices, "usage": usage_of()}

    return app


def sampling_params(body: CompletionRequest, max_tokens: int, j: int) -> SamplingParams:
    """The engine's settings for choice j of a request; with a seed, choice j draws from seed + j."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        seed=None if body.seed is None else (body.seed + j) % 2**63,
        stop_at_eos=not body.ignore_eos,
        logprobs=body.logprobs,
    )


def usage(prompts: list[list[int]], choices: list[Choice]) -> dict:
    prompt_tokens = sum(len(ids) for ids in prompts)
    completion_tokens = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(completion: Completion, state: ServerState, head: dict, usage_of) -> AsyncIterator[str]:
    """Server-sent events: a chunk per choice as its text grows, its finish_reason on its last; then [DONE].

    A client that disconnects cancels this generator (Starlette watches the connection), and the
    `finally` cancels the choices still decoding.
    """
    try:
        while not completion.done:
            choice = await completion.next_change()
            text, logprobs = choice.take_text(), choice.take_logprobs()
            if choice.finish_reason == "error":
                raise RuntimeError("the engine failed")
            finishing = choice.finish_reason is not None and not choice.finish_sent
            if text or finishing or (logprobs and logprobs["tokens"]):
                choice.finish_sent = choice.finish_reason is not None
                part = {
                    "text": text,
                    "index": choice.index,
                    "logprobs": logprobs,
                    "finish_reason": choice.finish_reason,
                }
                yield sse({**head, "choices": [part]})
        if usage_of is not None:
            yield sse({**head, "choices": [], "usage": usage_of()})
        yield sse("[DONE]")
    except Exception as e:  # a failure of ours: the client gets an error event, not a cut stream
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        yield sse(APIError(500, "the server failed while generating", type="server_error").body())
        yield sse("[DONE]")
    finally:
        completion.cancel()
        state.in_flight.discard(completion)


# --- the command ---------------------------------------------------------------------------------


class GracefulServer(uvicorn.Server):
    """uvicorn's server that tells the app when SIGTERM or SIGINT arrives (so it drains), and exits
    with status 0 after a clean shutdown, where uvicorn itself would re-raise the signal once stopped."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # connections from now on wait in the backlog until uvicorn accepts them
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve_command(cfg: ServeConfig) -> int:
    from .weights import load_model

    if cfg.api_key is None and os.environ.get("EXAMPLEGPT_API_KEY"):  # kept off the command line, where `ps` shows it
        cfg = dataclasses.replace(cfg, api_key=os.environ["EXAMPLEGPT_API_KEY"])
    device = pick_device(cfg.device)
    model = load_model(cfg.checkpoint)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model_id = cfg.model_name or Path(cfg.checkpoint.rstrip("/")).name
    sock = listen(cfg.host, cfg.port)
    engine = BatchEngine(model, max_batch=cfg.max_batch, max_queue=cfg.max_queue)
    app = create_app(engine, cfg, model_id, model.config)
    state: ServerState = app.state.server

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=None)
        server = GracefulServer(config, on_exit=lambda: loop.call_soon_threadsafe(state.start_draining, loop))
        await server.serve(sockets=[sock])

    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    c = model.config
    print(f"serving {model_id} ({c.num_layers} layers x {c.d_model}, context {c.max_seq_len}, {device}) "
          f"on http://{shown}:{port}  (playground: /, API: /v1, Ctrl+C to stop)", flush=True)  # fmt: skip
    # the engine runs the model as it is: on CPU, packed weights for the whole run
    with fast_cpu_inference(model) if cfg.fast_cpu and device.type == "cpu" else contextlib.nullcontext():
        asyncio.run(serve())
    print("stopped", flush=True)
    return 0
