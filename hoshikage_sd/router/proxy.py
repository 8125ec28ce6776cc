"""A lean HTTP/1.1 front that forwards to llama-server over its unix socket.

Measured against the router's aiohttp server + ClientSession (bench/proxy_layers.py, on this
2-core machine, tiny /tokenize requests): ~0.07 ms of CPU per request on asyncio's loop and
~0.055 ms on uvloop, against ~0.37 ms, and a fifth of the added latency. It costs so little
because nothing is done per request that need not be: one task, a hand-written parser over
whole buffers (httptools measured no faster), response bytes written from the upstream
protocol's callback straight to the client's transport, and no aiohttp import (~100 ms of a
cold start).

The caller plugs in one coroutine, `Handler`: given a parsed `Request` (body read whole; the
router needs its JSON to know the model) it returns either a `Response` to send itself
(/v1/models, /metrics, errors) or a `Forward` naming the `Upstream` to send the request to,
after whatever "resolve the model, start it" it has to do.

Upstreams are bounded pools: llama-server (cpp-httplib) gives each connection one thread of a
small pool until the connection closes or idles for 5 s, so more keep-alive connections than
threads leave requests parked in its accept queue for seconds. A pool holds at most `size`
connections; requests beyond that wait their turn here, first come first served.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

logger = logging.getLogger("hoshikage.proxy")

#: request and response headers that describe one connection, not the message: never passed on
HOP_BY_HOP = frozenset(h.encode() for h in (
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect"))
MAX_BODY = 256 << 20
MAX_HEAD = 64 << 10
#: pipelined requests parsed ahead of the one being answered before reading pauses
MAX_QUEUED = 16
REASONS = {100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request",
           401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
           413: "Payload Too Large", 422: "Unprocessable Entity", 429: "Too Many Requests",
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
    for longer; a connection waits `idle_timeout` for its next request. Bodies are read
    whole (the router needs the JSON's model), so at most `large_bodies` requests with more
    than `large_body` bytes count against `body_memory`, the bytes of such bodies being
    read or answered at once: one that does not fit gets a 503 before its body is read (the
    first one always fits, up to `max_body`). The router holds about three times a body
    while it reads its JSON (bytes, text, the strings in it)."""

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

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> dict[str, str]:
        """The query string's first value per key (as the router has always read it)."""
        out: dict[str, str] = {}
        for pair in filter(None, self.target.partition("?")[2].split("&")):
            key, _, value = pair.partition("=")
            out.setdefault(key, value)
        return out

    def header(self, name: str) -> str | None:
        key = name.lower().encode("latin-1")
        for k, v in self.headers:
            if k.lower() == key:
                return v.decode("latin-1")
        return None


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


@dataclass
class Forward:
    """Send the request to `upstream`. `unreachable` is asked what to do when no connection
    to it can be made (the unit was stopped: start it again, or give up); without it the
    client gets a 502. `done` runs once the exchange is over, however it ended.

    `request`: send this instead of the client's request (a translated one). `headers` are
    added to the response; upstream headers named in `drop` (lower case) are not passed on.
    `transform`, given the upstream status and headers, may return a Transform for the body
    (None: pass it through as it is)."""

    upstream: Upstream
    unreachable: Callable[[OSError], Awaitable[Forward | Response]] | None = None
    done: Callable[[Outcome], None] | None = None
    request: Request | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    drop: frozenset[bytes] = frozenset()
    transform: Callable[[int, list[tuple[bytes, bytes]]], Transform | None] | None = None


Handler = Callable[[Request], Awaitable[Response | Forward]]
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


