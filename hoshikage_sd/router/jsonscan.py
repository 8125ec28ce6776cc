"""The "model" of a large JSON body, found without decoding the body.

The router reads a request's body whole to learn its model, and for a small body it parses
it (json.loads). For a large one (a long prompt, images in base64) a parse costs about twice
the body on top of it while it runs: the decoded text, then the strings in it (a 200 MB
body took the router from 27 to 641 MB). This scanner walks the bytes instead: values
are skipped by the regex engine (a container nested up to NESTING deep in one match), a long
string with bytes.find (memchr) for its closing quote; only the top-level keys (and the
"model" string) are decoded: what it holds besides the body is a few small slices,
whatever the body's size.

It finds what json.loads would give as `data["model"]` (the last "model" key, as json.loads
keeps the last of duplicates) and checks the structure as far as it walks it: an
unterminated string, an unbalanced bracket or something after the top-level value is a
ValueError (the router's 400), as a parse would be. What it does not check (a malformed
number, a control character inside a string) is llama-server's to refuse, which parses the
body itself.
"""

from __future__ import annotations

import re
from json import loads
from typing import Final

Buffer = bytes | bytearray

#: a run of anything but strings and brackets; a string of at most PIECES pieces (runs of
#: up to SHORT bytes, escapes), a longer one being found with bytes.find (memchr) in Python
#: (the regex engine reads about 5 ns a byte); and, built of them, a container nested up
#: to NESTING deep (a chat's messages with their content parts), skipped by the regex
#: engine in one match, so that Python sees only the brackets of deeper ones and the long
#: strings. Atomic groups, not possessive quantifiers: bookworm's Python 3.11.2 matches
#: nested possessive ones wrongly (an unbalanced '[[[' matched); a failed container is
#: never backtracked into.
SHORT: Final = 4096
PIECES: Final = 4096
NESTING: Final = 6
_RUN: Final = rb'(?>[^"\[\]{}]+)'
_STRING: Final = rb'(?>"(?:(?>[^"\\]{1,%d})|\\.){0,%d}")' % (SHORT, PIECES)


def _skipping(depth: int) -> bytes:
    inner = rb"(?:" + _RUN + rb"|" + _STRING + rb")*"
    for _ in range(depth):
        inner = rb"(?:" + _RUN + rb"|" + _STRING + rb"|(?>[\[{]" + inner + rb"[\]}]))*"
    return inner


_CONTAINER: Final = re.compile(rb"(?>[\[{]" + _skipping(NESTING - 1) + rb"[\]}])")
#: inside a container deeper than that: up to its next bracket or long string
_INSIDE: Final = re.compile(rb"(?>" + _skipping(NESTING) + rb")")
_SPACE: Final = re.compile(rb"[ \t\n\r]*")
#: a literal or number at the top level: up to the next separator
_SCALAR: Final = re.compile(rb"[^,}\] \t\n\r]+")
QUOTE, BACKSLASH = ord('"'), ord("\\")
OPEN, CLOSE = frozenset(b"[{"), frozenset(b"]}")


def _space(buf: Buffer, i: int) -> int:
    match = _SPACE.match(buf, i)
    return match.end() if match else i


def string_end(buf: Buffer, i: int) -> int:
    """The index after the string that starts at buf[i] ('"')."""
    j = i + 1
    while True:
        q = buf.find(b'"', j)
        if q < 0:
            raise ValueError(f"unterminated string starting at byte {i}")
        k = q - 1
        while k > i and buf[k] == BACKSLASH:
            k -= 1
        if (q - 1 - k) % 2 == 0:  # an even run of backslashes: the quote is not escaped
            return q + 1
        j = q + 1


def _container_end(buf: Buffer, i: int) -> int:
    """The index after the array or object that starts at buf[i]."""
    whole = _CONTAINER.match(buf, i)
    if whole is not None:
        return whole.end()
    depth = 0
    while True:
        if depth:
            match = _INSIDE.match(buf, i)
            i = match.end() if match else i
        if i >= len(buf):
            raise ValueError(f"unterminated array or object at byte {i}")
        c = buf[i]
        if c == QUOTE:  # a long string (or one without its end: ValueError)
            i = string_end(buf, i)
            continue
        depth += 1 if c in OPEN else -1
        i += 1
        if depth == 0:
            return i


def _value_end(buf: Buffer, i: int) -> int:
    if i >= len(buf):
        raise ValueError("a value is missing at the end")
    c = buf[i]
    if c == QUOTE:
        return string_end(buf, i)
    if c in OPEN:
        return _container_end(buf, i)
    match = _SCALAR.match(buf, i)
    if match is None:
        raise ValueError(f"a value is missing at byte {i}")
    return match.end()


def model_of(buf: Buffer) -> object:
    """json.loads(buf).get("model"): None when there is none (a body that is not an object
    names none); ValueError where the walk finds the JSON malformed."""
    if len(buf) >= 2 and (not buf[0] or not buf[1] or buf[:2] in (b"\xff\xfe", b"\xfe\xff")):
        data = loads(buf)  # UTF-16 or UTF-32 (json.loads takes them): parsed, rare
        return data.get("model") if isinstance(data, dict) else None
    i = _space(buf, 3 if buf[:3] == b"\xef\xbb\xbf" else 0)  # UTF-8's BOM, as json.loads
    if i >= len(buf):
        return None
    if buf[i] != ord("{"):
        _value_end(buf, i)  # a top-level array or scalar: checked, names no model
        return None
    found: object = None
    i = _space(buf, i + 1)
    if i < len(buf) and buf[i] == ord("}"):
        i += 1
    else:
        while True:
            if i >= len(buf) or buf[i] != QUOTE:
                raise ValueError(f"expecting a key in double quotes at byte {i}")
            key_end = string_end(buf, i)
            key = loads(bytes(buf[i:key_end]))
            i = _space(buf, key_end)
            if i >= len(buf) or buf[i] != ord(":"):
                raise ValueError(f"expecting ':' at byte {i}")
            i = _space(buf, i + 1)
            end = _value_end(buf, i)
            if key == "model":  # the last one, as json.loads takes it
                found = loads(bytes(buf[i:end]))
            i = _space(buf, end)
            if i < len(buf) and buf[i] == ord(","):
                i = _space(buf, i + 1)
                continue
            if i < len(buf) and buf[i] == ord("}"):
                i += 1
                break
            raise ValueError(f"expecting ',' or '}}' at byte {i}")
    if _space(buf, i) != len(buf):
        raise ValueError(f"extra data at byte {i}")
    return found
