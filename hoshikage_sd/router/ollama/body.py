"""A request body decoded for translation, and the translation encoded for llama-server.

A small body is json.loads'd and its translation json.dumps'd. A large one (a long prompt, an
image in base64) would be held about four times over that way at the peak: its bytes, the
text and strings decoded from them, the encoded translation and its bytes. So its long strings
are never decoded: the body is parsed with each of them replaced by a marker (a string no
client sends: a random nonce in Unicode's private use area), the translation carries the
markers like any other string (`Long`: its `head` is the start of its text, for what must
look inside, an image's type), and the encoding puts each string's bytes back where its
marker is, moved within the body's own buffer, which becomes the upstream request. What that
costs besides the body is the small parts and one chunk of copying (docs/performance.md).

A long string goes on as the client wrote it, escapes included: the same string to a JSON
parser, the same bytes as json.dumps would write unless the client escaped differently
(`\\u00e9` stays `\\u00e9`). What json.loads would refuse inside one (a control character, a
bad escape) is llama-server's to refuse, as it is on the OpenAI routes (router/jsonscan.py).
A body sent chunked arrives as bytes, which cannot be rewritten in place: its translation is
a new buffer beside it (about twice the body).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from typing import Any, Final

from hoshikage_sd import lightjson
from hoshikage_sd.router.jsonscan import Buffer, string_end
from hoshikage_sd.router.ollama.base import _bad

#: bodies over this take the long-string path (headstart/request.LARGE_JSON's bound too)
LARGE: Final = 1 << 20
#: strings from this many bytes (quotes included) are kept as bytes
LONG: Final = 1 << 16
#: what one step of moving a string within the body copies
CHUNK: Final = 1 << 20
#: structure and short strings without escapes, skipped in one match (each string otherwise
#: costs a turn of the Python loop); it stops before a long string or one with an escape
_SHORT: Final = re.compile(rb'(?:[^"]*"[^"\\]{0,256}")*')
_BOM: Final = b"\xef\xbb\xbf"


class Long(str):
    """A long string of the body, undecoded: its value is its marker."""

    source: Buffer
    span: tuple[int, int]  # the literal in source, quotes included

    def __new__(cls, marker: str, source: Buffer, span: tuple[int, int]) -> Long:
        self = super().__new__(cls, marker)
        self.source, self.span = source, span
        return self

    @property
    def head(self) -> str:
        """The string's first characters (up to 512 bytes' worth), decoded."""
        start, end = self.span
        window = bytes(self.source[start + 1:min(end - 1, start + 513)])
        for cut in range(len(window), max(len(window) - 12, -1), -1):
            try:  # cut where no escape or UTF-8 sequence is split (\\uXXXX\\uXXXX: 12)
                head: str = json.loads(b'"' + window[:cut] + b'"')
                return head
            except ValueError:
                continue
        return ""

    def text(self) -> str:
        """The whole string, decoded (what a translation that rewrites it needs)."""
        start, end = self.span
        try:
            text: str = json.loads(bytes(self.source[start:end]))
        except ValueError as exc:
            raise _bad(f"invalid JSON: {exc}") from None
        return text


class Body:
    """A decoded request body (`data`) and how a translation of it is encoded."""

    def __init__(self, data: Any, raw: Buffer = b"", spans: list[tuple[int, int]] | None = None,
                 prefix: str = "") -> None:
        self.data = data
        self.raw = raw
        self.spans = spans or []
        self.prefix = prefix

    def encode(self, obj: object) -> Buffer:
        """`obj` (the translation) as JSON, as json.dumps writes it (ensure_ascii off). With
        long strings, in the body's buffer: the body is gone after this."""
        encoded = json.dumps(obj, ensure_ascii=False).encode()
        if not self.spans:
            return encoded
        marker = re.compile(re.escape(self.prefix.encode()) + rb"(\d+)\xee\x80\x81")
        pieces: list[bytes | tuple[int, int]] = []
        last = done = 0
        for match in marker.finditer(encoded):
            start, end = self.spans[int(match[1])]
            pieces.append(encoded[last:match.start()])
            if start >= done:  # in the body's order: moved in place
                pieces.append((start + 1, end - 1))
                done = end
            else:  # out of order, or a second time: a copy
                pieces.append(bytes(self.raw[start + 1:end - 1]))
            last = match.end()
        pieces.append(encoded[last:])
        raw, self.raw, self.spans = self.raw, b"", []
        if isinstance(raw, bytearray):
            return _compact(raw, pieces)
        view = memoryview(raw)
        return b"".join(view[p[0]:p[1]] if isinstance(p, tuple) else p for p in pieces)


