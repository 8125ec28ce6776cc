"""What the benchmarks in bench/ share: the machine's state, disturbance accounting, timed
cold runs, llama-server started by hand, and hoshikage deployed under real systemd.

A cold run (`timed`) first waits for a quiet machine, drops the page cache and waits for
memory to settle (on a VM with free-page reporting freed memory goes back to the host after
~2 s and its next first touch costs ~1 s per GiB). Every run records the CPU steal and the
share of the CPUs that processes other than the benchmark's used meanwhile: the benchmark
moves itself into a cgroup of its own (`ACCOUNTING.enter()`), and everything it starts, the
container included, is counted there.

The hoshikage helpers take the model's name, so one deployment can serve several models;
the breakdown of a start (`explain`) comes from systemd's monotonic timestamps and the
activator's journal records.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / "tools")) if p not in sys.path]

from testbed.container import Container  # noqa: E402
from testbed.deploy import Deployment, free_port  # noqa: E402

CACHE = Path("/var/tmp/hoshikage-bench")
ROUTER = "hoshikage.service"
POLL = 0.005
COLD_TIMEOUT = 180.0
CHAT_PATH = "/v1/chat/completions"
HEADERS = {"Content-Type": "application/json"}
CHILD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "LANG": "C.UTF-8", "HOME": "/root"}
COPY_KEY = "staging (journal)"


@contextlib.contextmanager
def containers(prefix: str) -> Iterator[Callable[[list[tuple[str, str, bool]]], Container]]:
    """A maker of booted containers (testbed.deploy.deploy takes it), each stopped on exit."""
    made: list[Container] = []

    def make(binds: list[tuple[str, str, bool]]) -> Container:
        container = Container(f"{prefix}-{int(time.time())}", binds)
        made.append(container)
        container.start(90)
        return container

    try:
        yield make
    finally:
        for container in made:
            container.stop()


def say(text: str) -> None:
    print(f"[{Path(sys.argv[0]).stem}] {text}", file=sys.stderr, flush=True)


def unit_of(name: str) -> str:
    return f"hoshikage-model@{name}.service"


def chat_body(model: str) -> bytes:
    """A max_tokens=1 chat completion for `model` (its prompt is 29 tokens)."""
    return json.dumps({"model": model, "max_tokens": 1,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()


# -- the machine ----------------------------------------------------------------------------

def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_into_cache(paths: Sequence[Path]) -> None:
    """Read files whole, so that they are in the page cache."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 22):
                pass


def churn_page_cache(files: Sequence[Path] = ()) -> None:
    """What a backup or a build does to the page cache between two requests. With no files,
    the clean page cache dropped (`echo 1 > /proc/sys/vm/drop_caches`: no sync, dentries and
    inodes kept, tmpfs pages (the RAM disk's copies) kept, as reading more files than the
    page cache holds would leave them); otherwise `files` read whole."""
    if files:
        read_into_cache(files)
    else:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")


