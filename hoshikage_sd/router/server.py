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
to streaming clients router/progress.py, preload at boot router/preload.py. The Router
holds its parts: the models' lifecycle (starts, stops, pools, requests in flight:
router/lifecycle.py) and its own answers (replies in the API's shape, CORS, listings:
router/answers.py). A manifest that cannot be read never stops the router: it answers every
model request with a 503 that says what is wrong until the file is fixed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

from hoshikage_sd import log, metrics
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import AmbiguousModel, Config, Model, names
from hoshikage_sd.resolve import resolve
from hoshikage_sd.router import auth, model_keys, progress, proxy, routes
from hoshikage_sd.router import errors as api
from hoshikage_sd.router.announcements import Announcements
from hoshikage_sd.router.answers import Answers
from hoshikage_sd.router.call import Call
from hoshikage_sd.router.config import Changes, load_config
from hoshikage_sd.router.errors import StartFailed
from hoshikage_sd.router.headstart.request import NotAName, model_name_of
from hoshikage_sd.router.headstart.take import FirstRequest
from hoshikage_sd.router.lifecycle import Lifecycle
from hoshikage_sd.router.proxy import Early, Forward, Request, Response
from hoshikage_sd.router.routes import Route
from hoshikage_sd.runtime import Runtime
from hoshikage_sd.sd import daemon

logger = logging.getLogger("hoshikage.router")

#: upstream response headers the router never passes on: CORS is the router's to grant
CORS_HEADERS = frozenset({b"access-control-allow-origin", b"access-control-allow-credentials",
                          b"access-control-allow-methods", b"access-control-allow-headers",
                          b"access-control-expose-headers", b"access-control-max-age"})
#: routes that need no API key: a load balancer's health check, a browser's preflight
KEYLESS = frozenset({Route.HEALTH, Route.OPTIONS})
STOP_AFTER_GRACE = 15.0  #: seconds a stopping router gets past stop_grace (cut streams end)