def decode(raw: Buffer) -> Body:
    """A request body as JSON (an empty one as {}); OllamaError (400) if it is not."""
    if len(raw) <= LARGE or raw.startswith(_BOM) or 0 in raw[:4]:  # small, UTF-16/32
        return Body(read_json(raw))
    spans = list(_long_strings(raw))
    if not spans:
        return Body(read_json(raw))
    prefix = f"\ue000{secrets.token_hex(8)}:"
    parts: list[Buffer] = []
    last = 0
    for i, (start, end) in enumerate(spans):
        parts += [raw[last:start], f'"{prefix}{i}\ue001"'.encode()]
        last = end
    parts.append(raw[last:])
    data = read_json(b"".join(parts))
    longs = {f"{prefix}{i}\ue001": Long(f"{prefix}{i}\ue001", raw, span)
             for i, span in enumerate(spans)}
    return Body(_marked(data, longs), raw, spans, prefix)


def read_json(raw: Buffer) -> Any:
    """A request body as JSON; OllamaError (400) if it is not."""
    if not raw.strip():
        return {}
    try:
        return lightjson.loads(raw)
    except ValueError as exc:
        raise _bad(f"invalid JSON: {exc}") from None


def resolved(obj: Any) -> Any:
    """`obj` with its long strings decoded: for a translation that encodes a part of the
    request inside a string (a tool call's arguments), where a marker cannot stand."""
    if isinstance(obj, Long):
        return obj.text()
    if isinstance(obj, dict):
        return {resolved(k): resolved(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolved(v) for v in obj]
    return obj


def _long_strings(buf: Buffer) -> Iterator[tuple[int, int]]:
    """The string literals in `buf` of LONG bytes or more; ValueError (as json.loads's) for
    one not terminated."""
    i = 0
    while True:
        skipped = _SHORT.match(buf, i)
        i = skipped.end() if skipped else i
        start = buf.find(b'"', i)
        if start < 0:
            return
        try:
            i = string_end(buf, start)
        except ValueError as err:
            raise _bad(f"invalid JSON: {err}") from None
        if i - start >= LONG:
            yield start, i


def _marked(data: Any, longs: dict[str, Long]) -> Any:
    """The parsed skeleton with each marker string (a value) made its Long."""
    if isinstance(data, str):
        return longs.get(data, data)
    stack = [data]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) \
            if isinstance(node, list) else ()
        for key, value in items:
            if isinstance(value, str):
                if value in longs:
                    node[key] = longs[value]
            elif isinstance(value, (dict, list)):
                stack.append(value)
    return data


def _compact(buf: bytearray, pieces: list[bytes | tuple[int, int]]) -> bytearray:
    """`pieces` (bytes, and spans of buf in increasing order) joined within buf itself.

    Each span is written at or before where it lies (the pieces between never overtake the
    next span): buf is first moved along by what the output runs ahead, which realloc does
    without a copy of a buffer this large (mremap)."""
    ahead = out = 0
    for piece in pieces:
        if isinstance(piece, tuple):
            ahead = max(ahead, out - piece[0])
            out += piece[1] - piece[0]
        else:
            out += len(piece)
    if ahead:
        buf[0:0] = bytes(ahead)
    if len(buf) < out:
        buf.extend(bytes(out - len(buf)))
    at = 0
    for piece in pieces:
        if isinstance(piece, tuple):
            start, end = piece[0] + ahead, piece[1] + ahead
            if start != at:
                for off in range(0, end - start, CHUNK):
                    n = min(CHUNK, end - start - off)
                    buf[at + off:at + off + n] = buf[start + off:start + off + n]
            at += end - start
        else:
            buf[at:at + len(piece)] = piece
            at += len(piece)
    del buf[out:]
    return buf
