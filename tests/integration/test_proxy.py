"""hoshikage_sd.router.proxy in front of a real llama-server on a unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hoshikage_sd.router import proxy as fastproxy
from hoshikage_sd.router.proxy import Forward, Proxy, Request, Response, ResponseParser, Upstream

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path,
          llama_server_bin: Path) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("fastproxy")
    sock = str(tmp / "tiny.sock")
    log = (tmp / "llama.log").open("wb")
    proc = subprocess.Popen([str(llama_server_bin), "-m", str(tiny_gguf), "--host", sock,
                             "-c", "4096", "-np", "2"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(sock)
                    s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                    if b" 200 " in s.recv(100):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("llama-server did not start: "
                            + (tmp / "llama.log").read_text(errors="replace"))
            time.sleep(0.05)
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


class Collect:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.pieces: list[bytes] = []
        self.ended = False

    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                length: int, chunked: bool) -> None:
        self.status = status
        self.headers = {k.decode().lower(): v.decode() for k, v in headers}
        if chunked:
            self.headers["transfer-encoding"] = "chunked"

    def on_body(self, data: bytes) -> None:
        self.pieces.append(data)

    def on_end(self) -> None:
        self.ended = True

    def on_error(self, exc: BaseException, got_bytes: bool) -> None:
        raise AssertionError(exc)

    @property
    def body(self) -> bytes:
        return b"".join(self.pieces)

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader, head_only: bool = False) -> Collect:
    got = Collect()
    parser = ResponseParser(got, head_only)
    while not got.ended:
        data = await asyncio.wait_for(reader.read(65536), 30)
        if not data:
            assert parser.eof(), "connection closed mid-response"
            break
        parser.feed(data)
    got.headers["connection"] = "close" if not parser.keep_alive else "keep-alive"
    return got


def post(path: str, body: bytes | dict[str, Any], **headers: str) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def direct(sock: str, raw: bytes) -> Collect:
    reader, writer = await asyncio.open_unix_connection(sock)
    writer.write(raw)
    try:
        return await read_response(reader)
    finally:
        writer.close()


Scenario = Callable[[int, Upstream], Awaitable[None]]


def run(llama: str, scenario: Scenario, handler: fastproxy.Handler | None = None,
        size: int = 2) -> None:
    async def main() -> None:
        upstream = Upstream(llama, size)

        async def forward_all(request: Request) -> Response | Forward:
            if request.path == "/local":
                return Response.json(200, {"local": True, "query": request.query})
            return Forward(upstream)

        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = await Proxy(handler or forward_all).listen(sock)
        try:
            await scenario(port, upstream)
        finally:
            server.close()
            upstream.close()

    asyncio.run(main())


def test_streaming_passes_through_event_by_event(llama: str) -> None:
    async def scenario(port: int, upstream: Upstream) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/completion", {"prompt": "hello", "n_predict": 12, "stream": True}))
        got = await read_response(reader)
        writer.close()
        assert got.status == 200
        assert got.headers["transfer-encoding"] == "chunked"
        assert got.headers["content-type"].startswith("text/event-stream")
        events = [p for p in got.pieces if p.startswith(b"data: ")]
        # one chunk per event llama-server wrote, not one buffered blob
        assert len(events) >= 12, got.pieces
        assert json.loads(events[-1][6:])["stop"] is True

    run(llama, scenario)


def test_keep_alive_reuses_one_upstream_connection(llama: str) -> None:
    async def scenario(port: int, upstream: Upstream) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        seen = set()
        for _ in range(5):
            writer.write(post("/tokenize", {"content": "hello world"}))
            got = await read_response(reader)
            assert got.status == 200 and got.json()["tokens"]
            assert got.headers["connection"] == "keep-alive"
            assert len(upstream.idle) == 1 and upstream.busy == 0
            seen.add(id(upstream.idle[0]))
        assert len(seen) == 1  # the same upstream connection every time
        writer.close()

    run(llama, scenario)


def test_chunked_request_body(llama: str) -> None:
    async def scenario(port: int, upstream: Upstream) -> None:
        body = json.dumps({"content": "the model server hello world " * 20}).encode()
        want = (await direct(llama, post("/tokenize", body))).json()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /tokenize HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: application/json\r\n\r\n")
        for i in range(0, len(body), 100):
            piece = body[i:i + 100]
            writer.write(b"%x;ext=1\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.005)  # separate reads on the proxy's side
        writer.write(b"0\r\n\r\n")
        got = await read_response(reader)
        writer.close()
        assert got.status == 200
        assert got.json() == want

    run(llama, scenario)


def test_client_gone_mid_stream_closes_upstream(llama: str) -> None:
    async def scenario(port: int, upstream: Upstream) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/completion", {"prompt": "hello", "n_predict": 100000,
                                          "stream": True, "ignore_eos": True}))
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        assert upstream.busy == 1
        await reader.readuntil(b"data: ")  # generating
        writer.transport.abort()
        for _ in range(100):
            if upstream.busy == 0:
                break
            await asyncio.sleep(0.02)
        assert upstream.busy == 0 and upstream.idle == []  # dropped, not pooled
        # llama-server saw its client go: its slots are free again (it answers at once)
        started = time.monotonic()
        got = await direct(llama, post("/completion", {"prompt": "hi", "n_predict": 2}))
        assert got.status == 200 and time.monotonic() - started < 10

    run(llama, scenario)


def test_upstream_errors_pass_through(llama: str) -> None:
    requests = [b"GET /no-such-route HTTP/1.1\r\nHost: localhost\r\n\r\n",
                post("/completion", b"{not json"),
                post("/embeddings", {"content": "hello"})]

    async def scenario(port: int, upstream: Upstream) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for raw in requests:
            want = await direct(llama, raw)
            writer.write(raw)
            got = await read_response(reader)
            assert want.status >= 400
            assert (got.status, got.body) == (want.status, want.body)
        writer.close()

    run(llama, scenario)


def test_big_bodies_both_ways(llama: str) -> None:
    async def scenario(port: int, upstream: Upstream) -> None:
        body = json.dumps({"content": "hello world the model " * 100_000}).encode()  # 2.2 MB
        want = await direct(llama, post("/tokenize", body))
        assert want.status == 200
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/tokenize", body, expect="100-continue"))
        interim = await reader.readuntil(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        got = await read_response(reader)
        writer.close()
        assert got.status == 200
        assert len(got.body) > 1_000_000
        assert got.body == want.body

    run(llama, scenario)


def test_local_answers_and_json_errors(llama: str, tmp_path: Path) -> None:
    gone = Upstream(str(tmp_path / "nobody.sock"))
    asked: list[OSError] = []

    async def handler(request: Request) -> Response | Forward:
        if request.path == "/local":
            return Response.json(200, {"query": request.query})
        if request.path == "/retry":
            async def unreachable(exc: OSError) -> Response | Forward:
                asked.append(exc)
                return Response.error(503, "could not be started", "model_unavailable")
            return Forward(gone, unreachable=unreachable)
        return Forward(gone)

    async def scenario(port: int, upstream: Upstream) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /local?model=a&model=b&x=1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        got = await read_response(reader)
        assert (got.status, got.json()) == (200, {"query": {"model": "a", "x": "1"}})
        writer.write(post("/v1/chat/completions", {"model": "x"}))
        got = await read_response(reader)
        error = got.json()["error"]  # OpenAI's shape
        assert got.status == 502 and error["code"] == "model_unavailable", error
        assert error["type"] == "server_error" and error["param"] is None
        assert got.headers["content-type"].startswith("application/json")
        writer.write(post("/retry", {}))
        got = await read_response(reader)
        assert got.status == 503 and got.json()["error"]["code"] == "model_unavailable"
        assert len(asked) == 1 and isinstance(asked[0], FileNotFoundError)
        # malformed framing: a JSON 400 and the connection closed
        writer.write(b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"
                     b"\r\n\r\n")
        got = await read_response(reader)
        assert got.status == 400 and got.headers["connection"] == "close"
        assert await reader.read() == b""
        writer.close()

    run(llama, scenario, handler)


def test_pool_bounds_upstream_connections(llama: str) -> None:
    async def scenario(port: int, upstream: Upstream) -> None:
        most = 0

        async def client() -> None:
            nonlocal most
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(3):
                writer.write(post("/tokenize", {"content": "hello"}))
                got = await read_response(reader)
                assert got.status == 200
                most = max(most, upstream.busy)
            writer.close()

        await asyncio.gather(*(client() for _ in range(40)))
        assert 1 <= most <= 2 and upstream.busy == 0 and len(upstream.idle) <= 2

    run(llama, scenario, size=2)


def test_request_parser_pipelining_and_refusals() -> None:
    got: list[Request] = []
    parser = fastproxy.RequestParser(got.append, max_body=100)
    parser.feed(b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\nPOST /b?q=1 HTTP/1.0\r\nContent-Len")
    parser.feed(b"gth: 3\r\nConnection: keep-alive\r\n\r\nab")
    parser.feed(b"cGET /c HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert [(r.method, r.target, r.body, r.keep_alive) for r in got] == [
        ("GET", "/a", b"", True), ("POST", "/b?q=1", b"abc", True), ("GET", "/c", b"", False)]
    for bad in (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                b"GET / HTTP/1.1\r\n folded: x\r\n\r\n",
                b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
                b"GET / HTTP/1.1\r\nContent-Length: 101\r\n\r\n",
                b"GET / HTTP/2\r\n\r\n",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        with pytest.raises(fastproxy.BadRequest):
            fastproxy.RequestParser(got.append, max_body=100).feed(bad)


class Upper:
    """A streaming transform: every piece upper-cased, a last line at the end."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.headers = [(b"Content-Type", b"text/plain")]
        self.whole = False
        self.pieces = 0

    def feed(self, data: bytes) -> bytes:
        self.pieces += 1
        return data.upper()

    def finish(self) -> bytes:
        return b"END %d\n" % self.pieces