# -- parsing ----------------------------------------------------------------------------------
class RequestParser:
    """HTTP/1.x requests from a byte stream, bodies by Content-Length or chunked. Strict where
    a lenient parser would let two parties read one stream differently (both framings, two
    lengths, folded or malformed header lines): such a request is a BadRequest."""

    def __init__(self, on_request: Callable[[Request], None], max_body: int = MAX_BODY,
                 large_body: int = 0,
                 admit_large: Callable[[Request, int], bool] | None = None) -> None:
        self.on_request = on_request
        self.max_body = max_body
        #: a body above `large_body` bytes is read only if `admit_large` says so
        self.large_body = large_body
        self.admit_large = admit_large
        self.buf = b""
        self.request: Request | None = None
        self.left = 0  # Content-Length: bytes to come; chunked: see _chunked
        self.chunked = False
        self.parts: list[bytes] = []
        self.size = 0
        self.into: bytearray | None = None
        #: set when a head asked for "100-continue" (the caller answers it)
        self.expects_continue = False

    def feed(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        self.buf = b""
        while buf:
            if self.request is None:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise BadRequest("request head too large", 431)
                    break
                if end > MAX_HEAD:
                    raise BadRequest("request head too large", 431)
                self._head(buf[:end])
                buf = buf[end + 4:]
                if not self.chunked and self.left == 0:
                    self._complete()
                continue
            buf = self._chunked(buf) if self.chunked else self._length(buf)
        self.buf = buf

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        first = lines[0].split(b" ")
        if len(first) != 3 or first[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not first[0].isalpha():
            raise BadRequest("malformed request line")
        version = first[2][5:].decode("ascii")
        request = Request(first[0].decode("ascii"), first[1].decode("latin-1"), version, [],
                          keep_alive=version == "1.1")
        length: int | None = None
        chunked = False
        expect = False
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
                raise BadRequest("malformed header line")
            value = value.strip()
            key = name.lower()
            if key == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise BadRequest("bad Content-Length")
                length = int(value)
            elif key == b"transfer-encoding":
                if value.lower() != b"chunked" or chunked:
                    raise BadRequest("only one 'Transfer-Encoding: chunked' is taken", 501)
                chunked = True
            elif key == b"connection":
                tokens = {t.strip() for t in value.lower().split(b",")}
                if b"close" in tokens:
                    request.keep_alive = False
                elif b"keep-alive" in tokens:
                    request.keep_alive = True
            elif key == b"expect":
                expect = value.lower() == b"100-continue"
            request.headers.append((name, value))
        if chunked and length is not None:
            raise BadRequest("both Content-Length and Transfer-Encoding")
        if length is not None and length > self.max_body:
            raise BadRequest(f"body larger than {self.max_body} bytes", 413, request)
        if length is not None and length > self.large_body:
            self._large(request, length)
        self.request = request
        self.chunked = chunked
        self.left = -1 if chunked else (length or 0)
        self.parts = []
        self.size = 0
        # a large body is read into its own buffer: no second copy to join it
        self.into = bytearray(length) if length and length > self.large_body else None
        self.expects_continue = expect and (chunked or bool(length))

    def _large(self, request: Request, size: int) -> None:
        if self.admit_large is not None and not self.admit_large(request, size):
            raise BadRequest("too many large request bodies are being read; try again",
                             503, request, **{"Retry-After": "1"})

    @property
    def idle(self) -> bool:
        """Between requests: nothing of the next one read (a partial head aside)."""
        return self.request is None

    def _length(self, buf: bytes) -> bytes:
        n = self.left
        into = self.into
        if into is not None:
            take = min(n, len(buf))
            at = len(into) - n
            into[at:at + take] = buf[:take]
            self.left = n - take
            if self.left == 0:
                self._complete()
            return buf[take:]
        if len(buf) < n:
            self.parts.append(buf)
            self.left = n - len(buf)
            return b""
        self.parts.append(buf[:n])
        self.left = 0
        self._complete()
        return buf[n:]

    def _chunked(self, buf: bytes) -> bytes:
        """left: -1 at a size line, > 0 in chunk data, -3 at the CRLF after it, -2 in
        trailers. Returns what is left unread (an incomplete line stays for the next feed)."""
        while buf and self.request is not None:
            if self.left == -1:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise BadRequest("malformed chunk size")
                    return buf
                text = buf[:end].split(b";", 1)[0].strip()
                try:
                    size = int(text, 16)
                except ValueError:
                    raise BadRequest("malformed chunk size") from None
                if size < 0:
                    raise BadRequest("malformed chunk size")
                self.size += size
                if self.size > self.max_body:
                    raise BadRequest(f"body larger than {self.max_body} bytes", 413,
                                     self.request)
                if self.size > self.large_body:
                    self._large(self.request, self.size)
                buf = buf[end + 2:]
                self.left = size if size else -2
            elif self.left > 0:
                take = min(self.left, len(buf))
                self.parts.append(buf[:take])
                self.left -= take
                buf = buf[take:]
                if self.left == 0:
                    self.left = -3
            elif self.left == -3:
                if len(buf) < 2:
                    return buf
                if buf[:2] != b"\r\n":
                    raise BadRequest("malformed chunk")
                buf = buf[2:]
                self.left = -1
            else:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise BadRequest("trailers too large", 431)
                    return buf
                line, buf = buf[:end], buf[end + 2:]
                if not line:
                    self._complete()
        return buf

    def _complete(self) -> None:
        request = self.request
        assert request is not None
        if self.into is not None:
            request.body, self.into = self.into, None  # type: ignore[assignment]
        else:
            request.body = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        self.request = None
        self.parts = []
        self.chunked = False
        self.left = 0
        self.on_request(request)


class Sink(Protocol):
    """Where an upstream response goes: the head, body pieces (de-chunked), the end."""

    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                length: int, chunked: bool) -> None: ...

    def on_body(self, data: bytes) -> None: ...

    def on_end(self) -> None: ...

    def on_error(self, exc: BaseException, got_bytes: bool) -> None: ...


class ResponseParser:
    """One HTTP/1.x response, fed incrementally. `length` is -1 when not given; a response
    with neither length nor chunking ends when the upstream closes (and is not kept)."""

    HEAD, LENGTH, SIZE, DATA, CRLF, TRAILERS, UNTIL_CLOSE, DONE = range(8)

    def __init__(self, sink: Sink, head_only: bool = False) -> None:
        self.sink = sink
        self.head_only = head_only
        self.buf = b""
        self.state = self.HEAD
        self.left = 0
        self.keep_alive = True

    @property
    def done(self) -> bool:
        return self.state == self.DONE

    def feed(self, data: bytes) -> None:
        if self.buf:
            data, self.buf = self.buf + data, b""
        while data and self.state != self.DONE:
            state = self.state
            if state == self.HEAD:
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    if len(data) > MAX_HEAD:
                        raise ValueError("upstream response head too large")
                    self.buf = data
                    return
                self._head(data[:end])
                data = data[end + 4:]
            elif state in (self.LENGTH, self.DATA):
                n = self.left
                piece, data = (data, b"") if len(data) <= n else (data[:n], data[n:])
                self.left = n - len(piece)
                self.sink.on_body(piece)
                if self.left == 0:
                    self.state = self.DONE if state == self.LENGTH else self.CRLF
            elif state == self.UNTIL_CLOSE:
                self.sink.on_body(data)
                data = b""
            elif state == self.CRLF:
                if len(data) < 2:
                    self.buf = data
                    return
                data = data[2:]
                self.state = self.SIZE
            else:  # SIZE or TRAILERS: a line
                end = data.find(b"\r\n")
                if end < 0:
                    self.buf = data
                    return
                line, data = data[:end], data[end + 2:]
                if state == self.TRAILERS:
                    if not line:
                        self.state = self.DONE
                else:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                    self.left = size
                    self.state = self.DATA if size else self.TRAILERS
        if self.state == self.DONE:
            if data:  # bytes after the response: nothing asked for them
                self.keep_alive = False
            self.sink.on_end()

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        first = lines[0].split(b" ", 2)
        status = int(first[1])
        headers: list[tuple[bytes, bytes]] = []
        length = -1
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            value = value.strip()
            key = name.lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif key == b"connection" and b"close" in value.lower():
                self.keep_alive = False
            if key not in HOP_BY_HOP:
                headers.append((name, value))
        if first[0] == b"HTTP/1.0":
            self.keep_alive = False
        self.sink.on_head(status, first[2] if len(first) > 2 else b"", headers, length,
                          chunked)
        if self.head_only or status in (204, 304) or 100 <= status < 200:
            self.state = self.DONE
        elif chunked:
            self.state = self.SIZE
        elif length >= 0:
            self.left = length
            self.state = self.LENGTH if length else self.DONE
        else:
            self.keep_alive = False
            self.state = self.UNTIL_CLOSE

    def eof(self) -> bool:
        """The upstream closed: did that end the response?"""
        if self.state == self.UNTIL_CLOSE:
            self.state = self.DONE
            self.sink.on_end()
        return self.state == self.DONE


# -- upstream ---------------------------------------------------------------------------------
class UpstreamConnection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser: ResponseParser | None = None
        self.sink: Sink | None = None
        self.closed = False
        self.got_bytes = False
        self.paused = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are ones
        self.transport = cast(asyncio.Transport, transport)

    def send(self, data: bytes, sink: Sink, head_only: bool = False, body: bytes = b"") -> None:
        assert self.transport is not None
        self.sink = sink
        self.got_bytes = False
        self.parser = ResponseParser(sink, head_only)
        if len(body) < 65536:
            self.transport.write(data + body)
        else:
            self.transport.write(data)
            self.transport.write(body)

    def data_received(self, data: bytes) -> None:
        if self.parser is None:  # bytes on an idle connection: nobody asked
            self.abort()
            return
        self.got_bytes = True
        try:
            self.parser.feed(data)
        except (ValueError, IndexError) as exc:
            parser, self.parser = self.parser, None
            self.abort()
            if self.sink is not None and not parser.done:
                self.sink.on_error(ValueError(f"malformed response: {exc}"), True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        parser, self.parser = self.parser, None
        if parser is not None and not parser.eof() and self.sink is not None:
            self.sink.on_error(exc or ConnectionResetError("upstream closed the connection"),
                               self.got_bytes)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def pause(self) -> None:
        """The client reads slower than llama-server writes: stop reading (TCP pushes back)."""
        if self.transport is not None and not self.paused and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and self.paused and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def reusable(self) -> bool:
        return (not self.closed and self.parser is not None and self.parser.done
                and self.parser.keep_alive)


class Upstream:
    """A bounded pool of keep-alive connections to one unix socket.

    `size`: connections at most. For llama-server keep it under its HTTP threads
    (--threads-http; by default max(slots + 2, cores - 1), 8 measured for b10068 with 4 slots
    on 2 cores): one spare thread answers health probes while the pool is busy."""

    #: llama-server (cpp-httplib) closes a keep-alive connection idle for 5 s: retire ours first
    IDLE = 4.0

    def __init__(self, path: str, size: int = 4) -> None:
        if size < 1:
            raise ValueError("an upstream pool needs at least one connection")
        self.path = path
        self.size = size
        self.busy = 0
        self.idle: list[UpstreamConnection] = []
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self, fresh: bool = False) -> tuple[UpstreamConnection, bool]:
        """A connection (a new one if `fresh`) and whether it served before: a request that
        fails on a reused connection before any reply may go again on a new one."""
        if self.busy < self.size and not self.waiters:
            self.busy += 1
        else:
            turn = asyncio.get_running_loop().create_future()
            self.waiters.append(turn)
            try:
                await turn  # whoever woke us counted us in `busy`
            except BaseException:
                if turn.done() and not turn.cancelled():
                    self._free()
                else:
                    with contextlib.suppress(ValueError):
                        self.waiters.remove(turn)
                raise
        now = time.monotonic()
        while self.idle and not fresh:
            conn = self.idle.pop()  # the most recent: the least likely to be timed out
            if not conn.closed and now - conn.idle_since < self.IDLE:
                return conn, True
            conn.abort()
        try:
            _, conn = await asyncio.get_running_loop().create_unix_connection(
                UpstreamConnection, self.path)
        except BaseException:
            self._free()
            raise
        return conn, False

    def release(self, conn: UpstreamConnection, keep: bool) -> None:
        if keep and conn.reusable():
            conn.parser = conn.sink = None
            conn.resume()  # the response may have ended while its client was slow
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        else:
            conn.parser = conn.sink = None
            conn.abort()
        self._free()

    def _free(self) -> None:
        self.busy -= 1
        while self.waiters:
            turn = self.waiters.popleft()
            if not turn.done():
                self.busy += 1
                turn.set_result(None)
                return

    def close(self) -> None:
        """Drop the idle connections (a model stopped); busy ones end with their exchange."""
        for conn in self.idle:
            conn.abort()
        self.idle.clear()


# -- the front --------------------------------------------------------------------------------
class Exchange:
    """The upstream side of one forwarded request, as seen from the client connection."""

    def __init__(self, client: ClientConnection, keep_alive: bool, http10: bool,
                 forward: Forward | None = None, head_only: bool = False) -> None:
        self.client = client
        self.keep_alive = keep_alive
        self.http10 = http10
        self.forward = forward
        self.head_only = head_only
        self.transform: Transform | None = None
        self.chunked = False
        self.head_sent = False
        self.error: BaseException | None = None
        self.got_bytes = False
        self.outcome = Outcome()
        self.sse = False
        self.finished: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                length: int, chunked: bool) -> None:
        forward = self.forward
        if forward is not None:
            if forward.drop:
                headers = [(k, v) for k, v in headers if k.lower() not in forward.drop]
            if forward.transform is not None and not self.head_only:
                transform = self.transform = forward.transform(status, headers)
                if transform is not None:
                    if transform.whole:
                        return  # the head goes out with the body, at the end
                    if status != transform.status:
                        reason = REASONS.get(transform.status, "Unknown").encode()
                    status, headers = transform.status, transform.headers
                    length, chunked = -1, True
            if forward.headers:
                headers = headers + forward.headers
        self._head(status, reason, headers, length, chunked)

    def _head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
              length: int, chunked: bool) -> None:
        self.outcome.status = status
        self.outcome.head_at = time.monotonic()
        if self.client.proxy.draining:
            self.keep_alive = False
        out = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        out += [k + b": " + v + b"\r\n" for k, v in headers]
        if length >= 0:
            out.append(b"Content-Length: %d\r\n" % length)
        elif chunked and not self.http10:
            out.append(b"Transfer-Encoding: chunked\r\n")
            self.chunked = True
        elif status not in (204, 304) and not 100 <= status < 200:
            self.keep_alive = False  # the end of the body is the end of the connection
        if not self.keep_alive:
            out.append(b"Connection: close\r\n")
        elif self.http10:
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        self.head_sent = True
        self.sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                       for k, v in headers)
        self.client.write(b"".join(out))

    def on_body(self, data: bytes) -> None:
        if self.transform is not None:
            data = self.transform.feed(data)
            if not data:
                return
        # one chunk out per piece in: server-sent events pass through as they come
        self.client.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)

    def _finish_transform(self) -> None:
        transform, self.transform = self.transform, None
        if transform is None:
            return
        data = transform.finish()
        if transform.whole:
            headers = transform.headers
            if self.forward is not None and self.forward.headers:
                headers = headers + self.forward.headers
            self._head(transform.status, REASONS.get(transform.status, "Unknown").encode(),
                       headers, len(data), False)
            self.client.write(data)
        elif data:
            self.client.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)

    def on_end(self) -> None:
        self._finish_transform()
        if self.chunked:
            self.client.write(b"0\r\n\r\n")
        self.outcome.complete = True
        if not self.finished.done():
            self.finished.set_result(True)

    def on_error(self, exc: BaseException, got_bytes: bool) -> None:
        self.error = exc
        self.got_bytes = got_bytes
        if self.head_sent and self.transform is not None and not self.transform.whole:
            # a translated stream ends with its own word on what went wrong
            self._finish_transform()
            if self.chunked:
                self.client.write(b"0\r\n\r\n")
        if not self.finished.done():
            self.finished.set_result(False)


    def cut(self, error: Response) -> None:
        """End the response here (the router stops): a chunked one gets its end, after a
        last word on why: an SSE `error` event carrying `error`'s JSON body (what OpenAI's
        and Anthropic's clients raise on), or the translation's own (Ollama's)."""
        if not self.head_sent or not self.chunked or self.finished.done():
            return  # no head yet or no framing to end: the close says it
        if self.transform is not None and not self.transform.whole:
            self._finish_transform()
        elif self.sse:
            event = b"event: error\ndata: " + error.body + b"\n\n"
            self.client.write(b"%x\r\n%b\r\n" % (len(event), event))
        self.client.write(b"0\r\n\r\n")
        self.got_bytes = True  # not to be sent again
        self.finished.set_result(False)


