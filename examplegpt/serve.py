"""`examplegpt serve`: an OpenAI-compatible completions server over the continuous-batching engine, and a playground.

A request travels: parse (`CompletionRequest`, made from sampling.SamplingParams, and `parse_request`)
-> submit to the engine (`Completion`: each choice of each prompt is one engine request) -> stream
(`stream_events`: server-sent events in OpenAI's format ending with `data: [DONE]`) or answer
(`answer`: one JSON object). The HTTP side (FastAPI on uvicorn) runs on one asyncio event loop on a
thread of its own; the model runs on the main thread (`batching.BatchEngine`, "Which thread", says
why), which calls back with each new token; the callback only hands the event to the event loop,
where `text.CompletionText` decodes it and looks for stop strings.
Failures are answered with OpenAI's error object (`http_errors.py`); the schema is at /openapi.json.
"""

import asyncio
import contextlib
import dataclasses
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
import typing
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Annotated, Literal

import anyio
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException

from .batching import BatchEngine, QueueFull, TokenEvent
from .config import ServeConfig, field_docs
from .cpu_inference import fast_cpu_inference, packing_summary
from .device import inference_precision, pick_device, prepare_for_inference
from .errors import UserError
from .http_errors import EXPECTED, RETRY_AFTER_SECONDS, APIError, Guard, error_responses, validation_error
from .sampling import TOKEN_SETTINGS, SamplingParams, seed_of_sample
from .text import CompletionText, crop_prompt
from .tokenizer import EOT_ID, encode, get_tokenizer

MAX_STOPS = 4  # OpenAI's limit on stop strings
# OpenAI's limits that are narrower than SamplingParams' own
API_LIMITS = {"temperature": {"le": 2}, "logprobs": {"le": 5}}
DISCONNECT_CHECK_SECONDS = 0.25  # how often a non-streaming request looks for its client having left


# --- 1. parse: the request body ---------------------------------------------------------------------


def integral(value: object) -> object:
    """JSON Schema's integers include 2.0: let it be 2 (strict pydantic would refuse it), and nothing else."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**limits: int) -> object:
    """An integer field within `limits` (pydantic's ge, gt, le, lt) that takes 2.0 as 2."""
    return Annotated[int, Field(**limits), BeforeValidator(integral)]


def neutral(value: object) -> Callable[[object], object]:
    def check(given: object) -> object:
        if given != value:
            raise ValueError(f"only {json.dumps(value)} is supported")
        return given

    return check


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class RequestBase(BaseModel):
    """OpenAI's fields of POST /v1/completions that are not sampling settings."""

    # Python's JSON reader takes Infinity and NaN, which no setting's range admits (sampling.out_of_range)
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="Keep generating past <|endoftext|> (as `generate --ignore-eos`).")
    # OpenAI fields that ExampleGPT does not implement: accepted only at their neutral value.
    echo: Annotated[bool, AfterValidator(neutral(False)), Field(json_schema_extra={"const": False})] = False
    best_of: integer(ge=1, le=1) | None = None
    frequency_penalty: Annotated[float, Field(ge=0, le=0)] = 0.0
    presence_penalty: Annotated[float, Field(ge=0, le=0)] = 0.0
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None
    suffix: None = None


def sampling_fields(max_tokens_limit: int) -> dict[str, tuple]:
    """The body's fields made from SamplingParams: its type, default, range and help, with OpenAI's narrower
    limits, and the server's on max_tokens (its default, OpenAI's 16, is held to it as well)."""
    docs, hints = field_docs(SamplingParams), typing.get_type_hints(SamplingParams)
    limits = {**API_LIMITS, "max_tokens": {"le": max_tokens_limit}}
    fields = {}
    for f in dataclasses.fields(SamplingParams):
        if f.name not in (*TOKEN_SETTINGS, "max_tokens", "logprobs"):
            continue
        kinds = [k for k in typing.get_args(hints[f.name]) if k is not type(None)] or [hints[f.name]]
        bounds = {**f.metadata.get("range", {}), **limits.get(f.name, {})}
        constrained = integer(**bounds) if kinds[0] is int else Annotated[kinds[0], Field(**bounds)]
        optional = len(kinds) < len(typing.get_args(hints[f.name])) or f.name == "max_tokens"  # null: the default
        default = min(f.default, max_tokens_limit) if f.name == "max_tokens" else f.default
        fields[f.name] = (constrained | None if optional else constrained, Field(default, description=docs[f.name]))
    return fields


