"""Ollama requests (`/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`) as the
request to send to llama-server: `translate()` gives an `Upstream` or a `LoadOnly`."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from hoshikage_sd.router.ollama.base import ENDPOINTS, Endpoint, OllamaError, _bad
from hoshikage_sd.router.ollama.body import Long, resolved
from hoshikage_sd.router.ollama.options import (
    KeepAlive,
    _format,
    _keep_alive,
    _number,
    _think,
    map_options,
)


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


def _model(data: Mapping[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required")
    return model


def _stream(data: Mapping[str, Any]) -> bool:
    stream = data.get("stream")
    return True if stream is None else bool(stream)  # Ollama streams unless told not to


_IMAGE_MAGIC: Final = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
                       (b"GIF8", "image/gif"), (b"BM", "image/bmp"))


def _image_part(image: object) -> dict[str, Any]:
    if not isinstance(image, str):
        raise _bad("images must be base64 strings")
    start = (image.head if isinstance(image, Long) else image)[:64]  # a long one undecoded
    try:
        head = base64.b64decode(start + "=" * (-len(start) % 4), validate=False)
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
                   "multimodal projector: give it one with mmproj: FILE in the manifest)")
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
                                 else json.dumps(resolved(args), ensure_ascii=False)}})
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
