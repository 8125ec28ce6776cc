"""The request that woke the router: taken from the listening socket, peeked at (its bytes
stay in the socket for the router's HTTP front), and what it asks for.

The head (method, target, fields, framing) is split by router/http1.py, as the router's
parser splits it: a head start must not start a model for a request that then gets a 400.
model_name_of() is also the router's, for every forwarded request.
"""

from __future__ import annotations

import _socket
import select
import time

from hoshikage_sd.lightjson import loads
from hoshikage_sd.router import hosts, http1, routes

#: how long to wait for the whole request (head and body) to arrive
PEEK_WAIT = 0.05
MAX_PEEK = 1 << 20
#: bodies above this are walked, not parsed, for their model (jsonscan: no copy of them)
LARGE_JSON = 1 << 20

Request = tuple[str, str, dict[str, str], bytes]  # method, path, query, body


class NotAName(ValueError):
    """The body's "model" is there, and neither a string nor null (a client's mistake,
    which must not mean the default model as null does)."""

    def __init__(self, value: object) -> None:
        kind = {bool: "a boolean", int: "an integer", float: "a number", list: "an array",
                dict: "an object"}.get(type(value), type(value).__name__)
        super().__init__(f"Invalid type for 'model': expected a string, but got {kind} "
                         "instead.")


def model_name_of(body: bytes, query: dict[str, str]) -> str | None:
    """The model a request names: JSON body's "model", else ?model=. ValueError if not JSON,
    NotAName (a ValueError) if its "model" is neither a string nor null."""
    if len(body) > LARGE_JSON:
        from hoshikage_sd.router import jsonscan  # large bodies only: not a start's cost

        model = jsonscan.model_of(body)
    elif body.strip():
        data = loads(body)
        model = data.get("model") if isinstance(data, dict) else None
    else:
        model = None
    if model is None:
        return query.get("model")
    if not isinstance(model, str):
        raise NotAName(model)
    return model


def forwarded(method: str, path: str, query: dict[str, str]) -> bool:
    """Is this a request the router forwards to a model (not one it answers itself)?"""
    return routes.classify(method, path, query) == routes.Route.FORWARD


def ollama_model(path: str, body: bytes) -> str | None:
    """The model an Ollama inference request loads (None: none, or it only unloads: a
    keep_alive of zero). ValueError if the body is not JSON."""
    if routes.classify("POST", path, {}) != routes.Route.OLLAMA_INFER:
        return None
    data = loads(body) if body.strip() else {}
    if not isinstance(data, dict) or not isinstance(data.get("model"), str):
        return None
    keep = data.get("keep_alive")
    if isinstance(keep, int | float) and not isinstance(keep, bool) and keep == 0:
        return None
    if isinstance(keep, str) and not keep.strip().lstrip("+-").strip("0.nsuµμmh"):
        return None  # "0", "0s", "0m", ...: unload
    return str(data["model"])


def wanted(request: Request) -> list[str | None] | None:
    """The names to resolve for a request, in order (None: the default model), or None when
    the request starts no model (not a model route, or an Ollama unload)."""
    method, path, query, body = request
    if forwarded(method, path, query):
        return [model_name_of(body, query)]
    name = ollama_model(path, body) if method == "POST" else None
    return None if name is None else [name, name.removesuffix(":latest")]


def parse(data: bytes, local: str = "") -> Request | None:
    """(method, path, query, body) of a complete HTTP/1.x request in `data`, or None while
    it is incomplete or for anything this small parser does not take (chunked bodies), or
    the router would refuse (http1.split_head; a Host that is a DNS rebinding to `local`,
    the address it came to, without the manifest's allowed_hosts: the router decides)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    try:
        method, target, version, fields = http1.split_head(head)
        length, chunked, _, _ = http1.framing(fields, version)
    except ValueError:
        return None
    host = next((v.decode("latin-1") for n, v in fields if n.lower() == b"host"), None)
    if chunked or not hosts.allowed(host, local):
        return None
    length = length or 0
    if len(rest) < length:
        return None
    text = target.decode("latin-1")
    return method.decode("ascii"), text.partition("?")[0], http1.query_of(text), rest[:length]


def peek(connection: _socket.socket, wait: float = PEEK_WAIT) -> Request | None:
    """The whole request waiting on `connection`, left unread, or None by `wait` seconds."""
    deadline = time.monotonic() + wait
    local = connection.getsockname()
    local = local[0] if isinstance(local, tuple) else ""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([connection], [], [], left)[0]:
            return None
        data = connection.recv(MAX_PEEK, _socket.MSG_PEEK)
        if not data or len(data) >= MAX_PEEK:  # closed, or more than a peek should hold
            return None
        request = parse(data, local)
        if request is not None:
            return request
        time.sleep(0.001)  # the rest is on its way (select says "readable" while a byte waits)


def accept(listener: _socket.socket) -> tuple[_socket.socket | None, Request | None]:
    """The connection pending on `listener` (None: none) and its request, peeked at."""
    try:
        listener.setblocking(False)
        fd, _ = listener._accept()  # type: ignore[attr-defined]  # what socket.accept calls
    except OSError:  # nothing pending (or not a stream socket): no head start
        return None, None
    finally:
        listener.setblocking(True)
    connection = _socket.socket(fileno=fd)
    return connection, peek(connection)