def request_model(config: ServeConfig, vocab_size: int, capacity: int) -> type[BaseModel]:
    """The body of POST /v1/completions on this server: its limits (max_tokens, n, token ids) are in the schema."""
    token = integer(ge=0, lt=vocab_size)
    prompts = Field(min_length=1)
    prompt = (
        str
        | Annotated[list[str], prompts]
        | Annotated[list[token], Field(min_length=1)]
        | Annotated[list[list[token]], prompts]
    )
    stop = Annotated[str, Field(min_length=1)]
    n_help = f"Completions of each prompt; prompts x n at most {capacity} (max_batch + max_queue)."
    return create_model(
        "CompletionRequest",
        __base__=RequestBase,
        __doc__="The body of POST /v1/completions: OpenAI's fields, and ExampleGPT's sampling extras.",
        prompt=(prompt, Field(description=f"What to continue: {EXPECTED['prompt']}.")),
        n=(integer(ge=1, le=capacity), Field(1, description=n_help)),
        stop=(
            stop | Annotated[list[stop], Field(max_length=MAX_STOPS)] | None,
            Field(None, description=f"Text that ends a choice: {EXPECTED['stop']} (at most {MAX_STOPS})."),
        ),
        **sampling_fields(config.max_tokens_limit),
    )


def parse_request(body: BaseModel, state: "ServerState") -> tuple[list[list[int]], list[SamplingParams], list[str]]:
    """The prompts (token ids, cropped to the context) and each choice's engine settings, prompt-major."""
    if isinstance(body.prompt, str):
        prompts = [encode(body.prompt)]
    elif isinstance(body.prompt[0], str):
        prompts = [encode(p) for p in body.prompt]
    elif isinstance(body.prompt[0], int):
        prompts = [list(body.prompt)]
    else:
        prompts = [list(p) for p in body.prompt]
    # an empty prompt starts from <|endoftext|>, GPT-2's document start; a long one keeps its last tokens
    prompts = [crop_prompt(ids or [EOT_ID], state.context) for ids in prompts]
    capacity = state.capacity
    if len(prompts) * body.n > capacity:
        raise APIError(400, f"n: {len(prompts)} prompt(s) x n={body.n} is {len(prompts) * body.n} completions; this "
                       f"server takes at most {capacity} at once (max_batch + max_queue)", param="n", code="invalid_value")  # fmt: skip
    settings = {name: getattr(body, name) for name in TOKEN_SETTINGS}
    params = [
        SamplingParams(
            **{**settings, "seed": None if body.seed is None else seed_of_sample(body.seed, j)},
            max_tokens=type(body).model_fields["max_tokens"].default if body.max_tokens is None else body.max_tokens,
            stop_at_eos=not body.ignore_eos,
            logprobs=body.logprobs,
        )
        for _ in prompts
        for j in range(body.n)
    ]
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return prompts, params, stops


# --- 2. submit to the engine ----------------------------------------------------------------------------


@dataclasses.dataclass
class Choice:
    """One completion of one prompt as it arrives, and what has been sent of it."""

    index: int
    text: CompletionText
    eos_is_text: bool  # else <|endoftext|> ends the choice and is not part of its text
    finish_reason: str | None = None
    finish_sent: bool = False  # streaming: the chunk with finish_reason has gone out
    request: object = None  # the engine's Request

    def add(self, event: TokenEvent) -> bool:
        """Take one event from the engine; True when a stop string ended this choice (its request should be cancelled)."""
        if self.finish_reason is not None:  # cut at a stop string: what the engine still sends is not wanted
            return False
        if event.token is not None and (event.token != EOT_ID or self.eos_is_text):
            if self.text.push(event.token, event.logprob, event.top_logprobs):
                self.finish_reason = "stop"
                return True
        if event.finish_reason is not None:
            self.text.finish()
            self.finish_reason = "stop" if self.text.stopped else event.finish_reason
        return False

    def logprobs(self) -> dict | None:
        return None if self.text.logprobs is None else self.text.logprobs.lists