class ClientConnection(asyncio.Protocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        limits = proxy.limits
        self.parser = RequestParser(self._parsed, limits.max_body, limits.large_body,
                                    proxy.admit_large)
        self.transport: asyncio.Transport | None = None
        self.queue: collections.deque[Request] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.upstream: UpstreamConnection | None = None
        self.exchange: Exchange | None = None
        self.current: Request | None = None
        self.lost = False
        self.reading = True
        self.eof = False
        #: the one timer: idle (between requests), head (one coming in), body (stalled)
        self.timer: asyncio.TimerHandle | None = None
        self.timing = ""

    # transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are ones
        self.transport = cast(asyncio.Transport, transport)
        if not self.proxy.admit(self):
            return
        self._arm("head", self.proxy.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed(data)
        except BadRequest as exc:
            self.queue.clear()
            response = self.proxy.error(exc.request, exc.status, str(exc),
                                        "model_unavailable" if exc.status == 503
                                        else "invalid_request")
            response.headers += list(exc.headers.items())
            self.write(response_bytes(response, False))
            self.close()
            return
        if self.task is None:
            # a head on its way, or a body: either must come within the header timeout
            if not self.parser.idle:
                self._arm("body", self.proxy.limits.header_timeout)
            elif self.timing == "idle" and self.parser.buf:
                self._arm("head", self.proxy.limits.header_timeout)
        if self.parser.expects_continue:
            self.parser.expects_continue = False
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def eof_received(self) -> bool:
        self.eof = True
        if self.task is not None:
            # The client closed its side with a request in flight: it went away (as nginx
            # reads it; HTTP clients do not half-close). Closing aborts the upstream request,
            # so llama-server stops generating for nobody.
            logger.debug("client went away during %s", self._what())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.proxy.lost(self)
        self._disarm()
        for request in (self.parser.request, *self.queue):
            if request is not None:
                self.proxy.release_large(request)
        if self.upstream is not None:
            # llama-server sees its client go and stops generating
            logger.debug("client went away (%s) during %s: cancelled upstream",
                         exc or "closed", self._what())
            self.upstream.abort()
        elif self.task is not None:
            self.task.cancel()  # still in the handler (a model starting) or waiting its turn

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume()

    # helpers
    @property
    def idle(self) -> bool:
        """Nothing being answered, nothing but a partial head read: may be closed."""
        return self.task is None and self.parser.idle and not self.lost

    def _what(self) -> str:
        request = self.current
        return f"{request.method} {request.path} ({request.id})" if request else "a request"

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _arm(self, what: str, seconds: float) -> None:
        self._disarm()
        self.timing = what
        self.timer = asyncio.get_running_loop().call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.timing = ""

    def _expired(self) -> None:
        what, self.timer, self.timing = self.timing, None, ""
        if self.task is not None or self.lost:
            return  # answering: the connection's timers start again after it
        if what != "idle" and (self.parser.buf or not self.parser.idle):
            logger.debug("closing a client connection: its request %s stalled",
                         "head" if what == "head" else "body")
            self.write(response_bytes(self.proxy.error(
                None, 408, f"the request {what} did not come within "
                f"{self.proxy.limits.header_timeout:g} s", "timeout"), False))
        self.close()

    def _parsed(self, request: Request) -> None:
        self.queue.append(request)
        if len(self.queue) > MAX_QUEUED and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()
        if self.task is None:
            self._disarm()
            self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        try:
            while self.queue and not self.lost:
                request = self.current = self.queue.popleft()
                if not self.reading and self.transport is not None:
                    self.reading = True
                    self.transport.resume_reading()
                try:
                    keep = await self._answer(request)
                finally:
                    self.current = None
                    self.proxy.release_large(request)
                if not keep or self.proxy.draining:
                    self.close()
                    return
        except asyncio.CancelledError:
            return
        except Exception:
            logger.exception("proxy: request failed")
            self.write(response_bytes(self.proxy.error(None, 500, "internal error in the "
                                                       "router", "server_error"), False))
            self.close()
            return
        finally:
            self.task = None
            self.proxy.answered()
        if self.eof:
            self.close()
        elif not self.lost:
            if not self.parser.idle:
                self._arm("body", self.proxy.limits.header_timeout)
            elif self.parser.buf:
                self._arm("head", self.proxy.limits.header_timeout)
            else:
                self._arm("idle", self.proxy.limits.idle_timeout)

    async def _answer(self, request: Request) -> bool:
        """Answer one request; False when the connection must close after it."""
        head_only = request.method == "HEAD"
        result = await self.proxy.handler(request)
        while isinstance(result, Forward):
            forward = result
            outcome = Outcome()
            try:
                return await self._forward(request, forward, head_only, outcome)
            except OSError as exc:  # no connection could be made: nothing was sent
                if forward.unreachable is None:
                    result = self.proxy.error(request, 502, f"upstream not answering: {exc}",
                                              "model_unavailable")
                else:
                    result = await forward.unreachable(exc)
            finally:
                if forward.done is not None:
                    forward.done(outcome)
        keep = request.keep_alive and not self.proxy.draining
        self.write(response_bytes(result, keep, head_only))
        return keep

    async def _forward(self, request: Request, forward: Forward, head_only: bool,
                       outcome: Outcome) -> bool:
        upstream_request = forward.request or request
        head = request_head(upstream_request)
        fresh = False
        while True:
            conn, reused = await forward.upstream.acquire(fresh)
            exchange = Exchange(self, request.keep_alive, request.version == "1.0", forward,
                                head_only)
            exchange.outcome = outcome
            self.upstream, self.exchange = conn, exchange
            ok = False
            try:
                if self.lost:
                    return False
                conn.send(head, exchange, head_only, upstream_request.body)
                ok = await exchange.finished
            finally:
                self.upstream = self.exchange = None
                forward.upstream.release(conn, ok)
            if ok:
                return exchange.keep_alive
            if not exchange.got_bytes and not self.lost:
                if reused:
                    # llama-server closed an idle connection as we sent on it: it read nothing
                    fresh = True
                    continue
                # reset or closed before a byte of answer (it died, or is stopping, with the
                # request in its queue): the caller's to handle, as a refused connection is
                raise ConnectionResetError(f"upstream closed before answering: "
                                           f"{exchange.error}")
            if not exchange.head_sent and not self.lost:
                response = self.proxy.error(request, 502, f"upstream failed: {exchange.error}",
                                            "model_unavailable")
                outcome.status = response.status
                self.write(response_bytes(response, False))
            return False

    def cut(self, message: str) -> None:
        """End what is being answered now, as cleanly as its framing allows (the router
        stops): a chunked stream gets a last event saying why and its end."""
        exchange = self.exchange
        if exchange is not None and self.current is not None:
            exchange.cut(self.proxy.error(self.current, 503, message, "shutting_down"))
        self.close()
        if self.upstream is not None:
            self.upstream.abort()


class Proxy:
    """The front: parse, ask the handler, answer or forward. One per router."""

    def __init__(self, handler: Handler, limits: Limits | None = None,
                 error: ErrorRenderer = default_error) -> None:
        self.handler = handler
        self.limits = limits or Limits()
        self.error = error
        #: open client connections, oldest first
        self.connections: dict[ClientConnection, None] = {}
        #: bytes of large bodies held (Limits.body_memory)
        self.body_bytes = 0
        self.draining = False
        self._drained: asyncio.Event | None = None

    def protocol(self) -> ClientConnection:
        return ClientConnection(self)

    def admit(self, client: ClientConnection) -> bool:
        """A new connection: past max_connections, the longest idle one makes room for it,
        or (none idle) it gets a 503 and is closed."""
        if self.draining:
            client.write(response_bytes(self.error(
                None, 503, "the router is stopping; try again", "shutting_down"), False))
            client.close()
            return False
        if len(self.connections) >= self.limits.max_connections:
            oldest = next((c for c in self.connections if c.idle), None)
            if oldest is None:
                logger.warning("refusing a connection: %d open, none idle (max_connections)",
                               len(self.connections))
                response = self.error(None, 503, f"too many connections "
                                      f"({self.limits.max_connections}); try again",
                                      "too_many_connections")
                response.headers.append(("Retry-After", "1"))
                client.write(response_bytes(response, False))
                client.close()
                return False
            logger.debug("max_connections reached: closing the longest idle connection")
            del self.connections[oldest]
            oldest.close()
        self.connections[client] = None
        return True

    def lost(self, client: ClientConnection) -> None:
        self.connections.pop(client, None)
        if self._drained is not None and not any(
                c.task is not None for c in self.connections):
            self._drained.set()

    def answered(self) -> None:
        if self._drained is not None and not any(
                c.task is not None for c in self.connections):
            self._drained.set()

    def admit_large(self, request: Request, size: int) -> bool:
        """May `request` hold `size` bytes of body (it holds request.large already)?"""
        more = size - request.large
        if self.body_bytes and self.body_bytes + more > self.limits.body_memory:
            logger.warning("refusing a request body of %d bytes: %d bytes of bodies held "
                           "(body_memory %d)", size, self.body_bytes, self.limits.body_memory)
            return False
        self.body_bytes += more
        request.large = size
        return True

    def release_large(self, request: Request) -> None:
        if request.large:
            self.body_bytes -= request.large
            request.large = 0

    async def listen(self, sock: Any) -> asyncio.Server:
        """Serve a listening socket (one of systemd's)."""
        return await asyncio.get_running_loop().create_server(self.protocol, sock=sock,
                                                              backlog=1024)

    async def adopt(self, conn: Any) -> None:
        """Serve a connection accepted already (first_request's), its request unread."""
        await asyncio.get_running_loop().connect_accepted_socket(self.protocol, conn)

    async def drain(self, grace: float) -> int:
        """Stop: idle connections close now, each busy one after its answer, and what is
        still being answered after `grace` seconds is cut. Returns how many were cut."""
        self.draining = True
        self._drained = asyncio.Event()
        for client in list(self.connections):
            if client.idle:
                client.close()
        self.answered()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._drained.wait()
        busy = [c for c in self.connections if c.task is not None]
        for client in busy:
            client.cut(f"the router stopped; the request ran past its {grace:g} s grace")
        self.close()
        return len(busy)

    def close(self) -> None:
        for client in list(self.connections):
            client.close()


# -- event loop -------------------------------------------------------------------------------
def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop where installed (a fifth less CPU per forwarded request), else asyncio's."""
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def bench_serve(port: int, upstream_path: str, size: int) -> None:
    """bench/proxy_layers.py's "fast" candidate: every request forwarded to one upstream,
    after the router's own cost of reading the model from the JSON body."""
    import socket

    async def main() -> None:
        upstream = Upstream(upstream_path, size)

        async def handler(request: Request) -> Response | Forward:
            if request.body.strip():
                try:
                    json.loads(request.body)
                except ValueError as exc:
                    return Response.error(400, f"request body is not valid JSON: {exc}",
                                          "invalid_request_error")
            return Forward(upstream)

        sock = socket.create_server(("127.0.0.1", port), backlog=1024)
        server = await Proxy(handler).listen(sock)
        print("ready", flush=True)
        await server.serve_forever()

    run(main())
