"""A request's knobs: `keep_alive`, `options` (as llama-server's per-request fields),
`format` and `think`."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from hoshikage_sd.router.ollama.base import _bad


@dataclass(frozen=True)
class KeepAlive:
    """What a request's `keep_alive` asks of the model's lifetime.

    "default": no keep_alive, the manifest's TTL applies; "unload": stop the model once this
    request is answered (0, "0", "0s"); "ttl": stay loaded `seconds` after the last request
    (overrides the TTL for this load); "forever": until stopped by hand or evicted (any
    negative value)."""

    mode: Literal["default", "unload", "ttl", "forever"] = "default"
    seconds: float | None = None


_GO_UNITS: Final[Mapping[str, float]] = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
    "h": 3600.0}
_GO_PART: Final = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def _go_duration(text: str) -> float:
    """Go's time.ParseDuration ("1h30m", "-1m", "300ms", "0"), in seconds."""
    s = text.strip()
    sign = -1.0 if s.startswith("-") else 1.0
    s = s[1:] if s[:1] in "+-" else s
    if s == "0":
        return 0.0
    total, pos = 0.0, 0
    while pos < len(s):
        match = _GO_PART.match(s, pos)
        if not match:
            raise ValueError(f'time: invalid duration "{text}"')
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        pos = match.end()
    if not s:
        raise ValueError(f'time: invalid duration "{text}"')
    return sign * total


#: seconds past which a keep_alive is "forever": Go's longest time.Duration (~292 years),
#: which Ollama's own durations are
MAX_KEEP_ALIVE = (2**63 - 1) / 1e9


def parse_keep_alive(value: object) -> KeepAlive:
    """Ollama's keep_alive: a number of seconds or a Go duration string; negative means
    forever, zero unload now. Also a bare number in a string ("300"), as OLLAMA_KEEP_ALIVE
    takes it. ValueError (-> 400) for anything else."""
    if value is None:
        return KeepAlive()
    if isinstance(value, bool):
        raise ValueError(f"keep_alive: a duration, not {value!r}")
    try:
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str):
            try:
                seconds = float(value)
            except ValueError:
                seconds = _go_duration(value)
        else:
            raise ValueError(f"keep_alive: a duration, not {type(value).__name__}")
    except OverflowError:  # an integer past a float's range
        seconds = math.inf
    if math.isnan(seconds):
        raise ValueError("keep_alive: a duration, not NaN")
    if seconds < 0 or seconds > MAX_KEEP_ALIVE:
        return KeepAlive("forever")
    if seconds == 0:
        return KeepAlive("unload", 0.0)
    return KeepAlive("ttl", seconds)


#: Ollama option -> llama-server request field, for options it takes per request
_OPTIONS: Final[Mapping[str, str]] = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "typical_p": "typical_p", "seed": "seed", "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "mirostat": "mirostat",
    "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta", "num_keep": "n_keep",
}
_INT_OPTIONS: Final = frozenset({"top_k", "seed", "repeat_last_n", "mirostat", "num_keep",
                                 "num_predict", "num_ctx"})


def _number(name: str, value: object, integer: bool) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"option {name} must be a number, not {json.dumps(value)}")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise _bad(f"option {name} must be a whole number, not {value}")
        return int(value)
    if not math.isfinite(value):
        raise _bad(f"option {name} must be a finite number")
    return value


def map_options(options: object, n_ctx: int | None = None) -> dict[str, Any]:
    """Ollama `options` as llama-server request fields. `n_ctx`: the context one request
    gets from the served model (`served_context()`), to check `num_ctx` against."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise _bad("options must be an object")
    out: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        if name in _OPTIONS:
            out[_OPTIONS[name]] = _number(name, value, name in _INT_OPTIONS)
        elif name == "num_predict":
            n = int(_number(name, value, True))
            if n >= 0:  # -1 (unlimited) and -2 (fill the context): llama-server's default
                out["max_tokens"] = n
        elif name == "stop":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise _bad("option stop must be a list of strings")
            if value:
                out["stop"] = value
        elif name == "num_ctx":
            want = int(_number(name, value, True))
            if n_ctx is not None and want > n_ctx:
                raise _bad(f"num_ctx {want} is more than this model is served with ({n_ctx} "
                           "tokens per request); hoshikage does not reload a model per "
                           "request: raise -c (or lower -np) in the model's args in the "
                           "manifest, or ask for less")
        # everything else: load-time options (the manifest's args decide) or unknown ones,
        # which Ollama also ignores
    return out


def _keep_alive(data: Mapping[str, Any]) -> KeepAlive:
    try:
        return parse_keep_alive(data.get("keep_alive"))
    except ValueError as exc:
        raise _bad(str(exc)) from None


def _format(value: object) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if value == "json":
        schema: object = {"type": "object"}
    elif isinstance(value, Mapping):
        schema = dict(value)
    else:
        raise _bad(f'format must be "json" or a JSON schema, not {json.dumps(value)}')
    return {"type": "json_schema", "json_schema": {"name": "format", "schema": schema}}


def _think(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return {"enable_thinking": value}
    if isinstance(value, str) and value in ("low", "medium", "high", "max"):
        return {"enable_thinking": True, "reasoning_effort": value}
    raise _bad(f'think must be true, false, "low", "medium", "high" or "max", '
               f"not {json.dumps(value)}")
