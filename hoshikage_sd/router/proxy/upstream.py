"""Upstream connections to llama-server's unix socket, in bounded pools, and what a handler
answers to send a request there (Forward)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from hoshikage_sd.router.proxy.messages import Early, Outcome, Request, Response, Transform
from hoshikage_sd.router.proxy.parsing import ResponseParser, Sink

logger = logging.getLogger("hoshikage.proxy")


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


@dataclass
class Forward:
    """Send the request to `upstream`. `unreachable` is asked what to do when no connection
    to it can be made (the unit was stopped: start it again, or give up); without it the
    client gets a 502. `done` runs once the exchange is over, however it ended.

    `request`: send this instead of the client's request (a translated one). `headers` are
    added to the response; upstream headers named in `drop` (lower case) are not passed on.
    `transform`, given the upstream status and headers, may return a Transform for the body
    (None: pass it through as it is).

    `broken` is asked for a streamed reply's last words when the upstream's connection
    breaks after the head went out (llama-server died mid-reply): given the error, the bytes
    that end the body in its own framing (an SSE error event, an NDJSON error line; b"" when
    the reply was whole after all), which the chunked end follows. None, or no `broken`, or
    a body that is neither SSE nor transformed: the client's connection is cut without the
    body's end, so that the reply never reads as complete (without `broken`, a transformed
    stream ends with the transform's own words, as at its end)."""

    upstream: Upstream
    unreachable: Callable[[OSError], Awaitable[Forward | Response]] | None = None
    done: Callable[[Outcome], None] | None = None
    request: Request | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    drop: frozenset[bytes] = frozenset()
    transform: Callable[[int, list[tuple[bytes, bytes]]], Transform | None] | None = None
    broken: Callable[[BaseException], Awaitable[bytes | None]] | None = None


Handler = Callable[[Request], Awaitable[Response | Forward | Early]]
