#!/usr/bin/env python3
"""The router's request parser alone (router/proxy/parsing.py's RequestParser.feed), this
tree's against another commit's, in one process: before and after in one run.

The other commit's parsing.py is loaded from `git show COMMIT:...` as a module of its own,
beside this tree's (it imports the same messages module; a commit whose parsing.py needs
other names than this tree has will not load). Requests, each fed whole to a fresh parser:

  chat      POST /v1/chat/completions as the openai Python client sends it (15 headers,
            ~1 KiB of JSON), the common case
  small     GET /v1/models with 3 headers
  chunked   POST with a chunked body of 4 chunks and one extension
  pipeline  the three in one buffer, fed in 1460-byte segments (a TCP MSS) to one parser

Rounds alternate the two (so drift on a shared machine hits both alike); each figure is
the median over rounds of the mean time per request in the round, and the least (the one
least disturbed by other processes).

  PYTHONPATH=. .venv/bin/python bench/proxy_parsing.py [--old COMMIT] [--rounds 15]
      [--n 20000] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO),) if p not in sys.path]

PARSING = "hoshikage_sd/router/proxy/parsing.py"
BODY = json.dumps({"model": "tiny", "messages": [
    {"role": "system", "content": "You are a helpful assistant. " * 6},
    {"role": "user", "content": "Tell me about the systemd socket activation protocol. " * 8}],
    "temperature": 0.7, "max_tokens": 256, "stream": True}).encode()
CHAT = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:11434\r\n"
        b"Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\nAccept: application/json\r\n"
        b"Content-Type: application/json\r\nUser-Agent: OpenAI/Python 1.54.4\r\n"
        b"X-Stainless-Lang: python\r\nX-Stainless-Package-Version: 1.54.4\r\n"
        b"X-Stainless-OS: Linux\r\nX-Stainless-Arch: x64\r\nX-Stainless-Runtime: CPython\r\n"
        b"X-Stainless-Runtime-Version: 3.11.2\r\nAuthorization: Bearer sk-0123456789abcdef\r\n"
        b"X-Stainless-Retry-Count: 0\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
SMALL = (b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/7.88.1\r\n"
         b"Accept: */*\r\n\r\n")
CHUNKED = (b"POST /completion HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n"
           + b"".join(b"%x;n=%d\r\n" % (len(part), i) + part + b"\r\n"
                      for i, part in enumerate(BODY[j * len(BODY) // 4:(j + 1) * len(BODY) // 4]
                                               for j in range(4)))
           + b"0\r\n\r\n")
PIPELINE = CHAT + SMALL + CHUNKED
CASES = {"chat": [CHAT], "small": [SMALL], "chunked": [CHUNKED],
         "pipeline": [PIPELINE[i:i + 1460] for i in range(0, len(PIPELINE), 1460)]}
PER_CASE = {"chat": 1, "small": 1, "chunked": 1, "pipeline": 3}


def load(commit: str | None) -> ModuleType:
    """parsing.py of `commit` (None: this tree's) as a module."""
    if commit is None:
        from hoshikage_sd.router.proxy import parsing
        return parsing
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{PARSING}"],
                            capture_output=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"parsing_{commit}.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location(f"parsing_{commit}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timer(module: ModuleType, pieces: list[bytes], n: int) -> Callable[[], float]:
    parser_class: Any = module.RequestParser
    got: list[Any] = []

    def run() -> float:
        start = time.perf_counter()
        for _ in range(n):
            parser = parser_class(got.append)
            for piece in pieces:
                parser.feed(piece)
        elapsed = time.perf_counter() - start
        got.clear()
        return elapsed / n

    return run


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--old", default="HEAD~1", help="the commit to compare with")
    args.add_argument("--rounds", type=int, default=15)
    args.add_argument("--n", type=int, default=20000, help="requests per round and case")
    args.add_argument("--json", help="write the figures here too")
    opts = args.parse_args()
    old, new = load(opts.old), load(None)
    for module in (old, new):  # both read the cases alike
        for case, pieces in CASES.items():
            got: list[Any] = []
            parser = module.RequestParser(got.append)
            for piece in pieces:
                parser.feed(piece)
            assert len(got) == PER_CASE[case], (module.__name__, case)
    results: dict[str, dict[str, float]] = {}
    for case, pieces in CASES.items():
        runs: dict[str, list[float]] = {"old": [], "new": []}
        timers = {"old": timer(old, pieces, opts.n), "new": timer(new, pieces, opts.n)}
        for i in range(opts.rounds):
            for which in (("old", "new") if i % 2 == 0 else ("new", "old")):
                runs[which].append(timers[which]())
        o, w = statistics.median(runs["old"]), statistics.median(runs["new"])
        lo, lw = min(runs["old"]), min(runs["new"])
        results[case] = {"old_us": o * 1e6, "new_us": w * 1e6, "ratio": w / o,
                         "old_min_us": lo * 1e6, "new_min_us": lw * 1e6, "min_ratio": lw / lo}
        print(f"{case:9} {opts.old}: {o * 1e6:6.2f} us (min {lo * 1e6:6.2f})   this tree: "
              f"{w * 1e6:6.2f} us (min {lw * 1e6:6.2f})   new/old {w / o:.2f}x "
              f"(min {lw / lo:.2f}x)")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"old": opts.old, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
