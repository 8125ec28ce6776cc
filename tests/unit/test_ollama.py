"""Ollama's API onto llama-server: request translation, reply translation (whole and
streamed) from replies the real llama-server b10068 sent (tests/unit/data/llama_server), and
listing bodies from a real GGUF header. Every reply is checked by ollama-python 0.6 itself:
its pydantic types, and its Client over a mock transport that answers with these functions."""

from __future__ import annotations

import base64
import importlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from hoshikage_sd.router import ollama
from hoshikage_sd.router.ollama import KeepAlive, LoadOnly, OllamaError, Upstream
from tests.support import unavailable

DATA = Path(__file__).parent / "data" / "llama_server"


def need(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        unavailable(f"{module} is not installed (pip install -e '.[test]')")


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def types() -> Any:
    return need("ollama._types")


# -- keep_alive, times ----------------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [
    (None, KeepAlive("default")),
    (0, KeepAlive("unload", 0.0)),
    (0.0, KeepAlive("unload", 0.0)),
    ("0", KeepAlive("unload", 0.0)),
    ("0s", KeepAlive("unload", 0.0)),
    (300, KeepAlive("ttl", 300.0)),
    (2.5, KeepAlive("ttl", 2.5)),
    ("300", KeepAlive("ttl", 300.0)),
    ("5m", KeepAlive("ttl", 300.0)),
    ("1h30m", KeepAlive("ttl", 5400.0)),
    ("1.5h", KeepAlive("ttl", 5400.0)),
    ("500ms", KeepAlive("ttl", 0.5)),
    ("+2s", KeepAlive("ttl", 2.0)),
    (-1, KeepAlive("forever")),
    ("-1", KeepAlive("forever")),
    ("-1m", KeepAlive("forever")),
    ("-0.5s", KeepAlive("forever")),
    # past Go's longest duration (~292 years): forever, not a number no clock holds
    (1e308, KeepAlive("forever")),
    (10**400, KeepAlive("forever")),
    ("99999999999999h", KeepAlive("forever")),
    ("inf", KeepAlive("forever")),
    (9e9, KeepAlive("ttl", 9e9)),
])
def test_keep_alive(value: object, expected: KeepAlive) -> None:
    assert ollama.parse_keep_alive(value) == expected


@pytest.mark.parametrize("value", ["", "5", "5 m", "m", "5d", "abc", "1h-5m", "--1m", True,
                                   [], {}, float("nan")])
def test_keep_alive_refused(value: object) -> None:
    if value == "5":  # a bare number is seconds, as OLLAMA_KEEP_ALIVE takes it
        assert ollama.parse_keep_alive(value) == KeepAlive("ttl", 5.0)
        return
    with pytest.raises(ValueError):
        ollama.parse_keep_alive(value)


@pytest.mark.parametrize(("ns", "text"), [
    (0, "1970-01-01T00:00:00Z"),
    (1691177565_499127000, "2023-08-04T19:32:45.499127Z"),
    (1691177565_000000001, "2023-08-04T19:32:45.000000001Z"),
    (1691177565_100000000, "2023-08-04T19:32:45.1Z"),
])
def test_rfc3339(ns: int, text: str) -> None:
    assert ollama.rfc3339(ns) == text


# -- requests -------------------------------------------------------------------------------
HI = [{"role": "user", "content": "hi"}]


def up(path: str, data: dict[str, Any], **kw: Any) -> Upstream:
    result = ollama.translate(path, data, **kw)
    assert isinstance(result, Upstream)
    return result


