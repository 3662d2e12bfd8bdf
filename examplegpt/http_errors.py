"""The server's errors: OpenAI's error object for every failure a client can cause, and the ASGI guard.

Every error is answered as `{"error": {"message", "type", "param", "code"}}` with its status; pydantic's
validation errors are rewritten into one sentence naming the field (and 400, as OpenAI answers, not
FastAPI's 422); the guard refuses a body too large to read and turns a bug of ours into a 500 object.
"""

from __future__ import annotations

import json
import sys

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

MAX_BODY_BYTES = 8 * 2**20  # a request body past this is refused before it is read (413)
RETRY_AFTER_SECONDS = 1
# OpenAI fields that ExampleGPT does not implement: accepted only at their neutral value (see serve.py).
UNSUPPORTED = ("echo", "best_of", "frequency_penalty", "presence_penalty", "logit_bias", "suffix")
# What each field of several types (serve.request_model) takes, in words: pydantic names the types by its internals.
EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of such lists",
    "stop": "a string or a list of strings",
}


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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error object."""

    error: ErrorDetail


ERRORS = {
    400: "The request is not valid: bad JSON, an unknown or missing field, a value out of range",
    401: "Missing or incorrect API key (when the server has one)",
    404: "No such route or model",
    411: "The request body has no Content-Length",
    413: f"The request body is larger than {MAX_BODY_BYTES} bytes",
    500: "The model failed while generating",
    503: "The server is busy (its queue is full) or shutting down: retry after Retry-After seconds",
}
HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}},
}


def error_responses(*statuses: int) -> dict:
    """The OpenAPI `responses` of a route for these error statuses, each an ErrorResponse."""
    return {
        status: {
            "model": ErrorResponse,
            "description": ERRORS[status],
            **({"headers": HEADERS[status]} if status in HEADERS else {}),
        }
        for status in statuses
    }


def validation_error(exc: RequestValidationError, content_type: str | None) -> APIError:
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
        # FastAPI reads a body as JSON only when its Content-Type says so: not a form's or text/plain, which a
        # web page may send to this server without the browser asking it first (CORS's "simple" requests)
        if isinstance(error.get("input"), bytes):
            given = content_type or "no Content-Type"
            message = f"the request body must be sent as Content-Type: application/json, got {given}"
            return APIError(400, message, code="invalid_content_type")
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
    if param in UNSUPPORTED and not error["type"].endswith("_type"):  # the right type, but not the neutral value
        hint = " (repetition_penalty is supported)" if param.endswith("_penalty") else ""
        return APIError(400, f"{param} is not supported by this server{hint}", param=param, code="unsupported")
    if len(same_field) == 1 or not error["type"].endswith("_type"):
        message = error["msg"]
    else:  # a wrong type for every type the field takes
        message = f"expected {EXPECTED[param]}" if param in EXPECTED else "not a valid value"
    return APIError(
        400, f"{param}: {message}, got {json.dumps(error.get('input'))[:80]}", param=param, code="invalid_value"
    )


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
            response = APIError(
                413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large"
            ).response()
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
