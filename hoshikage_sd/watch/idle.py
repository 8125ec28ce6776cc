"""`hoshikage idle-watch`, run by hoshikage-idle.timer: stop model units idle past their TTL.

Idle time runs from the end of the last request with nothing in flight (the router's activity
record), or from when the model became ready if it never served one. A model with a request in
flight is never stopped, so a long streaming reply is never cut.
"""

from __future__ import annotations

import logging
import time

from hoshikage_sd import log, metrics
from hoshikage_sd.manifest import Config
from hoshikage_sd.runtime import Runtime
from hoshikage_sd.sd import units as systemd


def should_stop(idle: float | None, ttl: float) -> bool:
    return idle is not None and idle >= ttl


def main(config: Config) -> int:
    runtime = Runtime(config.runtime_dir)
    now = time.time()
    for name in systemd.active_model_units(("active",)):  # not one already stopping
        model = config.models.get(name)
        ttl = model.ttl if model else config.idle_ttl
        idle = runtime.idle_seconds(name, now)  # None: busy, or not serving yet
        if not should_stop(idle, ttl):
            continue
        assert idle is not None
        runtime.set_stop_reason(name, "idle")
        metrics.count(config.runtime_dir, "hoshikage_evictions_total", model=name,
                      reason="idle")
        log.event("idle-stop", name, f"stopping {name}: idle {idle:.0f} s >= ttl {ttl:.0f} s",
                  idle_seconds=f"{idle:.1f}", ttl_seconds=f"{ttl:.1f}")
        systemd.systemctl("stop", "--no-block", systemd.model_unit(name), check=False)
    watch_pressure(config, runtime)
    return 0


def watch_pressure(config: Config, runtime: Runtime) -> None:
    """Above pressure_warn of RAM in use, say so; above pressure_critical, stop idle models,
    lowest rank first, before the kernel has to swap or kill."""
    from hoshikage_sd.policy.admission import pressure_victims
    from hoshikage_sd.policy.residents import memory, residents

    available, total = memory()
    used = total - available
    if used < config.pressure_warn * total:
        return
    share = f"{used / total:.0%} of RAM in use"
    if used < config.pressure_critical * total:
        log.event("pressure", "", f"memory pressure: {share} (warn at "
                  f"{config.pressure_warn:.0%})", level=logging.WARNING, used=used, total=total)
        return
    up = set(systemd.active_model_units(("active",)))  # not those already stopping
    victims = pressure_victims(used, total, config.pressure_critical,
                               [r for r in residents(config, runtime) if r.name in up],
                               config.evict_floor)
    log.event("pressure", "", f"memory pressure: {share} (critical at "
              f"{config.pressure_critical:.0%}): stopping "
              + (", ".join(v.name for v in victims) or "nothing idle"),
              level=logging.ERROR, used=used, total=total,
              victims=",".join(v.name for v in victims) or None)
    for victim in victims:
        runtime.set_stop_reason(victim.name, "memory pressure")
        metrics.count(config.runtime_dir, "hoshikage_evictions_total", model=victim.name,
                      reason="pressure")
        systemd.systemctl("stop", "--no-block", systemd.model_unit(victim.name), check=False)
