#!/usr/bin/python3 -IS
"""hoshikage-launch NAME: ExecStart of hoshikage-model@NAME.service.

Every millisecond before llama-server starts is cold-start latency, and the full activator
costs about 250 ms of imports from a cold page cache. So the unit's first process is this
file alone, run without site-packages (-I -S: only built-in and frozen modules, about 12 ms).

When the router has already admitted the model and found its staged copy current, it leaves
a launch ticket in $RUNTIME_DIRECTORY/launch/NAME: llama-server's argv and environment. The
launcher takes the ticket, starts llama-server at once, waits for its /health to say 200,
tells the router (a datagram on ROUTER_SOCKET: it forwards the waiting request at once) and
sends READY=1 itself. The activator's imports would take CPU and disk that llama-server's
first answer wants (measured: about 60 ms of it, even at nice 19), so only once llama-server
has gone quiet (the first answer is out) or HANDOVER_LIMIT has passed does the launcher
become (same PID, so still the unit's main process and llama-server's parent) `hoshikage
activate NAME --adopt PID`, at the lowest CPU priority; the activator keeps the records and
supervises. Without a usable ticket
(a manual start, a copy to make, room to make) the launcher becomes `hoshikage activate
NAME` at once, which does all of it. The `hoshikage` it runs is the one next to this file.

The writer of tickets is here too, so that the format has one home; it runs in the router.

Installed, hoshikage-launch is launch.c compiled (install_launcher): the same steps without
an interpreter to start, about 14 ms sooner. Where there is no C compiler it is a stub
(write_stub) that imports this module: Python compiles a script on every run (about 7 ms of
each cold start here) but caches a module's bytecode. Both forms keep one contract
(tests/unit/test_launch.py, tests/integration/test_activator.py); change them together.
"""

import _signal  # type: ignore[import-not-found]  # signal.py would import enum
import _socket
import posix  # os.py would import _collections_abc: ~4 ms
import sys
import time

MAGIC = b"hoshikage-launch-1"
TICKET_DIR = "launch"
#: the router's datagram socket in the runtime directory: a model's name sent there says
#: "it serves now", so the router need not poll /health (CPU llama-server's load wants)
ROUTER_SOCKET = "router.notify"
#: seconds a ticket stays good: one the unit did not take by then is from a start that failed
TICKET_TTL = 30.0
_NAME_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_NAME_REST = _NAME_FIRST | frozenset("._:-")
#: Python ignores these; llama-server must not inherit that (subprocess restores them too)
_RESET_SIGNALS = (13, 25)  # SIGPIPE, SIGXFSZ
NICE = 19
POLL = 0.005  # /health polling: every ms spent here is cold-start latency
#: seconds the launcher waits for /health itself before the activator (with its start-timeout
#: heartbeats) takes over the wait: the unit's TimeoutStartSec= must allow this much
WAIT_LIMIT = 10.0
#: llama-server counts as quiet when its threads used less than QUIET_SHARE of one CPU over
#: QUIET_WINDOW seconds; the window is longer than the router takes to forward after /health
QUIET_WINDOW = 0.05
QUIET_SHARE = 0.1
#: seconds after READY=1 that the activator waits at most for llama-server to go quiet
HANDOVER_LIMIT = 5.0
#: seconds llama-server gets to stop after SIGTERM. With a request in flight it can hang
#: there (seen: until the unit's 30 s TimeoutStopSec); a second SIGTERM makes it exit at
#: once, SIGKILL follows as long after that. The activator does the same.
STOP_GRACE = 8


def valid_name(name: str) -> bool:
    """config.NAME_RE without importing re: the name reaches a path."""
    return (0 < len(name) <= 100 and name[0] in _NAME_FIRST
            and all(ch in _NAME_REST for ch in name))


def ticket_path(runtime_dir: str, name: str) -> str:
    return f"{runtime_dir}/{TICKET_DIR}/{name}"


def write_ticket(runtime_dir: str, name: str, socket: str, health: str,
                 env: dict[str, str], argv: list[str]) -> None:
    """Leave llama-server's command line for the unit's launcher (atomically)."""
    import os
    from pathlib import Path

    from hoshikage_sd.state import write_atomic

    fields = [MAGIC, str(time.monotonic() + TICKET_TTL).encode(), os.fsencode(socket),
              health.encode()]
    fields += [os.fsencode(f"{k}={v}") for k, v in env.items()]
    fields += [b""] + [os.fsencode(a) for a in argv]
    write_atomic(Path(ticket_path(runtime_dir, name)), b"\0".join(fields))


class Ticket:
    def __init__(self, socket: bytes, health: str, env: dict[bytes, bytes],
                 argv: list[bytes]) -> None:
        self.socket = socket
        self.health = health
        self.env = env
        self.argv = argv


