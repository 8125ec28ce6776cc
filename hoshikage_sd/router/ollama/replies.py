"""llama-server's whole (non-streaming) replies, and its errors, as Ollama's replies."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hoshikage_sd.router.ollama.base import rfc3339
from hoshikage_sd.router.ollama.requests import LoadOnly


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