def test_chat_request() -> None:
    req = up("/api/chat", {
        "model": "qwen:latest", "messages": HI, "keep_alive": "10m", "format": "json",
        "options": {"temperature": 0.2, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "seed": 42,
                    "num_predict": 100, "stop": ["\n", "user:"], "repeat_penalty": 1.1,
                    "repeat_last_n": 33, "presence_penalty": 1.5, "frequency_penalty": 1.0,
                    "num_keep": 5, "typical_p": 0.7, "mirostat": 0, "num_ctx": 2048,
                    "num_gpu": 1, "num_thread": 8, "use_mmap": True, "numa": False,
                    "penalize_newline": True, "tfs_z": 1.0, "not_an_option": 3}}, n_ctx=4096)
    assert (req.endpoint, req.model, req.path, req.stream) == (
        "chat", "qwen:latest", "/v1/chat/completions", True)
    assert req.keep_alive == KeepAlive("ttl", 600.0)
    assert req.body == {
        "model": "qwen:latest", "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.2, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "seed": 42,
        "max_tokens": 100, "stop": ["\n", "user:"], "repeat_penalty": 1.1,
        "repeat_last_n": 33, "presence_penalty": 1.5, "frequency_penalty": 1.0, "n_keep": 5,
        "typical_p": 0.7, "mirostat": 0,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "format", "schema": {"type": "object"}}},
        "stream": True, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize(("data", "expected"), [
    ({"stream": False}, {"stream": False}),
    ({"options": {"num_predict": -1}}, {}),
    ({"options": {"num_predict": -2}}, {}),
    ({"options": {"num_predict": 0}}, {"max_tokens": 0}),
    ({"options": {"stop": "END"}}, {"stop": ["END"]}),
    ({"options": {"stop": []}}, {}),
    ({"options": {"seed": 3.0, "temperature": None}}, {"seed": 3}),
    ({"format": ""}, {}),
    ({"format": {"type": "object", "properties": {"a": {"type": "integer"}}}},
     {"response_format": {"type": "json_schema", "json_schema": {"name": "format", "schema": {
         "type": "object", "properties": {"a": {"type": "integer"}}}}}}),
    ({"think": True}, {"chat_template_kwargs": {"enable_thinking": True}}),
    ({"think": False}, {"chat_template_kwargs": {"enable_thinking": False}}),
    ({"think": "high"}, {"chat_template_kwargs": {"enable_thinking": True,
                                                  "reasoning_effort": "high"}}),
    ({"logprobs": True, "top_logprobs": 3}, {"logprobs": True, "top_logprobs": 3}),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]},
     {"tools": [{"type": "function", "function": {"name": "f"}}]}),
])
def test_chat_request_fields(data: dict[str, Any], expected: dict[str, Any]) -> None:
    req = up("/api/chat", {"model": "m", "messages": HI, **data})
    body = {k: v for k, v in req.body.items() if k not in ("model", "messages")}
    body.pop("stream_options", None)
    assert body == {"stream": True, **expected}


def test_chat_messages() -> None:
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
    req = up("/api/chat", {"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "look", "images": [png]},
        {"role": "assistant", "content": "", "thinking": "hmm",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]})
    assert req.body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]},
        {"role": "assistant", "content": "", "reasoning_content": "hmm", "tool_calls": [
            {"id": "call_0", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}}]},
        {"role": "tool", "content": "sunny", "name": "get_weather"},
    ]


@pytest.mark.parametrize(("path", "data", "endpoint", "reason"), [
    ("/api/chat", {"model": "m"}, "chat", "load"),
    ("/api/chat", {"model": "m", "messages": []}, "chat", "load"),
    ("/api/chat", {"model": "m", "messages": [], "keep_alive": 0}, "chat", "unload"),
    ("/api/generate", {"model": "m"}, "generate", "load"),
    ("/api/generate", {"model": "m", "prompt": "", "keep_alive": "0"}, "generate", "unload"),
    ("/api/generate", {"model": "m", "keep_alive": -1}, "generate", "load"),
    ("/api/embed", {"model": "m", "input": []}, "embed", "load"),
    ("/api/embeddings", {"model": "m", "prompt": ""}, "embeddings", "load"),
])
def test_load_only(path: str, data: dict[str, Any], endpoint: str, reason: str) -> None:
    action = ollama.translate(path, data)
    assert isinstance(action, LoadOnly)
    assert (action.endpoint, action.model, action.done_reason) == (endpoint, "m", reason)


def test_generate_requests() -> None:
    chat = up("/api/generate", {"model": "m", "prompt": "why?", "system": "brief",
                                "think": False, "stream": False})
    assert chat.path == "/v1/chat/completions" and chat.generate_kind == "chat"
    assert chat.body == {"model": "m", "messages": [{"role": "system", "content": "brief"},
                                                    {"role": "user", "content": "why?"}],
                         "stream": False, "chat_template_kwargs": {"enable_thinking": False}}
    raw = up("/api/generate", {"model": "m", "prompt": "<s>[INST] x", "raw": True,
                               "system": "ignored in raw mode", "options": {"num_predict": 3}})
    assert raw.path == "/v1/completions" and raw.generate_kind == "completion"
    assert raw.body == {"model": "m", "prompt": "<s>[INST] x", "max_tokens": 3, "stream": True,
                        "stream_options": {"include_usage": True}}
    fim = up("/api/generate", {"model": "m", "prompt": "def f(", "suffix": "return x",
                               "options": {"num_predict": 8, "temperature": 0}})
    assert fim.path == "/infill" and fim.generate_kind == "infill"
    assert fim.body == {"input_prefix": "def f(", "input_suffix": "return x", "prompt": "",
                        "n_predict": 8, "temperature": 0, "stream": True}