def take_ticket(runtime_dir: str, name: str) -> Ticket:
    """The model's ticket, removed; ValueError when there is none to use."""
    path = ticket_path(runtime_dir, name)
    try:
        with open(path, "rb") as f:
            data = f.read()
        posix.unlink(path)
    except OSError as exc:
        raise ValueError(f"no ticket: {exc.strerror}") from None
    fields = data.split(b"\0")
    if len(fields) < 5 or fields[0] != MAGIC:
        raise ValueError("not a launch ticket")
    if time.monotonic() > float(fields[1]):
        raise ValueError("stale ticket")
    end = fields.index(b"", 4)
    env = dict(f.split(b"=", 1) for f in fields[4:end])
    argv = fields[end + 1:]
    if not argv:
        raise ValueError("empty command line")
    return Ticket(fields[2], fields[3].decode(), env, argv)


def probe_request(route: str) -> bytes:
    return b"GET " + route.encode() + b" HTTP/1.0\r\nHost: localhost\r\n\r\n"


def status_of(head: bytes) -> int | None:
    """The status code in an HTTP response's first line, or None for anything else."""
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


def probe(path: str | bytes, route: str = "/health", timeout: float = 2.0) -> int | None:
    """The HTTP status of GET route on a unix socket, or None when nothing answers.

    A few lines of HTTP/1.0 on the built-in _socket: http.client (with ssl), or even
    socket.py (with enum), would cost more to import than the probe takes."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    head = b""
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(probe_request(route))
        while b"\r\n" not in head and len(head) < 4096:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    except OSError:
        return None
    finally:
        sock.close()
    return status_of(head)


def tell_router(runtime_dir: str, name: str) -> bool:
    """Tell a router waiting for this model that it serves. False when none listens."""
    return _send(f"{runtime_dir}/{ROUTER_SOCKET}".encode(errors="surrogateescape"),
                 name.encode())


def notify(message: bytes, address: bytes | None = None) -> bool:
    """sd_notify's datagram (b"READY=1\\nSTATUS=...") to `address`, by default
    $NOTIFY_SOCKET. False when not run by systemd."""
    if address is None:
        import os  # the launcher passes the address: importing os costs it ~4 ms

        address = os.environb.get(b"NOTIFY_SOCKET", b"")
    if not address:
        return False
    if address.startswith(b"@"):
        address = b"\0" + address[1:]
    return _send(address, message)


def _send(address: bytes, message: bytes) -> bool:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
    try:
        sock.sendto(message, address)
    except OSError:
        return False
    finally:
        sock.close()
    return True


def cpu_ns(pid: int) -> int | None:
    """CPU time all of pid's threads have used (ns, from schedstat), or None if unknown."""
    total, seen = 0, False
    try:
        tids = posix.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
            seen = True
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended meanwhile
    return total if seen else None


def exited(pid: int) -> bool:
    """Has the child exited? It stays unreaped, for the activator to collect its status."""
    return posix.waitid(posix.P_PID, pid,
                        posix.WEXITED | posix.WNOHANG | posix.WNOWAIT) is not None


def wait_quiet(pid: int, until: float) -> None:
    """Return once llama-server has been quiet for QUIET_WINDOW, exited, or `until` passed."""
    last = cpu_ns(pid)
    while last is not None and not exited(pid) and time.monotonic() < until:
        time.sleep(QUIET_WINDOW)
        now = cpu_ns(pid)
        if now is None or now - last < QUIET_WINDOW * QUIET_SHARE * 1e9:
            return
        last = now


def spawn(argv: list[bytes] | list[str], env: dict[bytes, bytes] | dict[str, str]) -> int:
    """Start llama-server (stdin /dev/null, output to the unit's journal); its PID."""
    return posix.posix_spawnp(
        argv[0], argv, env, setsigdef=_RESET_SIGNALS,
        file_actions=[(posix.POSIX_SPAWN_OPEN, 0, "/dev/null", posix.O_RDONLY, 0)])


