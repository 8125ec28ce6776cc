"""Error replies in the shape each API's clients parse, and request ids. No HTTP library.

One router port speaks three APIs, and each one's official client reads errors its own way:

- OpenAI (openai-python): `{"error": {"message", "type", "param", "code"}}`; `type` and `code`
  are strings (an unknown model is type "invalid_request_error", code "model_not_found"),
  `param` is null or the offending field. The request id is the `x-request-id` header
  (`APIStatusError.request_id`).
- Anthropic (anthropic-sdk-python, on `/v1/messages*`): `{"type": "error", "error": {"type",
  "message"}, "request_id"}` with `type` one of its ErrorType literals; the id is also the
  `request-id` header (`APIStatusError.request_id`).
- Ollama (ollama-python, on `/api/*`): `{"error": "message"}` (`ResponseError.error`).

Retries: both official Python clients (openai 3.x `_should_retry`, anthropic 0.x/2.x the same
code) retry 408, 409, 429 and every 5xx twice unless the reply says `x-should-retry: false`
(or `true` to force one), and give up at once if `Retry-After` exceeds 120 s. So a
permanent failure with a 5xx or 409 status (a model whose file is missing, a 501, an
ambiguous name) must say `x-should-retry: false`, or every client call waits for three
identical answers.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final


class Api(enum.Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    OLLAMA = "ollama"


def api_for(path: str, headers: Mapping[str, str] | None = None) -> Api:
    """Which API's shape an error on this request takes: `/v1/messages*` is Anthropic's,
    `/api/*` Ollama's, anything else OpenAI's. A request carrying `anthropic-version` (the
    anthropic client sends it on every call, e.g. its `models.list()` on `/v1/models`) is
    Anthropic's wherever it goes. `headers` may be any mapping with lower-case keys or a
    case-insensitive one."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return Api.ANTHROPIC
    if path == "/api" or path.startswith("/api/"):
        return Api.OLLAMA
    if headers is not None and _header(headers, "anthropic-version") is not None:
        return Api.ANTHROPIC
    return Api.OPENAI


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        for key, val in headers.items():
            if key.lower() == name:
                return val
    return value


# -- request ids --------------------------------------------------------------------------
_INCOMING_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def new_request_id() -> str:
    """A fresh id in the style both vendors use ("req_" and 32 hex digits): 128 random bits,
    as uuid4 has (whose module's imports would be on the router's start)."""
    return "req_" + os.urandom(16).hex()


def request_id(incoming: str | None = None) -> str:
    """The id of a request: the one a client or proxy sent in `x-request-id` if it is a
    plain token (so logs on both sides line up), else a fresh one."""
    if incoming and _INCOMING_ID.match(incoming):
        return incoming
    return new_request_id()


def request_id_headers(rid: str) -> dict[str, str]:
    """Both spellings: openai reads `x-request-id`, anthropic `request-id`."""
    return {"x-request-id": rid, "request-id": rid}


# -- errors -------------------------------------------------------------------------------
#: OpenAI's `type` by status where the caller names none. OpenAI itself answers 401 with
#: "invalid_request_error" (code "invalid_api_key"), 404 for models with
#: "invalid_request_error" (code "model_not_found"), request-rate 429s with "requests"
#: (code "rate_limit_exceeded"), and 5xx with "server_error".
_OPENAI_TYPE: Final[Mapping[int, str]] = {429: "requests"}
#: default `code` by status (OpenAI sends a string code or null; hoshikage always a string)
_OPENAI_CODE: Final[Mapping[int, str]] = {
    400: "invalid_request", 401: "invalid_api_key", 403: "permission_denied",
    404: "not_found", 405: "method_not_allowed", 408: "timeout", 409: "conflict",
    413: "request_too_large", 422: "invalid_request", 429: "rate_limit_exceeded",
    500: "server_error", 501: "not_implemented", 502: "model_unavailable",
    503: "model_unavailable", 504: "timeout",
}
#: Anthropic's error `type` by status (docs.claude.com/en/api/errors; anthropic-sdk-python
#: types/shared/error_type.py, plus "request_too_large" which only the docs list)
_ANTHROPIC_TYPE: Final[Mapping[int, str]] = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
    429: "rate_limit_error", 500: "api_error", 503: "overloaded_error",
    504: "timeout_error", 529: "overloaded_error",
}
#: statuses the clients would retry by default although the answer cannot change
_NEVER_RETRY: Final = frozenset({409, 501})


