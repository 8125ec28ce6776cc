"""The opt-in "loading" word to streaming clients (router/progress.py): SSE comment lines
while the model starts, then its stream, or an SSE error event; nothing new for a client
that does not ask. A real front (router/proxy) on the router, a fake llama-server on the
model's unix socket."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from hoshikage_sd.manifest import Model
from hoshikage_sd.router import progress, server
from hoshikage_sd.router.proxy import Proxy
from tests.unit.test_router_api import write

SSE = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'
UPSTREAM_ERROR = b'{"error":{"code":400,"message":"bad prompt","type":"invalid_request_error"}}'


def dechunk(raw: bytes) -> tuple[bytes, bytes]:
    head, _, rest = raw.partition(b"\r\n\r\n")
    if b"chunked" not in head.lower():
        return head, rest
    body = b""
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        body, rest = body + rest[:n], rest[n + 2:]
    return head, body


def ask(body: dict[str, object], progress_header: bool) -> bytes:
    data = json.dumps(body).encode()
    extra = b"X-Hoshikage-Progress: 1\r\n" if progress_header else b""
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(data) + data)


def run_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, requests: list[bytes],
              fail: bool = False, upstream_error: bool = False,
              stop_after: float | None = None,
              serving: bool = False) -> list[tuple[bytes, bytes]]:
    monkeypatch.setattr(progress, "INTERVAL", 0.2)
    (tmp_path / "tiny.gguf").write_bytes(b"\0" * 1000)
    (tmp_path / "rd").mkdir()
    (tmp_path / "run").mkdir()
    router = server.Router(server.load_config(write(tmp_path)))
    if serving:  # its runtime record says it serves (a router started afresh)
        router.runtime.serving = lambda name: True  # type: ignore[method-assign]

    async def ensure(model: Model) -> None:
        if model.name in router.ready:
            return
        partial = tmp_path / "rd" / ".tiny.gguf.tmp-1-0"
        partial.write_bytes(b"\0" * 450)
        await asyncio.sleep(0.7 if stop_after is None else 5)
        partial.unlink()
        if fail:
            raise server.StartFailed("no room for tiny: needed 9 GiB", permanent=True)
        router.ready.add(model.name)
    router.ensure = ensure  # type: ignore[method-assign]

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        if upstream_error:
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%b" % (len(UPSTREAM_ERROR),
                                                            UPSTREAM_ERROR))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n"
                         % (len(SSE), SSE))
        await writer.drain()
        writer.close()

    async def scenario() -> list[tuple[bytes, bytes]]:
        model_socket = await asyncio.start_unix_server(
            upstream, path=str(router.config.socket_path("tiny")))
        front = Proxy(router.handle, server.limits(router.config),
                      error=router.answers.render_error)
        sock = socket.create_server(("127.0.0.1", 0))
        listening = await front.listen(sock)
        answers = []
        for data in requests:
            router.ready.discard("tiny")
            reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            writer.write(data)
            await writer.drain()
            if stop_after is not None:  # the router stops while the model starts
                await asyncio.sleep(stop_after)
                await front.drain(0.1)
            answers.append(dechunk(await asyncio.wait_for(reader.read(), 10)))
            writer.close()
        front.close()
        listening.close()
        model_socket.close()
        return answers

    return asyncio.run(scenario())


def test_a_client_that_asks_hears_the_load_then_gets_the_stream(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked, plain, whole = run_front(tmp_path, monkeypatch, [
        ask({"model": "tiny", "stream": True}, True),
        ask({"model": "tiny", "stream": True}, False),
        ask({"model": "tiny"}, True)])  # not a stream: no word either
    head, body = asked
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    assert b"x-request-id" in head.lower()
    lines, _, rest = body.partition(b"data:")
    assert lines.startswith(b": loading tiny 45%\n\n"), body
    assert set(lines.split(b"\n\n")) <= {b": loading tiny 45%", b""}, lines
    assert lines.count(b": loading") >= 3  # one now, then one every INTERVAL
    assert b"data:" + rest == SSE
    for head, body in (plain, whole):
        assert head.startswith(b"HTTP/1.1 200") and b": loading" not in body
        assert body == SSE


def test_a_failed_start_ends_the_stream_with_an_error_event(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    [(head, body)] = run_front(tmp_path, monkeypatch,
                               [ask({"model": "tiny", "stream": True}, True)], fail=True)
    assert head.startswith(b"HTTP/1.1 200")
    comments, _, event = body.partition(b"event: error\ndata: ")
    assert comments.startswith(b": loading tiny")
    error = json.loads(event)
    assert "no room for tiny" in error["error"]["message"], error


def test_an_upstream_error_after_the_load_is_an_error_event_in_the_apis_shape(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    [(head, body)] = run_front(tmp_path, monkeypatch,
                               [ask({"model": "tiny", "stream": True}, True)],
                               upstream_error=True)
    assert head.startswith(b"HTTP/1.1 200")
    _, _, event = body.partition(b"event: error\ndata: ")
    error = json.loads(event)
    assert error["error"]["message"] == "bad prompt", error


def test_a_router_stopping_while_the_model_starts_ends_the_stream_with_its_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    [(head, body)] = run_front(tmp_path, monkeypatch,
                               [ask({"model": "tiny", "stream": True}, True)], stop_after=0.5)
    assert head.startswith(b"HTTP/1.1 200")
    comments, _, event = body.partition(b"event: error\ndata: ")
    assert comments.startswith(b": loading tiny")
    assert json.loads(event)["error"]["code"] == "shutting_down", event


def test_no_word_for_a_model_that_serves_already(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    [(head, body)] = run_front(tmp_path, monkeypatch,
                               [ask({"model": "tiny", "stream": True}, True)], serving=True)
    assert head.startswith(b"HTTP/1.1 200") and body == SSE
