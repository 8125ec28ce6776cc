"""A large body on Ollama's inference routes, through the real router to a real llama-server:
answered, and held by the router at about its own size (router/ollama/body.py), not three
times it. HOSHIKAGE_BODY_MB sets the body's size (docs/performance.md: 200, which
llama-server answers 413: its own payload limit; the router's peak is the figure)."""

from __future__ import annotations

import http.client
import json
import os
import socket
from pathlib import Path

import pytest

from .conftest import Served

pytestmark = pytest.mark.integration

SIZE = int(os.environ.get("HOSHIKAGE_BODY_MB", "48")) << 20


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def post(port: int, path: str, head: bytes, filler: int, tail: bytes) -> tuple[int, bytes]:
    """POST head + filler bytes of 'a' + tail, the body streamed from a small buffer (the
    client's memory is not the router's)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=300)
    size = len(head) + filler + len(tail)
    try:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\n"
                     "Content-Type: application/json\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode() + head)
        chunk = b"a" * (1 << 20)
        left = filler
        while left > 0:
            left -= sock.send(chunk[:left])
        sock.sendall(tail)
    except OSError:
        pass  # answered before the whole body (llama-server's 413): the answer waits
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    sock.close()
    return response.status, body


#: the stop string carries the size: llama-server keeps it without tokenizing it
ROUTES = {
    "/api/chat": (b'{"model": "tiny", "stream": false, "options": {"num_predict": 3, "stop": ["',
                  b'"]}, "messages": [{"role": "user", "content": "hello"}]}'),
    # the OpenAI route, forwarded as it came: the figure to match
    "/v1/chat/completions": (b'{"model": "tiny", "max_tokens": 3, "stop": ["',
                             b'"], "messages": [{"role": "user", "content": "hello"}]}'),
}


@pytest.mark.parametrize("path", ROUTES)
def test_a_large_body_costs_the_router_about_its_size(served: Served,
                                                      path: str) -> None:
    _, port, pid = served
    head, tail = ROUTES[path]
    # a small one first: the route's modules imported, the pool made
    status, body = post(port, path, head, 100, tail)
    assert status == 200, body
    before = status_kib(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM from here
    status, body = post(port, path, head, SIZE, tail)
    peak = status_kib(pid, "VmHWM")
    growth = (peak - before) * 1024
    print(f"router RSS {before / 1024:.0f} MiB before, peak {peak / 1024:.0f} MiB with one "
          f"{SIZE >> 20} MiB {path} body: {growth / SIZE:.2f}x its size; answered {status} "
          f"{body[:60]!r}")
    if SIZE <= 64 << 20:  # over its payload limit (100 MiB?) llama-server answers 413
        assert status == 200, body
        if path == "/api/chat":
            assert json.loads(body)["done"] is True
    assert growth < 1.35 * SIZE, growth
