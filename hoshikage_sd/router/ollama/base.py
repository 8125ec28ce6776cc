"""What every part of the Ollama translation shares: the API's constants, its error, Go's
time format, NDJSON lines."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Final, Literal

from hoshikage_sd.errors import HoshikageError

logger = logging.getLogger("hoshikage.ollama")

#: the Ollama release whose API this follows (the one ollama-python 0.6 was made for):
#: clients gate features on `/api/version`
OLLAMA_VERSION: Final = "0.12.0"
NDJSON: Final = "application/x-ndjson"
#: what Ollama's routes answer for a model manager's job hoshikage leaves to the operator
UNMANAGED: Final = frozenset({"/api/pull", "/api/push", "/api/create", "/api/delete",
                              "/api/copy", "/api/blobs"})
#: ns: Go's time.Now().Add(math.MaxInt64), what Ollama reports as a forever keep_alive
FOREVER_NS: Final = (1 << 63) - 1

Endpoint = Literal["chat", "generate", "embed", "embeddings"]
ENDPOINTS: Final[Mapping[str, Endpoint]] = {
    "/api/chat": "chat", "/api/generate": "generate", "/api/embed": "embed",
    "/api/embeddings": "embeddings"}


class OllamaError(HoshikageError):
    """A request hoshikage answers itself with `{"error": message}` and this status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def body(self) -> dict[str, Any]:
        return {"error": self.message}


def rfc3339(ns: int | None = None) -> str:
    """A wall-clock time as Go's time.Time marshals it in UTC (RFC 3339, nanoseconds with
    trailing zeros dropped): "2023-08-04T19:22:45.499127Z"."""
    ns = time.time_ns() if ns is None else ns
    secs, frac = divmod(ns, 1_000_000_000)
    stamp = dt.datetime.fromtimestamp(secs, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{frac:09d}".rstrip("0")
    return f"{stamp}.{fraction}Z" if fraction else f"{stamp}Z"

def _bad(message: str) -> OllamaError:
    return OllamaError(400, message)


def ndjson(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
