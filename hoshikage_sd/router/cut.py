"""A reply cut short: the model's llama-server went away after the client had the head of a
streamed reply (it crashed, the OOM killer took it, an RPC worker it uses vanished, its unit
was stopped). What the router can tell of why, and the stream's last words saying so in
each API's own shape, so that a client's SDK raises an error instead of taking the cut for
the end of a short reply (proxy.Forward's `broken`; Call.broken).

Nothing here runs unless a reply broke: the warm path pays nothing for it.
"""

from __future__ import annotations

import asyncio
import json
import time

from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.router import errors as api
from hoshikage_sd.runtime import Runtime

#: seconds to wait for the model unit's word on llama-server's end (the activator writes
#: it as it reaps llama-server, about when the router sees the connection break)
RECORD_WAIT = 1.0
RECORD_POLL = 0.02


async def why(config: Config, runtime: Runtime, model: Model, error: BaseException,
              since: float) -> str:
    """The message for a reply to `model` cut by `error` (the upstream connection's), with
    the cause where the router can know it: each of the model's RPC workers that is down,
    and what the unit's activator recorded after `since` (wall clock: the request's start),
    or the stop hoshikage asked for."""
    name = model.name
    workers = [asyncio.to_thread(down, config, w) for w in model.rpc if w in config.workers]
    found = await asyncio.gather(asyncio.to_thread(record, runtime, name, since), *workers)
    causes = [c for c in found[1:] if c]
    causes.append(found[0] or "its llama-server's connection broke "
                  f"({error or type(error).__name__})")
    return f"model '{name}' stopped mid-reply: " + "; ".join(causes)


def down(config: Config, worker: str) -> str | None:
    from hoshikage_sd.rpc import workers

    return workers.down(config.workers[worker])


def record(runtime: Runtime, name: str, since: float,
           wait: float = RECORD_WAIT) -> str | None:
    """What the model unit says of its end: the stop hoshikage asked for (the idle watch,
    an eviction, an unload), or the activator's record of llama-server's exit written after
    `since`; waiting up to `wait` seconds for either, since the activator writes its record
    a moment after the router sees the connection break. Nobody said: a unit going down
    was stopped by hand (systemctl stop); else None (a llama-server that is alive but
    closed the connection)."""
    deadline = time.monotonic() + wait
    while True:
        stop = runtime.stop_reason(name)
        if stop is not None:
            return f"its unit was stopped ({stop})"
        reason = runtime.error(name)
        if reason is not None and _written_since(runtime, name, since):
            return f"its unit failed: {reason}"
        if time.monotonic() >= deadline:
            return stopped_by_hand(name)
        time.sleep(RECORD_POLL)


def stopped_by_hand(name: str) -> str | None:
    from hoshikage_sd.errors import HoshikageError
    from hoshikage_sd.sd import units

    unit = units.model_unit(name)
    try:
        state, _ = units.unit_state(unit)
    except HoshikageError:
        return None
    if state in ("deactivating", "inactive"):
        return f"its unit was stopped (not by hoshikage: systemctl stop {units.shell_unit(name)}?)"
    return None


def _written_since(runtime: Runtime, name: str, since: float) -> bool:
    try:
        return runtime.error_path(name).stat().st_mtime >= since - 1.0
    except OSError:
        return False


def error(message: str) -> api.ApiError:
    """The error told: a 502's (OpenAI's type "server_error", Anthropic's "api_error")."""
    return api.ApiError(502, message, code="model_unavailable")


def sse_event(which: api.Api, err: api.ApiError, rid: str) -> bytes:
    """The SSE event that ends a stream with `err`: Anthropic's `event: error` (what its
    SDK raises on), else OpenAI's `data: {"error": ...}`, which is what llama-server itself
    sends on an error mid-stream (tools/server/server-context.cpp) and what OpenAI's SDKs
    raise on."""
    data = json.dumps(api.body(which, err, rid)).encode()
    if which is api.Api.ANTHROPIC:
        return b"event: error\ndata: " + data + b"\n\n"
    return b"data: " + data + b"\n\n"
