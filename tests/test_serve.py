"""`examplegpt serve`, driven over HTTP the way its users drive it.

Each server is the real command, started as a subprocess on a free localhost port with a tiny model
file made here, and stopped here. Clients are the official `openai` package and raw HTTP (httpx).
Every wait is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from examplegpt.generate import generate
from examplegpt.tokenizer import EOT_ID, decode, encode
from examplegpt.weights import load_model, save_model_file

from .conftest import REPO, assert_one_line_error, peaked_model, run_cli

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.xdist_group("serve")  # under pytest-xdist --dist loadgroup: one worker, one of each server

CONTEXT = 256  # the test model's context: long requests run a few hundred steps
START_TIMEOUT = 120  # seconds for a server to load the model and listen (2 busy cores)


class ServerProcess:
    """`python -m examplegpt serve` in a subprocess: its URL once it listens, and a clean stop."""

    def __init__(self, model_file: Path, *flags: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        command = [sys.executable, "-m", "examplegpt", "serve", "-c", str(model_file), "--port", "0", *flags]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        reader = threading.Thread(target=self._read_stdout, daemon=True)
        reader.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.lines and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.05)
        if not self.lines:
            self.stop()
            pytest.fail(f"the server did not start: {self.proc.stderr.read()[-2000:]}")
        address = next(word for word in self.lines[0].split() if word.startswith("http://"))
        self.url = address.rstrip("/")

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def client(self, api_key: str = "none", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_for_health(self, condition, timeout: float = 30) -> dict:
        """Poll /health until condition(health) holds (at most `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.health()
            if condition(health):
                return health
            time.sleep(0.02)
        pytest.fail(f"/health never reached the expected state; last: {health}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "tiny.pt"
    save_model_file(peaked_model(CONTEXT), path)
    return path


@pytest.fixture(scope="module")
def model(model_file):
    return load_model(str(model_file)).eval()


@pytest.fixture(scope="module")
def server(model_file):
    server = ServerProcess(model_file, "--max-batch", "8", "--max-queue", "8")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small_server(model_file):
    """One row and one place in the queue, and an API key."""
    server = ServerProcess(model_file, "--max-batch", "1", "--max-queue", "1", "--api-key", "sesame")
    yield server
    server.stop()


def greedy_reference(model, ids: list[int], max_tokens: int) -> list[int]:
    """What `generate` gives for this prompt alone: the new tokens, up to (not including) <|endoftext|>."""
    out = generate(model, torch.tensor([ids]), max_tokens, temperature=0, eos_id=EOT_ID)[0, len(ids) :].tolist()
    return out[: out.index(EOT_ID)] if EOT_ID in out else out


def sse_events(response: httpx.Response):
    """The data of each server-sent event of a streamed response, until [DONE] (which is yielded too)."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data
            if data == "[DONE]":
                return


def long_stream_body(max_tokens: int = CONTEXT - 8) -> dict:
    """A request that runs a few hundred steps (eos ignored, so it runs all of them)."""
    return {"prompt": "The", "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "temperature": 0}


# --- the API through the official client -----------------------------------------------------------


def test_completion_greedy_equals_generate_and_streams_the_same_text(server, model):
    client = server.client()
    prompt = "The history of the city"
    ids = encode(prompt)
    expected = greedy_reference(model, ids, 20)
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].index == 0
    assert reply.choices[0].text == decode(expected)
    assert reply.choices[0].finish_reason == ("length" if len(expected) == 20 else "stop")
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(expected)

    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reply.choices[0].text
    assert len([c for c in chunks if c.choices]) > 1  # it did arrive in pieces
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [reply.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == len(expected)


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny.pt"]
    assert models.data[0].model_extra["precision"] == "fp32"  # auto on CPU: what the card says is served
    health = server.health()
    assert health["status"] == "ok" and health["max_batch"] == 8 and health["max_queue"] == 8


def test_n_choices_and_seed_reproducibility(server):
    client = server.client()
    ask = dict(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=1.0, n=3)
    first = client.completions.create(seed=7, **ask)
    again = client.completions.create(seed=7, **ask)
    other = client.completions.create(seed=8, **ask)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert texts != [c.text for c in sorted(other.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # the n choices are independent samples, not one copied
    # the same seed streamed gives the same text
    streamed = ["", "", ""]
    for chunk in client.completions.create(seed=7, stream=True, **ask):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == texts


def test_list_of_prompts_orders_choices_prompt_major(server, model):
    client = server.client()
    prompts = ["Alpha beta", "The year was"]
    reply = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0, n=2)
    by_index = {c.index: c.text for c in reply.choices}
    for i, prompt in enumerate(prompts):
        expected = decode(greedy_reference(model, encode(prompt), 6))
        assert by_index[2 * i] == by_index[2 * i + 1] == expected


def test_stop_string_cuts_the_text_before_it(server):
    client = server.client()
    full = client.completions.create(model="tiny", prompt="In the beginning", max_tokens=24, temperature=0)
    text = full.choices[0].text
    assert len(text) > 12
    stop = text[6:9]
    expected = text[: text.find(stop)]
    cut = client.completions.create(model="tiny", prompt="In the beginning", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == expected
    assert cut.choices[0].finish_reason == "stop"
    pieces = client.completions.create(
        model="tiny", prompt="In the beginning", max_tokens=24, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces if c.choices) == expected


def test_concurrent_greedy_requests_each_equal_generate_alone(server, model):
    """Requests of different prompt and output lengths at once: each is token for token `generate`'s."""
    gen = torch.Generator().manual_seed(3)
    cases = [
        (torch.randint(0, 50257, (length,), generator=gen).tolist(), max_tokens)
        for length, max_tokens in [(1, 30), (7, 5), (40, 60), (3, 17), (90, 40), (15, 1), (120, 100)]
    ]
    client = server.client()

    def ask(case):
        ids, max_tokens = case
        reply = client.completions.create(model="tiny", prompt=ids, max_tokens=max_tokens, temperature=0)
        return reply.choices[0].text, reply.usage.completion_tokens

    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(ask, cases))
    for (ids, max_tokens), (text, count) in zip(cases, replies):
        expected = greedy_reference(model, ids, max_tokens)
        assert (text, count) == (decode(expected), len(expected))


def test_a_request_joins_the_running_batch_without_waiting_for_it(server):
    """A short request sent while a long one decodes is answered before the long one ends."""
    finished = {}

    def read_long_stream() -> None:
        with httpx.stream("POST", server.url + "/v1/completions", json=long_stream_body(), timeout=60) as response:
            events = sse_events(response)
            next(events)
            started.set()
            finished["count"] = 1 + sum(1 for _ in events)
        finished["at"] = time.monotonic()

    started = threading.Event()
    reader = threading.Thread(target=read_long_stream)
    reader.start()
    try:
        assert started.wait(timeout=60)
        reply = server.client().completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0)
        short_done = time.monotonic()
    finally:
        reader.join(timeout=120)
    assert reply.usage.completion_tokens == 3
    assert finished["count"] > 200  # the long stream ran to its end
    assert short_done < finished["at"]


def test_logprobs_are_the_models_own(server, model):
    """Each token's logprob, and the top ones, equal log_softmax of the model's logits at that position."""
    ids = encode("The meaning of")
    reply = server.client().completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, logprobs=3)
    logprobs = reply.choices[0].logprobs
    tokens = greedy_reference(model, ids, 6)
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(tokens)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids + tokens]))
    expected = torch.log_softmax(logits[0, len(ids) - 1 : -1].double(), dim=-1)  # (new, V)
    for i, token in enumerate(tokens):
        assert logprobs.token_logprobs[i] == pytest.approx(expected[i, token].item(), abs=1e-3)
        top = expected[i].topk(3)
        assert len(logprobs.top_logprobs[i]) == 3
        assert sorted(logprobs.top_logprobs[i].values(), reverse=True) == pytest.approx(top.values.tolist(), abs=1e-3)
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset[0] == 0


def test_a_prompt_past_the_context_keeps_its_last_tokens(server, model):
    ids = torch.randint(0, 50257, (CONTEXT + 50,), generator=torch.Generator().manual_seed(4)).tolist()
    reply = server.client().completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    kept = ids[-(CONTEXT - 1) :]
    assert reply.usage.prompt_tokens == CONTEXT - 1
    assert reply.choices[0].text == decode(greedy_reference(model, kept, 5))


def test_chat_endpoint_points_to_completions(server):
    with pytest.raises(openai.NotFoundError) as error:
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert "/v1/completions" in error.value.body["message"]


# --- bad input over raw HTTP -------------------------------------------------------------------------

BAD_REQUESTS = [
    ("{not json", None, "invalid_json"),
    ("[1, 2]", None, "invalid_json"),
    ("", None, "invalid_json"),
    ({"max_tokens": 5}, "prompt", "missing_field"),
    ({"prompt": "x", "colour": "red"}, "colour", "unknown_field"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "invalid_value"),
    ({"prompt": "x", "temperature": -1}, "temperature", "invalid_value"),
    ({"prompt": "x", "top_p": 1.5}, "top_p", "invalid_value"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"prompt": "x", "max_tokens": 10**9}, "max_tokens", "invalid_value"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "invalid_value"),
    ({"prompt": "x", "n": 10**6}, "n", "invalid_value"),
    ({"prompt": "x", "n": 0}, "n", "invalid_value"),
    ({"prompt": ["a"] * 20}, "n", "invalid_value"),
    ({"prompt": 5}, "prompt", "invalid_value"),
    ({"prompt": []}, "prompt", "invalid_value"),
    ({"prompt": [1, 50257]}, "prompt", "invalid_value"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"prompt": "x", "stop": ""}, "stop", "invalid_value"),
    ({"prompt": "x", "logprobs": 6}, "logprobs", "invalid_value"),
    ({"prompt": "x", "seed": -1}, "seed", "invalid_value"),
    ({"prompt": "x", "top_k": -1}, "top_k", "invalid_value"),
    ({"prompt": "x", "min_p": 2}, "min_p", "invalid_value"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty", "invalid_value"),
    ({"prompt": "x", "echo": True}, "echo", "unsupported"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "unsupported"),
]


@pytest.mark.parametrize("body, param, code", BAD_REQUESTS, ids=[str(b)[:40] for b, _, _ in BAD_REQUESTS])
def test_bad_requests_get_an_openai_error_object_and_the_server_keeps_serving(server, body, param, code):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(
        server.url + "/v1/completions", content=content, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code
    assert error["message"] and "Traceback" not in response.text
    assert server.health()["status"] == "ok"


def test_unknown_route_and_huge_body(server):
    missing = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    huge = httpx.post(server.url + "/v1/completions", content=b"x" * (9 * 2**20), timeout=30)
    assert huge.status_code == 413 and "larger than" in huge.json()["error"]["message"]
    # a chunked body states no size: it would be read whole, past the limit, before anything could refuse it
    chunks = (b"x" * 2**20 for _ in range(9))
    chunked = httpx.post(server.url + "/v1/completions", content=chunks, timeout=30)
    assert chunked.status_code == 411 and chunked.json()["error"]["code"] == "length_required"
    assert server.health()["status"] == "ok"


@pytest.fixture
def app_client(model):
    """The app in this process: for answers a real server and socket add nothing to."""
    from fastapi.testclient import TestClient

    from examplegpt.batching import BatchEngine
    from examplegpt.config import ServeConfig
    from examplegpt.serve import create_app

    app = create_app(BatchEngine(model, max_batch=2, max_queue=2), ServeConfig(), "tiny", model.config)
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None])
def test_a_json_body_sent_as_another_content_type_is_told_what_to_send(app_client, content_type):
    """curl -d sends a form's Content-Type; the body is JSON all the same, and the answer must not say it is not."""
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps({"prompt": "hi", "max_tokens": 2})
    error = app_client.post("/v1/completions", content=body, headers=headers).json()["error"]
    assert error["code"] == "invalid_content_type"
    assert error["message"].endswith(f"application/json, got {content_type or 'no Content-Type'}")


PROMPT_TYPES = "a string, a list of strings, a list of token ids, or a list of such lists"


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt": 5}, f"prompt: expected {PROMPT_TYPES}, got 5"),
        ({"prompt": [1.5]}, f"prompt: expected {PROMPT_TYPES}, got [1.5]"),
        ({"prompt": "x", "stop": 5}, "stop: expected a string or a list of strings, got 5"),
    ],
)
def test_a_value_of_none_of_a_fields_types_is_told_them_in_words(app_client, body, message):
    response = app_client.post("/v1/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["message"] == message and error["param"] == message.split(":")[0]


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty"])
def test_infinity_is_out_of_every_range(app_client, field):
    """Python's JSON reader takes Infinity; repetition_penalty has no upper bound to stop it."""
    body = f'{{"prompt": "x", "max_tokens": 2, "{field}": Infinity}}'
    response = app_client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field and "finite" in response.json()["error"]["message"]


@pytest.mark.parametrize("stop", ["", [""]])
def test_an_empty_stop_is_told_what_is_wrong_with_it(app_client, stop):
    response = app_client.post("/v1/completions", json={"prompt": "x", "stop": stop})
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("stop: String should have at least 1 character")


@pytest.mark.parametrize(
    "body, words",
    [
        (b'{"prompt": "\xff", "max_tokens": 2}', "UTF-8"),
        # found by an audit: these were told to send UTF-8, which they were
        (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "4,300 digits"),
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nesting"),
    ],
)
def test_a_body_the_json_parser_refuses_is_told_why(app_client, body, words):
    response = app_client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json" and words in response.json()["error"]["message"]


def test_a_wrong_method_and_a_body_too_large_carry_a_code_like_every_error(app_client):
    from examplegpt.http_errors import MAX_BODY_BYTES

    wrong_method = app_client.get("/v1/completions")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    huge = app_client.post("/v1/completions", content=b"x" * (MAX_BODY_BYTES + 1))
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"


def test_a_request_that_comes_while_draining_is_told_so(app_client):
    """What serve.md says of the moment between SIGTERM and the port closing."""
    app_client.app.state.server.draining = True
    assert app_client.get("/health").json()["status"] == "draining"
    refused = app_client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"


# --- disconnects, the bounded queue, the API key -------------------------------------------------------


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    before = server.wait_for_health(lambda h: h["running"] == 0)["tokens_generated"]
    body = long_stream_body(max_tokens=1000)
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        events = sse_events(response)
        next(events)
        assert server.health()["running"] == 1
    # leaving the block closed the connection mid-stream: the row is freed long before its 1000 tokens
    after = server.wait_for_health(lambda h: h["running"] == 0 and h["queued"] == 0)["tokens_generated"]
    assert 1 <= after - before < 500


def test_a_client_that_leaves_a_non_streaming_request_frees_its_row(server):
    """Tokens keep coming while it decodes: the server must still notice the client has gone."""
    before = server.wait_for_health(lambda h: h["running"] == 0)["tokens_generated"]
    body = {**long_stream_body(max_tokens=4000), "stream": False}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.0)  # gives up and closes the connection
    after = server.wait_for_health(lambda h: h["running"] == 0 and h["queued"] == 0)["tokens_generated"]
    assert 1 <= after - before < 2000


def test_past_the_queue_the_server_answers_503_with_retry_after(small_server):
    headers = {"Authorization": "Bearer sesame"}
    url = small_server.url + "/v1/completions"
    with httpx.Client(headers=headers, timeout=60) as first, httpx.Client(headers=headers, timeout=60) as second:
        with first.stream("POST", url, json=long_stream_body()) as running:
            events = sse_events(running)  # (a generator dropped would close the connection)
            next(events)
            with second.stream("POST", url, json=long_stream_body()) as waiting:
                small_server.wait_for_health(lambda h: h["running"] == 1 and h["queued"] == 1)
                refused = httpx.post(url, json={"prompt": "x", "max_tokens": 2}, headers=headers, timeout=30)
                assert refused.status_code == 503
                assert int(refused.headers["Retry-After"]) >= 1
                assert refused.json()["error"]["code"] == "overloaded"
                with pytest.raises(openai.InternalServerError):  # the client sees it as a 503 too
                    small_server.client("sesame").completions.create(model="m", prompt="x", max_tokens=2)
                assert waiting.status_code == 200
    small_server.wait_for_health(lambda h: h["running"] == 0 and h["queued"] == 0)
    reply = small_server.client("sesame").completions.create(model="m", prompt="x", max_tokens=2)
    assert reply.usage.completion_tokens >= 1  # served again once there is room


def test_api_key_is_required_when_set(small_server):
    with pytest.raises(openai.AuthenticationError):
        small_server.client("wrong").completions.create(model="m", prompt="x", max_tokens=2)
    bare = httpx.post(small_server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(small_server.url + "/v1/models", timeout=10).status_code == 401
    assert small_server.client("sesame").models.list().data[0].id == "tiny.pt"
    assert small_server.health()["status"] == "ok"  # /health and the playground need no key


# --- the command: shutdown and bad flags -------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_ends_streams_in_flight_cleanly_and_exits_0(model_file):
    server = ServerProcess(model_file, "--drain-seconds", "0.2")
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json=long_stream_body(), timeout=60) as response:
            events = sse_events(response)
            next(events)
            server.proc.send_signal(signal.SIGTERM)
            rest = list(events)
        assert rest[-1] == "[DONE]"
        finish = [json.loads(e)["choices"][0]["finish_reason"] for e in rest[:-1]]
        assert finish[-1] in ("cancelled", "length") and all(f is None for f in finish[:-1])
        assert server.proc.wait(timeout=30) == 0
        assert "Traceback" not in server.proc.stderr.read()
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=5)
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_ends_the_drain_at_once_and_streams_still_end_with_done(model_file, sig):
    server = ServerProcess(model_file, "--drain-seconds", "60")
    try:
        body = long_stream_body(max_tokens=4096)  # runs for many seconds, sliding past the context
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
            events = sse_events(response)
            next(events)
            server.proc.send_signal(sig)
            time.sleep(0.5)
            assert server.proc.poll() is None  # draining: the stream goes on
            asked = time.monotonic()
            server.proc.send_signal(sig)
            rest = list(events)
        assert time.monotonic() - asked < 30  # not the 60-second drain
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "cancelled"
        assert server.proc.wait(timeout=30) == 0
        assert "Traceback" not in server.proc.stderr.read()
    finally:
        server.stop()


def test_bad_model_file_and_busy_port_are_one_line_errors(tmp_path, server):
    assert_one_line_error(run_cli("serve", "-c", str(tmp_path / "missing.pt")), "missing.pt")
    port = server.url.rsplit(":", 1)[1]
    model = server.proc.args[server.proc.args.index("-c") + 1]
    assert_one_line_error(run_cli("serve", "-c", model, "--port", port), "cannot listen", port)


# --- the playground in a real browser ------------------------------------------------------------------


def find_browser() -> tuple[str, str] | None:
    browser = next(
        (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def playground(server):
    """A headless chromium on the server's playground page (skips where there is none)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    found = find_browser()
    if found is None:
        pytest.skip("no chromium and chromedriver on this machine (apt-get install chromium chromium-driver)")
    from selenium.common.exceptions import WebDriverException

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800"):
        options.add_argument(flag)
    try:
        browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=found[1]))
    except WebDriverException as e:
        pytest.skip(f"chromium is installed but does not start here: {e.msg or type(e).__name__}")
    try:
        browser.set_page_load_timeout(60)
        browser.get(server.url + "/")
        yield browser
    finally:
        browser.quit()


def test_playground_streams_in_a_real_browser(server, model):
    with playground(server) as browser:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        prompt = "The river ran"
        box = browser.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys(prompt)
        for field, value in (("max_tokens", "40"), ("temperature", "0")):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        # count the page's updates of the output: text streamed in arrives as many of them
        browser.execute_script(
            "window.updates = 0; new MutationObserver(() => window.updates++)"
            ".observe(document.getElementById('output'), {childList: true, subtree: true, characterData: true});"
        )
        browser.find_element(By.ID, "generate").click()
        stats = lambda: browser.find_element(By.ID, "stats").text
        WebDriverWait(browser, 60, poll_frequency=0.05).until(lambda b: "finished" in stats())
        completion = lambda: browser.find_element(By.ID, "completion").text
        expected = decode(greedy_reference(model, encode(prompt), 40))
        # the page shows text as HTML does: runs of whitespace may collapse at the edges
        assert completion().strip() == expected.strip()
        assert browser.execute_script("return window.updates") > 10
        assert "tokens/s" in stats()
        assert browser.find_element(By.ID, "error").text == ""
        screenshot = os.environ.get("EXAMPLEGPT_PLAYGROUND_SCREENSHOT")
        if screenshot:
            browser.save_screenshot(screenshot)


@pytest.mark.slow
def test_playground_says_when_it_was_stopped(server):
    with playground(server) as browser:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        for field, value in (("max_tokens", "4000"), ("temperature", "1")):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        browser.find_element(By.ID, "generate").click()
        stats = lambda: browser.find_element(By.ID, "stats").text
        WebDriverWait(browser, 60, poll_frequency=0.02).until(lambda b: "tokens/s" in stats())
        browser.find_element(By.ID, "stop").click()
        WebDriverWait(browser, 10, poll_frequency=0.05).until(lambda b: "stopped" in stats())
        assert "finished" not in stats() and browser.find_element(By.ID, "error").text == ""


# --- the benchmark script, so it cannot rot unseen -------------------------------------------------------


@pytest.mark.slow
def test_serve_benchmark_runs():
    """With the server pinned to one CPU and the clients to the others (where there are others)."""
    cpus = sorted(os.sched_getaffinity(0))
    placing = ["--server-cpus", str(cpus[0])] if len(cpus) > 1 else []
    command = [sys.executable, str(REPO / "benchmarks" / "bench_serve.py"), "--shapes", "2x64", "--clients", "1", "2",
               "--new-tokens", "6", "--rounds", "2", *placing]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ") and "clients" not in line]
    assert [int(row[1]) for row in rows] == [1, 2]
    assert all(float(row[2]) > 0 and float(row[6]) > 0 for row in rows)  # tokens/s, the clients' CPU per token
    # a `generate` run beside each round of one client, and the ratio of each pair
    by_round = re.search(r"one client / generate: [\d.]+ \(goal >= 0.85; by round ([\d., ]+)\)", proc.stdout)
    assert by_round and len(by_round[1].split(", ")) == 2 and "(median of 2: " in proc.stdout
    if placing:
        assert f"server on CPUs [{cpus[0]}], clients on {cpus[1:]}" in proc.stdout


def test_the_server_pays_its_one_time_costs_before_the_first_request(model_file):
    """Building the tokenizer and importing anyio's backend took the first request about 0.4 s; the app's
    start-up pays them. In a fresh process, where nothing has paid them yet (TestClient would import anyio)."""
    code = f"""
import asyncio, sys
from examplegpt.batching import BatchEngine
from examplegpt.config import ServeConfig
from examplegpt.serve import create_app
from examplegpt.tokenizer import get_tokenizer
from examplegpt.weights import load_model
model = load_model({str(model_file)!r})
app = create_app(BatchEngine(model, max_batch=1, max_queue=1), ServeConfig(), "tiny", model.config)
def paid():
    return get_tokenizer.cache_info().currsize == 1, "anyio._backends._asyncio" in sys.modules
async def start_and_stop():
    async with app.router.lifespan_context(app):
        print("after start-up", paid())
print("before", paid())
asyncio.run(start_and_stop())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "before (False, False)" in out.stdout and "after start-up (True, True)" in out.stdout, out.stdout


def test_after_the_model_fails_health_says_error_and_requests_get_500(model):
    """In process (a failure cannot be provoked from outside): not a 503 "busy" that retrying would never cure."""
    from fastapi.testclient import TestClient

    from examplegpt.batching import BatchEngine
    from examplegpt.config import ServeConfig
    from examplegpt.serve import create_app

    engine = BatchEngine(model, max_batch=2, max_queue=2)

    def failing_choose(requests, logits):
        raise RuntimeError("sampling broke")

    engine.choose = failing_choose
    app = create_app(engine, ServeConfig(), "tiny", model.config)
    with TestClient(app) as client:
        body = {"prompt": "Hello", "max_tokens": 3, "temperature": 1.0}
        first = client.post("/v1/completions", json=body)
        assert first.status_code == 500 and first.json()["error"]["type"] == "server_error"
        assert client.get("/health").json()["status"] == "error"
        again = client.post("/v1/completions", json=body)
        assert again.status_code == 500 and again.json()["error"]["code"] == "engine_failed"
