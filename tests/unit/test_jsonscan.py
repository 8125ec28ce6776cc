"""A large body's model found without decoding the body (router/jsonscan.py): the same
answer as json.loads, malformed structure refused, and no copy of the body held."""

from __future__ import annotations

import json
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hoshikage_sd.router import jsonscan
from hoshikage_sd.router.headstart import request as waking

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
    assert_names_as_json_loads(raw)
    assert_names_as_json_loads(bytes(bytearray(b" \n" + raw + b"\r\n")))


def assert_names_as_json_loads(raw: bytes) -> None:
    """The "model" json.loads finds, of any type (model_name_of judges it), and the same
    from the small body's path."""
    model = json.loads(raw).get("model")
    assert jsonscan.model_of(raw) == model
    if model is None or isinstance(model, str):
        assert waking.model_name_of(raw, {}) == model
    else:
        with pytest.raises(waking.NotAName, match="expected a string, but got"):
            waking.model_name_of(raw, {})


@pytest.mark.parametrize("depth", range(1, 12))
def test_containers_deeper_than_the_regex_skips_are_walked(depth: int) -> None:
    """Nesting past jsonscan.NESTING goes bracket by bracket (and an unbalanced '[[['
    is never taken for a container: Python 3.11.2's possessive quantifiers did that)."""
    value: object = 1
    for _ in range(depth):
        value = [value, "x", {"k": "]"}]
    raw = json.dumps({"a": [value, value], "s": "y" * (jsonscan.SHORT + 9), "model": "d",
                      "t": "\\n" * (jsonscan.PIECES + 9)}).encode()
    assert jsonscan.model_of(raw) == "d"
    with pytest.raises(ValueError):
        jsonscan.model_of(raw.replace(b"]]", b"]", 1))


def test_the_last_of_duplicate_keys_wins_as_in_json_loads() -> None:
    raw = b'{"model": "first", "x": [{}, "]"], "model": "last"}'
    assert jsonscan.model_of(raw) == json.loads(raw)["model"] == "last"


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32-le"])
def test_a_body_in_another_encoding_json_loads_takes_names_the_same(encoding: str) -> None:
    raw = json.dumps({"messages": [], "model": "\u661f\u5f71"}).encode(encoding)
    assert jsonscan.model_of(raw) == json.loads(raw)["model"]


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
    assert len(body) > waking.LARGE_JSON
    tracemalloc.start()
    try:
        assert waking.model_name_of(body, {}) == "vision"  # type: ignore[arg-type]
        _, walked = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        json.loads(body)
        _, parsed = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert walked < len(body) / 10, (walked, len(body))
    assert parsed > len(body)  # what it used to cost, for scale


# -- fuzzed against json.loads --------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["model", "messages", "m", 'a"b', "mod\\el", "]", "{"]) | st.text(
            max_size=6), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.dictionaries(st.sampled_from(["model", "stream", "messages", "x"]), JSON_VALUES,
                       max_size=4), st.sampled_from([None, 0, 1]), st.booleans())
def test_fuzzed_objects_name_what_json_loads_names(body: dict[str, object],
                                                    indent: int | None, ascii_only: bool
                                                    ) -> None:
    assert_names_as_json_loads(json.dumps(body, indent=indent, ensure_ascii=ascii_only).encode())


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=40) | st.text(alphabet='{}[]",: \\\\abmodel0123', max_size=40).map(
    str.encode))
def test_fuzzed_bytes_never_crash_and_a_parse_agrees_where_both_take_them(raw: bytes) -> None:
    """Bytes of any shape: a ValueError or an answer; where json.loads takes the body, the
    walk gives its model (the walk checks less: what it takes, a parse may refuse)."""
    try:
        found = jsonscan.model_of(raw)
    except ValueError:
        found = "refused"
    try:
        data = json.loads(raw)
    except ValueError:
        return
    model = data.get("model") if isinstance(data, dict) else None
    assert found == (model if isinstance(model, str) else None), raw