class StartFailed(Exception):
    """A model's unit did not start (the reason from its activator's record); `permanent`
    when trying again at once would fail the same way."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class ApiError:
    """One error, independent of the API it is told in.

    `code` is OpenAI's string code ("model_not_found", "model_ambiguous", ...): defaults
    from the status. `kind` overrides OpenAI's `type` (default: "invalid_request_error" for
    4xx, "server_error" for 5xx). `retry` is the `x-should-retry` header: None leaves it to
    the client (it retries 408/409/429/5xx), False for answers a retry cannot change, True
    to ask for a retry of a status a client would not retry. `retry_after` (seconds) adds
    `Retry-After`; above 120 the official clients do not retry at all."""

    status: int
    message: str
    code: str | None = None
    param: str | None = None
    kind: str | None = None
    retry: bool | None = None
    retry_after: float | None = None

    @property
    def should_retry(self) -> bool | None:
        if self.retry is not None:
            return self.retry
        return False if self.status in _NEVER_RETRY else None

    @property
    def openai_type(self) -> str:
        if self.kind:
            return self.kind
        if self.status in _OPENAI_TYPE:
            return _OPENAI_TYPE[self.status]
        return "server_error" if self.status >= 500 else "invalid_request_error"

    @property
    def openai_code(self) -> str:
        return self.code or _OPENAI_CODE.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request")

    @property
    def anthropic_type(self) -> str:
        if self.status == 503 and self.retry is False:
            return "api_error"  # overloaded_error says "try later"; this one will not mend
        if self.status in _ANTHROPIC_TYPE:
            return _ANTHROPIC_TYPE[self.status]
        # Anthropic: "We may also use [invalid_request_error] for other 4XX status codes"
        return "api_error" if self.status >= 500 else "invalid_request_error"


def model_not_found(name: str, known: list[str]) -> ApiError:
    listed = ", ".join(known) or "(none)"
    return ApiError(404, f"model '{name}' is not known; known models: {listed}",
                    code="model_not_found", param="model")


def model_ambiguous(message: str) -> ApiError:
    return ApiError(409, message, code="model_ambiguous", param="model", retry=False)


def no_model(known: list[str]) -> ApiError:
    listed = ", ".join(known) or "(none)"
    return ApiError(400, "the request names no model and there is no default; known models: "
                    f"{listed}", code="model_required", param="model")


def bad_json(detail: str) -> ApiError:
    return ApiError(400, f"request body is not valid JSON: {detail}", code="invalid_json")


def start_failed(name: str, reason: str, *, permanent: bool,
                 retry_after: float | None = 10.0) -> ApiError:
    """A model that could not be started: `permanent` for what a retry cannot mend (a
    missing file, a model bigger than the memory budget, llama-server failing to load it),
    else a busy machine where waiting may help."""
    return ApiError(503, f"model '{name}' could not be started: {reason}",
                    code="model_unavailable", retry=False if permanent else None,
                    retry_after=None if permanent else retry_after)


def not_answering(name: str, detail: str) -> ApiError:
    return ApiError(502, f"model '{name}' is not answering: {detail}", code="model_unavailable")


def body(api: Api, err: ApiError, rid: str | None = None) -> dict[str, Any]:
    """The JSON error body in `api`'s shape."""
    if api is Api.OLLAMA:
        return {"error": err.message}
    if api is Api.ANTHROPIC:
        return {"type": "error", "error": {"type": err.anthropic_type, "message": err.message},
                "request_id": rid}
    return {"error": {"message": err.message, "type": err.openai_type, "param": err.param,
                      "code": err.openai_code}}


def headers(err: ApiError, rid: str | None = None) -> dict[str, str]:
    """Headers an error reply carries besides Content-Type: request id, retry advice."""
    out = request_id_headers(rid) if rid else {}
    retry = err.should_retry
    if retry is not None:
        out["x-should-retry"] = "true" if retry else "false"
    if err.retry_after is not None:
        out["Retry-After"] = str(max(0, round(err.retry_after)))
    return out


def render(path: str, err: ApiError, rid: str | None = None,
           request_headers: Mapping[str, str] | None = None,
           ) -> tuple[int, dict[str, str], dict[str, Any]]:
    """(status, headers, JSON body) of an error on a request to `path`."""
    api = api_for(path, request_headers)
    return err.status, headers(err, rid), body(api, err, rid)


def from_upstream(status: int, data: object) -> ApiError:
    """llama-server's own error body (`{"error": {"code", "message", "type"}}`) as an
    ApiError of the same status, for retelling it in another API's shape. Its `type`
    ("exceed_context_size_error", ...) becomes the OpenAI code."""
    message, code = f"llama-server answered HTTP {status}", None
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict):
            message = str(inner.get("message") or message)
            kind = inner.get("type")
            code = kind if isinstance(kind, str) and kind else None
        elif isinstance(inner, str) and inner:
            message = inner
    elif isinstance(data, str) and data.strip():
        message = data.strip()
    if status == 500 and any(words in message for words in CLIENT_WORDS):
        status = 400  # a request it could not read: a client retries a 500 (anthropic's thrice)
    return ApiError(status, message, code=code)


#: what llama-server says, with a 500, of a request it could not read ("'messages' is
#: required" on /v1/messages): the client's mistake
CLIENT_WORDS = ("is required", "must be ")
