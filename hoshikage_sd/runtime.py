"""Runtime state shared by the router, the activator, the idle watch and `status`.

Small JSON files under /run/hoshikage, each replaced atomically (temp + rename), so a reader
never sees half a write and a crashed writer leaves the previous state intact. A record of the
wrong shape (another version, a hand edit) is reported and read as no record: never a crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hoshikage_sd import protocol, statefile
from hoshikage_sd.files import write_atomic
from hoshikage_sd.host import pid_exists

if TYPE_CHECKING:
    from hoshikage_sd.manifest import Model

T = TypeVar("T")


@dataclass(frozen=True)
class Activity:
    """Written by the router: requests in flight and when the last one ended (wall clock).
    It writes it once per request, at its end; while one is in flight it holds the model's
    busy lock instead (Runtime.busy), and writes in_flight > 0 only where it cannot."""

    in_flight: int
    last_end: float
    router_pid: int = 0
    last_end_boot: float = 0.0  # the same moment on boot_clock() (0: an older writer's)


@dataclass(frozen=True)
class Running:
    """Written by the activator once llama-server runs."""

    pid: int
    staged: str
    started: float
    started_boot: float = 0.0  # the same moment on boot_clock() (0: an older writer's)
    settings: str = ""  # manifest.Model.settings when it started ("": unknown)

    @classmethod
    def now(cls, pid: int, staged: str | Path, model: Model | None = None,
            healthy: float | None = None) -> Running:
        """A llama-server serving since `healthy` (its /health 200 on the monotonic clock:
        the launcher's, for a start it adopts), else from now on; `model`'s settings."""
        ago = time.monotonic() - healthy if healthy is not None else 0.0
        return cls(pid, str(staged), time.time() - ago, boot_clock() - ago,
                   model.settings if model is not None else "")


@dataclass(frozen=True)
class _Reason:
    reason: str


@dataclass(frozen=True)
class _Admitted:
    estimate: int


@dataclass(frozen=True)
class _Estimate:
    key: list[Any]
    bytes: int


@dataclass(frozen=True)
class _Devices:
    key: list[Any]          # what it was computed from (estimate_key, the devices' listing)
    use: dict[str, int]     # bytes the model takes on each device
    total: dict[str, int]   # each listed device's memory
    full: bool = False      # every layer on a device


@dataclass(frozen=True)
class _Kept:
    until: float
    until_boot: float = 0.0


@dataclass(frozen=True)
class _Keep:
    pass


@dataclass(frozen=True)
class _Ttl:
    ttl: float  # seconds; below zero: until stopped


@dataclass(frozen=True)
class _Caching:
    done: int
    total: int


def boot_clock() -> float:
    """CLOCK_BOOTTIME: seconds since boot, a suspend's included, which no step of the wall
    clock moves (date -s, NTP): what idle times and TTLs are measured on. The records keep
    wall times too, for people (ago, since)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def idle_seconds(now: float, ready_since: float, activity: Activity | None,
                 router_alive: bool = True) -> float | None:
    """Seconds a model has been idle, or None while a request is in flight: from the end of
    the last request with nothing in flight, or from when it became ready if it never served
    one. A router that died mid-request cannot finish it, so its in-flight count no longer
    counts."""
    if activity is not None and activity.in_flight > 0 and router_alive:
        return None
    last = max(ready_since, activity.last_end if activity else 0.0)
    return max(0.0, now - last)


class Runtime:
    def __init__(self, runtime_dir: Path) -> None:
        self.dir = runtime_dir

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """A machine-wide lock (flock on runtime_dir/NAME.lock), released on exit or crash."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _file(self, kind: str, name: str) -> Path:
        return self.dir / kind / f"{name}.json"

    def _read(self, kind: str, name: str, cls: type[T]) -> T | None:
        """The record, or None: not there, or of the wrong shape (reported)."""
        path = self._file(kind, name)
        data, problem = statefile.read_json(path)
        if data is None and problem is None:
            return None
        value, problem = (None, problem) if problem else statefile.record(cls, data)
        if value is not None and (getattr(value, "pid", 1) <= 0 or
                                  getattr(value, "in_flight", 0) < 0):
            value, problem = None, "a pid or a count below zero"
        if problem is not None:
            statefile.report(path, f"{path}: {problem} (ignored)")
        return value

    def _write(self, kind: str, name: str, data: dict[str, Any]) -> None:
        write_atomic(self._file(kind, name), json.dumps(data))

    def clear(self, kind: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._file(kind, name).unlink()

    def names(self, kind: str) -> list[str]:
        """The models that have a record of this kind."""
        with contextlib.suppress(FileNotFoundError):
            return sorted(p.stem for p in (self.dir / kind).glob("*.json"))
        return []

    def kept_until(self, name: str) -> float | None:
        """A stopped model's staged copy kept in RAM: until when (wall clock, as the boot
        clock counts from now: a step of the wall clock moves it too), else None."""
        kept = self._read("kept", name, _Kept)
        if kept is None:
            return None
        return time.time() + kept.until_boot - boot_clock() if kept.until_boot else kept.until

    def set_kept(self, name: str, until: float) -> None:
        self._write("kept", name, {"until": until,
                                   "until_boot": boot_clock() + until - time.time()})

    def keep_copy(self, name: str) -> bool:
        """Did whoever stopped the model ask to keep its staged copy (a stop to make room by
        count, not by memory)?"""
        return self._read("keep", name, _Keep) is not None

    def set_keep_copy(self, name: str) -> None:
        self._write("keep", name, {})

    def wanted(self, name: str) -> bool:
        """Is a request waiting for this model while its unit still stops? Then the copy to
        keep that its release asks hoshikage-keep@ for (release.copy_to_keep) is not made:
        the model starts again at once, and its source is in the page cache anyway."""
        return self._file("wanted", name).exists()

    def set_wanted(self, name: str, wanted: bool = True) -> None:
        path = self._file("wanted", name)
        if wanted:  # a flag, not a record: no write-and-rename on the request's path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def recorded(self) -> list[str]:
        """Models with a running or an admitted record: what the units say they hold."""
        names: set[str] = set()
        for kind in ("running", "admitted"):
            with contextlib.suppress(FileNotFoundError):
                names.update(p.stem for p in (self.dir / kind).glob("*.json"))
        return sorted(names)

    def activity(self, name: str) -> Activity | None:
        return self._read("activity", name, Activity)

    def busy_path(self, name: str) -> Path:
        return self.dir / "busy" / f"{name}.lock"

    def busy(self, name: str) -> bool:
        """Is a request to the model in flight? The router holds a shared flock on its busy
        file while one is, which costs it no write per request, and which the kernel drops
        if the router dies."""
        try:
            fd = os.open(self.busy_path(name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)  # and with it the lock, if this got it
        return False

    def idle_seconds(self, name: str, now: float) -> float | None:
        """How long the model has been idle (the idle watch, admission and `status` all ask
        this), or None while it is busy: a request in flight, or not serving yet. A model
        the launcher started serves before its activator writes the running record (after
        the first answer): a request it answered (its activity record) says so too."""
        running = self.serving_record(name)
        activity = self.activity(name)
        if (running is None and activity is None) or self.busy(name):
            return None
        alive = activity is not None and pid_exists(activity.router_pid)
        if (running is None or running.started_boot) and \
                (activity is None or activity.last_end_boot):
            # on the boot clock; `now`'s distance from the wall clock's now is a caller's
            # look ahead (a test's), kept
            on_boot = None if activity is None else replace(
                activity, last_end=activity.last_end_boot)
            return idle_seconds(boot_clock() + now - time.time(),
                                running.started_boot if running is not None else 0.0,
                                on_boot, alive)
        since = running.started if running is not None else 0.0
        return idle_seconds(now, since, activity, alive)

    def activity_path(self, name: str) -> Path:
        return self._file("activity", name)

    def set_activity(self, name: str, activity: Activity) -> None:
        self._write("activity", name, asdict(activity))

    def running(self, name: str) -> Running | None:
        return self._read("running", name, Running)

    def serving(self, name: str) -> bool:
        """Is the model loaded: its llama-server's record is there and that process lives?
        (The record outlives a router restart and goes with the unit's ExecStopPost.)"""
        running = self.serving_record(name)
        return running is not None and pid_exists(running.pid)

    def serving_record(self, name: str) -> Running | None:
        """The running record, else one made of the launcher's: its llama-server serves
        from /health 200 on, before the activator adopts it and writes the running record
        (~0.2 s later; seconds later while its first answer streams: launch.py)."""
        running = self.running(name)
        if running is not None:
            return running
        launched = protocol.read_launched(str(self.dir), name)
        if launched is None or not pid_exists(launched[0]):
            return None
        pid, _spawned, healthy = launched  # on the monotonic clock
        ago = time.monotonic() - healthy
        return Running(pid, "", time.time() - ago, boot_clock() - ago)

    def set_running(self, name: str, running: Running) -> None:
        self._write("running", name, asdict(running))

    def error_path(self, name: str) -> Path:
        """The error record's file (`hoshikage load` tells this start's record by its
        mtime from an earlier one's)."""
        return self._file("error", name)

    def error(self, name: str) -> str | None:
        record = self._read("error", name, _Reason)
        return record.reason if record else None

    def set_error(self, name: str, reason: str) -> None:
        self._write("error", name, {"reason": reason})

    def admitted(self, name: str) -> int | None:
        """The estimate a starting model was admitted with (it holds or will hold that)."""
        record = self._read(protocol.ADMITTED_DIR, name, _Admitted)
        return record.estimate if record else None

    def set_admitted(self, name: str, estimate: int) -> None:
        protocol.write_admitted(str(self.dir), name, estimate)

    def estimate(self, name: str) -> tuple[list[Any], int] | None:
        """A remembered memory estimate: (what it was computed from, bytes)."""
        record = self._read("estimate", name, _Estimate)
        return (record.key, record.bytes) if record else None

    def set_estimate(self, name: str, key: list[Any], value: int) -> None:
        self._write("estimate", name, {"key": key, "bytes": value})

    def devices_path(self, name: str) -> Path:
        return self._file("devices", name)

    def devices(self, name: str) -> tuple[list[Any], dict[str, int], dict[str, int]] | None:
        """The model's remembered use of GPU devices (admit/needs.device_use): (what it
        was computed from, bytes by device, each device's total)."""
        record = self._read("devices", name, _Devices)
        return (record.key, record.use, record.total) if record else None

    def fully_offloaded(self, name: str) -> bool:
        """Were all the model's layers on GPU devices when its unit last judged it?"""
        record = self._read("devices", name, _Devices)
        return bool(record and record.full)

    def set_devices(self, name: str, key: list[Any], use: dict[str, int],
                    total: dict[str, int], full: bool = False) -> None:
        self._write("devices", name, {"key": key, "use": use, "total": total, "full": full})

    def remembered_estimate(self, model: Model) -> tuple[os.stat_result, int] | None:
        """The estimate remembered for the model's file as it is now (and that file's stat),
        if one was computed for it (admit/needs.estimate); never reads the header."""
        try:
            st = model.path.stat()
            key = estimate_key(model, st)
        except OSError:
            return None
        cached = self.estimate(model.name)
        return (st, cached[1]) if cached is not None and cached[0] == key else None

    def caching(self, name: str) -> tuple[int, int] | None:
        """A copy to the SSD cache under way: (bytes done, bytes total)."""
        record = self._read("caching", name, _Caching)
        return (record.done, record.total) if record else None

    def set_caching(self, name: str, done: int, total: int) -> None:
        self._write("caching", name, {"done": done, "total": total})

    def ttl(self, name: str) -> float | None:
        """The TTL a request set for this load (Ollama's keep_alive; the router writes it,
        the unit's release clears it): seconds, math.inf for "until stopped", None: the
        manifest's."""
        record = self._read("ttl", name, _Ttl)
        if record is None:
            return None
        return float("inf") if record.ttl < 0 else record.ttl

    def set_ttl(self, name: str, seconds: float) -> None:
        self._write("ttl", name, {"ttl": -1 if seconds == float("inf") else seconds})

    def stop_reason(self, name: str) -> str | None:
        record = self._read("stop", name, _Reason)
        return record.reason if record else None

    def set_stop_reason(self, name: str, reason: str) -> None:
        self._write("stop", name, {"reason": reason})


def estimate_key(model: Model, st: os.stat_result) -> list[Any]:
    """What a remembered estimate was computed from: the files as they were (`st`: the
    first's), and the arguments. OSError when another of its files is gone."""
    others = [[s.st_size, s.st_mtime_ns] for s in
              (p.stat() for p in (*model.shards, *((model.mmproj,) if model.mmproj else ())))]
    return [str(model.path), st.st_size, st.st_mtime_ns, list(model.effective_args), *others]
