"""The router's bookkeeping of requests in flight, on the request path: each model's busy
lock while requests to it are in flight, and its activity record written once a request
ends (what the idle watch and admission read through runtime.Runtime)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time

from hoshikage_sd.runtime import Activity, Runtime, boot_clock

logger = logging.getLogger("hoshikage.router")


class ActivityRecords:
    """Writes Runtime's activity records (what Runtime.activity reads) on the request path:
    the same file, temp + rename, from precomputed paths and without dataclasses.asdict and
    pathlib (together ~4 times the cost of the write itself, measured)."""

    def __init__(self, runtime: Runtime, pid: int) -> None:
        self.runtime = runtime
        self.pid = pid
        self.paths: dict[str, tuple[str, str]] = {}

    def write(self, name: str, in_flight: int, last_end: float) -> None:
        paths = self.paths.get(name)
        if paths is None:
            final = str(self.runtime.activity_path(name))
            paths = self.paths[name] = (f"{final}.tmp-{self.pid}", final)
        boot = boot_clock() - (time.time() - last_end)  # last_end is now, as a rule
        data = json.dumps({"in_flight": in_flight, "last_end": last_end,
                           "router_pid": self.pid, "last_end_boot": boot}).encode()
        try:
            fd = os.open(paths[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the first record: its directory too
            self.runtime.set_activity(name, Activity(in_flight, last_end, self.pid, boot))
            return
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(*paths)


class BusyLocks:
    """A shared flock on each model's busy file (Runtime.busy_path) while requests to it are
    in flight: two system calls per busy period instead of a record written at its start."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.fds: dict[str, int] = {}

    def hold(self, name: str) -> bool:
        try:
            fd = self.fds.get(name)
            if fd is None:
                path = self.runtime.busy_path(name)
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = self.fds[name] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                              0o644)
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            logger.debug("no busy lock for %s: %s", name, exc)
            return False
        return True

    def release(self, name: str) -> None:
        fd = self.fds.get(name)
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