class Count:
    """A whole-body transform: the body's length as JSON, and a status of its choosing."""

    def __init__(self) -> None:
        self.status = 0
        self.headers = [(b"Content-Type", b"application/json")]
        self.whole = True
        self.parts: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        self.parts.append(data)
        return b""

    def finish(self) -> bytes:
        self.status = 202
        return json.dumps({"bytes": len(b"".join(self.parts))}).encode()


def test_forward_transforms_the_body_adds_and_drops_headers_and_says_how_it_ended(
        llama: str) -> None:
    outcomes: list[fastproxy.Outcome] = []
    upstream_holder: list[Upstream] = []

    async def handler(request: Request) -> Response | Forward:
        upstream = upstream_holder[0]
        common = {"headers": [(b"x-request-id", b"req_1")],
                  "drop": frozenset({b"content-type"}), "done": outcomes.append}
        if request.path == "/upper":
            translated = Request("POST", "/completion", "1.1", [], json.dumps(
                {"prompt": "once upon a time", "n_predict": 16, "stream": True}).encode())
            return Forward(upstream, request=translated,
                           transform=lambda status, _headers: Upper(status), **common)
        if request.path == "/count":
            return Forward(upstream, request=Request("POST", "/tokenize", "1.1", [],
                                                     b'{"content": "hello"}'),
                           transform=lambda _s, _h: Count(), **common)
        return Forward(upstream, transform=lambda _s, _h: None, **common)

    async def scenario(port: int, upstream: Upstream) -> None:
        upstream_holder.append(upstream)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/upper", {}))
        got = await read_response(reader)
        assert got.status == 200 and got.headers["transfer-encoding"] == "chunked"
        assert got.headers["content-type"] == "text/plain"  # llama-server's was dropped
        assert got.headers["x-request-id"] == "req_1"
        lines = got.body.splitlines()
        assert lines[0].startswith(b"DATA: ") and lines[-1].startswith(b"END ")
        assert int(lines[-1].split()[1]) > 1  # piece by piece, not buffered
        writer.write(post("/count", {}))  # same connection: still framed right
        got = await read_response(reader)
        assert got.status == 202 and "transfer-encoding" not in got.headers
        assert got.json()["bytes"] > 0 and got.headers["x-request-id"] == "req_1"
        writer.write(post("/tokenize", {"content": "hello"}))  # no transform: as it is
        got = await read_response(reader)
        assert got.status == 200 and got.json()["tokens"]
        assert "content-type" not in got.headers
        writer.close()
        assert [o.status for o in outcomes] == [200, 202, 200]
        assert all(o.complete and o.head_at is not None for o in outcomes)

    run(llama, scenario, handler)