def ensure_churn_files(gib: int) -> list[Path]:
    """`gib` files of 1 GiB of incompressible bytes (CACHE/churn/), written once."""
    paths = [CACHE / "churn" / f"{i:03}.bin" for i in range(gib)]
    block = os.urandom(1 << 22)
    for path in paths:
        if path.exists() and path.stat().st_size == 1 << 30:
            continue
        say(f"writing {path} (once)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            for _ in range(256):
                f.write(block)
        os.rename(tmp, path)
    return paths


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


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def git_commit() -> str:
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "hoshikage_sd", "units"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return head + (" (hoshikage_sd/units modified)" if dirty else "")


def machine(server: Path) -> dict[str, Any]:
    try:
        out = subprocess.run([str(server), "--version"], capture_output=True, text=True,
                             timeout=30, env=CHILD_ENV)
        version = next((ln for ln in (out.stdout + out.stderr).splitlines()
                        if ln.startswith("version")), "unknown")
    except (OSError, subprocess.TimeoutExpired):
        version = "unknown"
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "commit": git_commit(),
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

    def prepare(self, cached: Sequence[Path] = ()) -> float:
        """wait_quiet(), drop the page cache, sleep settle, then read `cached` back into
        it; the load wait_quiet() saw."""
        load = self.wait_quiet()
        drop_caches()
        time.sleep(self.settle)
        read_into_cache(cached)
        return load


@dataclass
class Run:
    """One timed cold (or staging) run, with the conditions it ran under."""

    seconds: float
    steal: float = 0.0  # fraction of CPU time the hypervisor took while it ran
    others: float | None = None  # fraction of all CPUs used by processes not ours meanwhile
    background: float = 0.0  # load (busy + steal) in the second before the run
    parts: dict[str, float] = field(default_factory=dict)  # where the time went
    copied: bool | None = None  # hoshikage: did the activator copy the model?
    launched: bool | None = None  # hoshikage: did the unit's launcher start llama-server?
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
def timed(cond: Conditions, cached: Sequence[Path] = ()) -> Iterator[Run]:
    """Prepare a cold run (with `cached` read back into the page cache) and time the block:
    the Run (the block may fill in parts)."""
    background = cond.prepare(cached)
    with observed(background) as run:
        yield run


@contextlib.contextmanager
def observed(background: float = 0.0) -> Iterator[Run]:
    """Time the block and record the steal and others' share of the CPUs meanwhile."""
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


def ensure_gguf(path: Path, min_bytes: int, **shape: Any) -> int:
    """A cached random-weight model (tools/make_gguf.py's write_model(**shape)), generated
    when missing or smaller than min_bytes; its size."""
    with contextlib.suppress(FileNotFoundError):
        size = path.stat().st_size
        if size >= min_bytes:
            return size
    import make_gguf  # tools/make_gguf.py (needs gguf, numpy)

    say(f"generating {path} (once)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not next to the target: a directory of models (llama.cpp's --models-dir) would list it.
    tmp = CACHE / f".{path.name}.tmp-{os.getpid()}"
    try:
        make_gguf.write_model(tmp, **shape)
        os.rename(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path.stat().st_size


# -- llama-server by hand ----------------------------------------------------------------------

SERVE_LIMIT = 300.0


def serve_seconds(server: Path, model: Path, sock: Path, log: Path, args: Sequence[str] = (),
                  env: dict[str, str] | None = None) -> float:
    """spawn -> /health 200 of llama-server on `model` (and `args`), then it is stopped."""
    from hoshikage_sd import protocol

    argv = [str(server), "-m", str(model), "--host", str(sock), "-c", "512", "-np", "1",
            "--cache-ram", "0", *args]
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    with open(log, "a") as out:
        start = time.monotonic()
        proc = subprocess.Popen(argv, env=env or {"PATH": "/usr/bin:/bin"}, stdout=out,
                                stderr=out)
        try:
            while protocol.probe(str(sock)) != 200:
                if proc.poll() is not None or time.monotonic() - start > SERVE_LIMIT:
                    raise RuntimeError(f"llama-server did not serve: {log.read_text()[-2000:]}")
                time.sleep(protocol.POLL)
            return time.monotonic() - start
        finally:
            proc.terminate()
            proc.wait(30)


# -- statistics -----------------------------------------------------------------------------

def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def secs(runs: Sequence[Run]) -> list[float]:
    return [r.seconds for r in runs]


def ms(x: float) -> str:
    return f"{1000 * x:8.1f}"


# -- HTTP -----------------------------------------------------------------------------------

def chat(conn: http.client.HTTPConnection, body: bytes) -> int:
    """POST one chat completion; the status once the whole reply is read."""
    try:
        conn.request("POST", CHAT_PATH, body=body, headers=HEADERS)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def tcp(port: int, timeout: float = COLD_TIMEOUT) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def timed_chat(connect: Callable[[], http.client.HTTPConnection], body: bytes) -> float:
    start = time.monotonic()
    status = chat(connect(), body)
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


# -- llama-server by hand -------------------------------------------------------------------

def by_hand(cleanup: Cleanup, cond: Conditions, server: Path, model: Path, log_path: Path,
            name: str, cached: Sequence[Path] = ()) -> Run:
    """Spawn llama-server; poll it every POLL s until a chat completion answers 200.

    The polls go to /health until it is 200, then to the chat completion: the first 200 of
    a chat completion comes at the same moment as when polling it alone (llama-server
    answers 503 to both while it loads), and the split is the one hoshikage's activator
    reports (spawn -> /health 200, then the answer)."""
    port = free_port()
    argv = [str(server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--alias", name]
    body = chat_body(name)
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

    with open(log_path, "w") as log, timed(cond, cached) as run:
        start = time.monotonic()
        proc = cleanup.spawn(argv, log)
        try:
            while True:
                with contextlib.suppress(OSError, http.client.HTTPException):
                    if healthy is None and health() == 200:
                        healthy = time.monotonic()
                    if healthy is not None and chat(tcp(port, timeout=30), body) == 200:
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


def stop_models(hk: Deployment, names: Sequence[str]) -> None:
    """Model units stopped (their ExecStopPost drops the staged copies); the router as is."""
    units = [unit_of(n) for n in names]
    hk.container.systemctl("stop", *units)
    for unit in units:
        wait_state(hk, unit, ("inactive", "failed"))
    for name in names:
        if (hk.container.root / f"mnt/hoshikage/{name}.gguf").exists():
            raise RuntimeError(f"the staged copy of {name} survived its model unit's stop")


def zero_processes(hk: Deployment, names: Sequence[str]) -> None:
    """Socket only: model units (their ExecStopPost drops the staged copies) and router
    stopped."""
    stop_models(hk, names)
    hk.container.systemctl("stop", ROUTER)
    wait_state(hk, ROUTER, ("inactive", "failed"))
    left = hk.processes("llama-server") + hk.processes("hoshikage")
    if left:
        raise RuntimeError(f"processes left in the container: {left}")


def host_pid(hk: Deployment, pid: int) -> int | None:
    """The host's PID of the container's process `pid`, or None."""
    leader = hk.container.pid1
    if leader is None or pid <= 0:
        return None
    namespace = os.readlink(f"/proc/{leader}/ns/pid")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(entry / "ns/pid") != namespace:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("NSpid:") and int(line.split()[-1]) == pid:
                    return int(entry.name)
    return None


def main_pid(hk: Deployment, unit: str) -> int | None:
    """The host's PID of a unit's main process in the container, or None."""
    return host_pid(hk, int(show(hk, unit, "MainPID")["MainPID"] or 0))


def explain(hk: Deployment, name: str, run: Run, start: float, router_started: bool) -> None:
    """Fill in where the time went, from systemd's monotonic timestamps (CLOCK_MONOTONIC,
    the same clock as time.monotonic() here) and the activator's `ready` journal record:
    when llama-server was spawned, and `load` seconds later its /health said 200 (the split
    of a llama-server started by hand). READY=1 may come later than that: after a launched
    start the activator imports only once llama-server serves."""
    unit = unit_of(name)
    end = start + run.seconds
    model = show(hk, unit, "InactiveExitTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    m_begin = mono(model["InactiveExitTimestampMonotonic"])
    m_ready = mono(model["ActiveEnterTimestampMonotonic"])
    ready = ready_since(hk, name, start)
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
        first = first_record(hk, name, m_begin, m_ready, ready)
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


def ready_since(hk: Deployment, name: str, start: float) -> dict[str, Any] | None:
    """The model's `ready` journal record logged after `start` (CLOCK_MONOTONIC s)."""
    later = [e for e in hk.events("ready", name)
             if int(e["__MONOTONIC_TIMESTAMP"]) / 1e6 > start]
    return later[-1] if later else None


def first_record(hk: Deployment, name: str, begin: float, ready_at: float,
                 ready: dict[str, Any]) -> tuple[str, float] | None:
    """The activator's first lifecycle record of this start: (kind, CLOCK_MONOTONIC s).

    journald stamps entries with the kernel's CLOCK_MONOTONIC, as systemd does; if the
    `ready` record is not within 0.5 s of the unit's ActiveEnter the clocks differ: None."""
    if abs(int(ready["__MONOTONIC_TIMESTAMP"]) / 1e6 - ready_at) > 0.5:
        return None
    entries = [(int(e["__MONOTONIC_TIMESTAMP"]) / 1e6, str(e.get("HOSHIKAGE_EVENT")))
               for e in hk.container.journal(f"HOSHIKAGE_MODEL={name}")
               if "HOSHIKAGE_EVENT" in e]
    during = sorted((t, kind) for t, kind in entries if begin <= t <= ready_at)
    if not during or during[0][1] == "ready":
        return None
    return during[0][1], during[0][0]


def wait_ready_record(hk: Deployment, name: str, start: float) -> None:
    """The activator's `ready` record comes after the answer when the launcher started
    llama-server: wait for this start's."""
    hk.wait_for(f"the ready record of {name}'s start",
                lambda: ready_since(hk, name, start) is not None)


def cold_request(hk: Deployment, cond: Conditions, name: str, router_started: bool,
                 cached: Sequence[Path] = ()) -> Run:
    """Prepare a cold run, send one chat completion for `name` and explain its time."""
    with timed(cond, cached) as run:
        start = time.monotonic()
        status = chat(tcp(hk.port), chat_body(name))
    if status != 200:
        raise RuntimeError(f"hoshikage answered HTTP {status}")
    wait_ready_record(hk, name, start)
    explain(hk, name, run, start, router_started)
    return run


def run_cleaning_up(body: Callable[[Cleanup], None]) -> int:
    """Run body(cleanup) with SIGTERM taken as Ctrl-C: whatever it set up (containers,
    mounts, processes) is cleaned up however it ends, and nothing interrupts the cleanup.
    0, or 130 when interrupted."""
    import signal

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    cleanup = Cleanup()
    ACCOUNTING.enter()
    try:
        body(cleanup)
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
    return 0