def test_embed_requests() -> None:
    one = up("/api/embed", {"model": "e", "input": "hello", "dimensions": 8, "truncate": True})
    assert (one.path, one.body, one.stream, one.dimensions) == (
        "/v1/embeddings", {"model": "e", "input": ["hello"]}, False, 8)
    legacy = up("/api/embeddings", {"model": "e", "prompt": "hello", "keep_alive": "1m"})
    assert legacy.body == {"model": "e", "input": "hello", "embd_normalize": -1}
    assert legacy.keep_alive == KeepAlive("ttl", 60.0)


@pytest.mark.parametrize(("path", "data", "status", "words"), [
    ("/api/chat", [], 400, "JSON object"),
    ("/api/chat", {"messages": HI}, 400, "model is required"),
    ("/api/chat", {"model": "", "messages": HI}, 400, "model is required"),
    ("/api/chat", {"model": "m", "messages": "hi"}, 400, "messages must be a list"),
    ("/api/chat", {"model": "m", "messages": [{"content": "x"}]}, 400, "role"),
    ("/api/chat", {"model": "m", "messages": HI, "keep_alive": "soon"}, 400,
     'invalid duration "soon"'),
    ("/api/chat", {"model": "m", "messages": HI, "options": {"temperature": "hot"}}, 400,
     "temperature must be a number"),
    ("/api/chat", {"model": "m", "messages": HI, "options": {"top_k": 2.5}}, 400,
     "whole number"),
    ("/api/chat", {"model": "m", "messages": HI, "options": {"stop": [1]}}, 400,
     "list of strings"),
    ("/api/chat", {"model": "m", "messages": HI, "options": []}, 400, "options must be"),
    ("/api/chat", {"model": "m", "messages": HI, "options": {"num_ctx": 8192}}, 400,
     "num_ctx 8192 is more than this model is served with (4096"),
    ("/api/chat", {"model": "m", "messages": HI, "format": "xml"}, 400, "format must be"),
    ("/api/chat", {"model": "m", "messages": HI, "think": "very"}, 400, "think must be"),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "x",
                                               "images": ["aGk="]}]}, 400,
     "does not take images"),
    ("/api/generate", {"model": "m", "prompt": "x", "context": [1, 2, 3]}, 400, "context"),
    ("/api/generate", {"model": "m", "prompt": "x", "template": "{{ .Prompt }}"}, 400,
     "template is not supported"),
    ("/api/generate", {"model": "m", "prompt": "x", "raw": True, "images": ["aGk="]}, 400,
     "raw"),
    ("/api/generate", {"model": "m", "prompt": 3}, 400, "prompt must be a string"),
    ("/api/embed", {"model": "m", "input": [1]}, 400, "input must be"),
    ("/api/embed", {"model": "m", "input": "x", "dimensions": 0}, 400, "positive"),
    ("/api/pull", {"model": "m"}, 404, "not an Ollama route"),
])
def test_refused(path: str, data: Any, status: int, words: str) -> None:
    with pytest.raises(OllamaError) as info:
        ollama.translate(path, data, n_ctx=4096, accepts_images=False)
    assert info.value.status == status
    assert words in info.value.message
    assert info.value.body() == {"error": info.value.message}


def test_num_ctx_within_is_fine() -> None:
    assert "num_ctx" not in up("/api/chat", {"model": "m", "messages": HI,
                                             "options": {"num_ctx": 4096}}, n_ctx=4096).body
    # unknown served context: nothing to check against
    up("/api/chat", {"model": "m", "messages": HI, "options": {"num_ctx": 10**6}})


# -- replies: whole ---------------------------------------------------------------------------
def test_chat_response_from_real_reply() -> None:
    upstream = json.loads(sample("chat.200.json"))
    out = ollama.chat_response(upstream, "tiny", total_ns=2_000_000_000, load_ns=5,
                               wall_ns=1_700_000_000_000_000_000)
    assert out == {
        "model": "tiny", "created_at": "2023-11-14T22:13:20Z",
        "message": {"role": "assistant", "content": " youreXB"}, "done": True,
        "done_reason": "length", "total_duration": 2_000_000_000, "load_duration": 5,
        "prompt_eval_count": 27, "prompt_eval_duration": 324_013_000, "eval_count": 4,
        "eval_duration": 997_723_000}
    parsed = types().ChatResponse.model_validate(out)
    assert parsed.message.content == " youreXB" and parsed.eval_count == 4


