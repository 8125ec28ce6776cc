"""`hoshikage router`: hoshikage.service, the socket-activated front door.

Takes the listening socket from systemd (LISTEN_FDS), finds the model a request names, starts
hoshikage-model@NAME.service (a D-Bus call to PID 1, no systemctl fork), forwards the request
to that model's unix socket as soon as the unit says llama-server serves (Announcements), and
streams the reply chunk by chunk. When the model's staged copy is current and it fits, the
router admits it itself and leaves the unit's launcher a ticket (launch.py), so llama-server
is the unit's first act.
Exits once nothing is loaded and nobody asked for anything for `router_idle_exit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from typing import Any

from aiohttp import ClientSession, ClientTimeout, UnixConnector, client_exceptions, web

from hoshikage_sd import cache, log, manifest, proc, protocol
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import AmbiguousModel, Config, Model, names
from hoshikage_sd.policy import residents
from hoshikage_sd.policy.admission import Verdict
from hoshikage_sd.resolve import resolve
from hoshikage_sd.router.announcements import Announcements
from hoshikage_sd.router.first_request import FirstRequest, forwarded, model_name_of
from hoshikage_sd.runtime import Activity, Runtime
from hoshikage_sd.sd import daemon
from hoshikage_sd.sd import units as systemd
from hoshikage_sd.staging import Identity, Store

logger = logging.getLogger("hoshikage.router")

HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
    "Transfer-Encoding", "Upgrade", "Host", "Content-Length"))
MAX_BODY = 256 << 20
MODELS_PREFIX = "/v1/models/"
START_POLL = 0.005  # while a model starts and nobody will say when it serves: probe this often
UNIT_POLL = 0.25  # ... and how often to ask systemd whether its unit failed
PROBE_TIMEOUT = 2.0
#: seconds after start-up during which a start of the model first_request started is that
#: start (its request comes at once; one whose client went away must not block a later one)
EARLY_START_VALID = 30.0


class StartFailed(Exception):
    pass


def error(status: int, message: str, kind: str, **headers: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(body, status=status, headers=headers)


class Router:
    def __init__(self, config: Config, started: str | None = None) -> None:
        self.config = config
        #: the model whose unit first_request started before this router could read requests
        self.started_early = started
        self._created = time.monotonic()
        self.runtime = Runtime(config.runtime_dir)
        self.announcements = Announcements(config.runtime_dir)
        self.sessions: dict[str, ClientSession] = {}
        self.starting: dict[str, asyncio.Task[None]] = {}
        self.ready: set[str] = set()
        self.in_flight: dict[str, int] = {}
        self.last_activity = time.monotonic()
        self.done = asyncio.Event()
        self._manifest_id = self._stat_manifest()
        self._checked = time.monotonic()

    # -- manifest reload ------------------------------------------------------------------
    def _stat_manifest(self) -> tuple[tuple[int, int, int] | None, ...] | None:
        """Identity of the manifest and the CLI's names file: a change in either reloads."""
        out: list[tuple[int, int, int] | None] = []
        for path in (self.config.source, names.path(self.config)):
            try:
                st = os.stat(path)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                if path == self.config.source:
                    return None
                out.append(None)
        return tuple(out)

    def maybe_reload(self) -> None:
        """Pick up an edited manifest (checked at most once a second); keep the last good one."""
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        current = self._stat_manifest()
        if current == self._manifest_id or current is None:
            return
        self._manifest_id = current
        try:
            config = names.effective(manifest.load(self.config.source))
        except HoshikageError as err:
            logger.error("keeping the last good manifest: %s", err.message)
            return
        logger.info("manifest %s reloaded: %d model(s)", config.source, len(config.models))
        self.config = config

    # -- model lifecycle ------------------------------------------------------------------
    async def serving(self, model: Model) -> bool:
        """Does the model's llama-server answer its health route with 200 (not 503
        'loading')? In raw HTTP/1.0, a third of aiohttp's CPU per probe (0.28 ms against
        0.85): without Announcements it is asked every START_POLL while the model loads."""
        path = self.config.socket_path(model.name)
        if not path.exists():
            return False
        writer = None
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(str(path))
                writer.write(protocol.probe_request(model.health))
                return protocol.status_of(await reader.readline()) == 200
        except (OSError, TimeoutError, ValueError):
            return False
        finally:
            if writer is not None:
                writer.close()

    def prepare(self, model: Model) -> bool:
        """The fast path of a cold start: when the staged copy is current and the model fits
        now, admit it here and leave the unit's launcher a ticket, so that llama-server starts
        as the unit's first act. Anything else (a copy to make, models to stop, a wait) is
        the activator's to do."""
        config, name = self.config, model.name
        store = Store(config.ramdisk)
        try:
            # A current staged copy, else the source: its RAM-disk copy is made alongside
            # once it serves (model_unit/activate.py copy_alongside).
            source = cache.source_for(config, model)
            path = store.staged(name) if store.reusable(name, Identity.of(source)) else source
            with self.runtime.locked("admission"):
                decision, estimate = residents.judge(config, model, self.runtime)
                if decision.verdict is not Verdict.LOAD:
                    return False
                residents.record(name, decision)
                self.runtime.set_admitted(name, estimate)
                protocol.write_ticket(str(config.runtime_dir), name,
                                      str(config.socket_path(name)), model.health,
                                      proc.minimal_env(),
                                      config.server_argv(model, path))
        except (OSError, HoshikageError) as exc:
            logger.warning("starting %s the slow way: %s", name, exc)
            return False
        return True

    async def _start(self, model: Model) -> None:
        # A router started afresh finds a model still loaded: no systemd round trip.
        if await self.serving(model):
            self.ready.add(model.name)
            return
        unit = systemd.model_unit(model.name)
        began = time.monotonic()
        announced = self.announcements.expect(model.name)
        try:
            await asyncio.to_thread(self.begin, model, unit)
        except HoshikageError as err:
            raise StartFailed(err.message) from None
        # Forward once the unit says it serves (before its READY=1 and the job's end); probe
        # only now and then, in case nobody says so (a unit started before this router).
        poll = UNIT_POLL if self.announcements.listening else START_POLL
        checked = time.monotonic()
        while not await self.serving(model):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(announced.wait(), poll)
                break
            if time.monotonic() - checked >= UNIT_POLL:
                checked = time.monotonic()
                state, pending = await asyncio.to_thread(systemd.unit_state, unit)
                if state == "failed" or (state == "inactive" and not pending):
                    raise StartFailed(self.runtime.error(model.name)
                                      or f"{unit} failed to start")
        logger.info("%s serves after %.3f s (%s)", model.name, time.monotonic() - began,
                    "announced by its unit" if announced.is_set() else "probed")
        self.ready.add(model.name)

    def begin(self, model: Model, unit: str) -> None:
        """Admit the model if it can go the fast way, and queue its unit's start."""
        if model.name == self.started_early:
            self.started_early = None
            if time.monotonic() - self._created < EARLY_START_VALID:
                # Its unit is on its way already (or has failed, which _start reports): a
                # ticket now would be left unused, a second start would fail twice.
                return
        self.prepare(model)
        systemd.start_unit(unit)

    async def ensure(self, model: Model) -> None:
        """Return once the model serves; concurrent callers share one start."""
        if model.name in self.ready:
            return
        task = self.starting.get(model.name)
        if task is None:
            task = asyncio.create_task(self._start(model))
            self.starting[model.name] = task
            task.add_done_callback(lambda _t: self.starting.pop(model.name, None))
        await asyncio.shield(task)

    def session(self, model: Model) -> ClientSession:
        session = self.sessions.get(model.name)
        if session is None:
            connector = UnixConnector(path=str(self.config.socket_path(model.name)),
                                      limit=0)
            session = ClientSession("http://localhost", connector=connector,
                                    auto_decompress=False,
                                    timeout=ClientTimeout(total=None))
            self.sessions[model.name] = session
        return session

    # -- activity -------------------------------------------------------------------------
    def _record(self, name: str, delta: int) -> None:
        count = self.in_flight.get(name, 0) + delta
        self.in_flight[name] = count
        self.last_activity = time.monotonic()
        self.runtime.set_activity(name, Activity(count, time.time(), os.getpid()))

    # -- HTTP -----------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.last_activity = time.monotonic()
        self.maybe_reload()
        if not forwarded(request.method, request.path, dict(request.query)):
            if request.path == "/v1/models":
                return await self.list_models()
            if request.path.startswith(MODELS_PREFIX):
                return await self.show_model(request.path[len(MODELS_PREFIX):])
            return web.json_response({"status": "ok"})
        body = await request.read()
        try:
            name = model_name_of(body, dict(request.query))
        except ValueError as exc:
            return error(400, f"request body is not valid JSON: {exc}", "invalid_request_error")
        try:
            model = resolve(self.config, name)
        except AmbiguousModel as exc:
            return error(409, exc.message + "; name one exactly", "model_ambiguous")
        if model is None:
            known = ", ".join(self.config.models) or "(none)"
            if name:
                return error(404, f"model '{name}' is not known; known models: {known}",
                             "model_not_found")
            return error(400, f"the request names no model and there is no default; "
                              f"known models: {known}", "invalid_request_error")
        self._record(model.name, +1)
        try:
            return await self.forward(request, model, body)
        finally:
            self._record(model.name, -1)

    async def forward(self, request: web.Request, model: Model,
                      body: bytes) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        for attempt in (1, 2):
            try:
                await self.ensure(model)
            except StartFailed as exc:
                return error(503, f"model '{model.name}' could not be started: {exc}",
                             "model_unavailable", **{"Retry-After": "10"})
            try:
                upstream = await self.session(model).request(
                    request.method, request.rel_url, headers=headers, data=body or None,
                    allow_redirects=False)
                break
            except (client_exceptions.ClientConnectorError,
                    client_exceptions.ServerDisconnectedError) as exc:
                # The unit was stopped (idle watch) or is restarting: start it again, once.
                self.ready.discard(model.name)
                if attempt == 2:
                    return error(502, f"model '{model.name}' is not answering: {exc}",
                                 "model_unavailable")
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, value)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        return response

    async def loaded(self) -> set[str]:
        """Models whose llama-server runs, from the runtime records: the truth after a
        router restart or an idle stop, which this router's own memory is not."""
        return await asyncio.to_thread(
            lambda: {name for name in self.config.models if self.runtime.serving(name)})

    @staticmethod
    def describe(model: Model, loaded: set[str]) -> dict[str, Any]:
        return {"id": model.name, "object": "model", "owned_by": "hoshikage", "created": 0,
                "aliases": list(model.aliases), "loaded": model.name in loaded}

    async def list_models(self) -> web.Response:
        loaded = await self.loaded()
        return web.json_response({"object": "list", "data": [
            self.describe(model, loaded) for model in self.config.models.values()]})

    async def show_model(self, name: str) -> web.Response:
        """GET /v1/models/{id}: aliases and partial names resolve as in a request."""
        try:
            model = resolve(self.config, name) if name else None
        except AmbiguousModel as exc:
            return error(409, exc.message + "; name one exactly", "model_ambiguous")
        if model is None:
            return error(404, f"model '{name}' is not known", "model_not_found")
        return web.json_response(self.describe(model, await self.loaded()))

    # -- idle exit ------------------------------------------------------------------------
    async def watch_idle(self) -> None:
        period = max(0.2, min(5.0, self.config.router_idle_exit / 4))
        while True:
            await asyncio.sleep(period)
            if any(self.in_flight.values()):
                continue
            if time.monotonic() - self.last_activity < self.config.router_idle_exit:
                continue
            try:
                loaded = set(await asyncio.to_thread(systemd.active_model_units))
            except HoshikageError as err:  # no systemd to ask (a test bed): the records
                logger.debug("asking the runtime records what is loaded: %s", err.message)
                loaded = await self.loaded()
            self.ready.intersection_update(loaded)
            if loaded:
                continue
            log.event("router-exit", "", "router exits: nothing loaded and idle for "
                      f"{self.config.router_idle_exit:.0f} s")
            self.done.set()
            return

    async def close(self) -> None:
        self.announcements.close()
        for session in self.sessions.values():
            await session.close()


