"""One forwarded request (Call): the headers the client gets besides the upstream's reply,
errors retold in the API's shape (Whole), and its end's bookkeeping. router/ollama/routes.py
builds its OllamaCall on it."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Protocol

from hoshikage_sd import metrics
from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.router import errors as api
from hoshikage_sd.router import proxy
from hoshikage_sd.router.answers import Answers
from hoshikage_sd.router.lifecycle import Lifecycle
from hoshikage_sd.router.proxy import Forward, Outcome, Request, Response
from hoshikage_sd.runtime import Runtime

JSON = [(b"Content-Type", b"application/json; charset=utf-8")]
logger = logging.getLogger("hoshikage.router")


class Router(Protocol):
    """What a call and the Ollama routes use of the router (server.Router, which imports
    them): said here, so that neither needs to import server.py."""

    config: Config
    runtime: Runtime
    metrics: metrics.Metrics
    in_flight: dict[str, int]
    lifecycle: Lifecycle
    answers: Answers

    def reply(self, request: Request, status: int, data: object,
              **headers: str) -> Response: ...
    def fail(self, request: Request, err: api.ApiError, **extra: str) -> Response: ...
    def model_for(self, request: Request, name: str | None) -> Model | api.ApiError: ...
    async def unload(self, model: Model, reason: str) -> None: ...
    async def started(self, request: Request, model: Model) -> Response | None: ...
    def may_start(self, request: Request, model: Model) -> Response | None: ...
    async def exchange(self, request: Request, model: Model, call: Call,
                       tries: int = 0) -> Response | Forward: ...


class Call:
    """One forwarded request: what the client gets besides the upstream's reply, and what
    happens when it ends."""

    #: the client's request is sent as it is
    upstream_request: Request | None = None

    def __init__(self, router: Router, request: Request, model: Model) -> None:
        self.router = router
        self.request = request
        self.model = model
        self.load_ns = 0
        self.began_ns = time.monotonic_ns()
        self._loaded = False
        self.transform: Callable[[int, list[tuple[bytes, bytes]]],
                                 proxy.Transform | None] | None = None
        path = request.path
        if path == "/v1/messages" or path.startswith("/v1/messages/"):
            self.transform = self._errors_as(api.Api.ANTHROPIC)
        elif path.startswith("/v1/"):
            self.transform = self._errors_as(api.Api.OPENAI)

    def loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            self.load_ns = time.monotonic_ns() - self.began_ns

    def headers(self) -> list[tuple[bytes, bytes]]:
        rid = self.request.id.encode()
        out = [(b"x-request-id", rid), (b"request-id", rid)]
        cors = self.router.answers.cors(self.request)
        out += [(k.encode(), v.encode("latin-1")) for k, v in cors]
        return out

    def _errors_as(self, which: api.Api) -> Callable[[int, list[tuple[bytes, bytes]]],
                                                     proxy.Transform | None]:
        rid = self.request.id

        def transform(status: int, headers: list[tuple[bytes, bytes]]) -> proxy.Transform | None:
            if status < 400:
                return None

            def retold(raw: bytes) -> tuple[int, bytes]:
                err = api.from_upstream(status, _json_or_text(raw))
                return err.status, json.dumps(api.body(which, err, rid)).encode()
            return Whole(status, JSON, retold)
        return transform

    async def broken(self, error: BaseException) -> bytes | None:
        """The last words of a streamed reply cut short (proxy.Forward's `broken`): why,
        as far as the router can tell (router/cut.py), in the API's shape."""
        from hoshikage_sd.router import cut

        request = self.request
        since = time.time() - (time.monotonic_ns() - self.began_ns) / 1e9
        message = await cut.why(self.router.config, self.router.runtime, self.model, error,
                                since)
        logger.warning("%s %s (%s): %s", request.method, request.path, request.id, message)
        return self.last_words(message)

    def last_words(self, message: str) -> bytes | None:
        """`message` as the SSE event that ends the stream."""
        from hoshikage_sd.router import cut

        request = self.request
        which = api.api_for(request.path, {k.decode("latin-1").lower(): v.decode("latin-1")
                                           for k, v in request.headers})
        return cut.sse_event(which, cut.error(message), request.id)

    def done(self, outcome: Outcome) -> None:
        self.router.lifecycle.request_ended(self.model.name)
        if outcome.status:  # else a retry follows, or the proxy answered (and counts) it
            now, began = time.monotonic(), self.began_ns / 1e9
            self.router.metrics.request(
                self.model.name, metrics.route_label(self.request.path), outcome.status,
                now - began, None if outcome.head_at is None else outcome.head_at - began)


class Whole:
    """A proxy.Transform that rewrites a whole (small) response body at its end."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]],
                 rewrite: Callable[[bytes], tuple[int, bytes]]) -> None:
        self.status = status
        self.headers = headers
        self.whole = True
        self.rewrite = rewrite
        self.parts: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        self.parts.append(data)
        return b""

    def finish(self) -> bytes:
        self.status, body = self.rewrite(b"".join(self.parts))
        return body


def _json_or_text(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")
