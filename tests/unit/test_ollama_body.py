"""router/ollama/body.py: a large Ollama request translated around its long strings is, byte
for byte, the request json.loads + translate + json.dumps makes (what upstream got before),
and is made in the body's own buffer."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hoshikage_sd.router import ollama
from hoshikage_sd.router.ollama import body as ob

MiB = 1 << 20
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8000).decode()
TEXT = "Zeile \"eins\"\n\tzwei \\ drei – 星影 \x01 " * 40000  # escapes, UTF-8, a control


def translated(path: str, raw: bytes | bytearray, **kw: Any) -> tuple[ollama.Upstream, Any]:
    decoded = ollama.decode(raw)
    action = ollama.translate(path, decoded.data, **kw)
    assert isinstance(action, ollama.Upstream)
    return action, decoded.encode(action.body)


def expected(path: str, data: Any, **kw: Any) -> bytes:
    """What the router sent before: the whole body decoded, translated, encoded."""
    action = ollama.translate(path, data, **kw)
    assert isinstance(action, ollama.Upstream)
    return json.dumps(action.body, ensure_ascii=False).encode()


CASES: list[tuple[str, dict[str, Any]]] = [
    ("/api/chat", {"model": "m", "stream": False, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": TEXT, "images": [PNG, PNG[:70000]]},
        {"role": "assistant", "content": "ok", "thinking": TEXT[:90000],
         "tool_calls": [{"function": {"name": "f", "arguments": {"code": TEXT[:80000]}}}]},
        {"role": "tool", "content": TEXT[:70000], "tool_name": "f"}],
        "tools": [{"type": "function", "function": {"name": "f", "description": TEXT[:70000],
                                                   "parameters": {"type": "object"}}}],
        "options": {"num_predict": 3, "stop": ["x" * 100000, "\ue000fake:0\ue001"]}}),
    # images before the text, system after the prompt: strings out of the body's order
    ("/api/chat", {"messages": [{"images": [PNG], "content": TEXT, "role": "user"}],
                   "model": "m"}),
    ("/api/generate", {"model": "m", "prompt": TEXT, "system": TEXT[:100000], "think": True}),
    ("/api/generate", {"model": "m", "prompt": TEXT, "raw": True, "stream": False}),
    ("/api/generate", {"model": "m", "prompt": TEXT, "suffix": TEXT[:200000]}),
    ("/api/generate", {"model": "m", "prompt": "what is this?", "images": [PNG]}),
    ("/api/embed", {"model": "m", "input": [TEXT, "short", TEXT[:65536]]}),
    ("/api/embeddings", {"model": "m", "prompt": TEXT}),
]


@pytest.mark.parametrize(("path", "data"), CASES)
def test_a_large_body_translates_to_the_bytes_a_parse_gave(path: str,
                                                           data: dict[str, Any]) -> None:
    raw = json.dumps(data, ensure_ascii=False).encode()
    assert len(raw) > ob.LARGE
    want = expected(path, json.loads(raw))
    _, got = translated(path, bytearray(raw))
    assert got == want
    # a body sent chunked (bytes, not a buffer of its own): the same, in a new one
    assert translated(path, raw)[1] == want
    if PNG[:32].encode() in raw:
        assert b'"url": "data:image/png;base64,iVBOR' in got  # typed from the long string's head


def test_the_translation_is_made_in_the_bodys_buffer() -> None:
    raw = bytearray(json.dumps({"model": "m", "messages": [
        {"role": "user", "content": TEXT}]}, ensure_ascii=False).encode())
    decoded = ollama.decode(raw)
    assert decoded.spans  # the long string was not decoded
    assert isinstance(decoded.data["messages"][0]["content"], ob.Long)
    action = ollama.translate("/api/chat", decoded.data)
    assert isinstance(action, ollama.Upstream)
    assert decoded.encode(action.body) is raw


def test_a_long_string_goes_on_as_the_client_escaped_it() -> None:
    data = {"model": "m", "prompt": TEXT + "/é", "raw": True}
    raw = json.dumps(data).encode().replace(b"/", b"\\/")  # \u escapes, escaped slashes
    _, got = translated("/api/generate", bytearray(raw))
    assert json.loads(got) == json.loads(expected("/api/generate", json.loads(raw)))
    assert b"\\u00e9" in got


def test_small_bodies_and_bodies_without_long_strings_are_parsed() -> None:
    small = json.dumps({"model": "m", "prompt": "hi"}).encode()
    assert not ollama.decode(small).spans
    many = json.dumps({"model": "m", "input": ["a short one"] * 200000}).encode()
    assert len(many) > ob.LARGE
    decoded = ollama.decode(bytearray(many))
    assert not decoded.spans
    action = ollama.translate("/api/embed", decoded.data)
    assert isinstance(action, ollama.Upstream)
    assert decoded.encode(action.body) == expected("/api/embed", json.loads(many))


@pytest.mark.parametrize("raw", [
    b'{"model": "m", "prompt": "' + b"a" * MiB,                        # unterminated
    b'{"model": "m", "prompt": "' + b"a" * MiB + b'" "raw": true}',    # a comma missing
    b'{"model": "m", "prompt": "' + b"a" * MiB + b'"}}',               # unbalanced
])
def test_malformed_large_bodies_are_a_400(raw: bytes) -> None:
    with pytest.raises(ollama.OllamaError) as err:
        ollama.decode(bytearray(raw))
    assert err.value.status == 400 and "invalid JSON" in err.value.message


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # the same bounds each
@given(st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]), texts,
                          st.integers(0, 3)), min_size=1, max_size=6),
       st.booleans(), st.booleans())
def test_any_chat_translates_to_the_bytes_a_parse_gave(
        monkeypatch: pytest.MonkeyPatch, messages: list[tuple[str, str, int]],
        ascii_client: bool, chunked: bool) -> None:
    """Strings of any characters (escapes, quotes, backslashes, UTF-8), some of them long
    (bounds lowered to make them so), in any mix."""
    monkeypatch.setattr(ob, "LARGE", 0)
    monkeypatch.setattr(ob, "LONG", 24)
    data = {"model": "m", "stream": False, "messages": [
        {"role": role, "content": text * repeat} for role, text, repeat in messages]}
    raw = json.dumps(data, ensure_ascii=ascii_client).encode()
    want = expected("/api/chat", json.loads(raw))
    _, got = translated("/api/chat", raw if chunked else bytearray(raw))
    if ascii_client:
        assert json.loads(got) == json.loads(want)
    else:
        assert got == want
