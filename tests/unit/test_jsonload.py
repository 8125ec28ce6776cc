"""router/jsonload.loads is json.loads: the same values, the same errors' kind."""

from __future__ import annotations

import json
import math

import pytest

from hoshikage_sd.router.jsonload import loads

CASES: list[str | bytes] = [
    b'{"model": "a"}', '  [1, 2.5, -3e5, true, false, null, "\\u00e9"] ', b"\xef\xbb\xbf{}",
    '{"a": NaN, "b": -Infinity}', "12345678901234567890", '{"a":1,"a":2}', '["\\ud800"]',
    b'"\xed\xa0\x80"', json.dumps({"a": "ü", "b": [{}]}).encode("utf-16"),
    json.dumps({"m": "x"}).encode("utf-32-le"), '{"nested": {"deep": [[[]]]}}', "\t\n1\r\n",
    # malformed: the same exception class
    b'{"x":', "[1] x", "", " ", b"\xff", "\ufeff{}", "{'a': 1}", "[1,]", '{"a" 1}', "nul",
]


def outcome(parse: object, data: str | bytes) -> tuple[str, object]:
    try:
        value = parse(data)  # type: ignore[operator]
    except Exception as exc:
        return type(exc).__name__, None
    return "ok", json.dumps(value, sort_keys=True) if not (
        isinstance(value, dict) and any(isinstance(v, float) and math.isnan(v)
                                        for v in value.values())) else repr(value)


@pytest.mark.parametrize("data", CASES)
def test_it_reads_what_json_reads(data: str | bytes) -> None:
    assert outcome(loads, data) == outcome(json.loads, data)
