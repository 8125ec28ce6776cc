"""The listener: one Proxy per router accepts client connections (front.py answers each)
within the limits on connections and body memory, and drains them when the router stops;
and the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from hoshikage_sd import lightjson
from hoshikage_sd.router.proxy.front import ClientConnection
from hoshikage_sd.router.proxy.messages import (
    ErrorRenderer,
    Limits,
    Request,
    Response,
    default_error,
    response_bytes,
)
from hoshikage_sd.router.proxy.upstream import Forward, Handler, Upstream

logger = logging.getLogger("hoshikage.proxy")
T = TypeVar("T")


class Proxy:
    """The front: parse, ask the handler, answer or forward. One per router."""

    def __init__(self, handler: Handler, limits: Limits | None = None,
                 error: ErrorRenderer = default_error) -> None:
        self.handler = handler
        self.limits = limits or Limits()
        self.error = error
        #: open client connections, oldest first
        self.connections: dict[ClientConnection, None] = {}
        #: bytes of large bodies held (Limits.body_memory)
        self.body_bytes = 0
        self.draining = False
        self._drained: asyncio.Event | None = None

    def protocol(self) -> ClientConnection:
        return ClientConnection(self)

    def admit(self, client: ClientConnection) -> bool:
        """A new connection: past max_connections, the longest idle one makes room for it,
        or (none idle) it gets a 503 and is closed."""
        if self.draining:
            client.finish(response_bytes(self.error(
                None, 503, "the router is stopping; try again", "shutting_down"), False))
            return False
        if len(self.connections) >= self.limits.max_connections:
            oldest = next((c for c in self.connections if c.idle), None)
            if oldest is None:
                logger.warning("refusing a connection: %d open, none idle (max_connections)",
                               len(self.connections))
                response = self.error(None, 503, f"too many connections "
                                      f"({self.limits.max_connections}); try again",
                                      "too_many_connections")
                response.headers.append(("Retry-After", "1"))
                client.finish(response_bytes(response, False))
                return False
            logger.debug("max_connections reached: closing the longest idle connection")
            del self.connections[oldest]
            oldest.close()
        self.connections[client] = None
        return True

    def lost(self, client: ClientConnection) -> None:
        self.connections.pop(client, None)
        if self._drained is not None and not any(
                c.task is not None for c in self.connections):
            self._drained.set()

    def answered(self) -> None:
        if self._drained is not None and not any(
                c.task is not None for c in self.connections):
            self._drained.set()

    def admit_large(self, request: Request, size: int) -> bool:
        """May `request` hold `size` bytes of body (it holds request.large already)?"""
        more = size - request.large
        if self.body_bytes and self.body_bytes + more > self.limits.body_memory:
            logger.warning("refusing a request body of %d bytes: %d bytes of bodies held "
                           "(body_memory %d)", size, self.body_bytes, self.limits.body_memory)
            return False
        self.body_bytes += more
        request.large = size
        return True

    def release_large(self, request: Request) -> None:
        if request.large:
            self.body_bytes -= request.large
            request.large = 0

    async def listen(self, sock: Any) -> asyncio.Server:
        """Serve a listening socket (one of systemd's)."""
        return await asyncio.get_running_loop().create_server(self.protocol, sock=sock,
                                                              backlog=1024)

    async def adopt(self, conn: Any) -> None:
        """Serve a connection accepted already (the head start's), its request unread."""
        await asyncio.get_running_loop().connect_accepted_socket(self.protocol, conn)

    async def drain(self, grace: float) -> int:
        """Stop: idle connections close now, each busy one after its answer, and what is
        still being answered after `grace` seconds is cut. Returns how many were cut."""
        self.draining = True
        self._drained = asyncio.Event()
        for client in list(self.connections):
            if client.idle:
                client.close()
        self.answered()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._drained.wait()
        busy = [c for c in self.connections if c.task is not None]
        for client in busy:
            client.cut(f"the router stopped; the request ran past its {grace:g} s grace")
        self.close()
        return len(busy)

    def close(self) -> None:
        for client in list(self.connections):
            client.close()


# -- event loop -------------------------------------------------------------------------------
def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop where installed (a fifth less CPU per forwarded request), else asyncio's."""
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def bench_serve(port: int, upstream_path: str, size: int) -> None:
    """bench/proxy_layers.py's "fast" candidate: every request forwarded to one upstream,
    after the router's own cost of reading the model from the JSON body."""
    import socket

    async def main() -> None:
        upstream = Upstream(upstream_path, size)

        async def handler(request: Request) -> Response | Forward:
            if request.body.strip():
                try:
                    lightjson.loads(request.body)
                except ValueError as exc:
                    return Response.error(400, f"request body is not valid JSON: {exc}",
                                          "invalid_request_error")
            return Forward(upstream)

        sock = socket.create_server(("127.0.0.1", port), backlog=1024)
        server = await Proxy(handler).listen(sock)
        print("ready", flush=True)
        await server.serve_forever()

    run(main())
