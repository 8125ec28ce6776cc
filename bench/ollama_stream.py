"""CPU the router spends turning llama-server's SSE into Ollama's NDJSON, per token.

Feeds hoshikage_sd.ollama.StreamTranslator a stream of chat-completion chunks shaped as
llama-server b10068 sends them (one token each), in one chunk per event and as one large
chunk, and prints the best of five runs in microseconds per token event.

    .venv/bin/python bench/ollama_stream.py [--events 10000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hoshikage_sd.router import ollama


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10000)
    n = parser.parse_args().events
    request = ollama.translate("/api/chat", {"model": "tiny",
                                             "messages": [{"role": "user", "content": "hi"}]})
    assert isinstance(request, ollama.Upstream)
    event = b"data: " + json.dumps({
        "choices": [{"finish_reason": None, "index": 0, "delta": {"content": " word"}}],
        "created": 1, "id": "chatcmpl-x", "model": "tiny", "system_fingerprint": "b1-571d0d5",
        "object": "chat.completion.chunk"}).encode() + b"\n\n"
    data = event * n
    for label, step in (("one chunk per event", len(event)), ("one chunk", len(data))):
        best = float("inf")
        for _ in range(5):
            translator = ollama.StreamTranslator(request, started_ns=0)
            began = time.perf_counter()
            lines = 0
            for i in range(0, len(data), step):
                lines += len(translator.feed(data[i:i + step]))
            best = min(best, time.perf_counter() - began)
        assert lines == n
        print(f"{label}: {best / n * 1e6:.1f} us per token event ({n} events)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
