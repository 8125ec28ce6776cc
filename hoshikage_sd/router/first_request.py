"""The request that woke the router, read before the router's own imports.

From zero processes, the router's imports take a while before it can read a request, and
only then would the model's unit start. So `hoshikage router` first accepts the pending
connection itself, peeks at its bytes (MSG_PEEK: they stay in the socket for the real HTTP
server), and when it names a model that is not serving, starts that model's unit at once.
The unit stages and loads while the router imports; the connection is then handed to the
router's HTTP front (proxy.adopt) like any other. Anything unexpected (no connection
pending, a slow or odd client, an unknown model, a manifest that cannot be read) just skips
the head start: the router handles the request as always.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
from dataclasses import dataclass, field

from hoshikage_sd import protocol
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Config
from hoshikage_sd.resolve import resolve
from hoshikage_sd.router import routes
from hoshikage_sd.sd import daemon, units

logger = logging.getLogger("hoshikage.router")

#: how long to wait for the whole request (head and body) to arrive
PEEK_WAIT = 0.05
MAX_PEEK = 1 << 20


@dataclass
class FirstRequest:
    """The router's listening sockets, the connection taken early (if any), and the model
    whose unit was started for it (if any)."""

    sockets: list[socket.socket] = field(default_factory=list)
    connection: socket.socket | None = None
    started: str | None = None


def model_name_of(body: bytes, query: dict[str, str]) -> str | None:
    """The model a request names: JSON body's "model", else ?model=. ValueError if not JSON."""
    if body.strip():
        data = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            return str(data["model"])
    return query.get("model")


def forwarded(method: str, path: str, query: dict[str, str]) -> bool:
    """Is this a request the router forwards to a model (not one it answers itself)?"""
    return routes.classify(method, path, query) is routes.Route.FORWARD


def ollama_model(path: str, body: bytes) -> str | None:
    """The model an Ollama inference request loads (None: none, or it only unloads: a
    keep_alive of zero). ValueError if the body is not JSON."""
    if routes.classify("POST", path, {}) is not routes.Route.OLLAMA_INFER:
        return None
    data = json.loads(body) if body.strip() else {}
    if not isinstance(data, dict) or not isinstance(data.get("model"), str):
        return None
    keep = data.get("keep_alive")
    if isinstance(keep, int | float) and not isinstance(keep, bool) and keep == 0:
        return None
    if isinstance(keep, str) and not keep.strip().lstrip("+-").strip("0.nsuµμmh"):
        return None  # "0", "0s", "0m", ...: unload
    return str(data["model"])


def parse(data: bytes) -> tuple[str, str, dict[str, str], bytes] | None:
    """(method, path, query, body) of a complete HTTP/1.x request in `data`, or None while
    it is incomplete or for anything this small parser does not take (chunked bodies)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    headers = {}
    for line in lines[1:]:
        key, colon, value = line.partition(":")
        if colon:
            headers[key.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        return None
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        return None
    if len(rest) < length:
        return None
    path, _, query_string = parts[1].partition("?")
    query: dict[str, str] = {}
    for pair in filter(None, query_string.split("&")):
        key, _, value = pair.partition("=")
        query.setdefault(key, value)
    return parts[0], path, query, rest[:length]


def peek(connection: socket.socket, wait: float = PEEK_WAIT) -> tuple[str, str, dict[str, str],
                                                                      bytes] | None:
    """The whole request waiting on `connection`, left unread, or None by `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([connection], [], [], left)[0]:
            return None
        data = connection.recv(MAX_PEEK, socket.MSG_PEEK)
        if not data or len(data) >= MAX_PEEK:  # closed, or more than a peek should hold
            return None
        request = parse(data)
        if request is not None:
            return request
        time.sleep(0.001)  # the rest is on its way (select says "readable" while a byte waits)


def take(config: Config | None) -> FirstRequest:
    """The sockets systemd passed, and a head start for the model the pending request names
    (none without a usable manifest)."""
    first = FirstRequest([socket.socket(fileno=fd) for fd in daemon.listen_fds()])
    if not first.sockets or config is None:
        return first
    listener = first.sockets[0]
    try:
        listener.setblocking(False)
        first.connection, _ = listener.accept()
    except OSError:  # nothing pending (or not a stream socket): no head start
        return first
    finally:
        listener.setblocking(True)
    try:
        request = peek(first.connection)
        if request is None:
            return first
        method, path, query, body = request
        if forwarded(method, path, query):
            model = resolve(config, model_name_of(body, query))
        else:
            name = ollama_model(path, body) if method == "POST" else None
            if name is None:
                return first
            model = resolve(config, name) or resolve(config, name.removesuffix(":latest"))
        if model is None:
            return first
        if protocol.probe(str(config.socket_path(model.name)), model.health, timeout=0.5) == 200:
            return first
        units.start_unit(units.model_unit(model.name))
        first.started = model.name
        logger.info("started %s for the request that woke the router", model.name)
    except HoshikageError as exc:
        logger.warning("no head start for the first request: %s", exc.message)
    except Exception as exc:  # a head start must never keep the router from serving
        logger.debug("no head start for the first request: %r", exc)
    return first
