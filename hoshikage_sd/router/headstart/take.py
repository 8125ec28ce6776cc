"""The head start's two steps, in order: take_early() before the router's imports, take()
once the manifest is parsed.

take_early() runs first thing in `hoshikage router` (cli.router_main), before argparse,
logging, PyYAML or the manifest code are imported: the sockets systemd passed
(sd/daemon.listen_fds), the pending connection and its request (request.py), the model it
names by the index the last router left (index.py), its admission and ticket (admit.py), and
the unit's start (sd/units.start_unit, over the bus connection the admission listed the
units on). What it cannot decide (no index, a changed manifest, an ambiguous name) take()
decides once the manifest is parsed, with resolve() as always. Anything unexpected (no
connection pending, a slow or odd client, an unknown model, a manifest that cannot be read)
just skips the head start: the router handles the request as always, and the connection is
handed to its HTTP front (proxy.adopt) like any other.

Imports at the top: built-in and small modules only (the head start's budget,
tests/unit/test_launch.py); the rest in take(), after the early step.
"""

from __future__ import annotations

import _socket
import os
import time

from hoshikage_sd import protocol
from hoshikage_sd.router.headstart import admit, index, request
from hoshikage_sd.sd import daemon, units

#: the nice of the thread that imports the router's modules beside a load the head start
#: began: ~0.2 s of CPU that the load wants on a machine with few cores (docs/performance.md,
#: "At ~2 GiB")
BESIDE_LOAD_NICE = 10

TYPE_CHECKING = False  # typing, dataclasses and logging would each cost the head start ms
if TYPE_CHECKING:
    import socket

    from hoshikage_sd.manifest import Config
    from hoshikage_sd.sd import bus


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
        self.request: request.Request | None = None
        #: the early step decided (a start, or the model serves already): take() is done
        self.decided = False
        #: what the early step has to say, for the log once there is one
        self.notes: list[str] = []
        #: when the early step began (CLOCK_MONOTONIC seconds; bench/router_start.py)
        self.began: float | None = None
        #: (estimate, available) when the early step admitted the model it started and left
        #: its launch ticket (admit.py): the router records the decision
        self.admitted: tuple[int, int] | None = None

    def accept(self) -> None:
        """Take the pending connection (if any) and peek at its request."""
        self.raw_sockets = [_socket.socket(fileno=fd) for fd in daemon.listen_fds()]
        if self.raw_sockets:
            self.raw_connection, self.request = request.accept(self.raw_sockets[0])

    def as_sockets(self) -> None:
        """take_early's raw sockets as the socket module's, for the router's HTTP front."""
        import socket

        self.sockets += [socket.socket(fileno=raw.detach()) for raw in self.raw_sockets
                         if raw.fileno() >= 0]
        if self.raw_connection is not None and self.raw_connection.fileno() >= 0:
            self.connection = socket.socket(fileno=self.raw_connection.detach())
        self.raw_sockets, self.raw_connection = [], None


def take_early() -> FirstRequest:
    """The first thing `hoshikage router` does: the sockets, the pending request, and its
    model's unit started when the last router's index says which model that is."""
    began = time.monotonic()
    first = FirstRequest()
    first.began = began
    try:
        first.accept()
        if first.request is None:
            return first
        names = request.wanted(first.request)
        if names is None:
            first.decided = True  # take() would start nothing either
            return first
        known = index.read()
        if known is None:
            first.notes.append("no current name index: resolving after the imports")
            return first
        if known.get("api_keys"):  # a request must show its key before it starts anything
            first.decided = True
            return first
        if len(first.request[3]) > known.get("max_body", len(first.request[3])):
            first.decided = True  # the router answers it 413, starting nothing
            return first
        model = None
        for name in names:
            try:
                model = index.lookup(known, name)
            except index.Ambiguous:  # the ranks' to decide: take(), with resolve()
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
                first.admitted, state = admit.admit(known, model, conn)
            except Exception as exc:  # the activator admits it then, as it always did
                first.notes.append(f"no admission in the head start: {exc!r}")
            admitted = time.monotonic()
            started = start(model["unit"], state, conn)
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
            admit.withdraw(known["runtime"], model["name"])
            first.admitted = None
    except Exception as exc:  # a head start must never keep the router from serving
        first.notes.append(f"no early head start: {exc!r}")
    return first


def import_beside_load(first: FirstRequest, modules: tuple[str, ...]) -> None:
    """Import `modules` in a thread of their own at BESIDE_LOAD_NICE, and wait for it, when
    the head start began a load: the router's start then gives the CPU to the load, while
    its main thread keeps its priority (Linux's nice is per thread), and so does everything
    it runs afterwards. An import that fails there fails again where the router imports it,
    and says so there."""
    if not first.started:
        return
    import contextlib
    import importlib
    import threading

    def run() -> None:
        # a unit without setpriority in its filter: the imports as they always were
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, BESIDE_LOAD_NICE)
        for module in modules:
            with contextlib.suppress(Exception):  # the router's own import reports it
                importlib.import_module(module)

    thread = threading.Thread(target=run, name="imports")
    thread.start()
    thread.join()
    first.notes.append(f"the router's imports ran at nice {BESIDE_LOAD_NICE} beside the "
                       f"load of {first.started}")


def start(unit: str, state: str | None, conn: bus.Connection) -> bool:
    """units.start_unit for a unit that is down (or failed, or starting): whether it was
    started. A unit that is up, or any error, is take()'s to handle with units.start_unit
    (it waits for a dying unit to go down). `state`: the unit's ActiveState, when the
    caller has just asked (admit's list)."""
    from hoshikage_sd.sd import bus

    try:
        if state is None:
            state = bus.units([unit], conn)[0].active
        if state in ("active", "reloading", "deactivating"):
            return False
        units.start_unit(unit, state, conn)
    except Exception:  # the bus's errors, systemctl's, or die()'s: take()'s to retry
        return False
    return True


def take(config: Config | None, first: FirstRequest | None = None) -> FirstRequest:
    """The sockets systemd passed, and a head start for the model the pending request names
    (none without a usable manifest). `first`: what take_early() did already."""
    import logging

    from hoshikage_sd.errors import HoshikageError
    from hoshikage_sd.resolve import resolve

    logger = logging.getLogger("hoshikage.router")
    if first is None:
        first = FirstRequest()
        first.accept()
    first.as_sockets()
    for note in first.notes:
        fields = {"HOSHIKAGE_HEAD_START_USEC": int(first.began * 1e6)} if first.began else {}
        logger.info("%s", note, extra=fields)
    if first.admitted and config is not None and config.memory_budget is not None:
        # what the policy counted as free for it: MemAvailable within memory_budget
        first.admitted = (first.admitted[0], min(first.admitted[1], config.memory_budget))
    if first.decided or first.request is None or config is None or config.api_keys:
        return first
    try:
        names = request.wanted(first.request)
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
