"""`hoshikage release NAME`: ExecStopPost of hoshikage-model@NAME.service.

Idempotent and safe after a failed or half-finished start: clear the RAM-disk copy (and any
partial copy), the socket and the runtime state, then write one `released` journal record.

A model stopped by hand or to make room by count (not by memory, not by its TTL) keeps its
staged copy while RAM is plentiful (below pressure_warn) and another model runs: swapping
back is then a load from RAM, not a copy. The copy goes when its TTL runs out (the idle
watch), when a start needs the room (kept copies go first, lowest rank first), or when the
last model stops: an idle machine holds nothing in RAM.

A model to keep that has no copy yet (stopped before its copy alongside was made) gets one
from hoshikage-keep@NAME.service (`hoshikage keep NAME`, keep() below), not from its release:
the model's stop then ends when llama-server has exited, and a request that wants it back
starts it at once (which stops the copy: the model unit's Conflicts=) instead of waiting for
the stop (docs/performance.md, "At ~2 GiB").
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from hoshikage_sd import fmt, log, metrics, protocol
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.host import memory
from hoshikage_sd.manifest import Config
from hoshikage_sd.model_unit import giveway
from hoshikage_sd.policy.kept import Kept, to_release
from hoshikage_sd.runtime import Runtime
from hoshikage_sd.sd import units
from hoshikage_sd.staging import Store, log_staged
from hoshikage_sd.stats import StatsFile


def reason_for(stop_reason: str | None, result: str | None, code: str | None,
               status: str | None) -> str:
    """Why the unit went away, from the idle watch's marker and systemd's $SERVICE_RESULT."""
    if result and result != "success":
        return f"failure: {result}" + (f" ({code}={status})" if code else "")
    return stop_reason or "manual stop"


#: the states of another model unit in which this one's copy is worth keeping: one going
#: down (deactivating) is not, or two units stopped together (`systemctl stop` of both,
#: `apt remove`) would each keep its copy for the other, and the RAM disk would hold both
#: with no model up
OTHERS_STATES = ("active", "activating", "reloading")


def others_up(name: str) -> list[str] | None:
    """The other model units that are up and not going down (asked once per release), None
    when systemd cannot say."""
    try:
        return [n for n in units.active_model_units(OTHERS_STATES) if n != name]
    except HoshikageError:
        return None


def keeps_copy(config: Config, runtime: Runtime, name: str, reason: str,
               others: list[str] | None) -> bool:
    """Keep the staged copy of a model stopped by hand or by count, while RAM is plentiful
    and another model runs (the idle watch, which expires kept copies, runs only then)."""
    if not (reason in ("manual stop", "manual unload") or runtime.keep_copy(name)):
        return False
    available, total = memory()
    if total - available >= config.pressure_warn * total:
        return False
    return bool(others)


def drop_kept(runtime: Runtime, store: Store, others: list[str] | None) -> None:
    """The last model stopped (none of `others` up, or systemd cannot say): no kept copy
    outlives it, and no copy to keep still being made (an idle machine runs nothing)."""
    if others:
        return
    for other in runtime.names("kept"):
        stop_keeping(other)
        freed = store.remove(other)
        runtime.clear("kept", other)
        log.event("released", other, f"released {other}'s kept copy: no model runs; freed "
                  f"{fmt.size(freed)} of RAM disk", reason="nothing loaded", bytes_freed=freed)


#: seconds a copy to keep may take (hoshikage-keep@.service's TimeoutStartSec= is above it,
#: with the time it may wait for other models' loads: giveway.WAIT_LIMIT)
COPY_BY = 20.0


def copy_to_keep(config: Config, runtime: Runtime, store: Store, name: str) -> bool:
    """Make the RAM-disk copy of a model stopped to be kept that has none: one stopped
    before its activator took over (the launcher's start) or before its copy alongside was
    done. Its load left the source in the page cache, so this is a copy from RAM; without it
    the swap back would read the disk. Bounded by COPY_BY; True when the copy is there.
    keep() runs it, in hoshikage-keep@NAME.service."""
    model = config.models.get(name)
    if model is None or not stageable(config, runtime, name):
        return False
    from hoshikage_sd import cache

    if runtime.wanted(name):
        log.log.info("%s keeps no copy: a request for it waits for its stop", name)
        return False
    deadline = time.monotonic() + COPY_BY
    giveway.lowest_priority()  # beside the next model's load, as a copy alongside
    give_way = giveway.GiveWay(runtime, name, lambda: runtime.wanted(name) or
                               time.monotonic() > deadline)

    def in_time(done: int, total: int) -> None:
        give_way(done, total)  # waits while the model that replaced it loads
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done within {COPY_BY:.0f} s")
        if runtime.wanted(name):
            raise InterruptedError("a request for it waits for its stop")

    source = cache.source_for(config, model)
    try:
        log_staged(name, store.stage(name, source, in_time, drop_behind=False), source,
                   " (after its stop, to keep)")
    except (OSError, HoshikageError) as exc:  # TimeoutError is an OSError
        log.log.warning("%s keeps no copy: %s", name, getattr(exc, "message", exc))
        return False
    return True


def launched_only(config: Config, name: str) -> tuple[int, float] | None:
    """(pid, load seconds) of a llama-server its launcher started and served, stopped before
    an activator adopted it (its record still there, protocol.LAUNCHED_DIR): that load's
    bookkeeping (usage statistics, the load counter) is the release's. Clears the record."""
    path = protocol.launched_path(str(config.runtime_dir), name)
    launched = protocol.read_launched(str(config.runtime_dir), name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    if launched is None:
        return None
    pid, spawned, healthy = launched
    metrics.count(config.runtime_dir, "hoshikage_loads_total", model=name, path="launcher")
    try:
        StatsFile(config.state_dir).record_load(name, healthy - spawned)
    except OSError as exc:
        log.log.warning("cannot record %s's load: %s", name, exc)
    return pid, healthy - spawned


def main(config: Config, name: str) -> int:
    runtime = Runtime(config.runtime_dir)
    running = runtime.running(name)
    activity = runtime.activity(name)
    launched = launched_only(config, name) if running is None else None
    store = Store(config.ramdisk)
    result, code, status = (os.environ.get(k) for k in ("SERVICE_RESULT", "EXIT_CODE",
                                                        "EXIT_STATUS"))
    reason = reason_for(runtime.stop_reason(name), result, code, status)
    ramdisk = config.ramdisk.is_dir()
    others = others_up(name) if ramdisk else None
    # a start refused at admission (or given up waiting for room) served nothing: the copy
    # an earlier stop kept stays as it was
    refused = running is None and launched is None and runtime.admitted(name) is None \
        and runtime.kept_until(name) is not None and store.has_copy(name)
    kept = ramdisk and (refused or keeps_copy(config, runtime, name, reason, others))
    copied = kept and not store.has_copy(name)  # to be made: by hoshikage-keep@NAME
    freed = 0
    if kept and not refused:
        model = config.models.get(name)
        ttl = model.ttl if model else config.idle_ttl
        runtime.set_kept(name, (activity.last_end if activity else time.time()) + ttl)
        if copied:
            kept = stageable(config, runtime, name) and start_keeping(name)
    if not kept and ramdisk:
        freed = store.remove(name)
        runtime.clear("kept", name)
    with contextlib.suppress(FileNotFoundError):
        config.socket_path(name).unlink()
    for kind in ("running", "activity", "stop", "admitted", "keep", "ttl"):
        runtime.clear(kind, name)
    # A ticket written while this unit was still stopping must not outlive its copy.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(protocol.ticket_path(str(config.runtime_dir), name))
    pid = running.pid if running else launched[0] if launched else None
    if running is not None or launched is not None:
        try:
            StatsFile(config.state_dir).record_stop(name, activity.last_end if activity else None)
        except OSError as exc:
            log.log.warning("cannot record %s's runtime: %s", name, exc)
    if ramdisk:
        drop_kept(runtime, store, others)
    until = time.strftime("%H:%M:%S", time.localtime(runtime.kept_until(name) or 0))
    log.event("released", name,
              f"released {name}: {reason}; "
              + (f"its staged copy stays in RAM until {until} (or until the room is needed)"
                 + (f" (to be made by {units.keep_unit(name)}: its copy alongside was not "
                    "done)" if copied else "")
                 if kept else f"freed {fmt.size(freed)} of RAM disk")
              + (f"; llama-server pid was {pid}" if pid else "")
              + (f" (launched, loaded in {launched[1]:.2f} s, stopped before its activator "
                 "took over)" if launched else ""),
              pid=pid, reason=reason, bytes_freed=freed, kept=int(kept),
              copied_at_stop=int(bool(copied and kept)), service_result=result,
              exit_code=code, exit_status=status,
              load_seconds=f"{launched[1]:.3f}" if launched else None)
    return 0


def stageable(config: Config, runtime: Runtime, name: str) -> bool:
    """Does the model get a RAM-disk copy at all (`stage:`, its layers' place)?"""
    model = config.models.get(name)
    return model is not None and model.staged(runtime.fully_offloaded(name))


def start_keeping(name: str) -> bool:
    """Start hoshikage-keep@NAME.service, which makes the copy to keep; whether it was."""
    try:
        units.start_helper(units.keep_unit(name))
    except HoshikageError as exc:
        log.log.warning("%s keeps no copy: %s", name, exc.message)
        return False
    return True


#: seconds a release waits for a copy to keep it stopped to end (it ends on its SIGTERM)
STOP_KEEPING_BY = 5.0


def stop_keeping(name: str) -> None:
    """Stop hoshikage-keep@NAME.service if it runs, and wait for it to end: a copy it then
    finishes is not left behind the caller's removal of the model's copy."""
    from hoshikage_sd.sd import bus

    unit = units.keep_unit(name)
    try:
        if units.unit_state(unit)[0] not in ("active", "activating", "deactivating"):
            return
        units.stop_unit(unit)
        deadline = time.monotonic() + STOP_KEEPING_BY
        while units.unit_state(unit)[0] != "inactive" and time.monotonic() < deadline:
            time.sleep(0.02)
    except (HoshikageError, bus.BusError) as exc:
        log.log.warning("cannot stop %s: %s", unit, getattr(exc, "message", exc))


def keep(config: Config, name: str) -> int:
    """`hoshikage keep NAME`, hoshikage-keep@NAME.service: the copy to keep that the model's
    release asked for. Kept when it is made, the model's kept record is still there (the
    idle watch, a start that needed the room or the last model's release did not drop it
    meanwhile) and another model is still up. A start of the model stops this unit: the
    copy is given up, its partial files removed, and nothing of the model's is touched (its
    own start may be making its copy alongside by then)."""
    runtime, store = Runtime(config.runtime_dir), Store(config.ramdisk)
    if runtime.kept_until(name) is None or not config.ramdisk.is_dir():
        return 0

    def stopped(_signum: int, _frame: object) -> None:
        raise InterruptedError("its model starts again")

    signal.signal(signal.SIGTERM, stopped)
    try:
        made = copy_to_keep(config, runtime, store, name)
        # The copy took seconds: the models up before it may be going down now, and their
        # releases may have looked for kept copies before this one was (drop_kept). Asked
        # after the copy, so that one of the two sees the other either way.
        if made and runtime.kept_until(name) is not None and others_up(name):
            return 0
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except InterruptedError:
        return 0  # between the copy and the look at the others: the start has it now
    freed = store.remove(name) if made else 0
    runtime.clear("kept", name)
    if made:
        log.event("released", name, f"released {name}'s copy made to keep: no other model "
                  f"is up, or it was dropped meanwhile; freed {fmt.size(freed)} of RAM disk",
                  reason="nothing loaded", bytes_freed=freed)
    return 0


def make_room(config: Config, runtime: Runtime, store: Store, name: str, size: int) -> None:
    """For model `name`'s start: kept copies of stopped models go first, lowest rank first,
    when the RAM disk or the memory lacks `size` bytes (policy/kept.py)."""
    kept = runtime.names("kept")
    if not kept:
        return  # the usual case: no stats to read, nothing to free
    ranks = StatsFile(config.state_dir).ranks(w=config.weights)
    copies = [Kept(n, store.held_bytes(n), ranks.get(n, 0.0)) for n in kept]
    for gone in to_release(copies, store.free_bytes(), memory()[0], size):
        freed = store.remove(gone)
        runtime.clear("kept", gone)
        log.event("released", gone, f"released {gone}'s kept copy: room for {name}; freed "
                  f"{fmt.size(freed)} of RAM disk", reason=f"room for {name}",
                  bytes_freed=freed)
