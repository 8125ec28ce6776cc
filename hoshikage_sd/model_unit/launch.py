"""hoshikage-launch NAME: ExecStart of hoshikage-model@NAME.service.

Every millisecond before llama-server starts is cold-start latency, and the full activator's
imports are long from a cold page cache. So the unit's first process is this file and
hoshikage_sd.protocol alone, run without site-packages (-I -S: only built-in and frozen
modules; protocol.py says which imports that avoids).

When the router has already admitted the model, it leaves
a launch ticket (protocol.py): llama-server's argv and environment. The launcher takes the
ticket, starts llama-server at once, waits for its /health to say 200, tells the router (it
forwards the waiting request at once) and sends READY=1 itself. The activator's imports would
take CPU and disk that llama-server's first answer wants (even at nice 19:
docs/performance.md), so only once llama-server has gone quiet (the first answer is out) or
HANDOVER_LIMIT has passed does the launcher become (same PID, so still the unit's main
process and llama-server's parent) `hoshikage activate NAME --adopt PID`, at the lowest CPU
priority; the activator keeps the records and supervises. (Stopped before that, the unit's
release does the load's bookkeeping from the record the launcher leaves once llama-server
serves: protocol.LAUNCHED_DIR.) Without a usable ticket (a manual
start, a copy to make, room to make) the launcher becomes `hoshikage activate NAME` at once,
which does all of it. The `hoshikage` it runs is the one next to this file.

Two forms, one contract. Installed, hoshikage-launch is launch.c compiled
(model_unit/install.py): the same steps without an interpreter to start (docs/performance.md,
"Kept optimisations"); the Debian package always compiles it and ships no stub. This module
is kept, and this is the one place that says why: tools/install and tools/bootstrap.sh run
where there may be no C compiler (they then install a stub that imports this module, and a
cold start pays an interpreter's start), and the launcher's steps (the ticket, the quiet
wait, the stop handed over) are unit-tested here one by one, while the contract tests run
both forms against protocol.py (tests/unit/test_launch.py, tests/integration/
test_activator.py). Change them together.
"""

import _signal  # type: ignore[import-not-found]  # signal.py would import enum
import posix  # os.py would import _collections_abc
import sys
import time

from hoshikage_sd.protocol import (
    HANDOVER_LIMIT,
    NICE,
    POLL,
    QUIET_SHARE,
    QUIET_WINDOW,
    STOP_ESCALATION,
    STOP_GRACE,
    WAIT_LIMIT,
    notify,
    probe,
    runtime_dir,
    take_ticket,
    tell_router,
    valid_name,
    with_unit_env,
    write_launched,
)

#: Python ignores these; llama-server must not inherit that (subprocess restores them too)
_RESET_SIGNALS = (13, 25)  # SIGPIPE, SIGXFSZ


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
    if notify_socket is None:
        notify_socket = posix.environ.get(b"NOTIFY_SOCKET", b"")
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
        pid = spawn(ticket.argv, with_unit_env(ticket.env, dict(posix.environ)))
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
        write_launched(runtime_dir, name, pid, started, healthy)
        wait_quiet(pid, healthy + HANDOVER_LIMIT)
    _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    return pid, started, healthy


def stop(pid: int, signum: int) -> None:
    """A stop while llama-server loads or gives its first answer: pass it on, wait for it
    (SIGTERM again after STOP_GRACE, then SIGKILL), and leave."""
    posix.kill(pid, signum)
    for again in STOP_ESCALATION:
        until = time.monotonic() + STOP_GRACE
        while time.monotonic() < until:
            if posix.waitpid(pid, posix.WNOHANG)[0] == pid:
                posix._exit(0)
            time.sleep(0.05)
        posix.kill(pid, again)
    posix.waitpid(pid, 0)
    posix._exit(0)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.stderr.write("usage: hoshikage-launch NAME\n")
        sys.exit(2)
    name = argv[1]
    hoshikage = (argv[0].rpartition("/")[0] or ".") + "/hoshikage"
    runtime = runtime_dir(posix.environ.get(b"RUNTIME_DIRECTORY", b"").decode())
    command = [hoshikage, "activate", name]
    started = launch(name, runtime, posix.environ.get(b"NOTIFY_SOCKET", b""))
    if started is not None:
        pid, spawned, healthy = started
        command += ["--adopt", str(pid), "--spawned", repr(spawned)]
        # A stop from here until the activator can pass it on waits (blocked, kept pending
        # across exec): by default it would end this process and leave llama-server serving
        # through its unit's stop (the activator unblocks them once its handlers are in place)
        _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGTERM, _signal.SIGINT})
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
