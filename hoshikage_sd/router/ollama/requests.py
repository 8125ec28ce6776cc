"""Ollama's API (`/api/*`) translated onto llama-server's OpenAI-compatible endpoints.

Pure translation, no HTTP library: the router reads a request, asks `translate()` what to
send upstream (or whether the request only loads/unloads the model), sends it, and turns
llama-server's reply back into Ollama's shape with `chat_response()` / `generate_response()`
/ `embed_response()` or, when streaming, a `StreamTranslator` fed with llama-server's SSE
bytes that gives NDJSON lines. Listing endpoints (`/api/tags`, `/api/ps`, `/api/show`) are
built from `ModelFacts` (manifest name, file stat, GGUF header).

Field names follow Ollama's docs/api.md and api/types.go, checked against ollama-python 0.6's
pydantic types (which its client validates every reply with: `ShowResponse` requires
`model_info`; `/api/tags` and `/api/ps` entries are read by `model`, not `name`).

Choices (README says the same):
- `/api/chat`, and `/api/generate` unless `raw`, go to `/v1/chat/completions`, so the
  model's own chat template applies (as Ollama applies its template); `raw: true` goes to
  `/v1/completions` with the prompt as is; `suffix` (fill-in-the-middle) to llama-server's
  native `/infill`. Both OpenAI endpoints return `usage` and llama-server's `timings`
  (prompt_ms, predicted_ms), from which the counts and durations come; streams ask for
  `stream_options.include_usage` so the last chunk has them too.
- Options that llama-server takes per request are passed under its names (`num_predict` ->
  `max_tokens`, `num_keep` -> `n_keep`, the samplers as they are). Load-time options (num_gpu,
  num_thread, use_mmap, ...) are the manifest's `args`, so they are ignored, as Ollama ignores
  options it does not know. `num_ctx` is honoured when the model is served with at least
  that much context per request (nothing to do) and refused with a clear 400 when it asks for
  more (hoshikage does not reload a model per request; raise `-c` in its args).
- `format: "json"` becomes a JSON-schema constraint `{"type": "object"}` (llama-server b10068
  ignores `response_format: json_object` without a schema: measured), a schema dict becomes
  that schema.
- `think` becomes `chat_template_kwargs.enable_thinking` (and `reasoning_effort` for a level);
  llama-server's `reasoning_content` becomes `thinking`.
- Images go to llama-server as `image_url` data-URL parts; a model without a projector
  (`--mmproj`) gets a 400 up front when the caller knows it, else llama-server's own error.
- The deprecated `context` (token history) and per-request `template` are refused: llama-
  server keeps no token context to resume and its templates are Jinja, not Go.
- `keep_alive` becomes a `KeepAlive` for the router: unload after the request, a TTL for this
  load, or forever.
- Digests are not file hashes (hashing a 40 GB file per `/api/tags` is out of the question):
  sha256 over (path, size, mtime), stable while the file is unchanged.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from hoshikage_sd import gguf
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


# -- keep_alive ---------------------------------------------------------------------------
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


def parse_keep_alive(value: object) -> KeepAlive:
    """Ollama's keep_alive: a number of seconds or a Go duration string; negative means
    forever, zero unload now. Also a bare number in a string ("300"), as OLLAMA_KEEP_ALIVE
    takes it. ValueError (-> 400) for anything else."""
    if value is None:
        return KeepAlive()
    if isinstance(value, bool):
        raise ValueError(f"keep_alive: a duration, not {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            seconds = _go_duration(value)
    else:
        raise ValueError(f"keep_alive: a duration, not {type(value).__name__}")
    if math.isnan(seconds):
        raise ValueError("keep_alive: a duration, not NaN")
    if seconds < 0:
        return KeepAlive("forever")
    if seconds == 0:
        return KeepAlive("unload", 0.0)
    return KeepAlive("ttl", seconds)


# -- times ----------------------------------------------------------------------------------
def rfc3339(ns: int | None = None) -> str:
    """A wall-clock time as Go's time.Time marshals it in UTC (RFC 3339, nanoseconds with
    trailing zeros dropped): "2023-08-04T19:22:45.499127Z"."""
    ns = time.time_ns() if ns is None else ns
    secs, frac = divmod(ns, 1_000_000_000)
    stamp = dt.datetime.fromtimestamp(secs, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{frac:09d}".rstrip("0")
    return f"{stamp}.{fraction}Z" if fraction else f"{stamp}Z"


# -- requests -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Upstream:
    """A request to send to the model's llama-server, and how to answer from its reply."""

    endpoint: Endpoint
    model: str                       # the name the client asked for: echoed in replies
    path: str                        # llama-server's route
    body: dict[str, Any]
    stream: bool                     # the client wants NDJSON (and llama-server SSE)
    keep_alive: KeepAlive
    dimensions: int | None = None    # /api/embed: cut vectors to this length

    @property
    def generate_kind(self) -> Literal["chat", "completion", "infill"]:
        return ("infill" if self.path == "/infill"
                else "completion" if self.path == "/v1/completions" else "chat")


