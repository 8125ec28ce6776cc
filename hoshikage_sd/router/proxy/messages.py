"""The proxy's messages and limits: requests, responses, forwards and what they may
cost."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from hoshikage_sd.router.http1 import query_of

logger = logging.getLogger("hoshikage.proxy")


#: request and response headers that describe one connection, not the message: never passed on
HOP_BY_HOP = frozenset(h.encode() for h in (
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect"))
MAX_BODY = 256 << 20
MAX_HEAD = 64 << 10
#: pipelined requests parsed ahead of the one being answered before reading pauses
MAX_QUEUED = 16
REASONS = {100: "Continue", 200: "OK", 202: "Accepted", 204: "No Content",
           308: "Permanent Redirect", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 409: "Conflict",
           413: "Payload Too Large", 415: "Unsupported Media Type",
           422: "Unprocessable Entity", 429: "Too Many Requests",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
           504: "Gateway Timeout"}

T = TypeVar("T")


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, request: Request | None = None,
                 **headers: str) -> None:
        super().__init__(message)
        self.status = status
        #: the request as far as it was read (its head: the error's shape follows its path)
        self.request = request
        self.headers = headers


@dataclass(frozen=True)
class Limits:
    """What one client may hold of the router (the manifest's client_* keys, README).

    Connections past `max_connections` first close the longest idle one (a keep-alive
    connection, or one that has not sent a whole request head); with none idle, the new one
    gets a 503. A request head must be in within `header_timeout`, and a body must not stall
    for longer nor, past it, come slower than front.MIN_BODY_RATE; a connection waits
    `idle_timeout` for its next request. Bodies are read
    whole (the router needs the JSON's model), so at most `large_bodies` requests with more
    than `large_body` bytes count against `body_memory`, the bytes of such bodies being
    read or answered at once: one that does not fit gets a 503 before its body is read (the
    first one always fits, up to `max_body`). A body over 1 MiB is walked for its model
    without being decoded (router/jsonscan.py): it costs about its own size; Ollama's
    routes translate it around its long strings (router/ollama/body.py): about its size too,
    more for a chunked body or one of many short strings."""

    max_connections: int = 1000
    header_timeout: float = 30.0
    idle_timeout: float = 75.0
    max_body: int = MAX_BODY
    large_body: int = 1 << 20
    body_memory: int = 256 << 20


# -- messages ---------------------------------------------------------------------------------
@dataclass
class Request:
    """One client request, body read whole. Headers as sent (latin-1), in order."""

    method: str
    target: str
    version: str
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    keep_alive: bool = True
    #: the handler's id for it (request ids in replies and logs)
    id: str = ""
    #: bytes of the proxy's body_memory it holds until answered (a large body)
    large: int = 0
    #: what the handler's access check granted it (router/auth.py: the key; None: no keys)
    grant: object = None
    #: the client's address ("" for a unix socket or unknown): the panel's loopback check
    peer: str = ""
    #: the address it connected to (router/hosts.py: DNS rebinding)
    local: str = ""

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> dict[str, str]:
        """The query string's first value per key, percent-decoded (http1.query_of)."""
        return query_of(self.target)

    def header(self, name: str) -> str | None:
        key = name.lower().encode("latin-1")
        for k, v in self.headers:
            if k.lower() == key:
                return v.decode("latin-1")
        return None


@dataclass(frozen=True)
class Early:
    """The handler's answer to a streaming request whose model must start first and whose
    client asked to hear about it (router/progress.py): the front sends the head of an SSE
    stream now (200, text/event-stream, chunked, `headers` besides), then awaits `wait`,
    which may `emit` SSE comment lines meanwhile and gives the real answer (a Forward, whose
    body continues the stream, or a Response, sent as an SSE `error` event)."""

    headers: list[tuple[str, str]]
    wait: Callable[[Callable[[bytes], None]], Awaitable[object]]


@dataclass
class Response:
    """A reply the front sends itself."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    #: the model it concerns, if any (the handler's own bookkeeping: never sent)
    model: str = ""

    @classmethod
    def json(cls, status: int, data: object, **headers: str) -> Response:
        return cls(status, json.dumps(data).encode(),
                   [("Content-Type", "application/json; charset=utf-8"), *headers.items()])

    @classmethod
    def error(cls, status: int, message: str, kind: str, **headers: str) -> Response:
        """OpenAI's error shape: {"error": {"message", "type", "param", "code"}} (the
        front's own errors where the caller renders none: see Proxy's `error`)."""
        code = kind if kind != "invalid_request_error" else "invalid_request"
        return cls.json(status, {"error": {"message": message, "type": (
            "server_error" if status >= 500 else "invalid_request_error"), "param": None,
            "code": code}}, **headers)


class Transform(Protocol):
    """Rewrites one upstream response for the client (e.g. llama-server's SSE as Ollama's
    NDJSON). Made by Forward's `transform` from the upstream's status and headers; the
    client then gets `status` and `headers` and what `feed` and `finish` return as its
    body: chunked as it comes, or, when `whole`, all at the end with a Content-Length (the
    head waits for it, so `status` may still change in `finish`)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    whole: bool

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes:
        """The rest, at the upstream's end (or when it failed midway: say so if you can)."""
        ...


@dataclass
class Outcome:
    """How a forwarded exchange ended: the status the client got (0: none), when the
    response head went out (monotonic; None: never), whether the body was complete."""

    status: int = 0
    head_at: float | None = None
    complete: bool = False


#: renders the front's own errors (malformed requests, an upstream failing) for a request
#: (None: it could not be parsed): status, message, OpenAI-style code
ErrorRenderer = Callable[[Request | None, int, str, str], Response]


def default_error(request: Request | None, status: int, message: str, code: str) -> Response:
    return Response.error(status, message, code)


def response_bytes(response: Response, keep_alive: bool, head_only: bool = False) -> bytes:
    out = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}\r\n"]
    out += [f"{k}: {v}\r\n" for k, v in response.headers]
    if response.status != 204 and not 100 <= response.status < 200:
        out.append(f"Content-Length: {len(response.body)}\r\n")
    if not keep_alive:
        out.append("Connection: close\r\n")
    out.append("\r\n")
    head = "".join(out).encode("latin-1")
    return head if head_only else head + response.body


def request_head(request: Request) -> bytes:
    """The request's head as sent upstream: HTTP/1.1, keep-alive, a Content-Length for its
    body (sent after it as it is: a large body is never copied into one buffer with it)."""
    out = [f"{request.method} {request.target} HTTP/1.1\r\nHost: localhost\r\n".encode("latin-1")]
    for k, v in request.headers:
        if k.lower() not in HOP_BY_HOP:
            out.append(k + b": " + v + b"\r\n")
    if request.body or request.method in ("POST", "PUT", "PATCH"):
        out.append(b"Content-Length: %d\r\n" % len(request.body))
    out.append(b"\r\n")
    return b"".join(out)
