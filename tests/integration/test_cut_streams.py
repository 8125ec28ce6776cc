"""A streamed reply whose llama-server dies mid-way (SIGKILL, as the OOM killer sends) ends
with an error the client's SDK raises, in each API's shape, naming the model and why; not
with a clean end that reads as a short reply. The real router in front of a real
llama-server run by its activator (no systemd: the activator's record says why)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from hoshikage_sd.runtime import Runtime
from tests.support import eventually

from .conftest import Served, Setup

pytestmark = pytest.mark.integration

#: long enough to be cut well before its end, however fast the tiny model goes
LONG = 3000
#: what the error must say: the model, and the cause the activator recorded
CAUSE = "model 'tiny' stopped mid-reply: its unit failed: llama-server was killed by SIGKILL"

OPENAI = ("/v1/chat/completions", {"model": "tiny", "stream": True, "max_tokens": LONG,
                                   "ignore_eos": True,
                                   "messages": [{"role": "user", "content": "hi"}]})
ANTHROPIC = ("/v1/messages", {"model": "tiny", "stream": True, "max_tokens": LONG,
                              "ignore_eos": True,
                              "messages": [{"role": "user", "content": "hi"}]})
OLLAMA = ("/api/chat", {"model": "tiny", "stream": True,
                        "options": {"num_predict": LONG, "ignore_eos": True},
                        "messages": [{"role": "user", "content": "hi"}]})


def kill_llama_server(setup: Setup) -> None:
    running = Runtime(setup.runtime).running("tiny")
    assert running is not None
    os.kill(running.pid, signal.SIGKILL)


def cut(setup: Setup, port: int, path: str, body: dict[str, Any], after: int = 5
        ) -> list[str]:
    """The reply's lines: the stream read through httpx (which raises on a chunked body
    without its end), llama-server killed once `after` lines of content came."""
    lines: list[str] = []
    content = 0
    with httpx.stream("POST", f"http://127.0.0.1:{port}{path}", json=body,
                      timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith(("data:", "{")):
                content += 1
                if content == after:
                    kill_llama_server(setup)
    return lines


def events(lines: list[str]) -> list[tuple[str, str]]:
    """SSE lines as (event, data) pairs."""
    out: list[tuple[str, str]] = []
    event = ""
    data: list[str] = []
    for line in [*lines, ""]:
        if not line:
            if data:
                out.append((event, "\n".join(data)))
            event, data = "", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    return out


def test_openai_stream_ends_with_an_error_event(served: Served) -> None:
    setup, port, _ = served
    got = events(cut(setup, port, *OPENAI))
    assert len(got) > 5 and "[DONE]" not in [d for _, d in got], got[-3:]
    assert all('"finish_reason":"' not in d for _, d in got), got[-3:]  # cut, not finished
    event, data = got[-1]
    error = json.loads(data)["error"]  # as llama-server's own errors mid-stream
    assert event == "" and error["type"] == "server_error", got[-1]
    assert CAUSE in error["message"], error


def test_anthropic_stream_ends_with_an_error_event(served: Served) -> None:
    setup, port, _ = served
    got = events(cut(setup, port, *ANTHROPIC))
    assert "message_stop" not in [e for e, _ in got], got[-3:]
    event, data = got[-1]
    assert event == "error", got[-1]
    error = json.loads(data)
    assert error["type"] == "error" and error["error"]["type"] == "api_error", error
    assert CAUSE in error["error"]["message"], error


def test_ollama_stream_ends_with_an_error_line(served: Served) -> None:
    setup, port, _ = served
    lines = [json.loads(line) for line in cut(setup, port, *OLLAMA) if line]
    assert len(lines) > 5 and not any(line.get("done") for line in lines), lines[-3:]
    assert CAUSE in lines[-1]["error"], lines[-1]


def raised(setup: Setup, port: int, read: Callable[[str], Iterator[object]]) -> Exception:
    """What the official client raises reading a stream cut after five pieces."""
    try:
        for n, _ in enumerate(read(f"http://127.0.0.1:{port}")):
            if n == 5:
                kill_llama_server(setup)
    except Exception as exc:
        return exc
    raise AssertionError("the stream ended without an error")


@pytest.mark.parametrize("client", ["openai", "anthropic", "ollama"])
def test_the_official_clients_raise_it(served: Served, client: str) -> None:
    """Each API's official Python client raises its own API error with the message (not
    httpx's protocol error, and not a clean end)."""
    setup, port, _ = served
    messages: Any = [{"role": "user", "content": "hi"}]
    if client == "openai":
        import openai

        def read(url: str) -> Iterator[object]:
            return iter(openai.OpenAI(base_url=url + "/v1", api_key="x").chat.completions
                        .create(model="tiny", stream=True, max_tokens=LONG, messages=messages,
                                extra_body={"ignore_eos": True}))
        kind: type[Exception] = openai.APIError
    elif client == "anthropic":
        import anthropic

        def read(url: str) -> Iterator[object]:
            return iter(anthropic.Anthropic(base_url=url, api_key="x").messages.create(
                model="tiny", stream=True, max_tokens=LONG, messages=messages,
                extra_body={"ignore_eos": True}))
        kind = anthropic.APIStatusError
    else:
        import ollama

        def read(url: str) -> Iterator[object]:
            return iter(ollama.Client(host=url).chat(
                model="tiny", stream=True, messages=messages,
                options={"num_predict": LONG, "ignore_eos": True}))
        kind = ollama.ResponseError
    exc = raised(setup, port, read)
    assert isinstance(exc, kind), repr(exc)
    assert CAUSE in str(exc), repr(exc)
    # the activator recorded it as it exited; the router said so within the second
    assert eventually(lambda: Runtime(setup.runtime).error("tiny") is not None, timeout=5)
