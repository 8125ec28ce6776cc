"""A reply cut short (router/cut.py, proxy.Forward's `broken`): the front ends a stream
whose upstream broke mid-way with the handler's last words and the chunked end, cuts any
other body without its end, and asks nothing on a normal end; the router's words say the
model and what the unit recorded, or the worker that is down. A real front on a fake
llama-server (a unix socket that breaks off), real records in a runtime directory."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import pytest

from hoshikage_sd.manifest.model import Worker
from hoshikage_sd.router import cut
from hoshikage_sd.router import errors as api
from hoshikage_sd.router.ollama import requests
from hoshikage_sd.router.ollama.requests import translate
from hoshikage_sd.router.ollama.stream import StreamTranslator
from hoshikage_sd.router.proxy import Forward, Proxy, Request, Upstream
from hoshikage_sd.rpc import workers
from hoshikage_sd.runtime import Runtime

PIECE = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
ASK = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}")


def front(tmp_path: Path, content_type: bytes, ends: bool,
          words: bytes | None = b"data: why\n\n") -> tuple[bytes, list[BaseException]]:
    """What a client reads of a reply whose upstream sends one chunk, then ends it (`ends`)
    or breaks off; and the errors `broken` was asked about."""
    asked: list[BaseException] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n{}")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\nTransfer-Encoding: chunked"
                     b"\r\n\r\n%x\r\n%b\r\n" % (content_type, len(PIECE), PIECE))
        if ends:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()  # as a killed llama-server's socket goes

    async def broken(error: BaseException) -> bytes | None:
        asked.append(error)
        return words

    async def scenario() -> bytes:
        path = str(tmp_path / "up.sock")
        server = await asyncio.start_unix_server(upstream, path=path)
        pool = Upstream(path, 1)

        async def handler(_request: Request) -> Forward:
            return Forward(pool, broken=broken)

        sock = socket.create_server(("127.0.0.1", 0))
        listening = await Proxy(handler).listen(sock)
        reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        writer.write(ASK)
        got = b""
        try:
            while chunk := await asyncio.wait_for(reader.read(65536), 5):
                got += chunk
                if ends and got.endswith(b"0\r\n\r\n"):
                    break
        except ConnectionResetError:
            got += b"<reset>"
        writer.close()
        listening.close()
        server.close()
        return got

    return asyncio.run(scenario()), asked


def test_a_broken_stream_ends_with_the_last_words_and_its_end(tmp_path: Path) -> None:
    got, asked = front(tmp_path, b"text/event-stream", ends=False)
    assert len(asked) == 1, asked
    assert got.endswith(b"%x\r\n%b\r\nb\r\ndata: why\n\n\r\n0\r\n\r\n" % (len(PIECE), PIECE)), got


def test_a_normal_end_asks_for_nothing(tmp_path: Path) -> None:
    got, asked = front(tmp_path, b"text/event-stream", ends=True)
    assert not asked and got.endswith(PIECE + b"\r\n0\r\n\r\n"), got


@pytest.mark.parametrize(("content_type", "words"), [
    (b"text/plain", b"data: why\n\n"),  # nothing to say it in: not asked
    (b"text/event-stream", None),       # nothing said
])
def test_a_body_that_cannot_say_why_is_cut_without_its_end(
        tmp_path: Path, content_type: bytes, words: bytes | None) -> None:
    got, asked = front(tmp_path, content_type, ends=False, words=words)
    assert len(asked) == (content_type == b"text/event-stream"), asked
    assert PIECE in got and not got.endswith(b"0\r\n\r\n"), got


def test_the_unit_s_record_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hoshikage_sd.sd import units

    monkeypatch.setattr(units, "unit_state", lambda unit: ("active", False))  # alive, closed
    runtime = Runtime(tmp_path)
    began = time.time()
    assert cut.record(runtime, "tiny", began, wait=0.1) is None  # nobody said
    runtime.set_error("tiny", "llama-server was killed by SIGKILL while serving")
    assert cut.record(runtime, "tiny", began, wait=0.1) == (
        "its unit failed: llama-server was killed by SIGKILL while serving")
    old = began - 3600
    os.utime(runtime.error_path("tiny"), (old, old))  # an earlier run's
    assert cut.record(runtime, "tiny", began, wait=0.1) is None
    runtime.set_stop_reason("tiny", "idle")
    assert cut.record(runtime, "tiny", began, wait=0.1) == "its unit was stopped (idle)"


@pytest.mark.parametrize(("state", "said"), [
    ("deactivating", "its unit was stopped (not by hoshikage: systemctl stop "
                     "'hoshikage-model@tiny\\x2d1.service'?)"),
    ("inactive", "its unit was stopped (not by hoshikage: systemctl stop "
                 "'hoshikage-model@tiny\\x2d1.service'?)"),
    ("active", None),
])
def test_a_unit_stopped_by_hand_is_said_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           state: str, said: str | None) -> None:
    """No record says why (systemctl stop by hand sets none): the unit's state does."""
    from hoshikage_sd.sd import units

    monkeypatch.setattr(units, "unit_state", lambda unit: (state, False))
    assert cut.record(Runtime(tmp_path), "tiny-1", time.time(), wait=0.05) == said


def test_a_worker_down_is_named_as_admission_names_it() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: refused
        said = workers.down(Worker("w3", "127.0.0.1", port), timeout=1)
    assert said is not None and said.startswith(
        f"worker 'w3' (127.0.0.1:{port}) is unavailable: refused the connection"), said
    with socket.create_server(("127.0.0.1", 0)) as up:
        assert workers.down(Worker("w2", "127.0.0.1", up.getsockname()[1])) is None


def test_each_api_s_last_words() -> None:
    err = cut.error("model 'tiny' stopped mid-reply: its unit failed: boom")
    openai = cut.sse_event(api.Api.OPENAI, err, "req_1")
    assert openai.startswith(b"data: {") and openai.endswith(b"\n\n")
    assert json.loads(openai[6:])["error"] == {
        "message": "model 'tiny' stopped mid-reply: its unit failed: boom",
        "type": "server_error", "param": None, "code": "model_unavailable"}
    anthropic = cut.sse_event(api.Api.ANTHROPIC, err, "req_1")
    event, data = anthropic.split(b"\n", 1)
    assert event == b"event: error" and data.startswith(b"data: ")
    assert json.loads(data[6:]) == {"type": "error", "request_id": "req_1", "error": {
        "type": "api_error", "message": "model 'tiny' stopped mid-reply: its unit failed: boom"}}
    chat = translate("/api/chat", {"model": "tiny",
                                   "messages": [{"role": "user", "content": "hi"}]})
    assert isinstance(chat, requests.Upstream)
    ollama = StreamTranslator(chat, started_ns=0)
    ollama.feed(PIECE)
    assert json.loads(ollama.finish("why")[-1]) == {"error": "why"}


def test_a_server_s_exit_is_told_by_what_it_was() -> None:
    """A command backend's program exiting is not told as llama-server's."""
    from hoshikage_sd.model_unit.child import exit_reason

    assert exit_reason(1) == "llama-server exited with status 1"
    assert exit_reason(-9, "its command (sh)") == "its command (sh) was killed by SIGKILL"
