"""A lean HTTP/1.1 front that forwards to llama-server over its unix socket.

It replaced the router's aiohttp server + ClientSession, at a fraction of the CPU per
request and of the added latency (bench/proxy_layers.py; docs/performance.md, "Kept
optimisations"): nothing is done per request that need not be: one task, a hand-written
parser over whole buffers (httptools measured no faster), response bytes written from the
upstream protocol's callback straight to the client's transport, and no aiohttp import on a
cold start.

The caller plugs in one coroutine, `Handler`: given a parsed `Request` (body read whole; the
router needs its JSON to know the model) it returns either a `Response` to send itself
(/v1/models, /metrics, errors) or a `Forward` naming the `Upstream` to send the request to,
after whatever "resolve the model, start it" it has to do.

Upstreams are bounded pools: llama-server (cpp-httplib) gives each connection one thread of a
small pool until the connection closes or idles for 5 s, so more keep-alive connections than
threads leave requests parked in its accept queue for seconds. A pool holds at most `size`
connections; requests beyond that wait their turn here, first come first served.
"""


from __future__ import annotations

from hoshikage_sd.router.proxy.exchange import (
    Exchange,
)
from hoshikage_sd.router.proxy.front import ClientConnection
from hoshikage_sd.router.proxy.listener import (
    Proxy,
    bench_serve,
    loop_factory,
    run,
)
from hoshikage_sd.router.proxy.messages import (
    HOP_BY_HOP,
    MAX_BODY,
    MAX_HEAD,
    MAX_QUEUED,
    REASONS,
    BadRequest,
    Early,
    ErrorRenderer,
    Limits,
    Outcome,
    Request,
    Response,
    Transform,
    default_error,
    request_head,
    response_bytes,
)
from hoshikage_sd.router.proxy.parsing import (
    RequestParser,
    ResponseParser,
    Sink,
)
from hoshikage_sd.router.proxy.upstream import (
    Forward,
    Handler,
    Upstream,
    UpstreamConnection,
)

__all__ = [
    "HOP_BY_HOP",
    "MAX_BODY",
    "MAX_HEAD",
    "MAX_QUEUED",
    "REASONS",
    "BadRequest",
    "ClientConnection",
    "Early",
    "ErrorRenderer",
    "Exchange",
    "Forward",
    "Handler",
    "Limits",
    "Outcome",
    "Proxy",
    "Request",
    "RequestParser",
    "Response",
    "ResponseParser",
    "Sink",
    "Transform",
    "Upstream",
    "UpstreamConnection",
    "bench_serve",
    "default_error",
    "loop_factory",
    "request_head",
    "response_bytes",
    "run",
]
