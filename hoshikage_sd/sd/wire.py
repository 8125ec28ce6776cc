"""D-Bus messages on the wire, for the few calls hoshikage makes to systemd's manager.

Marshalled by hand, with built-in modules only: the router's head start (router/headstart) starts
the waking request's model unit over D-Bus before anything else, and jeepney, which marshalled
these messages before, imports typing, re and enum: with json and socket, most of the head
start's imports (docs/performance.md, "Kept optimisations", with the measurement that finds the
change within the noise end to end). What is here is what systemd's replies need: the basic
types (s, o, g, u, i, b, y, n, q, t, x, d, h), arrays, structs and dict entries (read as
pairs), variants. tests/unit/test_wire.py checks it against jeepney.
"""

from __future__ import annotations

import _struct

StructError = getattr(_struct, "error")  # noqa: B009 (not in _struct's type stub)
METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
#: header field codes (the D-Bus specification's)
PATH, INTERFACE, MEMBER, ERROR_NAME, REPLY_SERIAL, DESTINATION, SENDER, SIGNATURE = (
    1, 2, 3, 4, 5, 6, 7, 8)
_FIXED = {"y": ("B", 1), "b": ("I", 4), "u": ("I", 4), "i": ("i", 4), "t": ("Q", 8),
          "x": ("q", 8), "d": ("d", 8), "n": ("h", 2), "q": ("H", 2), "h": ("I", 4)}
_ALIGN = {"s": 4, "o": 4, "g": 1, "a": 4, "(": 8, "{": 8, "v": 1,
          **{k: v[1] for k, v in _FIXED.items()}}


class WireError(ValueError):
    """Bytes that are not a D-Bus message this module reads."""


def _types(signature: str) -> list[str]:
    """The complete types of a signature: "sa(su)" -> ["s", "a(su)"]."""
    out, i = [], 0
    while i < len(signature):
        end = _end_of(signature, i)
        out.append(signature[i:end])
        i = end
    return out


def _end_of(signature: str, i: int) -> int:
    if i >= len(signature):
        raise WireError(f"incomplete signature {signature!r}")
    if signature[i] == "a":
        return _end_of(signature, i + 1)
    if signature[i] in "({":
        depth = 0
        for j in range(i, len(signature)):
            depth += {"(": 1, "{": 1, ")": -1, "}": -1}.get(signature[j], 0)
            if depth == 0:
                return j + 1
        raise WireError(f"unbalanced signature {signature!r}")
    return i + 1


# ---- writing ----------------------------------------------------------------------------

class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()

    def pad(self, alignment: int) -> None:
        self.buf += b"\0" * (-len(self.buf) % alignment)

    def write(self, kind: str, value: object) -> None:
        code = kind[0]
        self.pad(_ALIGN[code])
        if code in ("s", "o"):
            data = str(value).encode()
            self.buf += _struct.pack("<I", len(data)) + data + b"\0"
        elif code == "g":
            data = str(value).encode()
            self.buf += bytes([len(data)]) + data + b"\0"
        elif code in _FIXED:
            self.buf += _struct.pack("<" + _FIXED[code][0], value)
        elif code == "a":
            at = len(self.buf)
            self.buf += b"\0\0\0\0"
            self.pad(_ALIGN[kind[1]])
            start = len(self.buf)
            for item in value:  # type: ignore[attr-defined]
                self.write(kind[1:], item)
            self.buf[at:at + 4] = _struct.pack("<I", len(self.buf) - start)
        elif code in "({":
            for sub, item in zip(_types(kind[1:-1]), value, strict=True):  # type: ignore[call-overload]
                self.write(sub, item)
        elif code == "v":
            pair: tuple[str, object] = value  # type: ignore[assignment]
            self.write("g", pair[0])
            self.write(pair[0], pair[1])
        else:
            raise WireError(f"cannot write type {kind!r}")


