"""A large body's model found without decoding the body (router/jsonscan.py): the same
answer as json.loads, malformed structure refused, and no copy of the body held."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from hoshikage_sd.router import first_request, jsonscan

BODIES = [
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
    {"messages": [{"role": "user", "content": 'a "quoted" \\ back\\\\slash \u00e9 \u2603'}],
     "model": "qwen3-8b:q4"},
    {"input": [[1, 2, 3], [4.5e-3, -6]], "nested": {"model": "not-this"}, "model": "emb"},
    {"model": 3, "stream": True},
    {"model": None},
    {"x": [{}, [], "", {"a": ["]}[{"]}], "model": "last"},
    {"model": "\u30e2\u30c7\u30eb", "t": True, "f": False, "n": None},
    {},
    {"prompt": "x" * 1000},
]


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("indent", [None, 2])
def test_it_finds_what_json_loads_finds(body: object, indent: int | None) -> None:
    raw = json.dumps(body, indent=indent, ensure_ascii=indent is None).encode()
    data = json.loads(raw)
    expected = data.get("model") if isinstance(data.get("model"), str) else None
    assert jsonscan.model_of(raw) == expected
    assert jsonscan.model_of(bytearray(b" \n" + raw + b"\r\n")) == expected


def test_the_last_of_duplicate_keys_wins_as_in_json_loads() -> None:
    raw = b'{"model": "first", "x": [{}, "]"], "model": "last"}'
    assert jsonscan.model_of(raw) == json.loads(raw)["model"] == "last"


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"model"', b"3", b"", b"  "])
def test_a_body_that_is_not_an_object_names_no_model(raw: bytes) -> None:
    assert jsonscan.model_of(raw) is None


@pytest.mark.parametrize("raw", [
    b'{"model": "tiny"', b'{"model": "tiny}', b'{"model" "tiny"}', b'{"a": [1, 2}',
    b'{"model": "tiny"} x', b'{model: "tiny"}', b'{"a": 1,}', b'{"a": }', b'[1, 2',
])
def test_malformed_structure_is_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        jsonscan.model_of(raw)


def test_the_router_walks_a_large_body_without_holding_a_copy_of_it() -> None:
    """The issue's case: a 200 MB body cost the router three times its size. Here a 32 MiB
    body (an image in base64 and a long prompt of many messages) costs the walk well under
    a tenth of itself, where json.loads holds about twice it."""
    messages = [{"role": "user", "content": "word " * 200}] * 2000
    body = bytearray(json.dumps({
        "messages": [*messages, {"role": "user", "content": [
            {"type": "image_url",
             "image_url": {"url": "data:image/png;base64," + "A" * (30 << 20)}}]}],
        "stream": True, "model": "vision"}).encode())
    assert len(body) > first_request.LARGE_JSON
    tracemalloc.start()
    try:
        assert first_request.model_name_of(body, {}) == "vision"  # type: ignore[arg-type]
        _, walked = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        json.loads(body)
        _, parsed = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert walked < len(body) / 10, (walked, len(body))
    assert parsed > len(body)  # what it used to cost, for scale
