#!/usr/bin/python3 -IS
"""hoshikage-launch NAME: ExecStart of hoshikage-model@NAME.service.

Every millisecond before llama-server starts is cold-start latency, and the full activator
costs about 250 ms of imports from a cold page cache. So the unit's first process is this
file alone, run without site-packages (-I -S: only built-in and frozen modules, about 20 ms).

When the router has already admitted the model and found its staged copy current, it leaves
a launch ticket in $RUNTIME_DIRECTORY/launch/NAME: llama-server's argv and environment. The
launcher takes the ticket, starts llama-server at once, and then becomes (same PID, so still
the unit's main process and llama-server's parent) `hoshikage activate NAME --adopt PID`,
which imports the rest while llama-server loads and sends READY=1 once it serves. Without a
usable ticket (a manual start, a copy to make, room to make) it becomes `hoshikage activate
NAME`, which does all of it. The `hoshikage` it runs is the one next to this file.

The writer of tickets is here too, so that the format has one home; it runs in the router.
"""

import os
import sys
import time

MAGIC = b"hoshikage-launch-1"
TICKET_DIR = "launch"
#: seconds a ticket stays good: one the unit did not take by then is from a start that failed
TICKET_TTL = 30.0
_NAME_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_NAME_REST = _NAME_FIRST | frozenset("._:-")
#: Python ignores these; llama-server must not inherit that (subprocess restores them too)
_RESET_SIGNALS = (13, 25)  # SIGPIPE, SIGXFSZ


def valid_name(name: str) -> bool:
    """config.NAME_RE without importing re: the name reaches a path."""
    return (0 < len(name) <= 100 and name[0] in _NAME_FIRST
            and all(ch in _NAME_REST for ch in name))


def ticket_path(runtime_dir: str, name: str) -> str:
    return os.path.join(runtime_dir, TICKET_DIR, name)


def write_ticket(runtime_dir: str, name: str, socket: str, env: dict[str, str],
                 argv: list[str]) -> None:
    """Leave llama-server's command line for the unit's launcher (atomically)."""
    from pathlib import Path

    from hoshikage_sd.state import write_atomic

    fields = [MAGIC, str(time.monotonic() + TICKET_TTL).encode(), os.fsencode(socket)]
    fields += [os.fsencode(f"{k}={v}") for k, v in env.items()]
    fields += [b""] + [os.fsencode(a) for a in argv]
    write_atomic(Path(ticket_path(runtime_dir, name)), b"\0".join(fields))


def take_ticket(runtime_dir: str, name: str) -> tuple[bytes, dict[bytes, bytes], list[bytes]]:
    """The ticket's (socket, env, argv), removed; ValueError when there is none to use."""
    path = ticket_path(runtime_dir, name)
    try:
        with open(path, "rb") as f:
            data = f.read()
        os.unlink(path)
    except OSError as exc:
        raise ValueError(f"no ticket: {exc.strerror}") from None
    fields = data.split(b"\0")
    if len(fields) < 4 or fields[0] != MAGIC:
        raise ValueError("not a launch ticket")
    if time.monotonic() > float(fields[1]):
        raise ValueError("stale ticket")
    end = fields.index(b"", 3)
    env = dict(f.split(b"=", 1) for f in fields[3:end])
    argv = fields[end + 1:]
    if not argv:
        raise ValueError("empty command line")
    return fields[2], env, argv


def spawn(argv: list[bytes] | list[str], env: dict[bytes, bytes] | dict[str, str]) -> int:
    """Start llama-server (stdin /dev/null, output to the unit's journal); its PID."""
    return os.posix_spawnp(argv[0], argv, env, setsigdef=_RESET_SIGNALS,
                           file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)])


def launch(name: str, runtime_dir: str) -> tuple[int, float] | None:
    """Start llama-server from this model's ticket: (pid, when), or None to go the slow way."""
    if not runtime_dir or not valid_name(name):
        return None
    try:
        socket, env, argv = take_ticket(runtime_dir, name)
    except ValueError:
        return None
    try:  # noqa: SIM105 (contextlib is one more module to read from a cold disk)
        os.unlink(socket)  # llama-server does not remove a stale socket itself
    except FileNotFoundError:
        pass
    started = time.monotonic()
    try:
        return spawn(argv, env), started
    except OSError:
        return None  # the activator tries again and says what is wrong


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.stderr.write("usage: hoshikage-launch NAME\n")
        sys.exit(2)
    name = argv[1]
    hoshikage = os.path.join(os.path.dirname(os.path.abspath(argv[0])), "hoshikage")
    runtime_dir = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    command = [hoshikage, "activate", name]
    started = launch(name, runtime_dir)
    if started is not None:
        command += ["--adopt", str(started[0]), "--spawned", repr(started[1])]
    try:
        os.execv(hoshikage, command)
    except OSError as exc:
        sys.stderr.write(f"hoshikage-launch: cannot run {hoshikage}: {exc.strerror}\n")
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv)