def test_generate_response_from_real_reply() -> None:
    upstream = json.loads(sample("generate_raw.200.json"))
    out = ollama.generate_response(upstream, "tiny", total_ns=10)
    parsed = types().GenerateResponse.model_validate(out)
    assert parsed.response == upstream["choices"][0]["text"]
    assert (parsed.done, parsed.done_reason, parsed.eval_count) == (True, "length", 3)
    assert parsed.prompt_eval_count == upstream["usage"]["prompt_tokens"]


def test_reply_with_thinking_tools_and_logprobs() -> None:
    upstream = {"choices": [{"finish_reason": "tool_calls", "index": 0, "message": {
        "role": "assistant", "content": None, "reasoning_content": "need weather",
        "tool_calls": [{"type": "function", "id": "c1", "function": {
            "name": "get_weather", "arguments": '{"city":"Tokyo"}'}},
            {"type": "function", "function": {"name": "broken", "arguments": "{not json"}}]}},
        ], "logprobs": None, "usage": {"prompt_tokens": 9, "completion_tokens": 2}}
    out = ollama.chat_response(upstream, "m", total_ns=1)
    msg = types().ChatResponse.model_validate(out).message
    assert msg.thinking == "need weather" and msg.content == ""
    assert msg.tool_calls[0].function.name == "get_weather"
    assert msg.tool_calls[0].function.arguments == {"city": "Tokyo"}
    assert msg.tool_calls[1].function.arguments == {"arguments": "{not json"}
    assert out["done_reason"] == "stop"
    lp = {"choices": [{"finish_reason": "stop", "message": {"content": "a"}, "logprobs": {
        "content": [{"token": "a", "logprob": -0.1, "bytes": [97],
                     "top_logprobs": [{"token": "a", "logprob": -0.1, "bytes": [97]}]}]}}]}
    parsed = types().ChatResponse.model_validate(ollama.chat_response(lp, "m", total_ns=1))
    assert parsed.logprobs[0].top_logprobs[0].token == "a"


def test_embed_replies_from_real_replies() -> None:
    upstream = json.loads(sample("embed.200.json"))
    out = ollama.embed_response(upstream, "tiny", total_ns=7, load_ns=1)
    parsed = types().EmbedResponse.model_validate(out)
    assert len(parsed.embeddings) == 2 and len(parsed.embeddings[0]) == 64
    assert parsed.embeddings[1] == upstream["data"][1]["embedding"]
    assert parsed.prompt_eval_count == upstream["usage"]["prompt_tokens"]
    cut = ollama.embed_response(upstream, "tiny", total_ns=7, dimensions=8)["embeddings"]
    assert len(cut[0]) == 8 and abs(sum(x * x for x in cut[0]) - 1.0) < 1e-9
    shuffled = {**upstream, "data": list(reversed(upstream["data"]))}
    assert ollama.embed_response(shuffled, "tiny", total_ns=7)["embeddings"] == out["embeddings"]
    legacy = json.loads(sample("embeddings.200.json"))
    vec = types().EmbeddingsResponse.model_validate(ollama.embeddings_response(legacy))
    assert list(vec.embedding) == legacy["data"][0]["embedding"]
    assert sum(x * x for x in vec.embedding) > 2.0  # not normalised, as Ollama's legacy route


@pytest.mark.parametrize(("endpoint", "keep", "model_type"), [
    ("chat", 0, "ChatResponse"), ("chat", None, "ChatResponse"),
    ("generate", 0, "GenerateResponse"), ("embed", None, "EmbedResponse"),
    ("embeddings", None, "EmbeddingsResponse"),
])
def test_load_only_responses(endpoint: str, keep: int | None, model_type: str) -> None:
    action = LoadOnly(endpoint, "m", ollama.parse_keep_alive(keep))  # type: ignore[arg-type]
    out = ollama.load_only_response(action)
    getattr(types(), model_type).model_validate(out)
    if endpoint in ("chat", "generate"):
        assert out["done"] is True
        assert out["done_reason"] == ("unload" if keep == 0 else "load")


