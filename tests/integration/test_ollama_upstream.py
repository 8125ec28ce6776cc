"""hoshikage_sd.ollama against the real llama-server: every upstream request it makes is one
llama-server accepts, and every reply (whole or streamed) it translates is one ollama-python
0.6's types accept. A llama-server that changes its reply shapes fails here (the unit tests
replay recorded replies)."""

from __future__ import annotations

import http.client
import importlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hoshikage_sd.router import ollama
from hoshikage_sd.router.ollama import LoadOnly, Upstream
from tests.integration.conftest import popen_logged, stderr_of, stop
from tests.support import unavailable

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(llama_server_bin: Path, tiny_gguf: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    log = tmp_path_factory.mktemp("ollama") / "llama-server.log"
    process = popen_logged([str(llama_server_bin), "-m", str(tiny_gguf), "--host", "127.0.0.1",
                            "--port", str(port), "-c", "2048", "-np", "1", "--alias", "tiny",
                            "--embeddings", "--pooling", "mean"], {}, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"llama-server exited: {stderr_of(process)[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama-server did not serve within 60 s")
            time.sleep(0.05)
        yield port
    finally:
        stop(process)


def types() -> Any:
    try:
        return importlib.import_module("ollama._types")
    except ImportError:
        unavailable("ollama is not installed (pip install -e '.[test]')")


def send(port: int, request: Upstream) -> tuple[int, list[bytes]]:
    """POST the upstream request; the reply's status and its body in the chunks it came in."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", request.path, json.dumps(request.body),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    chunks = []
    while chunk := response.read1(4096):
        chunks.append(chunk)
    conn.close()
    return response.status, chunks


def answer(port: int, path: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    """What the router would answer an Ollama client: the NDJSON lines, or one body."""
    request = ollama.translate(path, data, n_ctx=2048, accepts_images=None)
    assert isinstance(request, Upstream)
    began = time.monotonic_ns()
    status, chunks = send(port, request)
    if status != 200:
        return [{"status": ollama.error_from_upstream(status, b"".join(chunks))[0],
                 **ollama.error_from_upstream(status, b"".join(chunks))[1]}]
    if request.stream:
        t = ollama.StreamTranslator(request, started_ns=began)
        lines = [line for chunk in chunks for line in t.feed(chunk)] + t.finish()
        return [json.loads(line) for line in lines]
    upstream = json.loads(b"".join(chunks))
    total = time.monotonic_ns() - began
    if request.endpoint == "chat":
        return [ollama.chat_response(upstream, request.model, total_ns=total)]
    if request.endpoint == "generate":
        return [ollama.generate_response(upstream, request.model, total_ns=total)]
    if request.endpoint == "embed":
        return [ollama.embed_response(upstream, request.model, total_ns=total,
                                      dimensions=request.dimensions)]
    return [ollama.embeddings_response(upstream)]


OPTIONS = {"num_predict": 6, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.05,
           "seed": 42, "repeat_penalty": 1.1, "repeat_last_n": 16, "stop": ["zzz"],
           "presence_penalty": 0.1, "frequency_penalty": 0.1, "typical_p": 0.9,
           "num_keep": 2, "num_ctx": 2048, "num_thread": 2}
HI = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


@pytest.mark.parametrize("stream", [True, False])
def test_chat(server: int, stream: bool) -> None:
    lines = answer(server, "/api/chat", {"model": "tiny", "messages": HI, "stream": stream,
                                         "options": OPTIONS})
    for line in lines:
        types().ChatResponse.model_validate(line)
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "length"
    assert final["eval_count"] == 6 and final["prompt_eval_count"] > 0
    assert final["eval_duration"] > 0 and final["total_duration"] > final["eval_duration"]
    text = "".join(line["message"]["content"] for line in lines)
    assert text.strip()
    if stream:
        assert len(lines) >= 3 and all(not line["done"] for line in lines[:-1])


def test_chat_format_json_is_json(server: int) -> None:
    lines = answer(server, "/api/chat", {"model": "tiny", "messages": HI, "stream": False,
                                         "format": "json", "options": {"num_predict": 24}})
    text = lines[0]["message"]["content"]
    assert text.startswith("{"), text  # the grammar took: the first character is forced


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("raw", [True, False])
def test_generate(server: int, stream: bool, raw: bool) -> None:
    lines = answer(server, "/api/generate", {"model": "tiny", "prompt": "hello world",
                                             "raw": raw, "stream": stream,
                                             "options": {"num_predict": 5, "seed": 1}})
    for line in lines:
        types().GenerateResponse.model_validate(line)
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 5
    assert "".join(line["response"] for line in lines)


def test_infill_needs_fim_tokens(server: int) -> None:
    # the tiny model has no FIM tokens: llama-server's refusal reaches the client as is
    lines = answer(server, "/api/generate", {"model": "tiny", "prompt": "def f(",
                                             "suffix": "return x"})
    assert lines == [{"status": 501, "error": lines[0]["error"]}]
    assert "Infill is not supported" in lines[0]["error"]


def test_embed(server: int) -> None:
    [one] = answer(server, "/api/embed", {"model": "tiny", "input": ["hello", "world"]})
    parsed = types().EmbedResponse.model_validate(one)
    assert len(parsed.embeddings) == 2 and parsed.prompt_eval_count
    for vector in parsed.embeddings:
        assert abs(sum(x * x for x in vector) - 1.0) < 1e-4  # /api/embed normalises
    [cut] = answer(server, "/api/embed", {"model": "tiny", "input": "hello", "dimensions": 16})
    assert len(cut["embeddings"][0]) == 16
    [legacy] = answer(server, "/api/embeddings", {"model": "tiny", "prompt": "hello"})
    vector = types().EmbeddingsResponse.model_validate(legacy).embedding
    assert abs(sum(x * x for x in vector) - 1.0) > 1e-3  # ... and the legacy route does not


def test_errors_from_llama_server(server: int) -> None:
    png = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAHggJ/PchI7w"
           "AAAABJRU5ErkJggg==")  # a 1x1 PNG
    lines = answer(server, "/api/chat", {"model": "tiny", "messages": [
        {"role": "user", "content": "what is this", "images": [png]}]})
    assert lines[0]["status"] == 400 and "image input is not supported" in lines[0]["error"]
    lines = answer(server, "/api/chat", {"model": "tiny", "messages": [
        {"role": "user", "content": "hello " * 3000}]})
    assert lines[0]["status"] == 400 and "exceeds the available context size" in \
        lines[0]["error"]


def test_load_only_sends_nothing() -> None:
    assert isinstance(ollama.translate("/api/generate", {"model": "tiny", "keep_alive": 0}),
                      LoadOnly)


def test_served_context_is_what_llama_server_reports(server: int, tiny_gguf: Path) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    conn.request("GET", "/props")
    props = json.loads(conn.getresponse().read())
    info = ollama.model_facts("tiny", tiny_gguf, args=("-c", "2048", "-np", "1")).context_length
    assert info == props["default_generation_settings"]["n_ctx"]

