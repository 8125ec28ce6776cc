"""The request that woke the router, read before the router's own imports.

From zero processes, the router's imports take a while before it can read a request, and
only then would the model's unit start. So `hoshikage router` first accepts the pending
connection itself, peeks at its bytes (MSG_PEEK: they stay in the socket for the real HTTP
server), and when it names a model that is not serving, starts that model's unit at once.
The unit stages and loads while the router imports; the connection is then handed to the
router's HTTP front (proxy.adopt) like any other.

Two steps. take_early() runs first thing in `hoshikage router`, before argparse, logging,
PyYAML or the manifest code are imported: it resolves the name with the index the last
router left (name_index) and starts the unit over D-Bus. What it cannot decide (no index, a
changed manifest, an ambiguous name) take() decides once the manifest is parsed, with
resolve() as always. Anything unexpected (no connection pending, a slow or odd client, an
unknown model, a manifest that cannot be read) just skips the head start: the router handles
the request as always.

Imports at the top: built-in and small modules only (the head start's budget); the rest in
take(), after the early step.
"""

from __future__ import annotations

import _socket
import os
import select
import time

from hoshikage_sd import protocol
from hoshikage_sd.router import early_admission, http1, name_index, routes
from hoshikage_sd.router.jsonload import loads

TYPE_CHECKING = False  # typing, dataclasses and logging would each cost the head start ms
if TYPE_CHECKING:
    import socket

    from hoshikage_sd.manifest import Config
    from hoshikage_sd.sd import bus


#: how long to wait for the whole request (head and body) to arrive
PEEK_WAIT = 0.05
MAX_PEEK = 1 << 20


Request = tuple[str, str, dict[str, str], bytes]  # method, path, query, body


class FirstRequest:
    """The router's listening sockets, the connection taken early (if any), and the model
    whose unit was started for it (if any)."""

    def __init__(self, sockets: list[socket.socket] | None = None,
                 connection: socket.socket | None = None, started: str | None = None) -> None:
        self.sockets = sockets if sockets is not None else []
        self.connection = connection
        #: take_early's: the same as _socket's objects, which take() turns into the socket
        #: module's for the router (socket's import, with enum, would be on the head start)
        self.raw_sockets: list[_socket.socket] = []
        self.raw_connection: _socket.socket | None = None
        self.started = started
        #: the pending request, peeked at (None: none, or none this parser takes)
        self.request: Request | None = None
        #: the early step decided (a start, or the model serves already): take() is done
        self.decided = False
        #: what the early step has to say, for the log once there is one
        self.notes: list[str] = []
        #: when the early step began (CLOCK_MONOTONIC seconds; bench/router_start.py)
        self.began: float | None = None
        #: (estimate, available) when the early step admitted the model it started and left
        #: its launch ticket (early_admission): the router records the decision
        self.admitted: tuple[int, int] | None = None


#: bodies above this are walked, not parsed, for their model (jsonscan: no copy of them)
LARGE_JSON = 1 << 20


def model_name_of(body: bytes, query: dict[str, str]) -> str | None:
    """The model a request names: JSON body's "model", else ?model=. ValueError if not JSON."""
    if len(body) > LARGE_JSON:
        from hoshikage_sd.router import jsonscan  # large bodies only: not a start's cost

        name = jsonscan.model_of(body)
        return name if name is not None else query.get("model")
    if body.strip():
        data = loads(body)
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            return str(data["model"])
    return query.get("model")


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