def method_call(serial: int, destination: str, path: str, interface: str, member: str,
                signature: str = "", body: tuple[object, ...] = ()) -> bytes:
    """A METHOD_CALL message (little-endian), ready to send."""
    payload = _Writer()
    for kind, value in zip(_types(signature), body, strict=True):
        payload.write(kind, value)
    fields = [(PATH, ("o", path)), (INTERFACE, ("s", interface)), (MEMBER, ("s", member)),
              (DESTINATION, ("s", destination))]
    if signature:
        fields.append((SIGNATURE, ("g", signature)))
    head = _Writer()
    head.buf += b"l" + bytes([METHOD_CALL, 0, 1])
    head.buf += _struct.pack("<II", len(payload.buf), serial)
    head.write("a(yv)", fields)
    head.pad(8)
    return bytes(head.buf + payload.buf)


# ---- reading ----------------------------------------------------------------------------

class Message:
    """A message read: its type, serial, header fields (code -> value) and body."""

    __slots__ = ("body", "fields", "kind", "serial")

    def __init__(self, kind: int, serial: int, fields: dict[int, object],
                 body: tuple[object, ...]) -> None:
        self.kind = kind
        self.serial = serial
        self.fields = fields
        self.body = body

    def __repr__(self) -> str:
        return f"Message(kind={self.kind}, serial={self.serial}, fields={self.fields})"


class _Reader:
    def __init__(self, data: bytes | bytearray, order: str) -> None:
        self.data = data
        self.order = order
        self.at = 0

    def pad(self, alignment: int) -> None:
        self.at += -self.at % alignment

    def fixed(self, code: str) -> object:
        fmt, size = _FIXED[code]
        (value,) = _struct.unpack_from(self.order + fmt, self.data, self.at)
        self.at += size
        return bool(value) if code == "b" else value

    def read(self, kind: str) -> object:
        code = kind[0]
        self.pad(_ALIGN.get(code, 1))
        if code in ("s", "o"):
            (size,) = _struct.unpack_from(self.order + "I", self.data, self.at)
            start = self.at + 4
            self.at = start + size + 1
            return bytes(self.data[start:start + size]).decode()
        if code == "g":
            size = self.data[self.at]
            start = self.at + 1
            self.at = start + size + 1
            return bytes(self.data[start:start + size]).decode()
        if code in _FIXED:
            return self.fixed(code)
        if code == "a":
            (size,) = _struct.unpack_from(self.order + "I", self.data, self.at)
            self.at += 4
            self.pad(_ALIGN.get(kind[1], 1))
            end = self.at + size
            items = []
            while self.at < end:
                items.append(self.read(kind[1:]))
            return items
        if code in "({":  # a struct, or a dict entry (read as a pair)
            return tuple(self.read(sub) for sub in _types(kind[1:-1]))
        if code == "v":
            signature = str(self.read("g"))
            return self.read(signature)
        raise WireError(f"cannot read type {kind!r}")


def message_size(data: bytes | bytearray) -> int | None:
    """The size of the message at the start of `data`, None until its fixed header is in."""
    if len(data) < 16:
        return None
    order = {0x6C: "<", 0x42: ">"}.get(data[0])
    if order is None:
        raise WireError(f"not a D-Bus message (endianness byte {data[0]:#x})")
    body, fields = _struct.unpack_from(order + "I4xI", data, 4)
    return int(16 + fields + (-(16 + fields) % 8) + body)


def read_message(data: bytes | bytearray) -> Message:
    """The message that `data` holds whole (message_size(data) bytes)."""
    order = "<" if data[0] == 0x6C else ">"
    kind = data[1]
    (serial,) = _struct.unpack_from(order + "I", data, 8)
    reader = _Reader(data, order)
    reader.at = 12
    try:
        fields = {code: value for code, value in reader.read("a(yv)")}  # type: ignore[attr-defined]
        reader.pad(8)
        signature = str(fields.get(SIGNATURE, ""))
        body = tuple(reader.read(t) for t in _types(signature))
    except (IndexError, KeyError, UnicodeDecodeError, StructError) as exc:
        raise WireError(f"malformed D-Bus message: {exc}") from None
    return Message(kind, serial, fields, body)
