"""`hoshikage idle-watch`, run by hoshikage-idle.timer: stop model units idle past their TTL,
within about a second of it (LOOKAHEAD), though the timer ticks once a minute.

Idle time runs from the end of the last request with nothing in flight (the router's activity
record), or from when the model became ready if it never served one. A model with a request in
flight is never stopped, so a long streaming reply is never cut. A pinned model (`pinned:
true`, or the panel's pin in names.json) is never stopped here: a pin holds against the TTL
as against eviction; `hoshikage unload` or the HTTP unload stops it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from hoshikage_sd import fmt, lastgood, log, metrics
from hoshikage_sd.manifest import Config
from hoshikage_sd.runtime import Runtime
from hoshikage_sd.sd import units
from hoshikage_sd.staging import Store

if TYPE_CHECKING:
    from hoshikage_sd.policy.pressure import Decision, Reading


def should_stop(idle: float | None, ttl: float) -> bool:
    return idle is not None and idle >= ttl


#: hoshikage-idle.timer fires once a minute; a model due before the next tick is waited for
#: here, so a 30 s TTL stops after ~30 s, not after 60-90 s
LOOKAHEAD = 55.0
#: never sweep more often than this while waiting
MIN_WAIT = 0.5
#: nor less often: a model taken out of the manifest meanwhile goes within this
RECHECK = 5.0


def main(config: Config) -> int:
    runtime = Runtime(config.runtime_dir)
    until = time.monotonic() + LOOKAHEAD
    while (wait := sweep(config, runtime)) is not None and time.monotonic() + wait < until:
        time.sleep(min(max(wait, MIN_WAIT), RECHECK))
        # the manifest as the router kept it since, if it is current: a model taken out of
        # it (or a TTL shortened) meanwhile counts at this sweep, not the next run's
        config = lastgood.load(config.source) or config
    watch_pressure(config, runtime)
    return 0


def sweep(config: Config, runtime: Runtime) -> float | None:
    """Stop the models idle past their TTL; seconds until the next one may be due (a busy
    one: its TTL from now at the soonest), or None when no model is up."""
    now = time.time()
    soonest: float | None = None
    for name in units.active_model_units(("active",)):  # not one already stopping
        model = config.models.get(name)
        if model is not None and model.pinned:
            continue  # pinned (manifest or names.json): no TTL, not even a keep_alive's
        # one the manifest no longer has (removed, renamed): nothing can ask for it, nor
        # show or unload it by name; it goes once no request is in flight
        ttl = 0.0 if model is None else runtime.ttl(name) or model.ttl
        idle = runtime.idle_seconds(name, now)  # None: busy, or not serving yet
        if idle is None and not runtime.busy(name):
            idle = unrecorded_idle(runtime, name)
        if not should_stop(idle, ttl):
            due = ttl - (idle or 0.0)
            soonest = max(due, MIN_WAIT) if soonest is None else min(soonest, max(due, MIN_WAIT))
            continue
        assert idle is not None
        reason = "idle" if model is not None else "removed"
        runtime.set_stop_reason(name, "idle" if model is not None else "not in the manifest")
        metrics.count(config.runtime_dir, "hoshikage_evictions_total", model=name,
                      reason=reason)
        log.event("idle-stop", name, f"stopping {name}: idle {idle:.0f} s >= ttl {ttl:.0f} s"
                  if model is not None else f"stopping {name}: no longer in the manifest",
                  idle_seconds=f"{idle:.1f}", ttl_seconds=f"{ttl:.1f}")
        units.systemctl("stop", "--no-block", units.model_unit(name), check=False)
    expire_kept(config, runtime, now)
    return soonest


def unrecorded_idle(runtime: Runtime, name: str) -> float | None:
    """An active unit whose records are gone (deleted by hand under /run): idle since its
    unit became active, as systemd says, so that its TTL still stops it. None otherwise."""
    if runtime.serving_record(name) is not None or runtime.activity(name) is not None:
        return None
    shown = units.show(units.model_unit(name), "ActiveEnterTimestampMonotonic")
    since = shown.get("ActiveEnterTimestampMonotonic", "")
    return max(0.0, time.monotonic() - int(since) / 1e6) if since.isdigit() and int(since) \
        else None


def expire_kept(config: Config, runtime: Runtime, now: float) -> None:
    """Kept staged copies of stopped models (model_unit/release.py) whose TTL ran out."""
    store = Store(config.ramdisk)
    for name in runtime.names("kept"):
        until = runtime.kept_until(name)
        if until is not None and until > now:
            continue
        try:
            freed = store.remove(name)
        except OSError as exc:  # the rest of the watch (other copies, pressure) goes on
            log.log.error("cannot release %s's kept copy: %s (hoshikage-idle.service needs "
                          "ReadWritePaths=%s: hoshikage check)", name, exc, config.ramdisk)
            continue
        runtime.clear("kept", name)
        log.event("released", name, f"released {name}'s kept copy: its TTL ran out; freed "
                  f"{fmt.size(freed)} of RAM disk", reason="idle", bytes_freed=freed)


def watch_pressure(config: Config, runtime: Runtime) -> None:
    """Above pressure_warn of RAM in use, say so; above pressure_critical, stop idle models,
    lowest rank first, before the kernel has to swap or kill: the memory and the models up
    read once, policy/pressure.decide, its decision carried out."""
    from hoshikage_sd.policy import pressure

    limits = pressure.Thresholds(config.pressure_warn, config.pressure_critical,
                                 config.evict_floor)
    reading = read_pressure(config, runtime)
    relieve(config, runtime, reading, pressure.decide(reading, limits))


def read_pressure(config: Config, runtime: Runtime) -> Reading:
    """The memory in use and the models up, not those already stopping."""
    from hoshikage_sd.admit.gather import residents
    from hoshikage_sd.host import memory
    from hoshikage_sd.policy.pressure import Reading

    available, total = memory()
    up = set(units.active_model_units(("active",)))
    return Reading(total - available, total,
                   tuple(r for r in residents(config, runtime) if r.name in up))


def relieve(config: Config, runtime: Runtime, reading: Reading, decision: Decision) -> None:
    """The pressure decision carried out: its journal record, the victims stopped."""
    from hoshikage_sd.policy.pressure import Level

    if decision.level is Level.CALM:
        return
    victims = ",".join(v.name for v in decision.victims) or None
    log.event("pressure", "", decision.message,
              level=logging.WARNING if decision.level is Level.WARN else logging.ERROR,
              used=reading.used, total=reading.total, victims=victims)
    for victim in decision.victims:
        runtime.set_stop_reason(victim.name, "memory pressure")
        metrics.count(config.runtime_dir, "hoshikage_evictions_total", model=victim.name,
                      reason="pressure")
        units.systemctl("stop", "--no-block", units.model_unit(victim.name), check=False)