class Router:
    """What each request gets: the manifest in use (reloaded when it changes), the API keys,
    and the request handled: the router's own answers (Answers) or its model started
    (Lifecycle) and the request forwarded to it."""

    def __init__(self, config: Config, started: str | None = None,
                 broken: str | None = None) -> None:
        self.config = config
        #: why the manifest cannot be used (it never could since this router started): every
        #: model request gets a 503 saying so, until it can
        self.broken = broken
        self.runtime = Runtime(config.runtime_dir)
        self.announcements = Announcements(config.runtime_dir, self.reload_now)
        self.done = asyncio.Event()
        self.metrics = metrics.Metrics(config.runtime_dir, config.ramdisk)
        self.lifecycle = Lifecycle(lambda: self.config, self.runtime, self.announcements,
                                   self.metrics, started)
        # the lifecycle's state, as the panel, control and the Ollama routes read it
        self.ready, self.starting = self.lifecycle.ready, self.lifecycle.starting
        self.in_flight = self.lifecycle.in_flight
        self.answers = Answers(self)
        self.gate = auth.Gate()
        #: the HTTP front (serve()): a reload gives it the manifest's client limits
        self.front: proxy.Proxy | None = None
        self._load_keys()
        self.changes = Changes(
            lambda: (self.config.source, names.path(self.config), self.gate.path()))

    # -- manifest reload ------------------------------------------------------------------
    def maybe_reload(self, force: bool = False) -> None:
        """Pick up an edited manifest (checked at most once a second, or now when `force`);
        keep the last good one."""
        if not self.changes.changed(force):
            return
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

    # -- what the panel, control, calls and the Ollama routes ask (face.py, call.py) -------
    async def serving(self, model: Model) -> bool:
        return await self.lifecycle.serving(model)

    async def ensure(self, model: Model) -> None:
        await self.lifecycle.ensure(model)

    def gone(self, name: str) -> None:
        self.lifecycle.gone(name)

    async def unload(self, model: Model, reason: str) -> None:
        await self.lifecycle.unload(model, reason)

    def reply(self, request: Request, status: int, data: object,
              **headers: str) -> Response:
        return self.answers.reply(request, status, data, **headers)

    def fail(self, request: Request, err: api.ApiError, **extra: str) -> Response:
        return self.answers.fail(request, err, **extra)

    # -- HTTP -----------------------------------------------------------------------------
    async def handle(self, request: Request) -> Response | Forward | Early:
        started = time.monotonic()
        request.id = api.request_id(request.header("x-request-id"))
        route = routes.classify(request.method, request.path, request.query)
        self.maybe_reload()
        refused = self.answers.host_refused(request)  # every route, the panel's too
        if refused is not None:
            return self.fail(request, refused)
        if route == Route.PANEL:
            # the web panel starts nothing by looking and keeps nothing alive: neither the
            # idle clock nor the request counters see it (it checks keys itself: its page
            # needs none, its data and actions do)
            from hoshikage_sd.panel import serve as panel

            return await panel.handle(self, request)
        if route in KEYLESS:
            # a health check says the router cannot serve (keys file unusable)
            denied = self.fail(request, auth.unusable(self.gate.problem, self.gate.spec)) \
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
        self.lifecycle.last_activity = started
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
            return self.fail(request, self.answers.broken_error())
        grant = self.gate.check(request.header)
        if isinstance(grant, api.ApiError):
            extra = {"WWW-Authenticate": "Bearer"} if grant.status == 401 else {}
            return self.fail(request, grant, **extra)
        refused = self.answers.cross_site_refused(request)
        if refused is not None:
            return self.fail(request, refused)
        request.grant = grant
        return None

    async def dispatch(self, request: Request, route: str) -> Response | Forward | Early:
        rid = request.id
        if route == Route.FORWARD:
            return await self.forward(request, rid)
        if route == Route.OPTIONS:
            return self.answers.options(request, rid)
        if route == Route.HEALTH:
            if self.broken is not None:
                return self.fail(request, self.answers.broken_error())
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
            return self.fail(request, self.answers.broken_error())
        if route == Route.MODELS:
            return self.reply(request, 200, await self.answers.list_models(request.grant))
        if route == Route.MODEL:
            return await self.answers.show_model(request)
        if route == Route.CONTROL:
            from hoshikage_sd.router import control

            return await control.handle(self, request)
        return await self.ollama(request, route, rid)

    async def ollama(self, request: Request, route: str, rid: str) -> Response | Forward:
        """Ollama's API, imported on its first request: imports (with gguf) that no router
        start pays, which from zero processes is on the waking request's path."""
        from hoshikage_sd.router.ollama import routes as ollama_routes

        return await ollama_routes.answer(self, request, route, rid)

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
            return self.fail(request, self.answers.broken_error())
        try:
            name = model_name_of(request.body, request.query)
        except NotAName as exc:
            return self.fail(request, api.ApiError(400, str(exc), code="invalid_type",
                                                   param="model"))
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
                       tries: int = 0, emit: Callable[[bytes], None] | None = None
                       ) -> Response | Forward:
        """Make sure the model serves, then forward (a Forward whose `done` ends the call)."""
        failed = await self.started(request, model, emit)
        if failed is not None:
            return failed
        call.loaded()
        pool = self.lifecycle.pool(model)

        async def unreachable(exc: OSError) -> Response | Forward:
            # The unit was stopped (idle, evicted, unloaded) or restarts: again, twice at most
            self.gone(model.name)
            if tries >= 2:
                result: Response | Forward = self.fail(
                    request, api.not_answering(model.name, str(exc)))
            else:
                result = await self.exchange(request, model, call, tries + 1, emit)
            if isinstance(result, Response):  # sent by the proxy, uncounted so far
                seconds = (time.monotonic_ns() - call.began_ns) / 1e9
                self.metrics.request(model.name, metrics.route_label(request.path),
                                     result.status, seconds, seconds)
            return result

        self.lifecycle.request_began(model)
        return Forward(pool, unreachable=unreachable, done=call.done,
                       request=call.upstream_request,
                       headers=call.headers(), drop=CORS_HEADERS, transform=call.transform,
                       broken=call.broken)

    # -- idle exit ------------------------------------------------------------------------
    async def watch_manifest(self) -> None:
        """Look at the manifest's and names.json's identity once a second, besides
        hoshikage-reload.path's datagram: systemd drops a path trigger that comes while the
        reload service from the previous one still runs, so a quick second edit would wait
        for the next request (seen in test_manifest_edit_takes_effect_without_restart)."""
        while True:
            await asyncio.sleep(1.0)
            self.maybe_reload()

    def close(self) -> None:
        self.announcements.close()
        self.lifecycle.close()


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
                                       error=router.answers.render_error)
    servers = [await front.listen(sock) for sock in listening_sockets(first, listen)]
    if first.connection is not None:
        # The connection the head start took: its request is still unread.
        await front.adopt(first.connection)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, router.done.set)
    daemon.notify(READY=1, STATUS="routing" if broken is None else "manifest broken")
    after = asyncio.create_task(asyncio.to_thread(after_ready, router, first))
    idle = asyncio.create_task(router.lifecycle.watch_idle(router.done,
                                                          router.answers.loaded))
    manifest = asyncio.create_task(router.watch_manifest())
    from hoshikage_sd.router import preload  # after READY=1: never on a request's path

    preloading = asyncio.create_task(preload.at_boot(router))
    await router.done.wait()
    await after
    idle.cancel()
    manifest.cancel()
    preloading.cancel()
    daemon.notify(STOPPING=1, EXTEND_TIMEOUT_USEC=int(  # the grace rules, not TimeoutStopSec=
        (router.config.stop_grace + STOP_AFTER_GRACE) * 1e6))
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
            router.lifecycle.record_early_admission(first.started, *first.admitted)
        except Exception as exc:  # a record must never take the router down at its stop
            logger.warning("cannot record the head start's admission: %r", exc)


def main(config: Config, listen: str | None = None, first: FirstRequest | None = None,
         broken: str | None = None) -> int:
    return proxy.run(serve(config, listen, first, broken))
