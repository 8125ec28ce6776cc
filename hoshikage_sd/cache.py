"""The SSD cache tier: `hoshikage cache-sync` (hoshikage-cache.service) copies the models
whose rank earns a place from slow disks to the cache, and expires unused ones to make room.

Copies go through the same Store as staging (temp name + rename, identity record, lock), so a
half-copied file is never used and the source is never written. Staging prefers a verified
cache copy over the slow original. An encrypted model's copy here stays ciphertext
(Store(plaintext=False)): its plaintext is only ever on the RAM disk.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

from hoshikage_sd import fmt, log
from hoshikage_sd.manifest import Config, Files, Model
from hoshikage_sd.policy.cacheplan import Action, CacheState, Holding, cache_state, plan_cache
from hoshikage_sd.runtime import Runtime
from hoshikage_sd.sd import daemon, units
from hoshikage_sd.staging import Store
from hoshikage_sd.stats import StatsFile

CACHE_UNIT = "hoshikage-cache.service"


def cached_copy(config: Config, model: Model) -> Files | None:
    """The cache's verified copy of the model, if there is one."""
    if config.cache is None:
        return None
    return Store(config.cache.dir, plaintext=False).current(model.name, Files.of(model))


def source_for(config: Config, model: Model) -> Files:
    """Where staging reads from: the SSD cache copy when it is current, else the source."""
    return cached_copy(config, model) or Files.of(model)


#: where hoshikage-cache.service cannot keep copies: its PrivateTmp=yes, ProtectSystem=full
UNIT_CANNOT_USE = (
    *((Path(p), f"is in {p}, which the cache unit has its own of") for p in ("/tmp",
                                                                           "/var/tmp")),
    *((Path(p), "is read-only to the cache unit (ProtectSystem=full)")
      for p in ("/usr", "/etc", "/boot")))


def check_problems(config: Config) -> list[str]:
    """`hoshikage check`'s word on the cache's directory as hoshikage-cache.service (user
    hoshikage, ProtectSystem=full, PrivateTmp=yes) finds it: every run fails otherwise."""
    if config.cache is None:
        return []
    directory = config.cache.dir
    where = f"cache: dir {directory}"
    made = f"install -d -o hoshikage -g hoshikage {directory}"
    if not directory.exists():
        return [f"{where} does not exist: make it on the SSD ({made})"]
    if not directory.is_dir():
        return [f"{where} is not a directory"]
    real = directory.resolve()
    for inside, why in ((config.ramdisk, "is on the RAM disk: the cache belongs on an SSD"),
                        *UNIT_CANNOT_USE):
        if real.is_relative_to(inside):
            return [f"{where} {why}"]
    from hoshikage_sd.commands import access

    user = access.service_user()
    refused = access.refusal(user, real, 3) if user is not None else None
    return [f"{where}: {refused} ({made}, or chown "
            f"{user.name if user else 'hoshikage'} it)"] if refused else []


def on_cache_disk(config: Config, model: Model) -> bool:
    """Is the source already on the cache's disk (an SSD source directory)?"""
    assert config.cache is not None
    try:
        return os.stat(model.path).st_dev == os.stat(config.cache.dir).st_dev
    except OSError:
        return False


def wants_sync(config: Config, model: Model) -> bool:
    return (config.cache is not None and cached_copy(config, model) is None
            and not on_cache_disk(config, model))


def trigger() -> None:
    """Start the cache sync in the background: never blocks the request that asked (the
    caller logs a refusal)."""
    units.start_helper(CACHE_UNIT)


def state(config: Config, busy: set[str], now: float) -> CacheState:
    assert config.cache is not None
    models = []
    for model in config.models.values():
        if not model.path.exists():
            continue
        size = Files.of(model).size()
        models.append(Holding(model.name, size, cached_copy(config, model) is not None,
                              on_cache_disk(config, model), model.pinned))
    st = os.statvfs(config.cache.dir)
    return cache_state(models, StatsFile(config.state_dir).read(), busy,
                       st.f_bavail * st.f_frsize, now, config.weights)


def sync(config: Config) -> int:
    if config.cache is None:
        logging.getLogger("hoshikage").info("no cache: configured in the manifest")
        return 0
    if not config.cache.dir.is_dir():
        log.log.error("cache directory %s does not exist; create it on the SSD", config.cache.dir)
        return 1
    runtime = Runtime(config.runtime_dir)
    store = Store(config.cache.dir, plaintext=False)
    failed = 0
    # a stop mid-copy (a shutdown, apt remove): the copy's partial file goes (Store.stage)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))
    with runtime.locked("cache"):
        busy = set(units.active_model_units())
        now = time.time()
        decisions = plan_cache(state(config, busy, now), config.cache, now)
        for d in decisions:
            model = config.models[d.name]
            if d.action is Action.EXPIRE:
                freed = store.remove(d.name)
                message = f"expired {d.name} from the cache ({fmt.size(freed)}): {d.reason}"
                log.event("cache-expire", d.name,
                          fmt.paint(message, "31", fmt.use_colour(sys.stderr)),
                          level=logging.WARNING,
                          rank=f"{d.rank:.1f}", bytes_freed=freed)
            elif d.action is Action.COPY:
                failed += not copy(config, runtime, store, model, d.rank)
            elif d.action is Action.SKIP:
                log.log.info("not caching %s (rank %.1f): %s", d.name, d.rank, d.reason)
    return 1 if failed else 0


def copy(config: Config, runtime: Runtime, store: Store, model: Model, rank: float) -> bool:
    """Copy the model to the cache; False (the failure recorded) when it cannot be: the
    run goes on with the other models."""
    last, quarter = 0.0, 0

    def progress(done: int, total: int) -> None:
        nonlocal last, quarter
        if total and time.monotonic() - last >= 1.0:
            last = time.monotonic()
            runtime.set_caching(model.name, done, total)
            daemon.notify(STATUS=f"caching {model.name}: {100 * done // total}%")
        if total and done * 4 // total > quarter and done < total:
            quarter = done * 4 // total  # a journal line at 25, 50 and 75%
            log.log.info("caching %s: %s of %s (%d%%)", model.name, fmt.size(done), fmt.size(total),
                         100 * done // total)

    log.event("cache-copy", model.name, f"copying {model.name} (rank {rank:.1f}) from "
              f"{model.path} to the cache {config.cache.dir if config.cache else ''}",
              rank=f"{rank:.1f}", source=model.path, phase="start")
    try:
        staged = store.stage(model.name, Files.of(model), progress)
    except OSError as exc:  # the cache's directory read-only or full, the source gone
        why = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        hint = " (the cache's directory must be writable by user hoshikage: hoshikage " \
            "check)" if isinstance(exc, PermissionError) else ""
        log.event("cache-copy", model.name, f"cannot cache {model.name}: {why}{hint}",
                  level=logging.ERROR, rank=f"{rank:.1f}", phase="failed")
        return False
    finally:
        runtime.clear("caching", model.name)
    rate = staged.size / max(staged.seconds, 1e-6)
    log.event("cache-copy", model.name, f"cached {model.name}: {fmt.size(staged.size)} in "
              f"{staged.seconds:.1f} s ({fmt.size(rate)}/s)", rank=f"{rank:.1f}",
              bytes=staged.size, seconds=f"{staged.seconds:.3f}", phase="done")
    return True