def launch(name: str, runtime_dir: str,
           notify_socket: bytes | None = None) -> tuple[int, float, float | None] | None:
    """Start llama-server from this model's ticket and wait (bounded) until it serves, then
    send READY=1 (to `notify_socket`, by default $NOTIFY_SOCKET) and wait (bounded) for its
    first answer to be out: (pid, when spawned, when /health said 200 or None), or None to go
    the slow way."""
    if not runtime_dir or not valid_name(name):
        return None
    try:
        ticket = take_ticket(runtime_dir, name)
    except ValueError:
        return None
    try:  # noqa: SIM105 (contextlib is one more module to read from a cold disk)
        posix.unlink(ticket.socket)  # llama-server does not remove a stale socket itself
    except FileNotFoundError:
        pass
    started = time.monotonic()
    try:
        pid = spawn(ticket.argv, ticket.env)
    except OSError:
        return None  # the activator tries again and says what is wrong
    _signal.signal(_signal.SIGTERM, lambda signum, _frame: stop(pid, signum))
    _signal.signal(_signal.SIGINT, lambda signum, _frame: stop(pid, signum))
    healthy = None
    # Until it answers, exits (left unreaped, for the activator) or the limit passes.
    while not exited(pid) and time.monotonic() < started + WAIT_LIMIT:
        if probe(ticket.socket, ticket.health) == 200:
            healthy = time.monotonic()
            break
        time.sleep(POLL)
    if healthy is not None:
        tell_router(runtime_dir, name)  # first: a request is waiting for this
        notify(b"READY=1\nSTATUS=serving " + name.encode(), notify_socket)
        wait_quiet(pid, healthy + HANDOVER_LIMIT)
    _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    return pid, started, healthy


def stop(pid: int, signum: int) -> None:
    """A stop while llama-server loads or gives its first answer: pass it on, wait for it
    (SIGTERM again after STOP_GRACE, then SIGKILL), and leave."""
    posix.kill(pid, signum)
    for again in (15, 9):  # SIGTERM, SIGKILL (signal.py would import enum)
        until = time.monotonic() + STOP_GRACE
        while time.monotonic() < until:
            if posix.waitpid(pid, posix.WNOHANG)[0] == pid:
                posix._exit(0)
            time.sleep(0.05)
        posix.kill(pid, again)
    posix.waitpid(pid, 0)
    posix._exit(0)


STUB = """#!/usr/bin/python3 -IS
# hoshikage-launch, written by hoshikage's installer: runs hoshikage_sd/launch.py as a module,
# whose bytecode Python caches (it compiles a script on every run).
import sys
sys.path.insert(0, (__file__.rpartition("/")[0] or ".") + "/{site}")
from hoshikage_sd.launch import main
main(sys.argv)
"""


def write_stub(path: str, site: str) -> None:
    """Write the hoshikage-launch stub at `path` for the hoshikage_sd package in `site`."""
    import os
    from pathlib import Path

    from hoshikage_sd.state import write_atomic

    relative = os.path.relpath(os.path.abspath(site), os.path.dirname(os.path.abspath(path)))
    write_atomic(Path(path), STUB.format(site=relative).encode())
    os.chmod(path, 0o755)


def build_native(path: str) -> str | None:
    """Compile launch.c (the same launcher without an interpreter to start: ~14 ms less per
    cold start) to `path`, atomically; None when done, else why it could not be."""
    import contextlib
    import os
    import shutil
    import subprocess

    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch.c")
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return "no C compiler (cc)"
    if not os.path.exists(source):
        return f"{source} is missing"
    temporary = f"{path}.tmp-{os.getpid()}"
    result = subprocess.run([compiler, "-O2", "-Wall", "-Wextra", "-o", temporary, source],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        return f"{compiler} failed: {result.stderr.strip()[-500:]}"
    os.replace(temporary, path)
    return None


def install_launcher(path: str, site: str) -> str:
    """hoshikage-launch at `path`: compiled when a C compiler is there, else the stub for the
    hoshikage_sd package in `site`. Says which, for the installer to print."""
    why = build_native(path)
    if why is None:
        return f"{path}: compiled from launch.c"
    write_stub(path, site)
    return f"{path}: Python stub ({why}; the compiled launcher starts ~14 ms sooner)"


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.stderr.write("usage: hoshikage-launch NAME\n")
        sys.exit(2)
    name = argv[1]
    hoshikage = (argv[0].rpartition("/")[0] or ".") + "/hoshikage"
    runtime_dir = posix.environ.get(b"RUNTIME_DIRECTORY", b"").split(b":")[0].decode()
    command = [hoshikage, "activate", name]
    started = launch(name, runtime_dir, posix.environ.get(b"NOTIFY_SOCKET", b""))
    if started is not None:
        pid, spawned, healthy = started
        command += ["--adopt", str(pid), "--spawned", repr(spawned)]
        if healthy is not None:
            command += ["--healthy", repr(healthy)]
        # Nothing waits for the activator (READY=1 is sent; the router polls /health
        # itself): its imports must not slow llama-server. It restores its priority later.
        posix.nice(NICE)
    try:
        posix.execv(hoshikage, command)
    except OSError as exc:
        sys.stderr.write(f"hoshikage-launch: cannot run {hoshikage}: {exc.strerror}\n")
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv)
