"""HTTP/1.1 message parsing over whole buffers: requests from clients, responses from
llama-server (strict: a framing it cannot be sure of is refused)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Protocol

from hoshikage_sd.router.http1 import (
    TCHAR,
    VALUE_BYTES,
    Refused,
    content_length,
    framing,
    origin_form,
    split_head,
)
from hoshikage_sd.router.proxy.messages import HOP_BY_HOP, MAX_BODY, MAX_HEAD, BadRequest, Request

logger = logging.getLogger("hoshikage.proxy")


# -- chunked framing (RFC 9112 §7.1) ---------------------------------------------------------
#: chunk-ext, without the BWS that RFC 9112 allows around ';' and '=': h11 refuses it as
#: well, and a refusal cannot make two readers frame a stream apart
_TOKEN = b"[" + re.escape(TCHAR) + b"]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
CHUNK_EXT = re.compile(b"(?:;" + _TOKEN + b"(?:=(?:" + _TOKEN + b"|" + _QUOTED + b"))?)*")


def chunk_size(line: bytes) -> int:
    """A chunk-size line's size: 1*HEXDIG (int(size, 16) would take '0x1a', '+1a', '1_a'
    and ' 1a'), up to 16 digits (past 2**64, past any body limit), then chunk extensions,
    which are checked and dropped (they are not forwarded: the body is)."""
    size, semicolon, _ = line.partition(b";")
    # int(size, 16) also takes a sign, '_', whitespace and '0x': isalnum() (ASCII only, on
    # bytes) leaves the last, and int() refuses the other letters. Cheaper than translate().
    if (not size.isalnum() or len(size) > 16 or b"x" in size or b"X" in size
            or (semicolon and CHUNK_EXT.fullmatch(line, len(size)) is None)):
        raise BadRequest("malformed chunk size")
    try:
        return int(size, 16)
    except ValueError:
        raise BadRequest("malformed chunk size") from None


def trailer(line: bytes) -> None:
    """A trailer field: a field line as in the head. Trailers are dropped, not forwarded,
    but a framing field among them (Content-Length, Transfer-Encoding) is refused: a reader
    that merged it would frame the message otherwise (RFC 9110 §6.5.1)."""
    name, colon, _ = line.partition(b":")
    if (not colon or not name or name.translate(None, TCHAR) or line.translate(None, VALUE_BYTES)
            or name.lower() in (b"content-length", b"transfer-encoding")):
        raise BadRequest("malformed trailer")


# -- parsing ----------------------------------------------------------------------------------
class RequestParser:
    """HTTP/1.x requests from a byte stream, bodies by Content-Length or chunked. Strict where
    a lenient parser would let two parties read one stream differently (both framings, two
    lengths, folded or malformed header lines, control characters, bare CR or LF, names that
    are not tokens, sizes that only int() reads as numbers: router/http1.py, chunk_size):
    such a request is a BadRequest. tests/unit/test_http_fuzz.py holds it to h11."""

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
        #: bytes of trailers read (chunked: after the last chunk)
        self.trailers = 0
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
            if not self.chunked:
                buf = self._length(buf)
            else:
                buf = self._chunked(buf)
                if self.request is not None:
                    # an incomplete line (a size, the CRLF after a chunk, a trailer): it
                    # waits for the next feed. (Looping on it instead spun the event loop
                    # forever on a size line split between two reads: found by
                    # tests/unit/test_http_parsing.py's split test, issue 23.)
                    break
        self.buf = buf

    def _head(self, head: bytes) -> None:
        try:
            method, target, version, fields = split_head(head)
            length, chunked, keep_alive, expect = framing(fields, version)
        except Refused as exc:
            raise BadRequest(str(exc), exc.status) from None
        target, fields = origin_form(target, fields)
        request = Request(method.decode("ascii"), target.decode("latin-1"),
                          version[5:].decode("ascii"), fields, keep_alive=keep_alive)
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
                size = chunk_size(buf[:end])
                self.size += size
                if self.size > self.max_body:
                    raise BadRequest(f"body larger than {self.max_body} bytes", 413,
                                     self.request)
                if self.size > self.large_body:
                    self._large(self.request, self.size)
                buf = buf[end + 2:]
                self.left = size if size else -2
                self.trailers = 0
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
                self.trailers += end + 2
                if self.trailers > MAX_HEAD:
                    raise BadRequest("trailers too large", 431)
                if not line:
                    self._complete()
                else:
                    trailer(line)
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
                    try:  # as strict as with clients: the upstream is not trusted to frame
                        size = chunk_size(line)
                    except BadRequest:
                        raise ValueError("malformed chunk size from upstream") from None
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
                given = content_length(value, None)  # 1*DIGIT, as with clients
                if 0 <= length != given:
                    raise ValueError("two different Content-Lengths from upstream")
                length = given
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
