"""The router's answers under /panel: the page's files and its data and actions.

What each request costs the machine: a state request asks systemd which model units are up
(one D-Bus call) and reads the runtime records, as `hoshikage status --json` does; it starts
nothing. The router's idle clock and request counters are left alone (router/server.py
sends panel requests here before it touches either): an open panel keeps nothing loaded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hoshikage_sd import __version__
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.panel import guard, journal
from hoshikage_sd.router import auth
from hoshikage_sd.router import errors as api
from hoshikage_sd.router.proxy import Request, Response

if TYPE_CHECKING:
    from hoshikage_sd.router.face import RouterFace

logger = logging.getLogger("hoshikage.panel")

STATIC_DIR = Path(__file__).parent / "static"
#: the page's files: path → (file, media type); nothing else is served from the directory
STATIC = {
    "/panel/": ("index.html", "text/html; charset=utf-8"),
    "/panel/panel.css": ("panel.css", "text/css; charset=utf-8"),
    "/panel/panel.js": ("panel.js", "text/javascript; charset=utf-8"),
    "/panel/icon.svg": ("icon.svg", "image/svg+xml"),
}
#: the page may load its own files and talk to its own origin, nothing else
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; "
     "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
     "frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
)
API = "/panel/api/"
#: how often the page asks for the state, start to start: a change shows within this and
#: one answer, under a second (a poll a second left a loaded machine's slow answer at 1.8 s)
POLL_MS = 750
#: load tasks started from the panel (kept referenced until done)
_loading: set[asyncio.Task[None]] = set()
#: the router's socket as systemd had it at this router's first state request (own_state)
_socket_seen: dict[str, Any] | None = None


async def handle(router: RouterFace, request: Request) -> Response:
    path = request.path
    if not path.startswith(API):
        return static(router, request)
    denied = router.admit(request)  # keys (when configured) and a usable manifest
    if denied is not None:
        return denied
    what = path[len(API):]
    if request.method == "POST":
        return await act(router, request, what)
    if request.method not in ("GET", "HEAD"):
        return refuse(router, request, guard.Refusal(
            405, f"{request.method} is not allowed on {path}", "method_not_allowed"))
    if what == "state":
        return await state(router, request)
    if what in ("journal", "logs"):
        return await records(router, request, what)
    if what in guard.ACTIONS:
        return refuse(router, request, guard.Refusal(
            405, f"{path} takes POST", "method_not_allowed"))
    return refuse(router, request, guard.Refusal(
        404, f"no panel endpoint {path} (state, journal, logs, load, unload, pin)",
        "not_found"))


def refuse(router: RouterFace, request: Request, why: guard.Refusal) -> Response:
    return router.fail(request, api.ApiError(why.status, why.message, code=why.code,
                                             retry=False))


def static(router: RouterFace, request: Request) -> Response:
    if request.path == "/panel":
        return Response(308, headers=[("Location", "/panel/")])
    entry = STATIC.get(request.path)
    if entry is None:
        return refuse(router, request, guard.Refusal(
            404, f"no panel file {request.path}", "not_found"))
    if request.method not in ("GET", "HEAD"):
        return refuse(router, request, guard.Refusal(
            405, f"{request.method} is not allowed on {request.path}", "method_not_allowed"))
    name, media = entry
    try:
        body = (STATIC_DIR / name).read_bytes()
    except OSError as exc:
        return refuse(router, request, guard.Refusal(
            500, f"the panel's {name} cannot be read: {exc.strerror}", "panel_missing"))
    return Response(200, body, [("Content-Type", media), *SECURITY_HEADERS])


def visible(config: Config, grant: object) -> dict[str, Model]:
    """The models the request's key may see (all, without keys or with an unlimited key)."""
    if not isinstance(grant, auth.Key):
        return dict(config.models)
    return {n: m for n, m in config.models.items() if grant.allows(n, m.aliases)}


def may_act(router: RouterFace, request: Request) -> bool:
    """With keys, any key may ask (the model's allow-list decides); without, loopback only."""
    return router.gate.spec is not None or guard.loopback(request.peer)


async def state(router: RouterFace, request: Request) -> Response:
    from hoshikage_sd.commands import facts
    from hoshikage_sd.sd import units

    config = router.config
    models = visible(config, request.grant)
    try:
        active = set(await asyncio.to_thread(units.active_model_units))
    except HoshikageError as err:
        return refuse(router, request, guard.Refusal(
            503, f"cannot ask systemd which models are up: {err.message}", "systemd"))
    shown = dataclasses.replace(config, models=models)
    data = await asyncio.to_thread(facts.gather, shown, active & set(models),
                                   dict(router.in_flight), await own_state())
    if len(models) != len(config.models):
        data.pop("counters", None)  # they name the other models
        data.pop("counters_since", None)
    data["panel"] = {"version": __version__, "keys": router.gate.spec is not None,
                     "may_act": may_act(router, request), "poll_ms": POLL_MS,
                     "min_reload_seconds": config.min_reload_seconds}
    return router.reply(request, 200, data)


