"""Loading and unloading over HTTP, in the shape of llama.cpp's router (its server's
`POST /models/load` and `POST /models/unload`, each with `{"model": NAME}`, answered
`{"success": true}`), plus hoshikage's own facts: the model's manifest name and its
`status` (loading, loaded, unloaded, not loaded).

A load starts the model as a request would (Router.ensure: the fast path, one start for
many callers) and answers at once, as llama.cpp's does: GET /v1/models says `loaded` once it
serves, and a start that fails is in the journal (start-failed). An unload stops the unit
and answers once it is no longer active (as Ollama's keep_alive 0).

Authorised like the rest: with `api_keys:` the request's key (router/auth.py) must allow the
model (403 otherwise), and a model's own llama-server key is asked before a load
(router/model_keys.py); without keys, only loopback clients may load or unload, as with the
web panel's actions. The body must be JSON sent as such (`Content-Type: application/json`):
a page on another site then cannot send it without a CORS preflight, which the router does
not grant unless `cors_origins:` names that site. Bad input is a 4xx that starts nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hoshikage_sd import lightjson
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Model
from hoshikage_sd.panel.guard import loopback  # the panel's actions' rule, the same
from hoshikage_sd.router import errors as api
from hoshikage_sd.router.proxy import Request, Response

if TYPE_CHECKING:
    from hoshikage_sd.router.face import RouterFace

logger = logging.getLogger("hoshikage.router")

LOAD = "/models/load"  # and /models/unload (routes.CONTROL)
#: load tasks started here, kept referenced until done
_loading: set[asyncio.Task[None]] = set()


@dataclass(frozen=True)
class Asked:
    """A valid body: the model it names, as the client wrote it."""

    model: str


def parse(request: Request) -> Asked | api.ApiError:
    """The body, checked: JSON sent as JSON, an object with a "model" string and nothing
    else."""
    media = (request.header("content-type") or "").partition(";")[0].strip().lower()
    if media != "application/json":
        return api.ApiError(415, f"{request.path} takes a JSON body sent as "
                            "'Content-Type: application/json': {\"model\": \"NAME\"}",
                            code="unsupported_media_type", retry=False)
    try:
        data = lightjson.loads(request.body or b"null")
    except (ValueError, UnicodeDecodeError):
        return api.bad_json("the body is not JSON")
    if not isinstance(data, dict):
        return api.ApiError(400, 'the body must be a JSON object: {"model": "NAME"}',
                            code="invalid_request", retry=False)
    unknown = sorted(set(data) - {"model"})
    if unknown:
        return api.ApiError(400, f"unknown field(s): {', '.join(unknown)} (only \"model\")",
                            code="invalid_request", param=unknown[0], retry=False)
    name = data.get("model")
    if not isinstance(name, str) or not name.strip():
        return api.ApiError(400, "'model' must name a model", code="invalid_request",
                            param="model", retry=False)
    return Asked(name)


async def handle(router: RouterFace, request: Request) -> Response:
    """POST /models/load or /models/unload (routes.Route.CONTROL)."""
    if router.gate.spec is None and not loopback(request.peer):
        return router.fail(request, api.ApiError(
            403, "without api_keys, models are loaded and unloaded over HTTP from this "
            "machine only (a loopback address)", code="not_loopback", retry=False))
    asked = parse(request)
    if isinstance(asked, api.ApiError):
        return router.fail(request, asked)
    found = router.model_for(request, asked.model)  # a key's allow-list: 403
    if isinstance(found, api.ApiError):
        return router.fail(request, found)
    if request.path == LOAD:
        response = await load(router, request, found)
    else:
        response = await unload(router, request, found)
    response.model = found.name
    return response


async def load(router: RouterFace, request: Request, model: Model) -> Response:
    from hoshikage_sd.commands import manual

    denied = router.may_start(request, model)
    if denied is not None:
        return denied
    if model.name in router.starting:
        return answer(router, request, model, "loading")
    if await asyncio.to_thread(router.runtime.serving, model.name) and \
            await router.serving(model):
        return answer(router, request, model, "loaded")
    wait = await asyncio.to_thread(manual.too_soon, router.config, model, time.time())
    if wait > 0:
        return router.fail(request, api.ApiError(
            409, f"too soon, wait {wait:.0f} s: {model.name} was loaded less than "
            f"{router.config.min_reload_seconds:.0f} s ago (min_reload_seconds)",
            code="too_soon"), **{"Retry-After": str(int(wait) + 1)})
    router.gone(model.name)  # the router may still take it for ready (stopped meanwhile)
    logger.info("%s: load asked over HTTP", model.name)
    task = asyncio.create_task(_load(router, model))
    _loading.add(task)
    task.add_done_callback(_loading.discard)
    return answer(router, request, model, "loading")


async def _load(router: RouterFace, model: Model) -> None:
    from hoshikage_sd.router.errors import StartFailed

    try:
        await router.ensure(model)
    except StartFailed as exc:  # its unit's record (start-failed) says why
        logger.warning("%s: the load asked over HTTP failed: %s", model.name, exc)


async def unload(router: RouterFace, request: Request, model: Model) -> Response:
    from hoshikage_sd.sd import units

    try:
        up = model.name in await asyncio.to_thread(units.active_model_units)
    except HoshikageError as err:
        return router.fail(request, api.ApiError(
            503, f"cannot ask systemd which models are up: {err.message}", code="systemd"))
    if not up:
        return answer(router, request, model, "not loaded")
    logger.info("%s: unload asked over HTTP", model.name)
    await router.unload(model, "unloaded over HTTP")
    return answer(router, request, model, "unloaded")


def answer(router: RouterFace, request: Request, model: Model, status: str) -> Response:
    return router.reply(request, 200, {"success": True, "model": model.name,
                                       "status": status})
