"""The router's own answers, besides what a model's llama-server says: replies and errors in
the request's API shape with its CORS headers, the preflight, the proxy's own errors, the
broken manifest's 503, and the model listings (`/v1/models`, what is loaded and up).
router/server.py's Router holds one Answers and replies through it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol
from urllib.parse import unquote

from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.router import auth, hosts, routes
from hoshikage_sd.router import errors as api
from hoshikage_sd.router.proxy import Request, Response
from hoshikage_sd.runtime import Runtime
from hoshikage_sd.sd import units

logger = logging.getLogger("hoshikage.router")


class Answering(Protocol):
    """What the answers read of the router: the manifest in use (or why there is none), the
    runtime records, the starts under way, and how a request's model name resolves."""

    config: Config
    broken: str | None
    runtime: Runtime
    starting: dict[str, asyncio.Task[None]]

    def model_for(self, request: Request, name: str | None) -> Model | api.ApiError: ...


class Answers:
    def __init__(self, router: Answering) -> None:
        self.router = router

    # replies
    def cors(self, request: Request) -> list[tuple[str, str]]:
        """CORS headers for a request from a browser, if the manifest allows its origin."""
        origins = self.router.config.cors_origins
        if not origins:
            return []
        origin = request.header("origin")
        if origin is None or ("*" not in origins and origin not in origins):
            return []
        return [("Access-Control-Allow-Origin", "*" if "*" in origins else origin),
                ("Vary", "Origin")]

    def host_refused(self, request: Request) -> api.ApiError | None:
        """A request that reached a loopback address by a name not this machine's: a DNS
        rebinding (router/hosts.py)."""
        host = request.header("host")
        if hosts.allowed(host, request.local, self.router.config.allowed_hosts):
            return None
        return api.ApiError(403, f"the name {host!r} is not this machine's: a request that "
                            "reached a loopback address by another name is refused (DNS "
                            "rebinding); allowed_hosts: in the manifest adds a name",
                            code="host_refused", retry=False)

    def cross_site_refused(self, request: Request) -> api.ApiError | None:
        if not self.cross_site_simple(request):
            return None
        return api.ApiError(415, "a request from a page on another site must be JSON "
                            "('Content-Type: application/json', which asks the browser for "
                            "CORS: cors_origins in the manifest)",
                            code="unsupported_media_type", retry=False)

    def cross_site_simple(self, request: Request) -> bool:
        """A POST a page on another site sends without a CORS preflight (a form's or
        text/plain body): it cannot read the answer, but would start a model and make it
        work. Browsers send Origin with it; other clients seldom do, and send JSON."""
        origin = request.header("origin")
        if origin is None or request.method != "POST":
            return False
        host = request.header("host") or ""
        origins = self.router.config.cors_origins
        if origin in (f"http://{host}", f"https://{host}") or "*" in origins \
                or origin in origins:
            return False
        media = (request.header("content-type") or "").partition(";")[0].strip().lower()
        return media != "application/json"

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
        if not request.id:  # refused before the router's handler gave it one (a 413)
            request.id = api.request_id(request.header("x-request-id"))
        return self.fail(request, err)

    def broken_error(self) -> api.ApiError:
        return api.ApiError(503, f"hoshikage cannot serve: {self.router.broken}; fix the file "
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

    # listings
    async def loaded(self) -> set[str]:
        """Models whose llama-server runs, from the runtime records: the truth after a
        router restart or an idle stop, which this router's own memory is not."""
        config, runtime = self.router.config, self.router.runtime
        return await asyncio.to_thread(
            lambda: {name for name in config.models if runtime.serving(name)})

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
        value = "loaded" if name in loaded else "loading" if name in self.router.starting \
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
                for model in auth.visible(self.router.config.models, grant).values()]
        return {"object": "list", "data": data, "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    async def show_model(self, request: Request) -> Response:
        """GET /v1/models/{id}: aliases and partial names resolve as in a request."""
        name = unquote(request.path[len(routes.MODEL_PREFIX):])
        found = self.router.model_for(request, name) if name else api.model_not_found(
            name, list(self.router.config.models))
        if isinstance(found, api.ApiError):
            return self.fail(request, found)
        return self.reply(request, 200, self.describe(found, await self.loaded()))