async def own_state() -> dict[str, Any]:
    """The router's facts for the state (facts.router_state's fields): it answers, so it
    runs, with this PID; where its socket listens systemd says, asked once in this router's
    life (a systemctl: not a process on each poll)."""
    global _socket_seen
    if _socket_seen is None:
        from hoshikage_sd.commands import facts

        seen = await asyncio.to_thread(facts.router_state)
        _socket_seen = {"socket_state": seen["socket_state"], "listen": seen["listen"]}
    return {"state": "active", "running": True, "pid": os.getpid(), **_socket_seen}


def query_model(request: Request, models: dict[str, Model], required: bool
                ) -> str | guard.Refusal | None:
    raw = request.query.get("model")
    if raw is None:
        return guard.Refusal(400, "?model=NAME is required", "invalid_model") \
            if required else None
    name = guard.model_name(raw)  # percent-decoded as every query value is (http1.query_of)
    if isinstance(name, guard.Refusal):
        return name
    if name not in models:
        return guard.Refusal(404, f"no model named '{name}'", "model_not_found")
    return name


async def records(router: RouterFace, request: Request, what: str) -> Response:
    models = visible(router.config, request.grant)
    name = query_model(request, models, required=what == "logs")
    lines = guard.lines(request.query.get("lines"))
    for problem in (name, lines):
        if isinstance(problem, guard.Refusal):
            return refuse(router, request, problem)
    assert not isinstance(name, guard.Refusal) and isinstance(lines, int)
    found, problem = await asyncio.to_thread(
        journal.read, router.config.runtime_dir, "unit" if what == "logs" else "events",
        name, lines)
    if len(models) != len(router.config.models):  # a limited key: its models' records only
        found = [r for r in found if r.model in models]
    return router.reply(request, 200, {"records": [dataclasses.asdict(r) for r in found],
                                       "problem": problem})


async def act(router: RouterFace, request: Request, what: str) -> Response:
    """POST /panel/api/{load,unload,pin}: checked for cross-site use, then the model."""
    refusal = guard.cross_site(request.header)
    if refusal is None and not may_act(router, request):
        refusal = guard.Refusal(403, "without api_keys, the panel's actions are taken from "
                                "this machine only (a loopback address)", "not_loopback")
    action = refusal or guard.action(what, request.body)
    if isinstance(action, guard.Refusal):
        return refuse(router, request, action)
    model = router.config.models.get(action.model)
    if model is None:
        return refuse(router, request, guard.Refusal(
            404, f"no model named '{action.model}'", "model_not_found"))
    grant = request.grant
    if isinstance(grant, auth.Key) and not grant.allows(model.name, model.aliases):
        return router.fail(request, auth.forbidden(model.name))
    if action.kind == "load":
        denied = router.may_start(request, model)  # its own --api-key (router/model_keys)
        return denied or await load(router, request, model)
    if action.kind == "unload":
        return await unload(router, request, model)
    assert action.pinned is not None
    return await pin(router, request, model, action.pinned)


async def load(router: RouterFace, request: Request, model: Model) -> Response:
    """Start the model's unit as a request would (the router's own start: its fast path and
    its bookkeeping), without waiting for it: the page shows it staging and serving."""
    from hoshikage_sd.commands import manual

    if model.name in router.starting or await asyncio.to_thread(router.runtime.serving,
                                                                  model.name):
        return router.reply(request, 200, {"model": model.name, "loading": False})
    router.gone(model.name)  # the router may still take it for ready (stopped meanwhile)
    wait = await asyncio.to_thread(manual.too_soon, router.config, model, time.time())
    if wait > 0:
        return refuse(router, request, guard.Refusal(
            409, f"too soon, wait {wait:.0f} s: {model.name} was loaded less than "
            f"{router.config.min_reload_seconds:.0f} s ago (min_reload_seconds)", "too_soon"))
    logger.info("%s: load asked from the panel", model.name)
    task = asyncio.create_task(_load(router, model))
    _loading.add(task)
    task.add_done_callback(_loading.discard)
    return router.reply(request, 202, {"model": model.name, "loading": True})


async def _load(router: RouterFace, model: Model) -> None:
    from hoshikage_sd.router.errors import StartFailed

    try:
        await router.ensure(model)
    except StartFailed as exc:  # the unit's record says why; the page shows it
        logger.warning("%s: the panel's load failed: %s", model.name, exc)


async def unload(router: RouterFace, request: Request, model: Model) -> Response:
    from hoshikage_sd.sd import units

    try:
        up = model.name in await asyncio.to_thread(units.active_model_units)
    except HoshikageError as err:
        return refuse(router, request, guard.Refusal(
            503, f"cannot ask systemd which models are up: {err.message}", "systemd"))
    if up:
        logger.info("%s: unload asked from the panel", model.name)
        await router.unload(model, "unloaded from the panel")
    return router.reply(request, 200, {"model": model.name, "unloaded": up})


async def pin(router: RouterFace, request: Request, model: Model, pinned: bool) -> Response:
    from hoshikage_sd.manifest import names

    try:
        said = await asyncio.to_thread(names.set_pinned, router.config, model.name, pinned)
    except HoshikageError as err:
        return refuse(router, request, guard.Refusal(409, err.message, "names_file"))
    logger.info("%s (from the panel)", said)
    router.maybe_reload(force=True)
    return router.reply(request, 200, {"model": model.name, "pinned": pinned})
