"""The client side: one client connection, its requests parsed, queued and answered in turn
(or forwarded), its timeouts (head, body, idle) and its lingering close; listener.Proxy
accepts the connections."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

from hoshikage_sd.router.proxy.exchange import Exchange, early_end, early_head
from hoshikage_sd.router.proxy.messages import (
    MAX_QUEUED,
    BadRequest,
    Early,
    ErrorRenderer,
    Limits,
    Outcome,
    Request,
    Response,
    request_head,
    response_bytes,
)
from hoshikage_sd.router.proxy.parsing import RequestParser
from hoshikage_sd.router.proxy.upstream import Forward, Handler, UpstreamConnection

logger = logging.getLogger("hoshikage.proxy")

#: bytes a second a body must come at, after the header timeout's grace (as Apache's
#: mod_reqtimeout MinRate): a body sent a byte at a time holds its connection for good else
MIN_BODY_RATE = 500
#: how long, and how many bytes at most, a connection closed with a last answer keeps
#: reading (and dropping) what its client still sends
LINGER_SECONDS = 2.0
LINGER_BYTES = 64 << 20


class Front(Protocol):
    """What a connection needs of the proxy that accepted it (listener.Proxy, which imports
    this module): the handler, the limits and the error's shape; its account of the open
    connections and of the large bodies held."""

    handler: Handler
    limits: Limits
    error: ErrorRenderer
    draining: bool

    def admit(self, client: ClientConnection) -> bool: ...

    def lost(self, client: ClientConnection) -> None: ...

    def answered(self) -> None: ...

    def admit_large(self, request: Request, size: int) -> bool: ...

    def release_large(self, request: Request) -> None: ...


class ClientConnection(asyncio.Protocol):
    def __init__(self, proxy: Front) -> None:
        self.proxy = proxy
        limits = proxy.limits
        self.parser = RequestParser(self._parsed, limits.max_body, limits.large_body,
                                    proxy.admit_large)
        self.transport: asyncio.Transport | None = None
        self.queue: collections.deque[Request] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.upstream: UpstreamConnection | None = None
        self.exchange: Exchange | None = None
        #: an Early stream's head is out and its model is still starting (no exchange yet)
        self.early = False
        self.current: Request | None = None
        self.lost = False
        self.reading = True
        self.eof = False
        #: the one timer: idle (between requests), head (one coming in), body (stalled)
        self.timer: asyncio.TimerHandle | None = None
        self.timing = ""
        #: bytes still to drop before closing (a last answer sent, see finish())
        self.lingering = 0
        self.peer = self.local = ""
        #: when the body being read began to come, and its bytes so far (MIN_BODY_RATE)
        self.body_began: float | None = None
        self.body_bytes = 0
        #: cleared while the transport's write buffer is full (pause_writing): the next
        #: request waits, so a client that sends and never reads holds a bounded buffer
        self.writable = asyncio.Event()
        self.writable.set()

    # transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are ones
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        local = transport.get_extra_info("sockname")
        self.local = str(local[0]) if isinstance(local, tuple) and local else ""
        if not self.proxy.admit(self):
            return
        self._arm("head", self.proxy.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self.lingering = max(0, self.lingering - len(data))
            if not self.lingering:
                self.close()
            return
        try:
            self.parser.feed(data)
        except BadRequest as exc:
            self.queue.clear()
            response = self.proxy.error(exc.request, exc.status, str(exc), {
                503: "model_unavailable", 501: "not_implemented"}.get(exc.status,
                                                                      "invalid_request"))
            response.headers += list(exc.headers.items())
            self.finish(response_bytes(response, False))
            return
        if self.parser.idle:
            self.body_began = None
        elif self.body_began is None:
            self.body_began, self.body_bytes = asyncio.get_running_loop().time(), 0
        else:
            self.body_bytes += len(data)
        if self.task is None:
            # a head on its way, or a body: either must come within the header timeout, a
            # body at MIN_BODY_RATE after it
            if not self.parser.idle:
                assert self.body_began is not None
                self._arm("body", self.body_began + self.proxy.limits.header_timeout
                          + self.body_bytes / MIN_BODY_RATE - asyncio.get_running_loop().time())
            elif self.timing == "idle" and self.parser.buf:
                self._arm("head", self.proxy.limits.header_timeout)
        self._continue()

    def _continue(self) -> None:
        """The 100 Continue a request's head asked for, once its turn has come: the answers
        to the requests before it go out first, whole (RFC 9112 §9.3.2)."""
        if self.parser.expects_continue and self.task is None and not self.queue:
            self.parser.expects_continue = False
            self.body_began = None  # its body's clock starts now, not at its head
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
        self.writable.clear()
        if self.upstream is not None:
            self.upstream.pause()

    def resume_writing(self) -> None:
        self.writable.set()
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

    def finish(self, last: bytes) -> None:
        """Send a last answer and close without losing it. Closed with bytes of the request
        unread, a socket sends a reset, and a client that is still sending may get the reset
        before it reads the answer. So, as nginx's lingering close does: shut our side, drop
        what still comes for a moment, then close."""
        self.write(last)
        transport = self.transport
        if transport is None or self.lost or not transport.can_write_eof():
            self.close()
            return
        self._disarm()
        self.queue.clear()
        self.lingering = LINGER_BYTES
        transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, self.close)

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
            grace = f"{self.proxy.limits.header_timeout:g} s"
            said = f"the request body came slower than {MIN_BODY_RATE} bytes a second after " \
                f"{grace}" if what == "body" and self.body_bytes else \
                f"the request {what} did not come within {grace}"
            self.finish(response_bytes(self.proxy.error(None, 408, said, "timeout"), False))
            return
        self.close()

    def _parsed(self, request: Request) -> None:
        self.parser.expects_continue = False  # its body came: no 100 is owed any more
        self.body_began = None  # the next one's clock starts with its first bytes
        self.queue.append(request)
        if len(self.queue) > MAX_QUEUED and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()
        if self.task is None:
            self._disarm()
            self.task = asyncio.get_running_loop().create_task(self._serve())

    def internal_error(self, request: Request | None) -> Response:
        """The 500 for a request whose handling failed: in its API's shape (an Ollama
        client reads {"error": "..."}), or the default one should that fail too."""
        message = "internal error in the router"
        try:
            return self.proxy.error(request, 500, message, "server_error")
        except Exception:
            logger.exception("proxy: the 500 in the request's shape failed")
            return self.proxy.error(None, 500, message, "server_error")

    async def _serve(self) -> None:
        request: Request | None = None
        try:
            while self.queue and not self.lost:
                if not self.writable.is_set():  # the answers before it are not read yet
                    await self.writable.wait()
                    if self.lost:
                        break
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
            self.write(response_bytes(self.internal_error(request), False))
            self.close()
            return
        finally:
            self.task = None
            self.proxy.answered()
        if self.eof:
            self.close()
        elif not self.lost:
            self._continue()  # a pipelined head waiting for it behind the answers
            if not self.parser.idle:
                self._arm("body", self.proxy.limits.header_timeout)
            elif self.parser.buf:
                self._arm("head", self.proxy.limits.header_timeout)
            else:
                self._arm("idle", self.proxy.limits.idle_timeout)

    async def _answer(self, request: Request) -> bool:
        """Answer one request; False when the connection must close after it."""
        head_only = request.method == "HEAD"
        request.peer, request.local = self.peer, self.local
        answer = await self.proxy.handler(request)
        continued = isinstance(answer, Early)
        if isinstance(answer, Early):
            # an SSE stream begun before its model serves: its head now, "loading" comments
            # while it starts (router/progress.py), then the upstream's body or the error
            self.write(early_head(answer, request.keep_alive))
            self.early = True
            try:
                answer = cast(Response | Forward, await answer.wait(self.write_chunk))
            finally:
                self.early = False
        result: Response | Forward = answer
        while isinstance(result, Forward):
            forward = result
            outcome = Outcome()
            try:
                return await self._forward(request, forward, head_only, outcome, continued)
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
        if continued:
            self.write(early_end(result))
            return request.keep_alive
        self.write(response_bytes(result, keep, head_only))
        return keep

    def write_chunk(self, data: bytes) -> None:
        """One chunk of a chunked response (an Early stream's comment lines)."""
        if data:
            self.write(b"%x\r\n%b\r\n" % (len(data), data))

    async def _forward(self, request: Request, forward: Forward, head_only: bool,
                       outcome: Outcome, continued: bool = False) -> bool:
        upstream_request = forward.request or request
        head = request_head(upstream_request)
        fresh = False
        while True:
            conn, reused = await forward.upstream.acquire(fresh)
            exchange = Exchange(self, request.keep_alive, request.version == "1.0", forward,
                                head_only, continued)
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
                self.write(early_end(response) if continued else response_bytes(response, False))
            elif exchange.error is not None and forward.broken is not None and not self.lost:
                await self._cut_short(forward.broken, exchange, exchange.error)
            return False

    async def _cut_short(self, broken: Callable[[BaseException], Awaitable[bytes | None]],
                         exchange: Exchange, error: BaseException) -> None:
        """The upstream broke after the client had the head (llama-server died mid-reply):
        a stream that can say so ends with the handler's last words on why and its chunked
        end, so that a client tells it from a short reply; any other body is cut by a
        reset, without its end, so that it never reads as complete. Only this path pays."""
        last = None
        if exchange.framed:
            try:
                last = await broken(error)
            except Exception:  # the words are a courtesy: the stream still ends
                logger.exception("proxy: no last words for %s", self._what())
        transport = self.transport
        if transport is None or self.lost or transport.is_closing():
            return  # the client went, or the router's stop has cut it meanwhile
        if last is not None:
            exchange.end_with(last)
        elif transport.get_write_buffer_size():
            transport.close()  # what is queued goes first; its framing shows the cut
        else:
            transport.abort()

    def cut(self, message: str) -> None:
        """End what is being answered now, as cleanly as its framing allows (the router
        stops): a chunked stream gets a last event saying why and its end."""
        exchange = self.exchange
        if exchange is not None and self.current is not None:
            exchange.cut(self.proxy.error(self.current, 503, message, "shutting_down"))
        elif self.early and self.current is not None:  # its model still starting
            self.write(early_end(self.proxy.error(self.current, 503, message,
                                                  "shutting_down")))
            self.early = False
        self.close()
        if self.upstream is not None:
            self.upstream.abort()
