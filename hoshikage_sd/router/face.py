"""What the router's hosted handlers ask of it: the web panel (panel/serve), loading and
unloading over HTTP (router/control) and preload at boot (router/preload).

A Protocol, so that those modules need not import router/server, which imports them (on a
request's path, lazily): they see the Router's face, not its module. router/server.Router
is checked against it where it hands itself over (mypy, structurally).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.router import auth
from hoshikage_sd.router import errors as api
from hoshikage_sd.router.proxy import Request, Response
from hoshikage_sd.runtime import Runtime


class RouterFace(Protocol):
    config: Config
    #: why the manifest cannot be used (None: it can)
    broken: str | None
    runtime: Runtime
    #: the starts under way, by model name
    starting: dict[str, asyncio.Task[None]]
    #: requests in flight, by model name
    in_flight: dict[str, int]
    gate: auth.Gate

    def admit(self, request: Request) -> Response | None: ...

    def reply(self, request: Request, status: int, data: object,
              **headers: str) -> Response: ...

    def fail(self, request: Request, err: api.ApiError, **extra: str) -> Response: ...

    def model_for(self, request: Request, name: str | None) -> Model | api.ApiError: ...

    def may_start(self, request: Request, model: Model) -> Response | None: ...

    def maybe_reload(self, force: bool = False) -> None: ...

    def gone(self, name: str) -> None: ...

    async def ensure(self, model: Model) -> None: ...

    async def unload(self, model: Model, reason: str) -> None: ...

    async def serving(self, model: Model) -> bool: ...