def listening_sockets(first: FirstRequest, listen: str | None) -> list[socket.socket]:
    if first.sockets:
        return first.sockets
    host, _, port = (listen or "127.0.0.1:8080").rpartition(":")
    sock = socket.create_server((host.strip("[]") or "127.0.0.1", int(port)), reuse_port=False)
    return [sock]


async def serve(config: Config, listen: str | None = None,
                first: FirstRequest | None = None) -> int:
    first = first or FirstRequest()
    router = Router(config, first.started)
    router.announcements.open()
    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_route("*", "/{tail:.*}", router.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    for sock in listening_sockets(first, listen):
        await web.SockSite(runner, sock).start()
    loop = asyncio.get_running_loop()
    if first.connection is not None and runner.server is not None:
        # The connection first_request took: its request is still unread, for aiohttp.
        await loop.connect_accepted_socket(runner.server, first.connection)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, router.done.set)
    daemon.notify(READY=1, STATUS="routing")
    idle = asyncio.create_task(router.watch_idle())
    await router.done.wait()
    idle.cancel()
    daemon.notify(STOPPING=1)
    await runner.cleanup()
    await router.close()
    return 0


def main(config: Config, listen: str | None = None, first: FirstRequest | None = None) -> int:
    return asyncio.run(serve(config, listen, first))