@dataclass(frozen=True)
class LoadOnly:
    """A request with nothing to generate (`/api/generate` without prompt, `/api/chat` with
    no messages, `/api/embed` with no input): load the model, or unload it when keep_alive
    says 0, and answer `load_only_response()`."""

    endpoint: Endpoint
    model: str
    keep_alive: KeepAlive

    @property
    def done_reason(self) -> str:
        return "unload" if self.keep_alive.mode == "unload" else "load"


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


def _bad(message: str) -> OllamaError:
    return OllamaError(400, message)


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


def _model(data: Mapping[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required")
    return model


def _stream(data: Mapping[str, Any]) -> bool:
    stream = data.get("stream")
    return True if stream is None else bool(stream)  # Ollama streams unless told not to


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


_IMAGE_MAGIC: Final = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
                       (b"GIF8", "image/gif"), (b"BM", "image/bmp"))


def _image_part(image: object) -> dict[str, Any]:
    if not isinstance(image, str):
        raise _bad("images must be base64 strings")
    try:
        head = base64.b64decode(image[:64] + "=" * (-len(image[:64]) % 4), validate=False)
    except (binascii.Error, ValueError):
        raise _bad("images must be base64 strings") from None
    mime = next((m for magic, m in _IMAGE_MAGIC if head.startswith(magic)), None)
    if mime is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        mime = "image/webp"
    return {"type": "image_url",
            "image_url": {"url": f"data:{mime or 'application/octet-stream'};base64,{image}"}}


def _content(text: object, images: object, accepts_images: bool | None) -> Any:
    if text is not None and not isinstance(text, str):
        raise _bad("message content must be a string")
    if not images:
        return text or ""
    if not isinstance(images, list):
        raise _bad("images must be a list of base64 strings")
    if accepts_images is False:
        raise _bad("this model does not take images (llama-server serves it without a "
                   "multimodal projector: add --mmproj FILE to its args in the manifest)")
    parts: list[dict[str, Any]] = [_image_part(i) for i in images]
    if text:
        parts.insert(0, {"type": "text", "text": text})
    return parts


def _tool_calls_out(calls: object) -> list[dict[str, Any]]:
    """Ollama tool calls (arguments an object) as OpenAI's (arguments a JSON string)."""
    if not isinstance(calls, list):
        raise _bad("tool_calls must be a list")
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise _bad("each tool call needs a function with a name")
        args = fn.get("arguments", {})
        out.append({"id": str(call.get("id") or f"call_{i}"), "type": "function",
                    "function": {"name": fn["name"],
                                 "arguments": args if isinstance(args, str)
                                 else json.dumps(args, ensure_ascii=False)}})
    return out


def _messages(messages: list[Any], accepts_images: bool | None) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise _bad("each message needs a role")
        msg: dict[str, Any] = {"role": m["role"],
                               "content": _content(m.get("content"), m.get("images"),
                                                   accepts_images)}
        if m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls_out(m["tool_calls"])
        if isinstance(m.get("thinking"), str) and m["thinking"]:
            msg["reasoning_content"] = m["thinking"]
        if isinstance(m.get("tool_name"), str):
            msg["name"] = m["tool_name"]
        if isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def _common(data: Mapping[str, Any], n_ctx: int | None, stream: bool) -> dict[str, Any]:
    body = map_options(data.get("options"), n_ctx)
    fmt = _format(data.get("format"))
    if fmt:
        body["response_format"] = fmt
    if data.get("logprobs"):
        body["logprobs"] = True
        if data.get("top_logprobs") is not None:
            body["top_logprobs"] = _number("top_logprobs", data["top_logprobs"], True)
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def translate(path: str, data: object, *, n_ctx: int | None = None,
              accepts_images: bool | None = None) -> Upstream | LoadOnly:
    """The upstream request for an Ollama request to `path` (/api/chat, /api/generate,
    /api/embed, /api/embeddings) with JSON body `data`. `n_ctx`: context per request of the
    served model, if known (checks num_ctx); `accepts_images`: whether it was given a
    projector, if known. OllamaError (400) for requests hoshikage cannot honour."""
    endpoint = ENDPOINTS.get(path)
    if endpoint is None:
        raise OllamaError(404, f"{path} is not an Ollama route hoshikage translates")
    if not isinstance(data, Mapping):
        raise _bad("request body must be a JSON object")
    model = _model(data)
    keep = _keep_alive(data)
    if endpoint == "chat":
        return _chat(data, model, keep, n_ctx, accepts_images)
    if endpoint == "generate":
        return _generate(data, model, keep, n_ctx, accepts_images)
    if endpoint == "embed":
        return _embed(data, model, keep)
    return _embeddings(data, model, keep)


def _chat(data: Mapping[str, Any], model: str, keep: KeepAlive, n_ctx: int | None,
          accepts_images: bool | None) -> Upstream | LoadOnly:
    messages = data.get("messages")
    if messages is None or messages == []:
        return LoadOnly("chat", model, keep)
    if not isinstance(messages, list):
        raise _bad("messages must be a list")
    stream = _stream(data)
    body = {"model": model, "messages": _messages(messages, accepts_images),
            **_common(data, n_ctx, stream)}
    if data.get("tools"):
        if not isinstance(data["tools"], list):
            raise _bad("tools must be a list")
        body["tools"] = data["tools"]
    kwargs = _think(data.get("think"))
    if kwargs:
        body["chat_template_kwargs"] = kwargs
    return Upstream("chat", model, "/v1/chat/completions", body, stream, keep)


def _generate(data: Mapping[str, Any], model: str, keep: KeepAlive, n_ctx: int | None,
              accepts_images: bool | None) -> Upstream | LoadOnly:
    prompt = data.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise _bad("prompt must be a string")
    images = data.get("images")
    if not prompt and not images:
        return LoadOnly("generate", model, keep)
    if data.get("context"):
        raise _bad("context (the token history of /api/generate) is not supported: "
                   "llama-server keeps none to resume; send the conversation to /api/chat")
    if data.get("template"):
        raise _bad("template is not supported: llama-server formats prompts with the "
                   "model's own (Jinja) chat template; use raw: true with a formatted prompt")
    stream = _stream(data)
    common = _common(data, n_ctx, stream)
    suffix = data.get("suffix")
    if suffix:
        if not isinstance(suffix, str):
            raise _bad("suffix must be a string")
        if images:
            raise _bad("images cannot be combined with suffix")
        # llama-server's native fill-in-the-middle; it takes n_predict, not max_tokens
        body = {"input_prefix": prompt or "", "input_suffix": suffix, "prompt": "",
                **{k: v for k, v in common.items() if k not in ("stream_options",)}}
        if "max_tokens" in body:
            body["n_predict"] = body.pop("max_tokens")
        if "response_format" in body:
            raise _bad("format cannot be combined with suffix")
        return Upstream("generate", model, "/infill", body, stream, keep)
    if data.get("raw"):
        if images:
            raise _bad("images cannot be combined with raw: true")
        return Upstream("generate", model, "/v1/completions",
                        {"model": model, "prompt": prompt, **common}, stream, keep)
    messages: list[dict[str, Any]] = []
    system = data.get("system")
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": _content(prompt, images, accepts_images)})
    body = {"model": model, "messages": messages, **common}
    kwargs = _think(data.get("think"))
    if kwargs:
        body["chat_template_kwargs"] = kwargs
    return Upstream("generate", model, "/v1/chat/completions", body, stream, keep)


def _embed(data: Mapping[str, Any], model: str, keep: KeepAlive) -> Upstream | LoadOnly:
    raw = data.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if inputs is None or inputs == []:
        return LoadOnly("embed", model, keep)
    if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        raise _bad("input must be a string or a list of strings")
    dims = data.get("dimensions")
    if dims is not None:
        dims = int(_number("dimensions", dims, True))
        if dims <= 0:
            raise _bad("dimensions must be positive")
    return Upstream("embed", model, "/v1/embeddings", {"model": model, "input": inputs},
                    False, keep, dimensions=dims)


def _embeddings(data: Mapping[str, Any], model: str, keep: KeepAlive) -> Upstream | LoadOnly:
    prompt = data.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise _bad("prompt must be a string")
    if not prompt:
        return LoadOnly("embeddings", model, keep)
    # the legacy route returns the raw vector; /api/embed normalises (llama-server's default)
    return Upstream("embeddings", model, "/v1/embeddings",
                    {"model": model, "input": prompt, "embd_normalize": -1}, False, keep)


def served_context(info: gguf.GGUFInfo, args: Sequence[str]) -> int | None:
    """The context one request gets from llama-server with these args: -c split over -np
    slots, or all of it with a unified KV cache (what -np auto means), and never more than
    the model was trained for (measured with b10068: "n_ctx_slot" in its log and /props).
    None if unknown."""
    from hoshikage_sd import memory  # the memory estimate's parser of the same args

    try:
        params = memory.load_params(info, args)
    except HoshikageError:
        return None
    per_slot = params.n_ctx if params.kv_unified else params.n_ctx // max(1, params.n_parallel)
    return min(per_slot, info.context_length) if info.context_length else per_slot


# -- replies ------------------------------------------------------------------------------
@dataclass
class _Metrics:
    """Counts and durations gathered from llama-server's usage and timings."""

    finish: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_ms: float | None = None
    predicted_ms: float | None = None

    def take(self, obj: Mapping[str, Any]) -> None:
        usage = obj.get("usage")
        if isinstance(usage, Mapping):
            self.prompt_tokens = _int_or(usage.get("prompt_tokens"), self.prompt_tokens)
            self.completion_tokens = _int_or(usage.get("completion_tokens"),
                                             self.completion_tokens)
        timings = obj.get("timings")
        if isinstance(timings, Mapping):
            self.prompt_ms = _float_or(timings.get("prompt_ms"), self.prompt_ms)
            self.predicted_ms = _float_or(timings.get("predicted_ms"), self.predicted_ms)
            if self.prompt_tokens is None and "prompt_n" in timings:
                # without usage: the prompt is what was cached plus what was evaluated
                self.prompt_tokens = (_int_or(timings.get("cache_n"), 0) or 0) \
                    + (_int_or(timings.get("prompt_n"), 0) or 0)
            if self.completion_tokens is None:
                self.completion_tokens = _int_or(timings.get("predicted_n"), None)
        # native /infill and /completion
        if "tokens_evaluated" in obj and self.prompt_tokens is None:
            self.prompt_tokens = _int_or(obj.get("tokens_evaluated"), None)
        if "tokens_predicted" in obj and obj.get("stop"):
            self.completion_tokens = _int_or(obj.get("tokens_predicted"),
                                             self.completion_tokens)
        if obj.get("stop") is True and isinstance(obj.get("stop_type"), str):
            self.finish = "length" if obj["stop_type"] == "limit" else "stop"

    def fields(self, total_ns: int, load_ns: int) -> dict[str, Any]:
        out: dict[str, Any] = {"done_reason": _done_reason(self.finish),
                               "total_duration": max(0, total_ns),
                               "load_duration": max(0, load_ns)}
        if self.prompt_tokens is not None:
            out["prompt_eval_count"] = self.prompt_tokens
        if self.prompt_ms is not None:
            out["prompt_eval_duration"] = round(self.prompt_ms * 1e6)
        if self.completion_tokens is not None:
            out["eval_count"] = self.completion_tokens
        if self.predicted_ms is not None:
            out["eval_duration"] = round(self.predicted_ms * 1e6)
        return out


def _int_or(value: object, default: int | None) -> int | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    return default


def _float_or(value: object, default: float | None) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return default


def _done_reason(finish: str | None) -> str:
    # Ollama says "stop" after tool calls too (docs/api.md, chat with tools)
    return "length" if finish == "length" else "stop"


def _tool_calls_in(calls: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI tool calls (arguments a JSON string) as Ollama's (an object)."""
    out = []
    for call in calls:
        fn = call.get("function") or {}
        raw = fn.get("arguments")
        args: object = raw
        if isinstance(raw, str):
            try:
                args = json.loads(raw) if raw.strip() else {}
            except ValueError:
                args = None
        if not isinstance(args, Mapping):
            # ollama-python wants an object: keep what the model wrote rather than lose it
            args = {"arguments": raw}
        entry: dict[str, Any] = {"function": {"name": str(fn.get("name") or ""),
                                              "arguments": args}}
        if isinstance(call.get("index"), int):
            entry["function"]["index"] = call["index"]
        if call.get("id"):
            entry["id"] = str(call["id"])
        out.append(entry)
    return out


def _logprobs(choice: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, Mapping) else None
    if not isinstance(content, list):
        return None
    out = []
    for item in content:
        if not isinstance(item, Mapping):
            continue
        entry: dict[str, Any] = {"token": str(item.get("token", "")),
                                 "logprob": float(item.get("logprob", 0.0))}
        tops = item.get("top_logprobs")
        if isinstance(tops, list):
            entry["top_logprobs"] = [{"token": str(t.get("token", "")),
                                      "logprob": float(t.get("logprob", 0.0))}
                                     for t in tops if isinstance(t, Mapping)]
        out.append(entry)
    return out


def _head(model: str, wall_ns: int | None) -> dict[str, Any]:
    return {"model": model, "created_at": rfc3339(wall_ns)}


def chat_response(upstream: Mapping[str, Any], model: str, *, total_ns: int,
                  load_ns: int = 0, wall_ns: int | None = None) -> dict[str, Any]:
    """llama-server's non-streaming /v1/chat/completions reply as Ollama's /api/chat reply.
    `total_ns`: the request's time in hoshikage (Ollama's total_duration); `load_ns`: the
    part spent starting the model."""
    choice = (upstream.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    message: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
    if msg.get("reasoning_content"):
        message["thinking"] = msg["reasoning_content"]
    if msg.get("tool_calls"):
        message["tool_calls"] = _tool_calls_in(msg["tool_calls"])
    metrics = _Metrics(finish=choice.get("finish_reason"))
    metrics.take(upstream)
    out = {**_head(model, wall_ns), "message": message, "done": True,
           **metrics.fields(total_ns, load_ns)}
    lp = _logprobs(choice)
    if lp is not None:
        out["logprobs"] = lp
    return out


def generate_response(upstream: Mapping[str, Any], model: str, *, total_ns: int,
                      load_ns: int = 0, wall_ns: int | None = None) -> dict[str, Any]:
    """llama-server's non-streaming reply (chat completion, text completion or native
    /infill) as Ollama's /api/generate reply."""
    metrics = _Metrics()
    thinking = None
    if "choices" in upstream:
        choice = (upstream.get("choices") or [{}])[0]
        metrics.finish = choice.get("finish_reason")
        if "message" in choice:
            msg = choice.get("message") or {}
            text = msg.get("content") or ""
            thinking = msg.get("reasoning_content") or None
        else:
            text = choice.get("text") or ""
    else:  # native
        text = str(upstream.get("content") or "")
        choice = {}
    metrics.take(upstream)
    out: dict[str, Any] = {**_head(model, wall_ns), "response": text}
    if thinking:
        out["thinking"] = thinking
    out.update({"done": True, **metrics.fields(total_ns, load_ns)})
    lp = _logprobs(choice)
    if lp is not None:
        out["logprobs"] = lp
    return out


def _normalise(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else vector


def embed_response(upstream: Mapping[str, Any], model: str, *, total_ns: int,
                   load_ns: int = 0, dimensions: int | None = None) -> dict[str, Any]:
    """llama-server's /v1/embeddings reply as Ollama's /api/embed reply (vectors in input
    order; cut to `dimensions` and normalised again, as Ollama does)."""
    data = sorted((d for d in upstream.get("data") or [] if isinstance(d, Mapping)),
                  key=lambda d: int(d.get("index", 0)))
    vectors = [list(d.get("embedding") or []) for d in data]
    if dimensions:
        vectors = [_normalise(v[:dimensions]) for v in vectors]
    out: dict[str, Any] = {"model": model, "embeddings": vectors,
                           "total_duration": max(0, total_ns), "load_duration": max(0, load_ns)}
    usage = upstream.get("usage")
    if isinstance(usage, Mapping) and isinstance(usage.get("prompt_tokens"), int):
        out["prompt_eval_count"] = usage["prompt_tokens"]
    return out


def embeddings_response(upstream: Mapping[str, Any]) -> dict[str, Any]:
    """llama-server's /v1/embeddings reply as Ollama's legacy /api/embeddings reply."""
    data = upstream.get("data") or [{}]
    return {"embedding": list(data[0].get("embedding") or [])}


def load_only_response(action: LoadOnly, *, wall_ns: int | None = None) -> dict[str, Any]:
    """The reply to a load/unload-only request, once the model is loaded (or stopped)."""
    if action.endpoint == "chat":
        return {**_head(action.model, wall_ns),
                "message": {"role": "assistant", "content": ""},
                "done_reason": action.done_reason, "done": True}
    if action.endpoint == "generate":
        return {**_head(action.model, wall_ns), "response": "", "done": True,
                "done_reason": action.done_reason}
    if action.endpoint == "embed":
        return {"model": action.model, "embeddings": []}
    return {"embedding": []}


def error_from_upstream(status: int, raw: bytes) -> tuple[int, dict[str, Any]]:
    """llama-server's error reply as Ollama's `{"error": message}`, with its status, except
    that llama-server's 500 for images to a model without a projector is the client's
    mistake (400)."""
    message = f"llama-server answered HTTP {status}"
    try:
        data = json.loads(raw)
    except ValueError:
        text = raw.decode(errors="replace").strip()
        message = text or message
    else:
        err = data.get("error") if isinstance(data, Mapping) else None
        if isinstance(err, Mapping) and err.get("message"):
            message = str(err["message"])
        elif isinstance(err, str) and err:
            message = err
    if status >= 500 and "image input is not supported" in message:
        status = 400
    return status, {"error": message}


def ndjson(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class StreamTranslator:
    """llama-server's SSE stream (chat completion chunks, text completion chunks or native
    /infill events) as Ollama's NDJSON stream: one line per piece of text, a line with the
    tool calls once they are complete, and a final `done: true` line with counts and
    durations. An error event or a stream cut short ends with an `{"error": ...}` line,
    which ollama-python raises as ResponseError.

        t = StreamTranslator(upstream, started_ns=t0, load_ns=load)
        for chunk in body: lines = t.feed(chunk)  # write each line as it comes
        lines = t.finish()                         # at upstream EOF
    """

    def __init__(self, request: Upstream, *, started_ns: int, load_ns: int = 0,
                 clock: Callable[[], int] = time.monotonic_ns,
                 wall: Callable[[], int] = time.time_ns) -> None:
        self.endpoint = request.endpoint
        self.model = request.model
        self.started_ns = started_ns
        self.load_ns = load_ns
        self.clock = clock
        self.wall = wall
        self.done = False
        self._buf = b""
        self._data: list[str] = []
        self._error: list[str] = []
        self._metrics = _Metrics()
        self._tools: dict[int, dict[str, Any]] = {}

    # SSE framing (WHATWG): lines end in \n, \r\n or \r; a blank line ends an event
    def feed(self, chunk: bytes) -> list[bytes]:
        if self.done:
            return []
        buf = self._buf + chunk if self._buf else chunk
        out: list[bytes] = []
        pos = 0
        while not self.done:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            out += self._line(buf[pos:nl].rstrip(b"\r").decode("utf-8", errors="replace"))
            pos = nl + 1
        self._buf = buf[pos:]  # one copy per chunk, however many lines it holds
        return out

    def finish(self) -> list[bytes]:
        """At the end of llama-server's body: the last lines, if the stream has not ended."""
        if self.done:
            return []
        out = []
        if self._buf:
            out += self._line(self._buf.rstrip(b"\r").decode("utf-8", errors="replace"))
            self._buf = b""
        if not self.done:
            out += self._line("")  # an event left without its blank line
        if not self.done:
            if self._metrics.finish is not None:
                out += self._final()  # no [DONE] but a finished generation
            else:
                out.append(self._fail("llama-server ended the stream before the reply was "
                                      "complete"))
        return out

    def _line(self, line: str) -> list[bytes]:
        if line == "":
            data, error = "\n".join(self._data), "\n".join(self._error)
            self._data, self._error = [], []
            if error:
                return [self._fail(_error_message(error))]
            return self._event(data) if data else []
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "error":  # llama-server before the OpenAI-style error chunks
            self._error.append(value)
        return []

    def _fail(self, message: str) -> bytes:
        self.done = True
        return ndjson({"error": message})

    def _event(self, data: str) -> list[bytes]:
        if data.strip() == "[DONE]":
            return self._final()
        try:
            obj = json.loads(data)
        except ValueError:
            logger.warning("%s: llama-server sent an event that is not JSON: %.200s",
                           self.model, data)
            return []
        if not isinstance(obj, Mapping):
            return []
        if "error" in obj:
            return [self._fail(_error_message(obj["error"]))]
        self._metrics.take(obj)
        if "choices" in obj:
            out = self._choices(obj)
        else:  # native /infill: {"content", "stop", ...}
            out = self._piece(str(obj.get("content") or ""), None, None)
            if obj.get("stop") is True:
                out += self._final()
        return out

    def _choices(self, obj: Mapping[str, Any]) -> list[bytes]:
        choices = obj.get("choices") or []
        if not choices:
            return []  # the usage chunk, already taken
        choice = choices[0]
        delta = choice.get("delta")
        if isinstance(delta, Mapping):
            text, thinking = delta.get("content"), delta.get("reasoning_content")
            for call in delta.get("tool_calls") or []:
                self._tool_delta(call)
        else:  # text completion
            text, thinking = choice.get("text"), None
        out = self._piece(text or "", thinking or None, _logprobs(choice))
        if choice.get("finish_reason"):
            self._metrics.finish = choice["finish_reason"]
            if self._tools:
                message = {"role": "assistant", "content": "",
                           "tool_calls": _tool_calls_in(
                               self._tools[i] for i in sorted(self._tools))}
                out.append(ndjson({**_head(self.model, self.wall()),
                                   "message": message, "done": False}))
                self._tools = {}
        return out

    def _tool_delta(self, call: Mapping[str, Any]) -> None:
        index = int(call.get("index", 0))
        entry = self._tools.setdefault(index, {"index": index, "id": None,
                                               "function": {"name": "", "arguments": ""}})
        if call.get("id"):
            entry["id"] = call["id"]
        fn = call.get("function") or {}
        if fn.get("name"):
            entry["function"]["name"] += fn["name"]
        if fn.get("arguments"):
            entry["function"]["arguments"] += fn["arguments"]

    def _piece(self, text: str, thinking: str | None,
               logprobs: list[dict[str, Any]] | None) -> list[bytes]:
        if not text and not thinking and not logprobs:
            return []
        head = _head(self.model, self.wall())
        if self.endpoint == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            line: dict[str, Any] = {**head, "message": message, "done": False}
        else:
            line = {**head, "response": text, "done": False}
            if thinking:
                line["thinking"] = thinking
        if logprobs:
            line["logprobs"] = logprobs
        return [ndjson(line)]

    def _final(self) -> list[bytes]:
        self.done = True
        head = _head(self.model, self.wall())
        body: dict[str, Any] = ({"message": {"role": "assistant", "content": ""}}
                                if self.endpoint == "chat" else {"response": ""})
        fields = self._metrics.fields(self.clock() - self.started_ns, self.load_ns)
        return [ndjson({**head, **body, "done": True, **fields})]


def _error_message(error: object) -> str:
    if isinstance(error, str):
        text = error
        try:
            error = json.loads(text)
        except ValueError:
            return text.strip() or "llama-server reported an error"
    if isinstance(error, Mapping):
        inner = error.get("error", error)
        if isinstance(inner, Mapping):
            return str(inner.get("message") or "llama-server reported an error")
        return str(inner)
    return str(error)


# -- models ---------------------------------------------------------------------------------
#: architectures that only embed (llama-server serves them for /v1/embeddings)
_EMBEDDING_ARCHS: Final = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2",
                                     "jina-bert-v3", "t5encoder", "modern-bert", "neo-bert",
                                     "eurobert"})


@dataclass(frozen=True)
class ModelFacts:
    """What Ollama's listings say about one model, from cheap sources: the manifest, the
    source file's stat, its GGUF header (None if unreadable)."""

    name: str
    path: str
    size: int
    modified_ns: int
    info: gguf.GGUFInfo | None = None
    context_length: int | None = None        # per request as served, else the GGUF's
    accepts_images: bool = False             # served with a projector (--mmproj)
    aliases: tuple[str, ...] = ()
    parameters: Mapping[str, Any] = field(default_factory=dict)  # shown by /api/show

    @property
    def digest(self) -> str:
        return identity_digest(self.path, self.size, self.modified_ns)

    @property
    def embedding_only(self) -> bool:
        info = self.info
        return info is not None and info.architecture in _EMBEDDING_ARCHS


def identity_digest(path: str, size: int, mtime_ns: int) -> str:
    """A stable stand-in for Ollama's digest: sha256 over the file's path, size and mtime.
    It changes when the file does; it is NOT the sha256 of the file's bytes."""
    return hashlib.sha256(f"{path}\0{size}\0{mtime_ns}".encode()).hexdigest()


@functools.lru_cache(maxsize=256)
def _header(path: str, size: int, mtime_ns: int) -> gguf.GGUFInfo | None:
    # keyed by identity: a replaced file is read again, an unchanged one never
    try:
        return gguf.read_info(path)
    except gguf.GGUFError as err:
        logger.warning("listing %s without details: %s", path, err.message)
        return None


def model_facts(name: str, path: str | os.PathLike[str], *,
                args: Sequence[str] = (), aliases: Sequence[str] = ()) -> ModelFacts:
    """Facts about a manifest model from its source file (stat + cached header read).
    `args`: its llama-server arguments, for the served context and the projector. A missing
    file gives size 0 and no details rather than an error: a listing names every model."""
    spath = os.fspath(path)
    try:
        st = os.stat(spath)
    except OSError:
        return ModelFacts(name, spath, 0, 0, aliases=tuple(aliases))
    info = _header(spath, st.st_size, st.st_mtime_ns)
    ctx = (served_context(info, args) if info is not None else None)
    if ctx is None and info is not None:
        ctx = info.context_length
    projector = any(a.split("=")[0] in ("-mm", "--mmproj", "-mmu", "--mmproj-url")
                    for a in args)
    params: dict[str, Any] = {"num_ctx": ctx} if ctx else {}
    return ModelFacts(name, spath, st.st_size, st.st_mtime_ns, info, ctx, projector,
                      tuple(aliases), params)


def human_number(n: int) -> str:
    """Ollama's format.HumanNumber: 7615616512 -> "7.6B", 494032768 -> "494.03M"."""
    for unit, scale, decimals in (("B", 10**9, 1), ("M", 10**6, 2)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{decimals}f}{unit}"
    if n >= 1000:
        return f"{n / 1000:.0f}K"
    return str(n)


def details(facts: ModelFacts) -> dict[str, Any]:
    info = facts.info
    if info is None:
        return {"parent_model": "", "format": "gguf", "family": "", "families": None,
                "parameter_size": "", "quantization_level": ""}
    count = info.metadata.get("general.parameter_count")
    n_params = count if isinstance(count, int) and not isinstance(count, bool) \
        else info.n_params
    quant = (info.file_type or info.quantisation).removesuffix(" (guessed)")
    return {"parent_model": "", "format": "gguf", "family": info.architecture,
            "families": [info.architecture], "parameter_size": human_number(n_params),
            "quantization_level": quant}


def tags_body(models: Iterable[ModelFacts]) -> dict[str, Any]:
    """/api/tags: every model of the manifest, loaded or not. Names are the manifest's, as
    they are (no ":latest" added); `resolve_name()` strips a ":latest" a client adds."""
    return {"models": [
        {"name": m.name, "model": m.name, "modified_at": rfc3339(m.modified_ns),
         "size": m.size, "digest": m.digest, "details": details(m)} for m in models]}


@dataclass(frozen=True)
class Loaded:
    """A loaded model, for /api/ps: its memory (the admission estimate, or what it uses) and
    when it will be stopped if nobody uses it (wall-clock ns; None: kept until stopped)."""

    facts: ModelFacts
    size: int
    expires_ns: int | None
    size_vram: int = 0


def ps_body(loaded: Iterable[Loaded], *, now_ns: int | None = None) -> dict[str, Any]:
    """/api/ps, longest-lived first as Ollama sorts it."""
    now = time.time_ns() if now_ns is None else now_ns
    rows = []
    for m in loaded:
        expires = min(now + FOREVER_NS, 253402300799 * 10**9) if m.expires_ns is None \
            else m.expires_ns
        rows.append((expires, {
            "name": m.facts.name, "model": m.facts.name, "size": m.size,
            "digest": m.facts.digest, "details": details(m.facts),
            "expires_at": rfc3339(expires), "size_vram": m.size_vram,
            "context_length": m.facts.context_length or 0}))
    rows.sort(key=lambda r: -r[0])
    return {"models": [row for _, row in rows]}


def _info_value(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def show_body(facts: ModelFacts) -> dict[str, Any]:
    """/api/show. `model_info` is the GGUF header's metadata (long arrays such as the
    vocabulary as [] like Ollama's non-verbose answer); `capabilities` from what llama-server
    can do with it."""
    info = facts.info
    model_info: dict[str, Any] = {}
    if info is not None:
        model_info = {k: _info_value(v) for k, v in info.metadata.items()}
        for key in info.array_lengths:
            model_info.setdefault(key, [])
        model_info.setdefault("general.parameter_count", info.n_params)
        model_info = dict(sorted(model_info.items()))
    if facts.embedding_only:
        capabilities = ["embedding"]
    else:
        capabilities = ["completion", "tools"] + (["vision"] if facts.accepts_images else [])
    params = "\n".join(f"{k:<30} {v}" for k, v in facts.parameters.items())
    out: dict[str, Any] = {
        "license": str(info.metadata.get("general.license", "")) if info else "",
        "modelfile": f"# served by hoshikage (llama-server) from {facts.path}\n"
                     f"FROM {facts.path}\n",
        "parameters": params,
        "template": "",
        "details": details(facts),
        "model_info": model_info,
        "capabilities": capabilities,
        "modified_at": rfc3339(facts.modified_ns),
    }
    return out


def version_body() -> dict[str, Any]:
    return {"version": OLLAMA_VERSION}


def unmanaged(path: str) -> OllamaError | None:
    """501 for Ollama's model-management routes; None for any other path."""
    base = "/api/blobs" if path.startswith("/api/blobs/") else path
    if base not in UNMANAGED:
        return None
    what = base.removeprefix("/api/")
    return OllamaError(501, f"hoshikage does not manage model files ({what} is not "
                            "available): put GGUF files in a sources: directory or name them "
                            "in /etc/hoshikage/models.yaml")


def resolve_name(name: str, known: Callable[[str], bool]) -> str:
    """The manifest name for an Ollama model name: as given if known, else without the
    ":latest" tag Ollama clients add to untagged names."""
    if known(name) or not name.endswith(":latest"):
        return name
    return name.removesuffix(":latest")


def read_json(raw: bytes) -> Any:
    """A request body as JSON; OllamaError (400) if it is not."""
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise _bad(f"invalid JSON: {exc}") from None
