"""`hoshikage router`: hoshikage.service, the socket-activated front door.

Takes the listening socket from systemd (LISTEN_FDS), finds the model a request names, starts
hoshikage-model@NAME.service (a D-Bus call to PID 1, no systemctl fork), forwards the request
to that model's unix socket as soon as the unit says llama-server serves (Announcements), and
streams the reply chunk by chunk. When the model fits, the router admits it itself and leaves
the unit's launcher a ticket (model_unit/launch.c), so llama-server is the unit's first act.
Exits once nothing is loaded and nobody asked for anything for `router_idle_exit`.

HTTP is router/proxy/ (an asyncio.Protocol front with a bounded upstream pool per model,
sized to llama-server's HTTP threads); which requests start a model is router/routes.py;
error bodies are in each API's shape (router/errors.py); Ollama's API is translated
and served by router/ollama/ (routes.py); one forwarded request is a
router/call.py Call; API keys are router/auth.py's (a model's own --api-key:
router/model_keys.py); loading and unloading over HTTP is router/control.py, the loading word
to streaming clients router/progress.py, preload at boot router/preload.py; the busy locks
and activity records are router/activity.py's. A manifest that cannot be read never stops
the router: it answers every model request with a 503 that says what is wrong until the
file is fixed.

Over the house's ~400 lines on purpose: what is left is the Router's one state (ready,
starting, in flight, pools, TTLs, the manifest and keys in use) and the methods that read and
change it together (reload, start, forward, the idle exit); split further, each part would
reach into the others' state, as router/ollama/routes.py already has to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from hoshikage_sd import log, metrics, proc, protocol
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import AmbiguousModel, Config, Model, names
from hoshikage_sd.resolve import resolve
from hoshikage_sd.router import auth, model_keys, progress, proxy, routes
from hoshikage_sd.router import errors as api
from hoshikage_sd.router.activity import ActivityRecords, BusyLocks
from hoshikage_sd.router.announcements import Announcements
from hoshikage_sd.router.call import Call
from hoshikage_sd.router.config import load_config, refresh_index
from hoshikage_sd.router.errors import StartFailed
from hoshikage_sd.router.headstart.request import model_name_of
from hoshikage_sd.router.headstart.take import FirstRequest
from hoshikage_sd.router.proxy import Early, Forward, Request, Response
from hoshikage_sd.router.routes import Route
from hoshikage_sd.runtime import Runtime
from hoshikage_sd.sd import daemon, units

logger = logging.getLogger("hoshikage.router")

START_POLL = 0.005  # while a model starts and nobody will say when it serves: probe this often
UNIT_POLL = 0.25  # ... and how often to ask systemd whether its unit failed
PROBE_TIMEOUT = 2.0
#: seconds after start-up during which a start of the model the head start started is that
#: start (its request comes at once; one whose client went away must not block a later one)
EARLY_START_VALID = 30.0
#: seconds an unload (Ollama's keep_alive 0) waits for the unit to leave "active"
UNLOAD_WAIT = 5.0
#: upstream response headers the router never passes on: CORS is the router's to grant
CORS_HEADERS = frozenset({b"access-control-allow-origin", b"access-control-allow-credentials",
                          b"access-control-allow-methods", b"access-control-allow-headers",
                          b"access-control-expose-headers", b"access-control-max-age"})
#: routes that need no API key: a load balancer's health check, a browser's preflight
KEYLESS = frozenset({Route.HEALTH, Route.OPTIONS})


class Router:
    def __init__(self, config: Config, started: str | None = None,
                 broken: str | None = None) -> None:
        self.config = config
        #: why the manifest cannot be used (it never could since this router started): every
        #: model request gets a 503 saying so, until it can
        self.broken = broken
        #: the model whose unit the head start started before this router could read requests
        self.started_early = started
        self._created = time.monotonic()
        self.runtime = Runtime(config.runtime_dir)
        self.announcements = Announcements(config.runtime_dir, self.reload_now)
        self.pools: dict[str, proxy.Upstream] = {}
        self._pools_for = config
        self.starting: dict[str, asyncio.Task[None]] = {}
        self.ready: set[str] = set()
        self.in_flight: dict[str, int] = {}
        self.last_activity = time.monotonic()
        self.done = asyncio.Event()
        self.pid = os.getpid()
        #: each model's busy lock while requests are in flight: the activity record is
        #: written once per request, at its end
        self.busy = BusyLocks(self.runtime)
        self.activity = ActivityRecords(self.runtime, self.pid)
        self.metrics = metrics.Metrics(config.runtime_dir, config.ramdisk)
        #: each loaded model's TTL override (keep_alive), as last read or written
        self._ttl: dict[str, float | None] = {}
        self.gate = auth.Gate()
        #: the HTTP front (serve()): a reload gives it the manifest's client limits
        self.front: proxy.Proxy | None = None
        self._load_keys()
        self._manifest_id = self._stat_manifest()
        self._checked = time.monotonic()

    # -- manifest reload ------------------------------------------------------------------
    def _stat_manifest(self) -> tuple[tuple[int, int, int] | None, ...]:
        """Identity of the manifest, the CLI's names file and the API keys file: a change in
        any reloads."""
        out: list[tuple[int, int, int] | None] = []
        for path in (self.config.source, names.path(self.config), self.gate.path()):
            if path is None:
                continue
            try:
                st = os.stat(path)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    def maybe_reload(self, force: bool = False) -> None:
        """Pick up an edited manifest (checked at most once a second, or now when `force`);
        keep the last good one."""
        now = time.monotonic()
        if not force and now - self._checked < 1.0:
            return
        self._checked = now
        current = self._stat_manifest()
        if current == self._manifest_id and not force:
            return
        self._manifest_id = current
        try:
            config = load_config(self.config.source)
        except HoshikageError as err:
            if self.broken is not None:
                self.broken = err.message
                logger.error("cannot serve: %s", err.message)
            else:
                logger.error("keeping the last good manifest: %s", err.message)
            self._load_keys()
            return
        if self.broken is not None:
            logger.info("manifest %s usable again", config.source)
        self.broken = None
        logger.info("manifest %s reloaded: %d model(s)", config.source, len(config.models))
        for warning in config.warnings:
            logger.warning("%s", warning)
        self.config = config
        if self.front is not None:
            # new connections and requests get them (an open connection keeps its body
            # limits); max_connections, the timeouts and body_memory apply at once
            self.front.limits = limits(config)
        self._load_keys()

    def _load_keys(self) -> None:
        """(Re-)read the API keys the manifest names; one that cannot be used closes the
        door (every request a 503 saying why), never opens it."""
        self.gate.load(self.config.api_keys)
        if self.gate.problem is not None:
            logger.error("cannot serve: %s", self.gate.problem)
        elif self.gate.spec is not None:
            logger.info("API keys: %d from %s", len(self.gate.keys), self.gate.spec)

    def reload_now(self) -> None:
        """`hoshikage reload` (its datagram on the announcements socket)."""
        logger.info("reloading the manifest on request")
        self.maybe_reload(force=True)

    # -- model lifecycle ------------------------------------------------------------------
    async def serving(self, model: Model) -> bool:
        """Does the model's llama-server answer its health route with 200 (not 503
        'loading')? Raw HTTP/1.0 on a fresh connection: without Announcements it is asked
        every START_POLL while the model loads."""
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

    def prepare(self, model: Model, start: Callable[[], None]) -> list[str] | None:
        """The fast path of a cold start: when the model fits now, or once others stop for
        max_loaded_models only (their memory is not needed: they stop while it loads), admit
        it here, leave the unit's launcher a ticket (so that llama-server starts as the
        unit's first act) and `start` the unit, then stop the others. Returns the models
        stopped for it, or None (not started): anything else (memory to free, a wait) is
        the activator's to do.

        The start goes before the stops and the records: a stop queued first kept PID 1
        and polkit busy while the start waited (a swap step's request -> unit starting
        later when the stop was queued first: bench/peers.py's breakdown, docs/performance.md)."""
        from hoshikage_sd import cache, encryption
        from hoshikage_sd.admit import act, gather, needs
        from hoshikage_sd.policy.admission import Verdict, decide
        from hoshikage_sd.staging import Store

        config, name = self.config, model.name
        store = Store(config.ramdisk)
        started = False
        try:
            # A current staged copy, else the source: its RAM-disk copy is made alongside
            # once it serves (model_unit/activate.py copy_alongside).
            source = cache.source_for(config, model)
            files = store.current(name, source) or source
            if files is source and any(map(encryption.named_or_encrypted, source.paths)):
                return None  # its unit decrypts it into the RAM disk first
            with self.runtime.locked("admission"):
                snapshot, request = gather.inputs(config, model, self.runtime, listing=False)
                decision = decide(snapshot, request)
                if decision.verdict is not Verdict.LOAD and not decision.by_count:
                    return None
                self.runtime.set_admitted(name, request.estimate)
                protocol.write_ticket(str(config.runtime_dir), name,
                                      str(config.socket_path(name)), model.health,
                                      proc.minimal_env(model.environment),
                                      config.server_argv(model, files))
                start()
                started = True
                act.record(name, decision, counts=self.metrics)
                act.evict(name, decision, self.runtime, self.metrics, wait=False)
                act.workers(config, model, request.estimate, decision, snapshot)
        except needs.DevicesUnknown:
            return None  # its first start: the unit lists the devices and judges
        except (OSError, HoshikageError) as exc:
            if started:
                logger.warning("%s started, but stopping the models it replaces failed: %s",
                               name, exc)
                return []
            logger.warning("starting %s the slow way: %s", name, exc)
            return None
        return [victim.name for victim in decision.victims]

    def record_early_admission(self, name: str, estimate: int, available: int) -> None:
        """The journal's admission record (and its count) for the model the head start
        admitted with nothing else up (headstart/admit.py): the decision the policy makes."""
        from hoshikage_sd.admit import act
        from hoshikage_sd.policy import admission

        model = self.config.models.get(name)
        if model is None:
            return
        # nothing else up: the machine is its MemAvailable within memory_budget (available)
        limits = admission.Limits(self.config.safety_margin, self.config.max_loaded_models)
        decision = admission.decide(admission.Snapshot(mem_available=available, limits=limits),
                                    admission.Request(name, estimate))
        act.record(name, decision, counts=self.metrics)

    async def _start(self, model: Model) -> None:
        early = self.early_start(model.name)
        # A router started afresh finds a model still loaded: no systemd round trip. Not one
        # whose stop is under way (evicted, idle): it answers until its unit is down.
        if self.runtime.stop_reason(model.name) is None and await self.serving(model):
            self.ready.add(model.name)
            return
        unit = units.model_unit(model.name)
        began = time.monotonic()
        self._ttl.pop(model.name, None)
        announced = self.announcements.expect(model.name)
        try:
            evicted = [] if early else await asyncio.to_thread(self.begin, model, unit)
        except HoshikageError as err:
            raise StartFailed(err.message) from None
        for name in evicted:
            self.gone(name)
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
                state, pending = await asyncio.to_thread(units.unit_state, unit)
                if state == "failed" or (state == "inactive" and not pending):
                    reason = self.runtime.error(model.name)
                    # the activator recorded why; only "no room yet" can change by itself
                    if reason is None:
                        raise StartFailed(f"{unit} failed to start")
                    raise StartFailed(reason, permanent=not reason.startswith("no room for"))
        logger.info("%s serves after %.3f s (%s)", model.name, time.monotonic() - began,
                    "announced by its unit" if announced.is_set() else "probed")
        self.ready.add(model.name)
        # its estimate is remembered now: the next router's head start may admit it
        await asyncio.to_thread(refresh_index, self.config)

    def early_start(self, name: str) -> bool:
        """Is the model's unit the head start's, on its way? For this router's first start
        of the model only, whether it serves already or not: a later one (after a stop)
        needs a start of its own."""
        if name != self.started_early:
            return False
        self.started_early = None
        return time.monotonic() - self._created < EARLY_START_VALID

    def begin(self, model: Model, unit: str) -> list[str]:
        """Admit the model if it can go the fast way, and queue its unit's start. Returns
        the models stopped to make room for it. (Not for the head start's unit: it is on
        its way already, or has failed, which _start reports; a ticket now would be left
        unused, a second start would fail twice.)"""
        # A unit still stopping (evicted a moment ago) goes down first: its release removes
        # the ticket and the admission record of a start prepared before. A copy it is
        # making to keep is given up: this request waits for it (Runtime.wanted).
        waited: list[bool] = []

        def wanted() -> None:
            self.runtime.set_wanted(model.name)
            waited.append(True)

        state = units.wait_down(unit, wanted)
        if waited:
            self.runtime.set_wanted(model.name, False)
        started: list[bool] = []

        def start() -> None:
            try:
                units.start_unit(unit, state)
            except HoshikageError as err:  # the start's failure, not the fast path's
                raise StartFailed(err.message) from None
            started.append(True)

        evicted = self.prepare(model, start)
        if not started:  # the activator's start
            start()
        return evicted or []

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

    def pool(self, model: Model) -> proxy.Upstream:
        pool = self.pools.get(model.name)
        if pool is not None and self._pools_for is self.config:
            return pool
        if self._pools_for is not self.config:  # a reload may have moved or resized them
            self._pools_for = self.config
            for name in [n for n in self.pools if n != model.name]:
                self.pools.pop(name).close()
        path, size = str(self.config.socket_path(model.name)), model.upstream_pool
        if pool is None or pool.path != path or pool.size != size:
            if pool is not None:
                pool.close()
            pool = self.pools[model.name] = proxy.Upstream(path, size)
        return pool

    def gone(self, name: str) -> None:
        """The model's llama-server went away (stopped, or being stopped)."""
        self.ready.discard(name)
        self._ttl.pop(name, None)  # its release clears the override
        pool = self.pools.pop(name, None)
        if pool is not None:
            pool.close()

    async def unload(self, model: Model, reason: str) -> None:
        """Stop the model's unit now (Ollama's keep_alive 0) and return once it is no
        longer "active" (so /api/ps no longer lists it)."""
        unit = units.model_unit(model.name)
        self.gone(model.name)
        self.runtime.set_stop_reason(model.name, reason)
        try:
            await asyncio.to_thread(units.stop_unit, unit)
        except HoshikageError as err:
            logger.warning("cannot unload %s: %s", model.name, err.message)
            return
        deadline = time.monotonic() + UNLOAD_WAIT
        while time.monotonic() < deadline:
            state, _ = await asyncio.to_thread(units.unit_state, unit)
            if state != "active":
                return
            await asyncio.sleep(0.02)

    # -- activity -------------------------------------------------------------------------
    def effective_ttl(self, model: Model) -> float:
        """The model's TTL for this load: a request's keep_alive, else the manifest's."""
        if model.name not in self._ttl:
            self._ttl[model.name] = self.runtime.ttl(model.name)
        return self._ttl[model.name] or model.ttl

    def _begin(self, model: Model) -> None:
        """A request to the model starts: from the first in flight, it is busy (no idle
        stop, no eviction) for the idle watch and admission."""
        name = model.name
        count = self.in_flight.get(name, 0) + 1
        self.in_flight[name] = count
        self.last_activity = time.monotonic()
        self.metrics.in_flight(name, +1)
        if count == 1 and not self.busy.hold(name):
            # no lock to be had (a reader holds it this very moment, or no runtime
            # directory): say so in the record, as the router always did
            self.activity.write(name, count, time.time())

    def _end(self, name: str) -> None:
        count = self.in_flight.get(name, 0) - 1
        self.in_flight[name] = max(0, count)
        self.last_activity = time.monotonic()
        self.metrics.in_flight(name, -1)
        if count > 0:
            return
        self.activity.write(name, 0, time.time())
        self.busy.release(name)  # after the record: never idle with an old last_end

    # -- HTTP -----------------------------------------------------------------------------
    async def handle(self, request: Request) -> Response | Forward | Early:
        started = time.monotonic()
        request.id = api.request_id(request.header("x-request-id"))
        route = routes.classify(request.method, request.path, request.query)
        self.maybe_reload()
        if route == Route.PANEL:
            # the web panel starts nothing by looking and keeps nothing alive: neither the
            # idle clock nor the request counters see it (it checks keys itself: its page
            # needs none, its data and actions do)
            from hoshikage_sd.panel import serve as panel

            return await panel.handle(self, request)
        if route in KEYLESS:
            # a health check says the router cannot serve (keys file unusable)
            denied = self.fail(request, auth.unusable(self.gate.problem)) \
                if route == Route.HEALTH and self.gate.problem else None
        else:
            denied = self.admit(request)
        if denied is not None:
            self.metrics.request("", metrics.route_label(request.path), denied.status, 0.0, 0.0)
            return denied
        if route == Route.METRICS:
            # a scrape starts nothing and keeps nothing alive, the router's idle clock
            # included; it is not counted either (it would count itself)
            return Response(200, await asyncio.to_thread(self.metrics.render),
                            [("Content-Type", metrics.CONTENT_TYPE),
                             *api.request_id_headers(request.id).items()])
        self.last_activity = started
        result = await self.dispatch(request, route)
        if isinstance(result, Response):
            seconds = time.monotonic() - started
            self.metrics.request(result.model, metrics.route_label(request.path),
                                 result.status, seconds, seconds)
        return result

    def admit(self, request: Request) -> Response | None:
        """The API key check, before anything can start: None lets the request on (with
        its key as `request.grant`, whose allow-list model_for applies)."""
        if self.broken is not None:
            # a manifest never read: whether it asks for keys is unknown, so nothing passes
            return self.fail(request, self.broken_error())
        grant = self.gate.check(request.header)
        if isinstance(grant, api.ApiError):
            extra = {"WWW-Authenticate": "Bearer"} if grant.status == 401 else {}
            return self.fail(request, grant, **extra)
        request.grant = grant
        return None

    async def dispatch(self, request: Request, route: str) -> Response | Forward | Early:
        rid = request.id
        if route == Route.FORWARD:
            return await self.forward(request, rid)
        if route == Route.OPTIONS:
            return self.options(request, rid)
        if route == Route.HEALTH:
            if self.broken is not None:
                return self.fail(request, self.broken_error())
            return self.reply(request, 200, {"status": "ok"})
        if route == Route.NOT_FOUND:
            return self.fail(request, api.ApiError(
                404, f"no route {request.method} {request.path}: hoshikage serves the OpenAI, "
                "Anthropic and Ollama APIs and llama-server's own routes", code="not_found"))
        if route == Route.NOT_ALLOWED:
            return self.fail(request, api.ApiError(
                405, f"{request.method} is not allowed on {request.path}",
                code="method_not_allowed"), Allow=routes.allowed_methods(request.path))
        if route in (Route.OLLAMA_VERSION, Route.OLLAMA_UNMANAGED):  # a broken manifest too
            return await self.ollama(request, route, rid)
        if self.broken is not None:
            return self.fail(request, self.broken_error())
        if route == Route.MODELS:
            return self.reply(request, 200, await self.list_models(request.grant))
        if route == Route.MODEL:
            return await self.show_model(request)
        if route == Route.CONTROL:
            from hoshikage_sd.router import control

            return await control.handle(self, request)
        return await self.ollama(request, route, rid)

    async def ollama(self, request: Request, route: str, rid: str) -> Response | Forward:
        """Ollama's API, imported on its first request: imports (with gguf) that no router
        start pays, which from zero processes is on the waking request's path."""
        from hoshikage_sd.router import ollama
        from hoshikage_sd.router.ollama import routes as ollama_routes

        if route == Route.OLLAMA_VERSION:
            return self.reply(request, 200, ollama.version_body())
        if route == Route.OLLAMA_UNMANAGED:
            err = ollama.unmanaged(request.path)
            assert err is not None
            return self.fail(request, api.ApiError(err.status, err.message, retry=False))
        if route == Route.OLLAMA_TAGS:
            return self.reply(request, 200, await asyncio.to_thread(
                ollama_routes.tags, self, request.grant))
        if route == Route.OLLAMA_PS:
            return self.reply(request, 200, await ollama_routes.ps(self, request.grant))
        if route == Route.OLLAMA_SHOW:
            return ollama_routes.show(self, request)
        return await ollama_routes.infer(self, request, rid)

    # replies
    def cors(self, request: Request) -> list[tuple[str, str]]:
        """CORS headers for a request from a browser, if the manifest allows its origin."""
        origins = self.config.cors_origins
        if not origins:
            return []
        origin = request.header("origin")
        if origin is None or ("*" not in origins and origin not in origins):
            return []
        return [("Access-Control-Allow-Origin", "*" if "*" in origins else origin),
                ("Vary", "Origin")]

    def reply(self, request: Request, status: int, data: object,
              **headers: str) -> Response:
        response = Response.json(status, data, **api.request_id_headers(request.id), **headers)
        response.headers += self.cors(request)
        return response

    def fail(self, request: Request, err: api.ApiError, **extra: str) -> Response:
        low = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        status, headers, body = api.render(request.path, err, request.id, low)
        response = Response.json(status, body, **headers, **extra)
        response.headers += self.cors(request)
        return response

    def render_error(self, request: Request | None, status: int, message: str,
                     code: str) -> Response:
        """The proxy's own errors (malformed requests, an upstream failing mid-way)."""
        err = api.ApiError(status, message, code=code)
        if request is None:
            _, headers, body = api.render("/", err, api.new_request_id())
            return Response.json(status, body, **headers)
        return self.fail(request, err)

    def broken_error(self) -> api.ApiError:
        return api.ApiError(503, f"hoshikage cannot serve: {self.broken}; fix the file "
                            "(the router picks it up within a second, or `hoshikage reload`)",
                            code="manifest_invalid", retry=False)

    def options(self, request: Request, rid: str) -> Response:
        """OPTIONS: a CORS preflight (granted only for the manifest's cors_origins), or the
        methods in general."""
        response = Response(204, headers=[("Allow", "GET, HEAD, POST, OPTIONS"),
                                          *api.request_id_headers(rid).items()])
        granted = self.cors(request)
        if granted:
            asked = request.header("access-control-request-headers")
            response.headers += [*granted,
                                 ("Access-Control-Allow-Methods", "GET, HEAD, POST, OPTIONS"),
                                 ("Access-Control-Allow-Headers", asked or "*"),
                                 ("Access-Control-Max-Age", "600")]
        return response

    # resolving
    def model_for(self, request: Request, name: str | None) -> Model | api.ApiError:
        try:
            model = resolve(self.config, name)
        except AmbiguousModel as exc:
            return api.model_ambiguous(exc.message + "; name one exactly")
        if model is not None:
            grant = request.grant
            if isinstance(grant, auth.Key) and not grant.allows(model.name, model.aliases):
                return auth.forbidden(model.name)
            return model
        known = list(self.config.models)
        return api.model_not_found(name, known) if name else api.no_model(known)

    # forwarding
    async def forward(self, request: Request, rid: str) -> Response | Forward | Early:
        if self.broken is not None:
            return self.fail(request, self.broken_error())
        try:
            name = model_name_of(request.body, request.query)
        except ValueError as exc:
            return self.fail(request, api.bad_json(str(exc)))
        found = self.model_for(request, name)
        if isinstance(found, api.ApiError):
            return self.fail(request, found)
        denied = self.may_start(request, found)
        if denied is not None:
            return denied
        call = Call(self, request, found)
        if found.name not in self.ready and progress.wanted(request) and not \
                await asyncio.to_thread(self.runtime.serving, found.name):
            return self.early(request, found, call)  # (a router started afresh: not ready)
        return await self.exchange(request, found, call)

    def early(self, request: Request, model: Model, call: Call) -> Early:
        """A streaming request that asked to hear about its model's start (progress.py):
        the front sends the stream's head now, the comment lines while the model starts,
        then what exchange() answers."""
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in call.headers()]

        async def wait(emit: Callable[[bytes], None]) -> Response | Forward:
            result = await self.exchange(request, model, call, emit=emit)
            if isinstance(result, Response):  # sent by the proxy as an SSE error event
                seconds = (time.monotonic_ns() - call.began_ns) / 1e9
                self.metrics.request(model.name, metrics.route_label(request.path),
                                     result.status, seconds, seconds)
            return result
        return Early(headers, wait)

    def may_start(self, request: Request, model: Model) -> Response | None:
        """The model's own llama-server key (router/model_keys.py), checked before its
        start: None lets the request on, else the 401 (nothing started, nothing evicted)."""
        if not model.own_key and not os.environ.get(model_keys.ENV):
            return None
        if model.name in self.ready and request.path in model_keys.PUBLIC:
            return None  # llama-server's own health check needs no key, and starts nothing
        err = model_keys.check(model, request.header)
        if err is None:
            return None
        extra = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
        response = self.fail(request, err, **extra)
        response.model = model.name
        return response

    async def started(self, request: Request, model: Model,
                      emit: Callable[[bytes], None] | None = None) -> Response | None:
        """Make sure the model serves: None once it does, else the error reply. `emit`:
        where the progress lines go meanwhile (a client that asked for them)."""
        reporter = None if emit is None or model.name in self.ready else \
            asyncio.create_task(progress.report(emit, self.config, model))
        try:
            await self.ensure(model)
        except StartFailed as exc:
            response = self.fail(request, api.start_failed(model.name, str(exc),
                                                           permanent=exc.permanent))
            response.model = model.name
            return response
        finally:
            if reporter is not None:
                reporter.cancel()
        return None

    async def exchange(self, request: Request, model: Model, call: Call,
                       retried: bool = False, emit: Callable[[bytes], None] | None = None
                       ) -> Response | Forward:
        """Make sure the model serves, then forward (a Forward whose `done` ends the call)."""
        failed = await self.started(request, model, emit)
        if failed is not None:
            return failed
        call.loaded()
        pool = self.pool(model)

        async def unreachable(exc: OSError) -> Response | Forward:
            # The unit was stopped (idle watch, eviction) or is restarting: start it once more.
            self.gone(model.name)
            if retried:
                result: Response | Forward = self.fail(
                    request, api.not_answering(model.name, str(exc)))
            else:
                result = await self.exchange(request, model, call, retried=True, emit=emit)
            if isinstance(result, Response):  # sent by the proxy, uncounted so far
                seconds = (time.monotonic_ns() - call.began_ns) / 1e9
                self.metrics.request(model.name, metrics.route_label(request.path),
                                     result.status, seconds, seconds)
            return result

        self._begin(model)
        return Forward(pool, unreachable=unreachable, done=call.done,
                       request=call.upstream_request,
                       headers=call.headers(), drop=CORS_HEADERS, transform=call.transform,
                       broken=call.broken)

    # listings
    async def loaded(self) -> set[str]:
        """Models whose llama-server runs, from the runtime records: the truth after a
        router restart or an idle stop, which this router's own memory is not."""
        return await asyncio.to_thread(
            lambda: {name for name in self.config.models if self.runtime.serving(name)})

    async def up(self) -> set[str]:
        """Loaded models whose unit is not being stopped: what Ollama's /api/ps lists."""
        loaded = await self.loaded()
        try:
            active = set(await asyncio.to_thread(units.active_model_units, ("active",)))
        except HoshikageError as err:  # no systemd to ask (a test bed): the records
            logger.debug("listing from the runtime records: %s", err.message)
            return loaded
        return loaded & active

    def describe(self, model: Model, loaded: set[str]) -> dict[str, Any]:
        """A model as OpenAI's models.retrieve returns it (and Anthropic's models API, whose
        clients read type/id/display_name/created_at), plus hoshikage's own facts, and
        llama.cpp's router's `status` (what its clients poll after /models/load)."""
        name = model.name
        value = "loaded" if name in loaded else "loading" if name in self.starting \
            else "unloaded"
        return {"id": name, "object": "model", "owned_by": "hoshikage", "created": 0,
                "type": "model", "display_name": name,
                "created_at": "1970-01-01T00:00:00Z",
                "aliases": list(model.aliases), "loaded": name in loaded,
                "status": {"value": value}}

    async def list_models(self, grant: object = None) -> dict[str, Any]:
        """GET /v1/models: the models the request's key may use (auth.visible)."""
        loaded = await self.loaded()
        data = [self.describe(model, loaded)
                for model in auth.visible(self.config.models, grant).values()]
        return {"object": "list", "data": data, "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    async def show_model(self, request: Request) -> Response:
        """GET /v1/models/{id}: aliases and partial names resolve as in a request."""
        name = unquote(request.path[len(routes.MODEL_PREFIX):])
        found = self.model_for(request, name) if name else api.model_not_found(
            name, list(self.config.models))
        if isinstance(found, api.ApiError):
            return self.fail(request, found)
        return self.reply(request, 200, self.describe(found, await self.loaded()))

    # -- idle exit ------------------------------------------------------------------------
    async def watch_manifest(self) -> None:
        """Look at the manifest's and names.json's identity once a second, besides
        hoshikage-reload.path's datagram: systemd drops a path trigger that comes while the
        reload service from the previous one still runs, so a quick second edit would wait
        for the next request (seen in test_manifest_edit_takes_effect_without_restart)."""
        while True:
            await asyncio.sleep(1.0)
            self.maybe_reload()

    async def watch_idle(self) -> None:
        while True:
            period = max(0.2, min(5.0, self.config.router_idle_exit / 4))
            await asyncio.sleep(period)
            if any(self.in_flight.values()):
                continue
            if time.monotonic() - self.last_activity < self.config.router_idle_exit:
                continue
            try:
                loaded = set(await asyncio.to_thread(units.active_model_units))
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

    def close(self) -> None:
        self.announcements.close()
        for pool in self.pools.values():
            pool.close()
        self.busy.close()


def limits(config: Config) -> proxy.Limits:
    return proxy.Limits(max_connections=config.max_connections,
                        header_timeout=config.client_header_timeout,
                        idle_timeout=config.client_idle_timeout, max_body=config.max_body,
                        large_body=config.large_body, body_memory=config.body_memory)


def listening_sockets(first: FirstRequest, listen: str | None) -> list[socket.socket]:
    if first.sockets:
        return first.sockets
    host, _, port = (listen or "127.0.0.1:8080").rpartition(":")
    sock = socket.create_server((host.strip("[]") or "127.0.0.1", int(port)), reuse_port=False)
    return [sock]


async def serve(config: Config, listen: str | None = None,
                first: FirstRequest | None = None, broken: str | None = None) -> int:
    first = first or FirstRequest()
    router = Router(config, first.started, broken)
    if broken is not None:
        logger.error("cannot serve until the manifest is fixed: %s", broken)
    router.announcements.open()
    front = router.front = proxy.Proxy(router.handle, limits(config),
                                       error=router.render_error)
    servers = [await front.listen(sock) for sock in listening_sockets(first, listen)]
    if first.connection is not None:
        # The connection the head start took: its request is still unread.
        await front.adopt(first.connection)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, router.done.set)
    daemon.notify(READY=1, STATUS="routing" if broken is None else "manifest broken")
    after = asyncio.create_task(asyncio.to_thread(after_ready, router, first))
    idle = asyncio.create_task(router.watch_idle())
    manifest = asyncio.create_task(router.watch_manifest())
    from hoshikage_sd.router import preload  # after READY=1: never on a request's path

    preloading = asyncio.create_task(preload.at_boot(router))
    await router.done.wait()
    await after
    idle.cancel()
    manifest.cancel()
    preloading.cancel()
    daemon.notify(STOPPING=1)
    began = time.monotonic()
    for server in servers:  # systemd's socket holds what comes now, for the next router
        server.close()
    busy = sum(c.task is not None for c in front.connections)
    cut = await front.drain(router.config.stop_grace)
    if busy:
        logger.info("stopped in %.2f s: %d request(s) in flight let finish, %d cut at the "
                    "%g s grace", time.monotonic() - began, busy - cut, cut,
                    router.config.stop_grace)
    router.close()
    router.metrics.flush()
    return 0


def after_ready(router: Router, first: FirstRequest) -> None:
    """What the router writes once READY=1 is out, in a worker thread: the journal's module
    and the policy's imports must not hold up the waking request's answer. The
    records held back until now (log.hold), and the admission the head start made."""
    log.release()
    if first.started and first.admitted:
        try:
            router.record_early_admission(first.started, *first.admitted)
        except Exception as exc:  # a record must never take the router down at its stop
            logger.warning("cannot record the head start's admission: %r", exc)


def main(config: Config, listen: str | None = None, first: FirstRequest | None = None,
         broken: str | None = None) -> int:
    return proxy.run(serve(config, listen, first, broken))
