"""llama-server as the activator holds it: a child by PID (one it spawned, or one the
launcher spawned before it exec'ed into the activator), how it was adopted, and its exit as a
person reads it."""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

from hoshikage_sd.manifest import Config
from hoshikage_sd.sd import units


def exit_reason(code: int | None, program: str = "llama-server") -> str:
    """The server's exit as a person reads it: a signal by name, and why SIGILL happens.
    `program`: what it is ("llama-server", or a command backend's program)."""
    if code is None or code >= 0:
        return f"{program} exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if -code == signal.SIGILL:
        return (f"{program} died of {name}: its build uses CPU instructions this machine "
                "lacks (e.g. AVX-512 or AVX-VNNI)")
    return f"{program} was killed by {name}"


def crash_hint(config: Config, name: str, code: int | None) -> str:
    """What to do about llama-server's exit `code`."""
    if code == -signal.SIGILL:
        return (f"use a llama-server built for this CPU ('llama_server:' in the manifest; "
                f"{config.llama_server} is the one configured)")
    return f"journalctl -u {units.shell_unit(name)}"


class Stopped(Exception):
    """SIGTERM arrived before llama-server was running."""


@dataclass(frozen=True)
class Adopted:
    """llama-server as hoshikage-launch started it: its PID, when (CLOCK_MONOTONIC), and
    when its /health first said 200 if the launcher saw that."""

    pid: int
    spawned: float
    healthy: float | None = None


class Child:
    """llama-server, by PID: one this process spawned, or one the launcher spawned before it
    exec'ed into this (an adopted child is still our child; subprocess cannot take it)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
