"""One request forwarded upstream and its answer relayed back."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from hoshikage_sd.router.proxy.messages import (
    REASONS,
    Early,
    Outcome,
    Response,
    Transform,
)
from hoshikage_sd.router.proxy.upstream import Forward


class Draining(Protocol):
    draining: bool


class Client(Protocol):
    """What an exchange needs of the client connection it answers (front.ClientConnection,
    which imports this module)."""

    @property
    def proxy(self) -> Draining: ...

    def write(self, data: bytes) -> None: ...

logger = logging.getLogger("hoshikage.proxy")


# -- the front --------------------------------------------------------------------------------
class Exchange:
    """The upstream side of one forwarded request, as seen from the client connection."""

    def __init__(self, client: Client, keep_alive: bool, http10: bool,
                 forward: Forward | None = None, head_only: bool = False,
                 continued: bool = False) -> None:
        self.client = client
        #: the client has its head already (an SSE stream that said "loading" while the
        #: model started: Early): the upstream's head is not sent, its body is chunked on,
        #: an error's body becomes an SSE `error` event
        self.continued = continued
        self.error_body: bytearray | None = None
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
        if self.continued:
            self.head_sent = self.chunked = self.sse = True
            if status >= 400:
                self.error_body = bytearray()
            return
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
        self._out(data)

    def _out(self, data: bytes) -> None:
        if self.error_body is not None:
            self.error_body += data
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
            self._out(data)
        elif data:
            self._out(data)

    def on_end(self) -> None:
        self._finish_transform()
        if self.error_body is not None:
            self.client.write(sse_error(bytes(self.error_body)))
            self.error_body = None
        if self.chunked:
            self.client.write(b"0\r\n\r\n")
        self.outcome.complete = True
        if not self.finished.done():
            self.finished.set_result(True)

    def on_error(self, exc: BaseException, got_bytes: bool) -> None:
        self.error = exc
        self.got_bytes = got_bytes
        if self.head_sent and self.transform is not None and not self.transform.whole and \
                (self.forward is None or self.forward.broken is None):
            # a translated stream ends with its own word on what went wrong (with `broken`,
            # the front asks for the last words once it knows why: front._cut_short)
            self._finish_transform()
            if self.chunked:
                self.client.write(b"0\r\n\r\n")
        if not self.finished.done():
            self.finished.set_result(False)

    @property
    def framed(self) -> bool:
        """Can the body still say why it ends: chunked, and made of events or lines that a
        client reads one by one (SSE, or a translation such as Ollama's NDJSON)."""
        return self.head_sent and self.chunked and (self.sse or self.transform is not None)

    def end_with(self, last: bytes) -> None:
        """The body's last words (a reply cut short: why, in its own framing; b"": none
        needed) and the chunked end."""
        self.client.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(last), last) if last
                          else b"0\r\n\r\n")

    def cut(self, error: Response) -> None:
        """End the response here (the router stops): a chunked one gets its end, after a
        last word on why: an SSE `error` event carrying `error`'s JSON body (what OpenAI's
        and Anthropic's clients raise on), or the translation's own (Ollama's)."""
        if not self.head_sent or not self.chunked or self.finished.done():
            return  # no head yet or no framing to end: the close says it
        if self.transform is not None and not self.transform.whole:
            self._finish_transform()
        elif self.sse:
            self.client.write(sse_error(error.body))
        self.client.write(b"0\r\n\r\n")
        self.got_bytes = True  # not to be sent again
        self.finished.set_result(False)


def sse_error(body: bytes) -> bytes:
    """One chunk holding an SSE `error` event with `body` (a JSON error) as its data: what
    OpenAI's and Anthropic's clients raise on in a stream."""
    data = b"\ndata: ".join(body.replace(b"\r", b"").split(b"\n"))
    event = b"event: error\ndata: " + data + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(event), event)


def early_head(early: Early, keep_alive: bool) -> bytes:
    """The head of an SSE stream sent before the model serves (Early): 200, chunked."""
    out = [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
           b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n"]
    out += [k.encode("latin-1") + b": " + v.encode("latin-1") + b"\r\n"
            for k, v in early.headers]
    if not keep_alive:
        out.append(b"Connection: close\r\n")
    return b"".join(out) + b"\r\n"


def early_end(result: Response) -> bytes:
    """How a stream begun early ends when the answer is the router's own (a start that
    failed, a model that went away): its error as an SSE event, then the chunked end."""
    return sse_error(result.body) + b"0\r\n\r\n"