class Completion:
    """One /v1/completions call in flight: its choices in the engine and the events they send back.

    The engine calls `on_event` from its own thread; the event is queued onto the event loop, and
    applied there by `next_change`, so choices are only ever touched by the loop.
    """

    def __init__(
        self, prompts: list[list[int]], params: list[SamplingParams], stops: list[str], state: "ServerState"
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.state = state
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        self.prompts = [ids for ids in prompts for _ in range(len(params) // len(prompts))]  # one per choice
        self.params = params
        self.choices = [
            Choice(i, CompletionText(stops, logprobs=p.logprobs is not None), eos_is_text=not p.stop_at_eos)
            for i, p in enumerate(params)
        ]
        self.events: asyncio.Queue[tuple[Choice, TokenEvent]] = asyncio.Queue()

    def submit(self, engine: BatchEngine) -> None:
        """Hand every choice to the engine; if it is full, none of them (503)."""
        try:
            for choice, ids, p in zip(self.choices, self.prompts, self.params):
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
        self.state.in_flight.add(self)

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
        """Cancel every choice still decoding (the engine frees its row at the next step); the call is over."""
        for choice in self.choices:
            if choice.request is not None and choice.finish_reason is None:
                choice.request.cancel()
        self.state.in_flight.discard(self)

    def usage(self) -> dict:
        prompt_tokens = self.prompt_tokens
        completion_tokens = sum(len(c.text.tokens) for c in self.choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


# --- 3. stream or answer -------------------------------------------------------------------------------


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(completion: Completion, head: dict, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per choice as its text grows, its finish_reason on its last; then [DONE].

    A client that disconnects cancels this generator (Starlette watches the connection), and the
    `finally` cancels the choices still decoding.
    """
    try:
        while not completion.done:
            choice = await completion.next_change()
            if choice.finish_reason == "error":
                raise RuntimeError("the engine failed")
            text = choice.text.take()
            logprobs = None if choice.text.logprobs is None else choice.text.logprobs.take()
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
        if include_usage:
            yield sse({**head, "choices": [], "usage": completion.usage()})
        yield sse("[DONE]")
    except Exception as e:  # a failure of ours: the client gets an error event, not a cut stream
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        yield sse(APIError(500, "the server failed while generating", type="server_error").body())
        yield sse("[DONE]")
    finally:
        completion.cancel()


async def answer(completion: Completion, head: dict, request: Request) -> dict | JSONResponse:
    """The whole completion as one JSON object, once every choice has finished."""
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
    if any(c.finish_reason == "error" for c in completion.choices):
        raise APIError(500, "the model failed while generating", type="server_error")
    choices = [
        {"text": c.text.text, "index": c.index, "logprobs": c.logprobs(), "finish_reason": c.finish_reason}
        for c in completion.choices
    ]
    return {**head, "choices": choices, "usage": completion.usage()}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class LogprobsBody(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: LogprobsBody | None
    finish_reason: Literal["stop", "length", "cancelled"] | None


class CompletionBody(BaseModel):
    """The answer: one JSON object, or (`stream`) a server-sent event of this shape per piece of text."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# each server-sent event: `data: ` and a CompletionBody (or, should the model fail, an ErrorResponse) as JSON,
# the last one `data: [DONE]`
EVENT_DATA = {"anyOf": [
    {"const": "[DONE]"},
    {"contentMediaType": "application/json", "contentSchema": {"anyOf": [{"$ref": "#/components/schemas/CompletionBody"},
                                                                      {"$ref": "#/components/schemas/ErrorResponse"}]}},
]}  # fmt: skip
STREAM = {"text/event-stream": {"schema": {"type": "object", "properties": {"data": EVENT_DATA}, "required": ["data"]}}}


# --- the app ------------------------------------------------------------------------------------------


class ServerState:
    """What the routes share: the engine, the model's facts, and the completions in flight."""

    def __init__(self, engine: BatchEngine, config: ServeConfig, model_id: str, model_config) -> None:
        self.engine = engine
        self.config = config
        self.model_id = model_id
        self.context = model_config.max_seq_len
        self.vocab_size = model_config.vocab_size
        self.capacity = engine.max_batch + engine.max_queue  # completions the engine holds at once
        self.created = int(time.time())
        self.in_flight: set[Completion] = set()
        self.tokens_generated = 0  # by the engine since the start, for every request
        self.draining = False

    def start_draining(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop taking requests; let those in flight finish for drain_seconds, then cut them short.
        Called again (a second SIGTERM or Ctrl+C), cut them short now."""
        if self.draining:
            self.cut_in_flight()
            return
        self.draining = True
        loop.call_later(self.config.drain_seconds, self.cut_in_flight)

    def cut_in_flight(self) -> None:
        for completion in list(self.in_flight):
            completion.cancel()


class Health(BaseModel):
    status: Literal["ok", "draining", "error"]
    model: str
    running: int
    queued: int
    tokens_generated: int
    max_batch: int
    max_queue: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    precision: str  # the weights' precision as served: fp32, bf16, fp16 or int8


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


def create_app(
    engine: BatchEngine, config: ServeConfig, model_id: str, model_config, start_engine: bool = True
) -> FastAPI:
    """The app; its lifespan starts the engine on a thread of its own (unless `start_engine` is False: the
    caller runs it) and shuts it down."""
    state = ServerState(engine, config, model_id, model_config)
    CompletionRequest = request_model(config, state.vocab_size, state.capacity)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start_engine:
            engine.start()
        # What the first request would otherwise pay once (about 0.4 s on a small CPU): the tokenizer's
        # tables, and the backend that anyio imports when Starlette first streams
        get_tokenizer()
        async with anyio.create_task_group():
            pass
        yield
        engine.shutdown(drain=False)  # the streams have ended (or been cut) by now: nothing is left to drain
        engine.join(timeout=10)

    app = FastAPI(title="ExampleGPT", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    app.openapi = lambda: openapi_schema(app)
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_middleware(Guard)
    authorized, key_errors = api_key_check(config.api_key)

    @app.post("/v1/completions", dependencies=authorized,
              responses={200: {"model": CompletionBody, "content": STREAM}, **error_responses(400, *key_errors, 411, 413, 500, 503)})  # fmt: skip
    async def completions(body: CompletionRequest, request: Request):
        if state.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})  # fmt: skip
        completion = Completion(*parse_request(body, state), state)
        completion.submit(engine)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}  # fmt: skip
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(
                stream_events(completion, head, include_usage), media_type="text/event-stream", headers=headers
            )
        return await answer(completion, head, request)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(resources.files("examplegpt").joinpath("playground.html").read_text(encoding="utf-8"))

    @app.get("/health", response_model=Health)
    async def health() -> dict:
        stats = engine.stats
        status = "error" if engine.error is not None else "draining" if state.draining else "ok"
        return {"status": status, "model": model_id, "running": stats["running"], "queued": stats["queued"],
                "tokens_generated": state.tokens_generated, "max_batch": config.max_batch, "max_queue": config.max_queue}  # fmt: skip

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": state.created, "owned_by": "examplegpt",
                "max_model_len": state.context, "precision": config.precision}  # fmt: skip

    @app.get("/v1/models", dependencies=authorized, response_model=ModelList, responses=error_responses(*key_errors))
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=authorized, response_model=ModelCard,
             responses=error_responses(*key_errors, 404))  # fmt: skip
    async def get_model(name: Annotated[str, PathParam(examples=[model_id])]) -> dict:
        if name != model_id:
            raise APIError(
                404, f"no model '{name}': this server serves '{model_id}'", param="model", code="model_not_found"
            )
        return model_card()

    @app.post("/v1/chat/completions", dependencies=authorized, responses=error_responses(*key_errors, 404, 411, 413))
    async def chat_completions() -> None:
        raise APIError(404, "this server serves a GPT-2 base model, which is not trained to chat: "
                       "use POST /v1/completions with a prompt (client.completions.create)", code="unsupported_endpoint")  # fmt: skip

    return app


def api_key_check(api_key: str | None) -> tuple[list, tuple[int, ...]]:
    """The dependency that checks the API key on /v1 routes (none without a key), and the status it may answer."""
    if api_key is None:
        return [], ()
    bearer = HTTPBearer(auto_error=False, description="The server's --api-key")

    def check_api_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if credentials is None or not hmac.compare_digest(credentials.credentials.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    return [Depends(check_api_key)], (401,)


async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(exc, request.headers.get("content-type")).response()


async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (no such route, a method the route does not take, a body FastAPI could not even
    decode as text) as OpenAI's error object."""
    if exc.status_code == 400:  # malformed JSON comes as a validation error: this is a body the parser refused
        return APIError(
            400,
            "the request body could not be read as JSON: send UTF-8 text, with no number of more than 4,300 "
            "digits and no nesting deeper than about 1,000 levels",
            code="invalid_json",
        ).response()
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(
        exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=kind, headers=exc.headers
    ).response()


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema of the app, less the 422 answer it documents for every body: this server answers 400."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = exact_bounds(schema)
    return app.openapi_schema


def exact_bounds(schema: object) -> object:
    """The schema with whole-number bounds as integers: FastAPI's schema model stores them as floats, and a
    float bound such as 2**63 lets a client's integer past it (2**63 + 190 rounds to the same float) look valid."""
    if isinstance(schema, dict):
        return {
            key: int(value)
            if key in BOUNDS and isinstance(value, float) and value.is_integer()
            else exact_bounds(value)
            for key, value in schema.items()
        }
    return [exact_bounds(value) for value in schema] if isinstance(schema, list) else schema


BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


# --- the command ---------------------------------------------------------------------------------


class GracefulServer(uvicorn.Server):
    """uvicorn's server that tells the app when SIGTERM or SIGINT arrives (so it drains, or on a later
    signal cuts the drain short), and exits with status 0 after a clean shutdown, where uvicorn itself
    would re-raise the signal once stopped."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.on_exit()
        # uvicorn's own second Ctrl+C forces the exit, cancelling streams mid-write (tracebacks, no
        # `data: [DONE]`): a later signal of either kind only has the app cut what is in flight itself
        if not self.should_exit:
            super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
            yield
            return
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
    cfg = dataclasses.replace(cfg, precision=inference_precision(cfg.precision, device))  # what /v1/models reports
    model = prepare_for_inference(load_model(cfg.checkpoint), cfg.precision, device)
    model_id = cfg.model_name or Path(cfg.checkpoint.rstrip("/")).name
    sock = listen(cfg.host, cfg.port)
    engine = BatchEngine(model, max_batch=cfg.max_batch, max_queue=cfg.max_queue)
    app = create_app(engine, cfg, model_id, model.config, start_engine=False)
    state: ServerState = app.state.server
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=None)
    # uvicorn's choice of event loop (uvloop where installed, as `uvicorn` itself runs): each streamed token
    # costs the loop a wake-up and a socket write, CPU that a small machine takes from the model's cores
    runner = asyncio.Runner(loop_factory=config.get_loop_factory())
    loop = runner.get_loop()

    def stop_taking_requests() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the HTTP server has stopped already
            loop.call_soon_threadsafe(state.start_draining, loop)

    server = GracefulServer(config, on_exit=stop_taking_requests)

    def serve_http() -> None:
        with runner:
            runner.run(server.serve(sockets=[sock]))

    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    c = model.config
    # The model runs on this (main) thread only: loaded, packed, warmed up and decoding (batching.py says why).
    # long_run: a server copies a chosen layout's weights in its warm-up, not mid-request once they have paid
    with (
        fast_cpu_inference(model, long_run=True) if cfg.fast_cpu and device.type == "cpu" else contextlib.nullcontext()
    ):
        engine.warm_up()
        packing = f", {packing_summary()}" if cfg.fast_cpu and device.type == "cpu" else ""
        print(f"serving {model_id} ({c.num_layers} layers x {c.d_model}, context {c.max_seq_len}, {device}, {cfg.precision}{packing}) "
              f"on http://{shown}:{port}  (playground: /, API: /v1, Ctrl+C to stop)", flush=True)  # fmt: skip
        with server.capture_signals():
            engine.run_beside(serve_http)
    print("stopped", flush=True)
    return 0