@pytest.mark.parametrize(("name", "status", "message"), [
    ("chat_images.500.json", 400, "image input is not supported"),
    ("chat_too_long.400.json", 400, "exceeds the available context size (2048 tokens)"),
    ("infill_stream.501.json", 501, "Infill is not supported by this model"),
])
def test_upstream_errors(name: str, status: int, message: str) -> None:
    got_status, body = ollama.error_from_upstream(int(name.split(".")[1]), sample(name))
    assert got_status == status and message in body["error"]
    assert ollama.error_from_upstream(502, b"Bad Gateway") == (502, {"error": "Bad Gateway"})
    assert ollama.error_from_upstream(500, b"") == (500, {
        "error": "llama-server answered HTTP 500"})


# -- replies: streamed ----------------------------------------------------------------------
class Clock:
    def __init__(self, start: int = 1_000) -> None:
        self.now = start

    def __call__(self) -> int:
        self.now += 1_000_000
        return self.now


def stream(request: Upstream, chunks: Iterator[bytes] | list[bytes]) -> list[dict[str, Any]]:
    t = ollama.StreamTranslator(request, started_ns=0, load_ns=123, clock=Clock(),
                                wall=lambda: 1_700_000_000_000_000_000)
    raw: list[bytes] = []
    for chunk in chunks:
        raw += t.feed(chunk)
    raw += t.finish()
    assert t.done
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in raw)
    return [json.loads(line) for line in raw]


def splits(data: bytes) -> list[Callable[[], list[bytes]]]:
    return [lambda: [data], lambda: [data[i:i + 1] for i in range(len(data))],
            lambda: [data[i:i + 7] for i in range(0, len(data), 7)]]


CHAT = up("/api/chat", {"model": "tiny", "messages": HI})
GENERATE_CHAT = up("/api/generate", {"model": "tiny", "prompt": "hi"})
RAW = up("/api/generate", {"model": "tiny", "prompt": "hi", "raw": True})
INFILL = up("/api/generate", {"model": "tiny", "prompt": "a", "suffix": "b"})


@pytest.mark.parametrize("split", range(3))
def test_chat_stream_from_real_sse(split: int) -> None:
    data = sample("chat_stream.200.sse")
    lines = stream(CHAT, splits(data)[split]())
    deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content")
              for e in data.decode().split("\n\n") if e.startswith("data: {")
              and json.loads(e[6:])["choices"]]
    pieces = [d for d in deltas if d]
    assert [line["message"]["content"] for line in lines[:-1]] == pieces
    for line in lines[:-1]:
        assert line["done"] is False and line["model"] == "tiny"
        assert line["created_at"] == "2023-11-14T22:13:20Z"
    final = lines[-1]
    assert final["done"] is True and final["message"] == {"role": "assistant", "content": ""}
    assert (final["done_reason"], final["eval_count"], final["prompt_eval_count"]) == (
        "length", 4, 27)
    assert final["load_duration"] == 123 and final["total_duration"] == 1_000 + 1_000_000
    assert final["eval_duration"] > 0 and final["prompt_eval_duration"] > 0
    for line in lines:
        types().ChatResponse.model_validate(line)


def test_generate_streams_from_real_sse() -> None:
    lines = stream(RAW, [sample("generate_raw_stream.200.sse")])
    assert all("response" in line for line in lines)
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 3
    assert lines[-1]["done_reason"] == "length"
    for line in lines:
        types().GenerateResponse.model_validate(line)
    native = stream(INFILL, [sample("completion_native_stream.200.sse")])
    assert [n["response"] for n in native[:-1]] == ["may", "B", "b"]
    assert native[-1]["done"] is True and native[-1]["done_reason"] == "length"
    assert native[-1]["eval_count"] == 3 and native[-1]["prompt_eval_count"] == 8
    for line in native:
        types().GenerateResponse.model_validate(line)


def sse(*events: object, done: bool = True, eol: str = "\n") -> bytes:
    out = "".join(f"data: {json.dumps(e, ensure_ascii=False)}{eol}{eol}" for e in events)
    return (out + (f"data: [DONE]{eol}{eol}" if done else "")).encode()


def delta(finish: str | None = None, **d: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "finish_reason": finish, "delta": d}],
            "object": "chat.completion.chunk"}


