"""llama-server's SSE stream as Ollama's NDJSON stream."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from hoshikage_sd.router.ollama.base import logger, ndjson
from hoshikage_sd.router.ollama.replies import (
    _error_message,
    _head,
    _logprobs,
    _Metrics,
    _tool_calls_in,
)
from hoshikage_sd.router.ollama.requests import Upstream


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

    def finish(self, cut: str | None = None) -> list[bytes]:
        """At the end of llama-server's body: the last lines, if the stream has not ended;
        `cut`: the error line's message for a reply that is not complete (why it broke)."""
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
                out.append(self._fail(cut or "llama-server ended the stream before the "
                                      "reply was complete"))
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
