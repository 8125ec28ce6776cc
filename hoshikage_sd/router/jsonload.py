"""json.loads for the router's head start, without json's imports.

json.decoder compiles its regular expressions at import, and re with enum costs the head
start imports (`python3 -IS -X importtime`; docs/performance.md) before the waking
request's model unit can start. The parsing itself is the same: json.loads's C scanner
(_json), driven as json.JSONDecoder drives it. A malformed document raises the same
json.JSONDecodeError (a ValueError; _json imports json.decoder for it then), and bytes in
UTF-16 or UTF-32, which json.loads detects, go to json.loads itself.
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}
_SPACE = " \t\n\r"


class _Context:
    """What _json's scanner reads from a JSONDecoder: its defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


_scan = _json.make_scanner(_Context())  # type: ignore[arg-type]  # a JSONDecoder's fields


def loads(data: str | bytes | bytearray) -> Any:
    """json.loads(data), for str and for bytes in UTF-8."""
    if not isinstance(data, str):
        if len(data) >= 2 and (not data[0] or not data[1] or data[:2] in (b"\xff\xfe",
                                                                          b"\xfe\xff")):
            import json  # UTF-16 or UTF-32: json.loads tells which

            return json.loads(data)
        # decoded where it lies: bytes(data) first would copy a bytearray body once more
        data = data.decode("utf-8-sig" if data[:3] == b"\xef\xbb\xbf" else "utf-8",
                           "surrogatepass")
    start = 0
    while start < len(data) and data[start] in _SPACE:
        start += 1
    try:
        value, end = _scan(data, start)
    except StopIteration as stop:
        import json

        raise json.JSONDecodeError("Expecting value", data, stop.value) from None
    while end < len(data) and data[end] in _SPACE:
        end += 1
    if end != len(data):
        import json

        raise json.JSONDecodeError("Extra data", data, end)
    return value
