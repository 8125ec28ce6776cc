"""An opt-in word to streaming clients while their model starts: SSE comment lines.

A client that sends `X-Hoshikage-Progress: 1` with a streaming request (`"stream": true`,
an SSE reply) for a model that does not serve yet gets the stream's head at once, and
while the model stages and loads, one comment line a second:

    : loading tiny 45%        (its RAM-disk copy being made: bytes written of its files)
    : loading tiny            (llama-server loading it, or a start with no copy to make)

SSE clients ignore comment lines (the WHATWG event-stream format: a line that begins with
':'), so a client that asks sees them in the raw stream and any SSE parser skips them; a
client that does not ask gets nothing new, ever. Then the model's own stream follows, or,
when the start fails, an SSE `error` event with the error in the API's shape (the status is
200 by then: the head went out before the model could fail).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from json import loads
from typing import Final

from hoshikage_sd.manifest import Config, Files, Model
from hoshikage_sd.router.proxy import Request

HEADER: Final = "x-hoshikage-progress"
YES: Final = frozenset({"1", "true", "yes", "on"})
#: seconds between two lines
INTERVAL: Final = 1.0
#: bodies above this are not parsed again to see whether they stream (no word for them)
MAX_PARSED: Final = 1 << 20


def wanted(request: Request) -> bool:
    """Did the client ask, for a request whose reply is an SSE stream?"""
    value = request.header(HEADER)
    if value is None or value.strip().lower() not in YES:
        return False
    if request.method != "POST" or request.version == "1.0" or not request.body:
        return False  # no chunked reply for HTTP/1.0, no stream without a body
    if len(request.body) > MAX_PARSED or b'"stream"' not in request.body:
        return False
    try:
        data = loads(request.body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("stream") is True


def percent(config: Config, model: Model) -> int | None:
    """How much of the model's RAM-disk copy is written (None: no copy being made)."""
    temporaries = list(config.ramdisk.glob(f".{model.name}.gguf.tmp-*"))
    if not temporaries:
        return None
    from hoshikage_sd.staging import Store

    done = sum(Store.size_of(path) for path in temporaries)
    total = 0
    for path in Files.of(model).paths:
        try:
            total += path.stat().st_size
        except OSError:
            return None
    return min(99, done * 100 // total) if total else None


def line(name: str, share: int | None) -> bytes:
    """One comment line (and the blank line that ends an event: an event with no field,
    which SSE parsers drop)."""
    said = f": loading {name}" + ("" if share is None else f" {share}%")
    return said.encode("utf-8", "replace") + b"\n\n"


async def report(emit: Callable[[bytes], None], config: Config, model: Model) -> None:
    """A line now and every INTERVAL until cancelled (the model serves, or failed)."""
    while True:
        share = await asyncio.to_thread(percent, config, model)
        emit(line(model.name, share))
        await asyncio.sleep(INTERVAL)
