"""lightjson.loads gives what json.loads gives, and refuses what it refuses."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hoshikage_sd import lightjson
from testbed import REPO_ROOT

VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(VALUES, st.sampled_from(["", " ", "\n\t ", "\r\n"]), st.booleans(), st.booleans())
def test_it_reads_what_json_writes(value: object, space: str, as_bytes: bool,
                                   ascii_only: bool) -> None:
    text = space + json.dumps(value, ensure_ascii=ascii_only) + space
    data: str | bytes = text.encode() if as_bytes else text
    assert lightjson.loads(data) == json.loads(data)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12) | st.binary(max_size=12).map(lambda b: b.decode("latin-1")))
def test_it_refuses_what_json_refuses(text: str) -> None:
    try:
        expected: object = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            lightjson.loads(text)
    else:
        got = lightjson.loads(text)
        assert got == expected or (isinstance(got, float) and math.isnan(got))


@pytest.mark.parametrize("data", [
    '{"model": "tiny"} x', "", "   ", '{"a": 1,}', "[1, 2", '"\x01"', "nul", "{'a': 1}",
    b"\xff\xfe", b'{"model": "\xff"}', '\ufeff{"a": 1}',
])
def test_bad_documents_are_value_errors_as_in_json(data: str | bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(data)
    with pytest.raises(ValueError):
        lightjson.loads(data)


@pytest.mark.parametrize("data", [
    '{"model": "tiny", "n": 1e400, "c": NaN, "d": -Infinity}',
    '{"model": "tin\\u0079", "model": "last"}',
    '{"s": "\\ud800"}',
    '{"model": "tiny"}'.encode("utf-16"), '{"model": "tiny"}'.encode("utf-32-le"),
    '{"model": "tiny"}'.encode("utf-16-be"), b'{"model": "\xc3\xa9"}',
    b'\xef\xbb\xbf{"a": 1}',
])
def test_the_corners_json_takes(data: str | bytes) -> None:
    expected, got = json.loads(data), lightjson.loads(data)
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)


def test_it_imports_neither_json_nor_re() -> None:
    check = subprocess.run(
        [sys.executable, "-IS", "-c", f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); "
         "from hoshikage_sd.lightjson import loads; loads(b'{\"model\": [1, 2.5, null]}'); "
         "print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True)
    assert not {"json", "re", "enum"} & set(check.stdout.split()), check.stdout


def test_without_the_accelerator_json_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lightjson, "_scan", None)
    assert lightjson.loads(b'{"model": "tiny"}') == {"model": "tiny"}
    with pytest.raises(json.JSONDecodeError):  # json's own error, with where
        lightjson.loads('{"model": }')