def parse(data: bytes) -> Request | None:
    """(method, path, query, body) of a complete HTTP/1.x request in `data`, or None while
    it is incomplete or for anything this small parser does not take (chunked bodies), or
    the router's parser would refuse (http1.split_head: a head start must not start a model
    for a request that then gets a 400)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    try:
        method, target, version, fields = http1.split_head(head)
        length, chunked, _, _ = http1.framing(fields, version)
    except ValueError:
        return None
    if chunked:
        return None
    length = length or 0
    if len(rest) < length:
        return None
    path, _, query_string = target.decode("latin-1").partition("?")
    query: dict[str, str] = {}
    for pair in filter(None, query_string.split("&")):
        key, _, value = pair.partition("=")
        query.setdefault(key, value)
    return method.decode("ascii"), path, query, rest[:length]


def peek(connection: _socket.socket, wait: float = PEEK_WAIT) -> Request | None:
    """The whole request waiting on `connection`, left unread, or None by `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([connection], [], [], left)[0]:
            return None
        data = connection.recv(MAX_PEEK, _socket.MSG_PEEK)
        if not data or len(data) >= MAX_PEEK:  # closed, or more than a peek should hold
            return None
        request = parse(data)
        if request is not None:
            return request
        time.sleep(0.001)  # the rest is on its way (select says "readable" while a byte waits)


def listen_fds() -> list[int]:
    """The sockets systemd passed (sd_listen_fds(3)), with LISTEN_* removed from the
    environment and not inherited by children: sd/daemon.listen_fds without python-systemd,
    whose import the head start cannot afford."""
    try:
        mine = int(os.environ.get("LISTEN_PID", "")) == os.getpid()
        count = int(os.environ.get("LISTEN_FDS", "")) if mine else 0
    except ValueError:
        count = 0
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    fds = list(range(3, 3 + max(count, 0)))  # SD_LISTEN_FDS_START
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


def accept(first: FirstRequest) -> None:
    """Take the pending connection (if any) and peek at its request."""
    listener = first.raw_sockets[0]
    try:
        listener.setblocking(False)
        fd, _ = listener._accept()  # type: ignore[attr-defined]  # what socket.accept calls
    except OSError:  # nothing pending (or not a stream socket): no head start
        return
    finally:
        listener.setblocking(True)
    first.raw_connection = _socket.socket(fileno=fd)
    first.request = peek(first.raw_connection)


def as_sockets(first: FirstRequest) -> None:
    """take_early's raw sockets as the socket module's, for the router's HTTP front."""
    import socket

    first.sockets += [socket.socket(fileno=raw.detach()) for raw in first.raw_sockets
                      if raw.fileno() >= 0]
    if first.raw_connection is not None and first.raw_connection.fileno() >= 0:
        first.connection = socket.socket(fileno=first.raw_connection.detach())
    first.raw_sockets, first.raw_connection = [], None


def wanted(request: Request) -> list[str | None] | None:
    """The names to resolve for a request, in order (None: the default model), or None when
    the request starts no model (not a model route, or an Ollama unload)."""
    method, path, query, body = request
    if forwarded(method, path, query):
        return [model_name_of(body, query)]
    name = ollama_model(path, body) if method == "POST" else None
    return None if name is None else [name, name.removesuffix(":latest")]


def take_early() -> FirstRequest:
    """The first thing `hoshikage router` does: the sockets, the pending request, and its
    model's unit started when the last router's index (name_index) says which model that is.
    Built-in modules and the router's own small ones only (tests/unit/test_launch.py says
    which are not imported): no manifest, no logging, no socket or json modules yet."""
    began = time.monotonic()
    first = FirstRequest()
    first.raw_sockets = [_socket.socket(fileno=fd) for fd in listen_fds()]
    first.began = began
    try:
        if not first.raw_sockets:
            return first
        accept(first)
        if first.request is None:
            return first
        names = wanted(first.request)
        if names is None:
            first.decided = True  # take() would start nothing either
            return first
        index = name_index.read()
        if index is None:
            first.notes.append("no current name index: resolving after the imports")
            return first
        if index.get("api_keys"):  # a request must show its key before it starts anything
            first.decided = True
            return first
        if len(first.request[3]) > index.get("max_body", len(first.request[3])):
            first.decided = True  # the router answers it 413, starting nothing
            return first
        model = None
        for name in names:
            try:
                model = name_index.lookup(index, name)
            except name_index.Ambiguous:  # the ranks' to decide: take(), with resolve()
                return first
            if model is not None:
                break
        if model is None:  # no such model: take() answers it as always
            return first
        if model.get("keyed"):  # its own llama-server key: the router checks it first
            first.decided = True
            return first
        peeked = time.monotonic()
        if protocol.probe(model["socket"], model["health"], timeout=0.5) == 200:
            first.decided = True
            return first
        probed = time.monotonic()
        from hoshikage_sd.sd import bus

        with bus.Connection() as conn:  # one for the list and the start
            state = None
            try:
                first.admitted, state = early_admission.admit(index, model, conn)
            except Exception as exc:  # the activator admits it then, as it always did
                first.notes.append(f"no admission in the head start: {exc!r}")
            admitted = time.monotonic()
            started = start_early(model["unit"], state, conn)
        if started:
            first.started = model["name"]
            first.decided = True
            first.notes.append(
                f"started {model['name']} for the request that woke the router, from the "
                f"name index ({(peeked - began) * 1e3:.1f} ms to read the request and the "
                f"index, {(probed - peeked) * 1e3:.1f} ms to probe, "
                + (f"{(admitted - probed) * 1e3:.1f} ms to admit it and leave its ticket, "
                   if first.admitted else "") +
                f"{(time.monotonic() - admitted) * 1e3:.1f} ms to start the unit)")
        elif first.admitted:
            early_admission.withdraw(index["runtime"], model["name"])
            first.admitted = None
    except Exception as exc:  # a head start must never keep the router from serving
        first.notes.append(f"no early head start: {exc!r}")
    return first


def start_early(unit: str, state: str | None = None, conn: bus.Connection | None = None
                ) -> bool:
    """units.start_unit's common case (the unit is down, or failed): start it. A unit that
    is up, or any error, is take()'s to handle with units.start_unit (it waits for a
    dying unit to go down, and falls back to systemctl). `state`: the unit's ActiveState,
    when the caller has just asked (admit's list)."""
    from hoshikage_sd.sd import bus

    try:
        if state is None:
            state = bus.units([unit], conn)[0].active
        if state in ("active", "reloading", "deactivating"):
            return False
        if state == "failed":
            bus.reset_failed_unit(unit, conn)
        bus.start_unit(unit, conn=conn)
    except (OSError, bus.BusError):
        return False
    return True


def take(config: Config | None, first: FirstRequest | None = None) -> FirstRequest:
    """The sockets systemd passed, and a head start for the model the pending request names
    (none without a usable manifest). `first`: what take_early() did already."""
    import logging

    from hoshikage_sd.errors import HoshikageError
    from hoshikage_sd.resolve import resolve
    from hoshikage_sd.sd import units

    logger = logging.getLogger("hoshikage.router")
    if first is None:
        first = FirstRequest()
        first.raw_sockets = [_socket.socket(fileno=fd) for fd in listen_fds()]
        if first.raw_sockets:
            accept(first)
    as_sockets(first)
    for note in first.notes:
        fields = {"HOSHIKAGE_HEAD_START_USEC": int(first.began * 1e6)} if first.began else {}
        logger.info("%s", note, extra=fields)
    if first.decided or first.request is None or config is None or config.api_keys:
        return first
    try:
        names = wanted(first.request)
        model = None
        for name in names or ():
            model = resolve(config, name)
            if model is not None:
                break
        if model is None or model.own_key or os.environ.get("LLAMA_API_KEY"):
            return first  # none, or its own key: the router checks it before a start
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
