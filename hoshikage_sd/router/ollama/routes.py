"""Ollama's API on the router: /api/tags, /api/ps, /api/show and the inference routes
(/api/chat, /api/generate, /api/embed, /api/embeddings) sent to llama-server translated
(the rest of this package does the translating) and answered in Ollama's shape, with
keep_alive as the TTL of a load. Functions of the Router, which router/server.py dispatches
to. The package does not import this module: the translation knows nothing of the router."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

from hoshikage_sd.manifest import Model
from hoshikage_sd.router import auth, ollama, proxy
from hoshikage_sd.router import errors as api
from hoshikage_sd.router.call import JSON, Call, Router, Whole
from hoshikage_sd.router.proxy import Forward, Outcome, Request, Response
from hoshikage_sd.router.routes import Route

NDJSON = [(b"Content-Type", ollama.NDJSON.encode())]


def model_facts(model: Model) -> ollama.ModelFacts:
    return ollama.model_facts(model.name, model.path, shards=model.shards,
                              projector=model.mmproj is not None, args=model.effective_args,
                              aliases=model.aliases)


def resolve_model(router: Router, request: Request, name: object) -> Model | api.ApiError:
    if not isinstance(name, str) or not name:
        return api.ApiError(400, "model is required", param="model")
    return router.model_for(request, ollama.resolve_name(
        name, lambda n: bool(router.config.matches(n))))


def tags(router: Router, grant: object = None) -> dict[str, Any]:
    """The models the request's key may use (auth.visible)."""
    return ollama.tags_body([model_facts(m) for m in
                             auth.visible(router.config.models, grant).values()])


async def ps(router: Router, grant: object = None) -> dict[str, Any]:
    up = await router.answers.up() & set(auth.visible(router.config.models, grant))
    now = time.time()
    rows = []
    for name in sorted(up):
        model = router.config.models[name]
        ttl = router.lifecycle.effective_ttl(model)
        if math.isinf(ttl):
            expires: int | None = None
        else:
            activity = router.runtime.activity(name)
            running = router.runtime.serving_record(name)
            since = now if activity is not None and activity.in_flight else max(
                activity.last_end if activity else 0.0,
                running.started if running else now)
            expires = int((since + ttl) * 1e9)
        size = router.runtime.admitted(name) or model_facts(model).size
        on_devices = router.runtime.devices(name)
        vram = sum(on_devices[1].values()) if on_devices else 0
        rows.append(ollama.Loaded(model_facts(model), max(size, vram), expires, vram))
    return ollama.ps_body(rows)


def show(router: Router, request: Request) -> Response:
    try:
        data = ollama.read_json(request.body)
    except ollama.OllamaError as exc:
        return router.fail(request, api.ApiError(exc.status, exc.message))
    name = data.get("model") or data.get("name") if isinstance(data, dict) else None
    found = resolve_model(router, request, name)
    if isinstance(found, api.ApiError):
        return router.fail(request, found)
    return router.reply(request, 200, ollama.show_body(model_facts(found)))


async def infer(router: Router, request: Request, rid: str) -> Response | Forward:
    started = time.monotonic_ns()
    try:
        body = ollama.decode(request.body)  # a large one keeps its long strings as bytes
        data = body.data
        found = resolve_model(router, request, data.get("model")
                              if isinstance(data, dict) else None)
        if isinstance(found, api.ApiError):
            return router.fail(request, found)
        facts = model_facts(found)
        action = ollama.translate(request.path, data, n_ctx=facts.context_length,
                                  accepts_images=facts.accepts_images
                                  if facts.info is not None else None)
    except ollama.OllamaError as exc:
        return router.fail(request, api.ApiError(exc.status, exc.message))
    keep = action.keep_alive
    if not (isinstance(action, ollama.LoadOnly) and keep.mode == "unload"):
        denied = router.may_start(request, found)  # the model's own key, before its start
        if denied is not None:
            return denied
    if isinstance(action, ollama.LoadOnly):
        if keep.mode == "unload":
            if router.lifecycle.in_flight.get(found.name, 0):  # others' requests first
                router.lifecycle.unload_once_answered(found, "keep_alive 0")
            elif found.name in await router.answers.loaded():
                await router.unload(found, "keep_alive 0")
            router.runtime.clear("ttl", found.name)
            router.lifecycle.ttl_override.pop(found.name, None)
            response = router.reply(request, 200, ollama.load_only_response(action))
        else:
            failed = await router.started(request, found)
            if failed is not None:
                response = failed
            else:
                keep_alive(router, found, keep)
                response = router.reply(request, 200, ollama.load_only_response(action))
        response.model = found.name
        return response
    call = OllamaCall(router, request, found, action, body, started)
    return await router.exchange(request, found, call)