def test_a_refused_client_reads_its_answer_not_a_reset() -> None:
    """A connection closed with its request unread would send a reset, which loses the
    answer written just before: refusals shut the write side and drop what still comes."""
    async def handler(request: Request) -> Response | Forward:
        return Response.json(200, {"ok": True})

    def read_all(sock: socket.socket) -> bytes:
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        limits = fastproxy.Limits(max_connections=1, max_body=1000)
        server = await Proxy(handler, limits).listen(listener)
        try:
            busy = socket.create_connection(("127.0.0.1", port))
            busy.sendall(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")  # not idle
            await asyncio.sleep(0.1)
            # connected and sent before the router's loop runs again: the request lies
            # unread in the kernel when the router refuses the connection
            extra = socket.create_connection(("127.0.0.1", port))
            extra.sendall(post("/v1/chat/completions", {"model": "x"}))
            extra.settimeout(5)
            answer = await loop.run_in_executor(None, read_all, extra)
            assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
            assert b"too many connections" in answer
            extra.close()
            busy.close()
            await asyncio.sleep(0.1)
            # a body past max_body, still being sent when the router answers 413
            big = socket.create_connection(("127.0.0.1", port))
            big.settimeout(5)

            def send_and_read() -> bytes:
                with contextlib.suppress(OSError):  # the router stops reading at its end
                    big.sendall(post("/x", b"x" * (4 << 20)))
                return read_all(big)

            answer = await loop.run_in_executor(None, send_and_read)
            assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
            big.close()
        finally:
            server.close()

    asyncio.run(main())


def test_a_client_that_sends_and_never_reads_holds_a_bounded_buffer() -> None:
    """Pipelined requests for the router's own answers (20 KB each), their answers never
    read: the router answers the next one only once the answers before it are on their way,
    so its write buffer stays bounded (it grew without end: the router was killed for its
    memory); all of them come once the client reads."""
    answered: list[int] = []
    count, size = 2000, 20_000

    async def handler(request: Request) -> Response | Forward:
        answered.append(1)
        return Response(200, b"x" * size, [("Content-Type", "text/plain")])

    def read_all(sock: socket.socket) -> bytes:
        data = bytearray()
        while chunk := sock.recv(1 << 20):
            data += chunk
        return bytes(data)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        server = await Proxy(handler).listen(listener)
        try:
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(listener.getsockname())
            pipelined = b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n" * count
            await loop.run_in_executor(None, client.sendall, pipelined)
            await asyncio.sleep(1.0)  # the router's time to answer all it would
            held = len(answered)
            client.sendall(b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            client.settimeout(30)
            data = await loop.run_in_executor(None, read_all, client)
            client.close()
            # what the kernel's socket buffers take (~3 MB on loopback), then the transport's
            assert held < count // 4, f"{held} of {count} answered with none read"
            assert data.count(b"HTTP/1.1 200 ") == count + 1
        finally:
            server.close()

    asyncio.run(main())


def test_a_pipelined_100_continue_comes_after_the_answers_before_it() -> None:
    """A head asking for 100-continue behind a request still being answered: its 100 goes
    out once that answer has (it went out at once, into the middle of a streamed answer);
    an HTTP/1.0 request's Expect gets none (RFC 9110 §10.1.1)."""
    async def handler(request: Request) -> Response | Forward:
        if request.path == "/slow":
            await asyncio.sleep(0.3)
        return Response.json(200, {"path": request.path, "body": request.body.decode()})

    async def main() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        server = await Proxy(handler).listen(listener)
        try:
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            writer.write(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n"
                         b"POST /next HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
                         b"Content-Length: 5\r\n\r\n")
            await asyncio.sleep(0.8)
            data = await asyncio.wait_for(reader.read(65536), 5)
            first, interim = data.split(b"HTTP/1.1 100 Continue\r\n\r\n")
            assert first.startswith(b"HTTP/1.1 200 ") and b'"/slow"' in first, data
            assert interim == b"", data
            writer.write(b"hello")
            second = await read_response(reader)
            assert second.json() == {"path": "/next", "body": "hello"}
            writer.close()
            # HTTP/1.0: no interim answer, the body is simply read
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            writer.write(b"POST /old HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n"
                         b"\r\n")
            await asyncio.sleep(0.2)
            writer.write(b"ok")
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
            assert b"100 Continue" not in answer
            writer.close()
        finally:
            server.close()

    asyncio.run(main())


def test_a_body_sent_a_byte_at_a_time_is_cut_at_the_minimum_rate() -> None:
    """A byte every 0.3 s restarts no clock for good: past the header timeout (1 s here)
    a body must come at MIN_BODY_RATE, so this one gets a 408 (it held its connection as
    long as it trickled: enough of them locked everyone out)."""
    async def handler(request: Request) -> Response | Forward:
        return Response.json(200, {"ok": True})

    async def main() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        server = await Proxy(handler, fastproxy.Limits(header_timeout=1.0)).listen(listener)
        try:
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            writer.write(b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n")
            began = time.monotonic()
            for _ in range(20):
                await asyncio.sleep(0.3)
                if reader.at_eof() or reader._buffer:  # type: ignore[attr-defined]
                    break
                writer.write(b"x")
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
            assert b"came slower than 500 bytes a second" in answer, answer  # it came
            assert time.monotonic() - began < 3
            writer.close()
        finally:
            server.close()

    asyncio.run(main())


def test_a_body_sent_after_a_late_100_continue_has_its_own_clock() -> None:
    """The answer before it took longer than the header timeout (1 s here): its body, sent
    once the 100 came, is timed from the 100, not from its head (a 408 at once)."""
    async def handler(request: Request) -> Response | Forward:
        if request.path == "/slow":
            await asyncio.sleep(1.5)
        return Response.json(200, {"body": request.body.decode()})

    async def main() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        server = await Proxy(handler, fastproxy.Limits(header_timeout=1.0)).listen(listener)
        try:
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            writer.write(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n"
                         b"POST /next HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
                         b"Content-Length: 200000\r\n\r\n")
            data = b""
            while b"100 Continue" not in data:
                data += await asyncio.wait_for(reader.read(65536), 5)
            writer.write(b"x" * 100)  # in two parts, as a large body comes
            await asyncio.sleep(0.2)
            writer.write(b"x" * 199_900)
            second = await read_response(reader)
            assert second.status == 200, second.body[:200]
            assert second.json() == {"body": "x" * 200_000}
            writer.close()
        finally:
            server.close()

    asyncio.run(main())
