"""json.loads for the head start's path, without the json package's import.

`import json` brings re and enum, and json compiles its regular expressions as it loads,
on every start from zero before the head start can begin (docs/performance.md, "Kept
optimisations", says what that costs). This takes the same C scanner the json package
parses with (_json.make_scanner, set up as json.JSONDecoder sets it up by default), so the
values are json.loads's. Whatever it does not take on itself goes to json.loads: bytes
other than UTF-8, a byte-order mark, and any interpreter without the _json accelerator.
Errors are ValueError, as json's are (its JSONDecodeError is one), but only json.loads's
say where: callers that show the message to a client parse with json.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing would cost the head start what this module saves
if TYPE_CHECKING:
    from typing import Any

_WHITESPACE = " \t\n\r"


class _Decoding:
    """json.JSONDecoder()'s settings, as the C scanner reads them."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"),
                      "NaN": float("nan")}.__getitem__


_scan: Any = None
try:
    from _json import make_scanner

    _scan = make_scanner(_Decoding())  # type: ignore[arg-type]  # reads only the settings
except (ImportError, AttributeError, TypeError):  # no accelerator: json.loads
    pass


def loads(data: str | bytes | bytearray) -> Any:
    """json.loads(data); a ValueError, not a RecursionError, for arrays or objects nested
    past the interpreter's recursion limit (a client's body: a 400, not a 500)."""
    try:
        return _loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _loads(data: str | bytes | bytearray) -> Any:
    if isinstance(data, (bytes, bytearray)):
        # json.loads guesses UTF-16 and UTF-32 from zero bytes, and refuses a BOM
        if _scan is None or len(data) < 2 or not data[0] or not data[1] \
                or data[:3] == b"\xef\xbb\xbf" or data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return _json_loads(data)
        text = bytes(data).decode("utf-8", "surrogatepass")
    else:
        text = data
    if _scan is None or text.startswith("\ufeff"):
        return _json_loads(text)
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as stop:
        raise ValueError(f"Expecting value at character {stop.value}") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"Extra data at character {end}")
    return value


def _json_loads(data: str | bytes | bytearray) -> Any:
    import json

    return json.loads(data)