def keep_alive(router: Router, model: Model, keep: ollama.KeepAlive) -> None:
    """A request's keep_alive for this load: a TTL or forever (for the idle watch), or
    the manifest's again (a request without one, as Ollama resets it)."""
    name = model.name
    if keep.mode == "ttl" and keep.seconds is not None:
        router.runtime.set_ttl(name, keep.seconds)
        router.lifecycle.ttl_override[name] = keep.seconds
    elif keep.mode == "forever":
        router.runtime.set_ttl(name, math.inf)
        router.lifecycle.ttl_override[name] = math.inf
    elif keep.mode == "default" and router.lifecycle.effective_ttl(model) != model.ttl:
        router.runtime.clear("ttl", name)
        router.lifecycle.ttl_override[name] = None


class OllamaCall(Call):
    """A request to Ollama's /api/chat, /api/generate, /api/embed or /api/embeddings, sent
    to llama-server translated and answered in Ollama's shape."""

    def __init__(self, router: Router, request: Request, model: Model,
                 action: ollama.Upstream, body: ollama.Body, started_ns: int) -> None:
        super().__init__(router, request, model)
        self.began_ns = started_ns
        self.action = action
        # the client's key goes along: a model with its own --api-key asks llama-server
        # for it too (router/model_keys.py)
        keys = [(k, v) for k, v in request.headers
                if k.lower() in (b"authorization", b"x-api-key")]
        self.upstream_request = Request(
            "POST", action.path, "1.1", [(b"Content-Type", b"application/json"), *keys],
            # a large body's buffer becomes this one (ollama/body.py): the client's request
            # is not read again, and a retry sends this; a bytearray, as the proxy's own
            # large bodies are (proxy/parsing.py)
            body.encode(action.body))  # type: ignore[arg-type]
        self.transform = self._translate
        #: the NDJSON translation of a streamed reply, once its head came
        self.stream: Stream | None = None

    def loaded(self) -> None:
        super().loaded()
        keep_alive(self.router, self.model, self.action.keep_alive)  # for this load

    def _translate(self, status: int, headers: list[tuple[bytes, bytes]]) -> proxy.Transform:
        action = self.action
        if status >= 400:
            def error(raw: bytes) -> tuple[int, bytes]:
                told, body = ollama.error_from_upstream(status, raw)
                return told, json.dumps(body).encode()
            return Whole(status, JSON, error)
        if action.stream:
            self.stream = Stream(ollama.StreamTranslator(action, started_ns=self.began_ns,
                                                         load_ns=self.load_ns))
            return self.stream

        def whole(raw: bytes) -> tuple[int, bytes]:
            total = time.monotonic_ns() - self.began_ns
            try:
                data = json.loads(raw)
            except ValueError:
                return 502, json.dumps({"error": "llama-server answered with something "
                                                 "that is not JSON"}).encode()
            if action.endpoint == "chat":
                out = ollama.chat_response(data, action.model, total_ns=total,
                                           load_ns=self.load_ns)
            elif action.endpoint == "generate":
                out = ollama.generate_response(data, action.model, total_ns=total,
                                               load_ns=self.load_ns)
            elif action.endpoint == "embed":
                out = ollama.embed_response(data, action.model, total_ns=total,
                                            load_ns=self.load_ns, dimensions=action.dimensions)
            else:
                out = ollama.embeddings_response(data)
            return 200, json.dumps(out, ensure_ascii=False).encode()
        return Whole(200, JSON, whole)

    def last_words(self, message: str) -> bytes | None:
        """A stream cut short ends with Ollama's `{"error": message}` line (what
        ollama-python raises as ResponseError), or as it was when it was whole already."""
        if self.stream is None:
            return None
        return b"".join(self.stream.translator.finish(message))

    def done(self, outcome: Outcome) -> None:
        super().done(outcome)
        if self.action.keep_alive.mode == "unload" and outcome.status:
            # once the other requests in flight to it are answered (none: at once)
            self.router.lifecycle.unload_once_answered(self.model, "keep_alive 0")


class Stream:
    """A proxy.Transform: llama-server's SSE as Ollama's NDJSON, line by line."""

    def __init__(self, translator: ollama.StreamTranslator) -> None:
        self.status = 200
        self.headers = NDJSON
        self.whole = False
        self.translator = translator

    def feed(self, data: bytes) -> bytes:
        return b"".join(self.translator.feed(data))

    def finish(self) -> bytes:
        return b"".join(self.translator.finish())


async def answer(router: Router, request: Request, route: str, rid: str) -> Response | Forward:
    """An Ollama route (router/routes.py's Route.OLLAMA_*) answered."""
    if route == Route.OLLAMA_VERSION:
        return router.reply(request, 200, ollama.version_body())
    if route == Route.OLLAMA_UNMANAGED:
        err = ollama.unmanaged(request.path)
        assert err is not None
        return router.fail(request, api.ApiError(err.status, err.message, retry=False))
    if route == Route.OLLAMA_TAGS:
        return router.reply(request, 200, await asyncio.to_thread(tags, router, request.grant))
    if route == Route.OLLAMA_PS:
        return router.reply(request, 200, await ps(router, request.grant))
    if route == Route.OLLAMA_SHOW:
        return show(router, request)
    return await infer(router, request, rid)