def test_stream_thinking_and_tool_calls() -> None:
    data = sse(delta(role="assistant", content=None),
               delta(reasoning_content="let me"), delta(reasoning_content=" see"),
               delta(tool_calls=[{"index": 0, "id": "c1", "type": "function",
                                  "function": {"name": "get_weather", "arguments": ""}}]),
               delta(tool_calls=[{"index": 0, "function": {"arguments": '{"city":'}}]),
               delta(tool_calls=[{"index": 0, "function": {"arguments": '"Tokyo"}'}}]),
               delta("tool_calls"),
               {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9},
                "timings": {"prompt_ms": 1.5, "predicted_ms": 2.25, "prompt_n": 5,
                            "predicted_n": 9, "cache_n": 0}})
    for split in splits(data):
        lines = stream(CHAT, split())
        assert [line["message"].get("thinking") for line in lines[:2]] == ["let me", " see"]
        calls = lines[2]["message"]["tool_calls"]
        assert calls == [{"function": {"name": "get_weather", "arguments": {"city": "Tokyo"},
                                       "index": 0}, "id": "c1"}]
        assert lines[3]["done"] is True and lines[3]["done_reason"] == "stop"
        assert (lines[3]["prompt_eval_duration"], lines[3]["eval_duration"]) == (
            1_500_000, 2_250_000)
        for line in lines:
            types().ChatResponse.model_validate(line)
    gen = stream(GENERATE_CHAT, [sse(delta(reasoning_content="hm"), delta(content="42"),
                                     delta("stop"))])
    assert gen[0]["thinking"] == "hm" and gen[1]["response"] == "42"
    assert gen[2]["done"] is True and "eval_count" not in gen[2]


@pytest.mark.parametrize(("data", "message"), [
    (sse(delta(content="a"), {"error": {"code": 500, "message": "slot crashed",
                                        "type": "server_error"}}, done=False),
     "slot crashed"),
    (sse(delta(content="a"), done=False) + b'error: {"code":500,"message":"old style"}\n\n',
     "old style"),
    (sse(delta(content="a"), done=False), "ended the stream before the reply was complete"),
    (sse(delta(content="a"), done=False)[:-1], "ended the stream before"),
])
def test_stream_errors(data: bytes, message: str) -> None:
    lines = stream(CHAT, [data])
    assert lines[0]["message"]["content"] == "a"
    assert message in lines[-1]["error"] and len(lines) == 2


def test_stream_odd_framing() -> None:
    crlf = sse(delta(content="x"), delta("stop"), eol="\r\n")
    lines = stream(CHAT, [crlf])
    assert lines[0]["message"]["content"] == "x" and lines[1]["done"] is True
    # no [DONE], but the generation finished: the final line still comes
    lines = stream(CHAT, [sse(delta(content="x"), delta("stop"), done=False)])
    assert lines[-1]["done"] is True
    # comments, unknown fields, a non-JSON event and bytes after the end are ignored
    noisy = b": ping\n\nevent: x\nid: 3\ndata: nonsense\n\n" + sse(delta(content="y")) \
        + b"data: {\"choices\": []}\n\n"
    lines = stream(CHAT, [noisy])
    assert [line.get("message", {}).get("content") for line in lines] == ["y", ""]
    # a multi-byte character split across chunks
    data = sse(delta(content="星影"), delta("stop"))
    cut = data.index("影".encode()) + 1
    assert stream(CHAT, [data[:cut], data[cut:]])[0]["message"]["content"] == "星影"


# -- listings -------------------------------------------------------------------------------
def facts(tiny_gguf: Path, **kw: Any) -> ollama.ModelFacts:
    return ollama.model_facts("tiny", tiny_gguf, args=kw.pop("args", ("-c", "4096", "-np", "2")),
                              **kw)


def test_model_facts(tiny_gguf: Path) -> None:
    f = facts(tiny_gguf)
    st = os.stat(tiny_gguf)
    assert (f.size, f.modified_ns) == (st.st_size, st.st_mtime_ns)
    assert f.info is not None and f.context_length == 2048  # 4096 over 2 slots
    # as llama-server b10068 sizes a slot (n_ctx_slot in its log, measured)
    for args, n_ctx in ((("-c", "1024", "-np", "2"), 512), (("-c", "1024"), 1024),
                        (("-c", "1024", "-np", "2", "-kvu"), 1024),
                        (("-c", "4096"), 2048)):  # trained for 2048: the cap
        assert facts(tiny_gguf, args=args).context_length == n_ctx, args
    assert f.digest == ollama.identity_digest(str(tiny_gguf), st.st_size, st.st_mtime_ns)
    assert len(f.digest) == 64 and f.digest == facts(tiny_gguf).digest
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    try:
        assert facts(tiny_gguf).digest != f.digest
    finally:
        os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns))
    missing = ollama.model_facts("gone", tiny_gguf.parent / "nope.gguf")
    assert (missing.size, missing.info) == (0, None)
    assert ollama.details(missing)["format"] == "gguf"


