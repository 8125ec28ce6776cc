"""The router under systemd-socket-activate, forwarding to a real llama-server."""

from __future__ import annotations

import http.client
import json
import time

import pytest

from testbed.unixhttp import UnixHTTPConnection
from tests.support import eventually, listening

from .conftest import (
    Served,
    Setup,
    free_port,
    socket_activated_router,
    stop,
    write_manifest,
)

pytestmark = pytest.mark.integration


def request(port: int, method: str, path: str,
            body: object = None) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return response.status, payload


def test_chat_completion_by_alias(served: Served) -> None:
    setup, port, _ = served
    status, body = request(port, "POST", "/v1/chat/completions",
                           {"model": "small", "max_tokens": 4,
                            "messages": [{"role": "user", "content": "hello"}]})
    assert status == 200, body
    assert body["model"] == "tiny"
    choices = body["choices"]
    assert isinstance(choices, list) and choices[0]["message"]["content"]
    # The router writes the record once the request ended, just after the last byte went out.
    record = setup.runtime / "activity" / "tiny.json"
    assert eventually(record.exists, timeout=5)
    activity = json.loads(record.read_text())
    assert activity["in_flight"] == 0 and activity["last_end"] > time.time() - 60


def test_llama_server_endpoints_pass_through(served: Served) -> None:
    port = served.port
    status, body = request(port, "POST", "/tokenize", {"model": "tiny", "content": "hello"})
    assert status == 200 and body["tokens"], body
    status, body = request(port, "POST", "/completion", {"prompt": "hi", "n_predict": 3})
    assert status == 200 and body["tokens_predicted"] == 3, body  # default model: the only one


def test_models_unknown_and_malformed(served: Served) -> None:
    """/v1/models says what serves (the model was started before this router saw a request
    for it: its own records know nothing), and GET /v1/models/{id} resolves aliases."""
    setup, port, _ = served
    status, body = request(port, "GET", "/v1/models")
    assert status == 200
    tiny = {"id": "tiny", "object": "model", "owned_by": "hoshikage", "created": 0,
            "type": "model", "display_name": "tiny", "created_at": "1970-01-01T00:00:00Z",
            "aliases": ["small"], "loaded": True, "status": {"value": "loaded"}}
    assert body["data"] == [tiny]  # with llama.cpp's router's status (router/control.py)
    assert request(port, "GET", "/v1/models/small") == (200, tiny)
    status, body = request(port, "GET", "/v1/models/nope")
    assert status == 404 and "nope" in str(body["error"]), body
    status, body = request(port, "POST", "/v1/chat/completions", {"model": "nope"})
    assert status == 404 and "tiny" in str(body["error"]), body
    status, body = request(port, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in str(body["error"]), body
    # nested past the interpreter's recursion limit: bad JSON too, not the router's 500
    deep = b'{"model": "tiny", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path in ("/v1/chat/completions", "/api/chat", "/models/load"):
        status, body = request(port, "POST", path, deep)
        assert status == 400 and "JSON" in str(body), (path, body)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/panel/api/load", body=deep, headers={
        "Content-Type": "application/json", "X-Hoshikage-Panel": "1"})
    response = conn.getresponse()
    assert response.status == 400, response.read()
    conn.close()
    assert not (setup.runtime / "activity" / "tiny.json").exists()  # no request reached tiny


def test_streaming_is_not_buffered(served: Served) -> None:
    setup, port, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/completion", body=json.dumps(
        {"prompt": "once upon a time", "n_predict": 3000, "stream": True}),
        headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    first = response.readline()
    assert first.startswith(b"data: "), first
    # The first chunk reached us while llama-server is still generating: nothing buffered.
    slots = UnixHTTPConnection(str(setup.sock()))
    slots.request("GET", "/slots")
    busy = [s for s in json.loads(slots.getresponse().read()) if s["is_processing"]]
    slots.close()
    assert busy, "generation had already finished when the first chunk arrived"
    events = 1
    for line in iter(response.readline, b""):  # a hundred more, not all 3000: they stream
        events += line.startswith(b"data: ")
        if events > 100:
            break
    conn.close()  # the router cancels the rest upstream
    assert events > 100


def test_router_exits_when_idle_and_nothing_loaded(setup: Setup) -> None:
    write_manifest(setup.root, setup.llama_server, setup.source, router_idle_exit="1s")
    port = free_port()
    router = socket_activated_router(setup, port)
    assert listening(port)
    try:
        status, _ = request(port, "GET", "/v1/models")
        assert status == 200
        router.wait(15)  # no model unit is loaded (no systemd here), so it may go
    finally:
        stop(router)
    assert router.returncode == 0
    assert b"router exits" in (router.stderr.read() if router.stderr else b"")
