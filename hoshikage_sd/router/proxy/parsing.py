"""HTTP/1.1 message parsing over whole buffers: requests from clients, responses from
llama-server (strict: a framing it cannot be sure of is refused)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from hoshikage_sd.router.proxy.messages import HOP_BY_HOP, MAX_BODY, MAX_HEAD, BadRequest, Request

logger = logging.getLogger("hoshikage.proxy")


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