def test_listing_bodies(tiny_gguf: Path) -> None:
    f = facts(tiny_gguf)
    assert f.info is not None
    det = ollama.details(f)
    assert det == {"parent_model": "", "format": "gguf", "family": "llama",
                   "families": ["llama"], "parameter_size": ollama.human_number(f.info.n_params),
                   "quantization_level": "F32"}
    tags = ollama.tags_body([f, ollama.model_facts("gone", "/nonexistent/x.gguf")])
    listed = types().ListResponse.model_validate(tags)
    assert [m.model for m in listed.models] == ["tiny", "gone"]
    assert listed.models[0].size == f.size and listed.models[0].digest == f.digest
    assert listed.models[0].details.family == "llama"

    now = 1_700_000_000_000_000_000
    ps = ollama.ps_body([ollama.Loaded(f, 5 << 20, now + 300 * 10**9),
                         ollama.Loaded(ollama.model_facts("b", tiny_gguf), 1, None)],
                        now_ns=now)
    running = types().ProcessResponse.model_validate(ps)
    assert [m.model for m in running.models] == ["b", "tiny"]  # forever sorts first
    assert running.models[1].expires_at.isoformat() == "2023-11-14T22:18:20+00:00"
    assert running.models[0].expires_at.year == 2316
    assert running.models[1].size == 5 << 20 and running.models[1].context_length == 2048

    show = ollama.show_body(f)
    shown = types().ShowResponse.model_validate(show)
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == f.info.context_length
    assert shown.modelinfo["tokenizer.ggml.tokens"] == []
    assert shown.modelinfo["general.parameter_count"] == f.info.n_params
    assert shown.capabilities == ["completion", "tools"]
    assert shown.details.quantization_level == "F32"
    assert "num_ctx" in (shown.parameters or "")
    assert ollama.show_body(facts(tiny_gguf, args=("--mmproj", "p.gguf")))["capabilities"] \
        == ["completion", "tools", "vision"]
    json.dumps(show)  # every value is JSON


@pytest.mark.parametrize(("n", "text"), [
    (7_615_616_512, "7.6B"), (8_000_000_000, "8B"), (494_032_768, "494.03M"),
    (1_000_000, "1M"), (135_000, "135K"), (999, "999"), (0, "0")])
def test_human_number(n: int, text: str) -> None:
    assert ollama.human_number(n) == text


def test_unmanaged_and_version() -> None:
    for path in ("/api/pull", "/api/push", "/api/create", "/api/delete", "/api/copy",
                 "/api/blobs/sha256:abc"):
        err = ollama.unmanaged(path)
        assert err is not None and err.status == 501
        assert "does not manage model files" in err.message
    assert ollama.unmanaged("/api/chat") is None
    assert ollama.version_body() == {"version": ollama.OLLAMA_VERSION}
    assert ollama.resolve_name("tiny:latest", {"tiny"}.__contains__) == "tiny"
    assert ollama.resolve_name("a:latest", {"a:latest"}.__contains__) == "a:latest"
    assert ollama.resolve_name("qwen3:8b", set().__contains__) == "qwen3:8b"
    assert ollama.read_json(b"") == {}
    with pytest.raises(OllamaError):
        ollama.read_json(b"{nope")


# -- the real client, end to end over a mock transport --------------------------------------
UPSTREAM = {  # what llama-server sent, by (upstream path, streamed)
    ("/v1/chat/completions", True): "chat_stream.200.sse",
    ("/v1/chat/completions", False): "chat.200.json",
    ("/v1/completions", True): "generate_raw_stream.200.sse",
    ("/v1/completions", False): "generate_raw.200.json",
    ("/v1/embeddings", False): "embed.200.json",
}


class FakeRouter:
    """What the router does for /api/*, with llama-server's recorded replies upstream."""

    def __init__(self, tiny: ollama.ModelFacts, httpx: Any) -> None:
        self.facts = tiny
        self.httpx = httpx
        self.sent: list[tuple[str, Any]] = []
        self.loaded: dict[str, KeepAlive] = {}

    def __call__(self, request: Any) -> Any:
        path = request.url.path
        data = ollama.read_json(request.content) if request.content else {}
        self.sent.append((path, data))
        try:
            if (err := ollama.unmanaged(path)) is not None:
                raise err
            if path == "/api/tags":
                return self.json(ollama.tags_body([self.facts]))
            if path == "/api/ps":
                return self.json(ollama.ps_body(
                    ollama.Loaded(self.facts, 1 << 20, None) for _ in self.loaded))
            if path == "/api/show":
                return self.json(ollama.show_body(self.facts))
            if path == "/api/version":
                return self.json(ollama.version_body())
            action = ollama.translate(path, data, n_ctx=self.facts.context_length)
        except OllamaError as err:
            return self.httpx.Response(err.status, json=err.body())
        if isinstance(action, LoadOnly):
            if action.keep_alive.mode == "unload":
                self.loaded.pop(action.model, None)
            else:
                self.loaded[action.model] = action.keep_alive
            return self.json(ollama.load_only_response(action))
        self.loaded[action.model] = action.keep_alive
        raw = sample(UPSTREAM[(action.path, action.stream)])
        if action.stream:
            t = ollama.StreamTranslator(action, started_ns=0)
            lines = [*t.feed(raw), *t.finish()]
            return self.httpx.Response(200, headers={"Content-Type": ollama.NDJSON},
                                       content=b"".join(lines))
        upstream = json.loads(raw)
        if action.endpoint == "chat":
            body = ollama.chat_response(upstream, action.model, total_ns=1)
        elif action.endpoint == "generate":
            body = ollama.generate_response(upstream, action.model, total_ns=1)
        elif action.endpoint == "embed":
            body = ollama.embed_response(upstream, action.model, total_ns=1,
                                         dimensions=action.dimensions)
        else:
            body = ollama.embeddings_response(upstream)
        return self.json(body)

    def json(self, body: dict[str, Any]) -> Any:
        return self.httpx.Response(200, json=body)


@pytest.fixture
def client(tiny_gguf: Path) -> Iterator[tuple[Any, FakeRouter]]:
    ollama_py = need("ollama")
    httpx = need("httpx")
    router = FakeRouter(facts(tiny_gguf), httpx)
    with ollama_py.Client(host="http://127.0.0.1:8080",
                          transport=httpx.MockTransport(router)) as c:
        yield c, router


def test_ollama_client_end_to_end(client: tuple[Any, FakeRouter]) -> None:
    c, router = client
    ollama_py = need("ollama")
    assert [m.model for m in c.list().models] == ["tiny"]
    assert c.ps().models == []
    assert c.show("tiny").modelinfo["general.architecture"] == "llama"
    reply = c.chat(model="tiny", messages=HI, options={"temperature": 0, "num_predict": 4},
                   keep_alive="5m")
    assert reply.message.content == " youreXB" and reply.done_reason == "length"
    assert router.loaded == {"tiny": KeepAlive("ttl", 300.0)}
    parts = list(c.chat(model="tiny", messages=HI, stream=True))
    assert parts[-1].done and "".join(p.message.content or "" for p in parts) != ""
    gen = c.generate(model="tiny", prompt="hello", raw=True)
    assert gen.response and gen.eval_count == 3
    assert [p.response for p in c.generate(model="tiny", prompt="hello", raw=True,
                                           stream=True)][-1] == ""
    assert len(c.embed(model="tiny", input=["hello", "world"]).embeddings) == 2
    assert len(c.embed(model="tiny", input="hello", dimensions=4).embeddings[0]) == 4
    assert len(c.embeddings(model="tiny", prompt="hello").embedding) == 64
    assert len(c.ps().models) == 1
    # the AIfred pattern: read /api/ps, unload with keep_alive 0 and an empty prompt
    unload = c.generate(model="tiny", keep_alive=0)
    assert unload.done_reason == "unload" and c.ps().models == []
    assert c.chat(model="tiny", messages=[]).done_reason == "load"
    with pytest.raises(ollama_py.ResponseError) as info:
        c.pull("llama3")
    assert info.value.status_code == 501
    with pytest.raises(ollama_py.ResponseError) as info:
        c.chat(model="tiny", messages=HI, options={"num_ctx": 100_000})
    assert info.value.status_code == 400 and "num_ctx 100000" in info.value.error
    # what the client sent was accepted as sent (no field hoshikage choked on)
    assert {path for path, _ in router.sent} >= {"/api/chat", "/api/generate", "/api/embed",
                                                 "/api/embeddings", "/api/tags", "/api/ps",
                                                 "/api/show", "/api/pull"}
