"""The one model of state (gather()'s facts): every model, the router, the RAM disk, memory,
the GPU devices, copies to the SSD cache, the RPC workers and the metrics' counters. What
`status --json` prints, and what `status`, `ps` and the web panel show."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from hoshikage_sd.errors import HoshikageError, die
from hoshikage_sd.host import memory
from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.runtime import Runtime
from hoshikage_sd.sd import units
from hoshikage_sd.staging import Store


@dataclass(frozen=True)
class ModelStatus:
    """One manifest model as `hoshikage status` shows it (null where it does not apply)."""

    name: str
    state: str                      # the unit's ActiveState
    pid: int | None                 # the unit's main process (the activator)
    llama_server_pid: int | None    # from the runtime record
    memory_bytes: int | None        # the unit's cgroup (MemoryCurrent): staged copy included
    resident_bytes: int | None      # llama-server's RSS
    staged_bytes: int | None        # its copy on the RAM disk
    last_request_end: float | None  # Unix time
    idle_seconds: float | None      # null while a request is in flight or not loaded
    busy: bool                      # loaded with a request in flight
    ttl_seconds: float
    ttl_left_seconds: float | None  # until the idle watch stops it; null: busy or not loaded
    device_bytes: dict[str, int] | None = None  # estimated, on each GPU device; null: none
    # What the web panel shows besides (router/panel): one model of state for both.
    phase: str = "not-loaded"       # phase_of(): what a person reads in the state column
    error: str | None = None        # why its last start failed (the activator's record)
    copying_bytes: int | None = None  # of a RAM-disk copy being made now (staging)
    in_flight: int | None = None    # requests in flight (the router's count; null: unknown)
    aliases: list[str] = dataclasses.field(default_factory=list)
    tags: list[str] = dataclasses.field(default_factory=list)
    pinned: bool = False
    preload: bool = False           # started at boot (manifest; router/preload.py)
    rank: float = 0.0               # policy/rank over the usage file (eviction order)
    estimate_bytes: int | None = None  # what admission counts it as (docs/memory.md)
    source_bytes: int | None = None    # its files on disk
    cached: bool = False            # a current copy in the SSD cache (cache: dir:)
    # What `hoshikage status`, `ps` and `load` show besides (issue 23).
    status_text: str | None = None  # the unit's STATUS= (staging progress, the failure)
    since: float | None = None      # Unix time llama-server started serving it
    #: serving with what the manifest said when it started, changed since (path, args, env)
    outdated: bool = False


#: the phases phase_of() names, in the order a start goes through them
PHASES = ("not-loaded", "kept", "staging", "loading", "serving", "stopping", "failed")


def phase_of(state: str, serving: bool, copying: bool, staged: bool,
             error: str | None) -> str:
    """A model's phase from its unit's ActiveState and the runtime's facts: staging while
    its unit starts and a RAM-disk copy is being written, loading while it starts without
    one, kept when it is not loaded but its copy stays on the RAM disk."""
    if state == "failed" or (state == "inactive" and error is not None):
        return "failed"
    if state == "deactivating":
        return "stopping"
    if state in ("activating", "reloading") or (state == "active" and not serving):
        return "staging" if copying else "loading"
    if state == "active":
        return "serving"
    return "kept" if staged else "not-loaded"


def model_status(config: Config, model: Model, runtime: Runtime, active: set[str],
                 now: float, in_flight: Mapping[str, int] | None = None,
                 failed: Collection[str] = (), used: Mapping[str, float] | None = None
                 ) -> ModelStatus:
    """`failed`: the model units systemd has in "failed" (one without a record of why:
    its activator killed, by a memory limit say); `used`: when each model's last request
    ended, from the usage file, for a model stopped since (its activity record went)."""
    import psutil

    unit = units.model_unit(model.name)
    props = unit_props(unit) if model.name in active else {}
    state = props.get("ActiveState", "inactive")
    if model.name in failed:
        state = "failed"
    elif not props and runtime.error(model.name) is not None:
        # not up: failed (a unit in "failed" is listed as loaded, so not here) or never
        # started since its failure was recorded
        state = units.unit_state(unit)[0] or "inactive"
    store = Store(config.ramdisk)
    size = store.copy_size(model.name)
    copying = copying_bytes(config, model.name)
    mem = props.get("MemoryCurrent", "")
    pid = props.get("MainPID", "")
    running = runtime.serving_record(model.name)
    activity = runtime.activity(model.name)
    idle = left = rss = None
    serving = running is not None and state == "active"
    if serving and running is not None:
        idle = runtime.idle_seconds(model.name, now)
        # a pinned model has no TTL: the idle watch never stops it
        ttl = runtime.ttl(model.name) or model.ttl  # a request's keep_alive, as the watch
        left = None if idle is None or model.pinned or math.isinf(ttl) else max(0.0, ttl - idle)
        with contextlib.suppress(psutil.Error):
            rss = psutil.Process(running.pid).memory_info().rss
    error = runtime.error(model.name) if state in ("failed", "inactive") else None
    if state == "failed" and error is None:  # before the activator could say why
        from hoshikage_sd.sd import failure

        error = failure.why_failed(unit)
    return ModelStatus(
        model.name, state, int(pid) if pid.isdigit() and pid != "0" else None,
        running.pid if serving and running else None,
        int(mem) if mem.isdigit() else None, rss, size,
        activity.last_end if activity else (used or {}).get(model.name), idle,
        serving and idle is None,
        model.ttl, left,
        on_devices(runtime, model.name) if state not in ("inactive", "failed") else None,
        phase=phase_of(state, serving, copying is not None, size is not None, error),
        error=error, copying_bytes=copying,
        in_flight=None if in_flight is None else in_flight.get(model.name, 0),
        aliases=list(model.aliases), tags=list(model.tags), pinned=model.pinned,
        preload=model.preload,
        status_text=props.get("StatusText") or None,
        since=running.started if serving and running else None,
        outdated=bool(serving and running and running.settings
                      and running.settings != model.settings))


#: what status shows of a model unit that is up, and the interface of each
UNIT_PROPS = {"ActiveState": "org.freedesktop.systemd1.Unit",
              "MainPID": "org.freedesktop.systemd1.Service",
              "MemoryCurrent": "org.freedesktop.systemd1.Service",
              "StatusText": "org.freedesktop.systemd1.Service"}


def unit_props(unit: str) -> dict[str, str]:
    """A model unit's UNIT_PROPS as `systemctl show` prints them: over D-Bus (no process
    per loaded model on each of the panel's polls), else from systemctl."""
    from hoshikage_sd.sd import bus

    try:
        return bus.unit_properties(unit, UNIT_PROPS)
    except (bus.BusUnavailable, bus.BusError):
        return units.show(unit, *UNIT_PROPS)


def copying_bytes(config: Config, name: str) -> int | None:
    """Bytes written so far of the model's RAM-disk copy being made (staging.Store's
    temporaries), None when none is."""
    temporaries = list(config.ramdisk.glob(f".{name}.gguf.tmp-*"))
    if not temporaries:
        return None
    return sum(Store.size_of(t) for t in temporaries)


def on_devices(runtime: Runtime, name: str) -> dict[str, int] | None:
    """What the model holds on each GPU device (its unit's estimate); None: none."""
    record = runtime.devices(name)
    if record is None or not record[1]:
        return None
    return dict(record[1])


def devices_in_use(runtime: Runtime, names: list[str]) -> list[dict[str, Any]]:
    """Each GPU device the loaded models use: its memory and their estimated use of it."""
    used: dict[str, int] = {}
    totals: dict[str, int] = {}
    for name in names:
        record = runtime.devices(name)
        if record:
            for device, n in record[1].items():
                used[device] = used.get(device, 0) + n
                totals[device] = record[2].get(device, 0)
    return [{"name": d, "total_bytes": totals[d], "used_bytes": used[d]} for d in sorted(used)]


def gather(config: Config, active: set[str] | None = None,
           in_flight: Mapping[str, int] | None = None,
           router: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What `status --json` prints and the web panel shows (router/panel): every model, the
    RAM disk, memory, copies to the SSD cache under way, and the metrics' counters (the same
    facts /metrics has). `active`: the model units up (else asked of systemd, or the
    command dies); `in_flight`: the router's requests in flight per model; `router`: the
    router's own account of itself (router_state()'s fields), else systemd is asked."""
    from hoshikage_sd import metrics
    from hoshikage_sd.rpc import workers as rpc_workers

    runtime = Runtime(config.runtime_dir)
    now = time.time()
    active = set(loaded_units()) if active is None else active
    try:
        failed = set(units.active_model_units(("failed",)))
    except HoshikageError:
        failed = set()
    ranks, used = usage_ranks(config, active), last_used(config)
    models = [dataclasses.replace(
        model_status(config, m, runtime, active, now, in_flight, failed, used),
        rank=round(ranks.get(m.name, 0.0), 1), estimate_bytes=estimate_of(m, runtime),
        source_bytes=source_size(m), cached=cached(config, m))
        for m in config.models.values()]
    available, total = memory()
    usage = metrics.ramdisk_usage(config.ramdisk)
    caching = []
    for model in config.models.values():
        copying = runtime.caching(model.name)
        if copying:
            caching.append({"model": model.name, "done_bytes": copying[0],
                            "total_bytes": copying[1],
                            "cache_dir": str(config.cache.dir) if config.cache else None})
    totals = metrics.read(config.runtime_dir)
    return {
        "router": dict(router) if router is not None else router_state(),
        "time": now,
        "models": [dataclasses.asdict(m) for m in models],
        "loaded": [m.name for m in models if m.llama_server_pid is not None],
        "ramdisk": {"path": str(config.ramdisk), "mounted": usage is not None,
                    "used_bytes": usage[0] if usage else None,
                    "size_bytes": usage[1] if usage else None,
                    # kept copies of models the manifest no longer has (renamed, removed):
                    # no row shows them; they go at their TTL
                    "orphans": [{"name": n, "bytes": Store(config.ramdisk).held_bytes(n)}
                                for n in runtime.names("kept") if n not in config.models]},
        "memory": {"available_bytes": available, "total_bytes": total},
        "devices": devices_in_use(runtime, [m.name for m in models
                                            if m.llama_server_pid is not None]),
        "caching": caching,
        # RPC workers (README "Several machines"): which models each serves, what it holds
        "workers": rpc_workers.status(config, [m.name for m in models
                                               if m.llama_server_pid is not None]),
        "counters": metrics.as_json(totals),
        "counters_since": totals.since,
    }


def loaded_units() -> list[str]:
    """The model units that are up, or a clear error: never "all inactive" for a failing
    bus."""
    try:
        return units.active_model_units()
    except HoshikageError as err:
        die(f"cannot ask systemd which models are loaded: {err.message}",
            hint="is systemd running, and may this user query it? (systemctl status)")


#: the router's units: the socket systemd listens on, the service it starts
SOCKET_UNIT, ROUTER_UNIT = "hoshikage.socket", "hoshikage.service"


def router_state() -> dict[str, Any]:
    """The router as systemd has it: whether it runs (and its PID), and where the socket
    listens (its ListenStream=, what clients connect to): null fields where systemd cannot
    be asked (nothing is started to find out). One systemctl: the router itself asks once
    in its life (panel/serve.py), not on each of the panel's polls."""
    try:
        out = units.systemctl("show", SOCKET_UNIT, ROUTER_UNIT, "--property=Id",
                              "--property=ActiveState", "--property=MainPID",
                              "--property=Listen", check=False, timeout=5)
    except HoshikageError:  # no systemctl here
        out = ""
    shown = parse_show(out)
    socket, service = shown.get(SOCKET_UNIT, {}), shown.get(ROUTER_UNIT, {})
    pid = service.get("MainPID", "")
    return {
        "state": service.get("ActiveState") or None,
        "running": service.get("ActiveState") in ("active", "reloading", "deactivating"),
        "pid": int(pid) if pid.isdigit() and pid != "0" else None,
        "socket_state": socket.get("ActiveState") or None,
        "listen": listen_addresses(socket.get("Listen", "")),
    }


def parse_show(text: str) -> dict[str, dict[str, str]]:
    """`systemctl show A B --property=Id,...`: each unit's properties by its Id (units are
    separated by a blank line; Listen= may come once per address)."""
    by_id: dict[str, dict[str, str]] = {}
    for block in text.split("\n\n"):
        props: dict[str, str] = {}
        for line in block.splitlines():
            key, _, value = line.partition("=")
            props[key] = f"{props[key]}\n{value}" if key in props else value
        if props.get("Id"):
            by_id[props["Id"]] = props
    return by_id


def listen_addresses(listen: str) -> list[str]:
    """The socket's stream addresses from systemd's Listen= ("127.0.0.1:8080 (Stream)", one
    a line): what a client connects to."""
    out = []
    for line in listen.splitlines():
        address, _, kind = line.strip().rpartition(" ")
        if address and kind == "(Stream)":
            out.append(address)
    return out


def last_used(config: Config) -> dict[str, float]:
    """When each model's last request ended, from the usage file ({} where it cannot be
    read)."""
    from hoshikage_sd.stats import StatsFile

    try:
        stats = StatsFile(config.state_dir).read()
    except OSError:
        return {}
    return {name: at for name, s in stats.items() if (at := s.last_used) is not None}


def usage_ranks(config: Config, active: set[str]) -> dict[str, float]:
    """Each model's rank from the usage file ({} where it cannot be read: a status as
    another user than hoshikage)."""
    from hoshikage_sd.stats import StatsFile

    try:
        return StatsFile(config.state_dir).ranks(w=config.weights, running=active)
    except OSError:
        return {}


def estimate_of(model: Model, runtime: Runtime) -> int | None:
    """Admission's estimate of the model: the one remembered in the runtime directory, else
    read from its header (and remembered, where this user may write there)."""
    from hoshikage_sd.admit import needs

    remembered = runtime.remembered_estimate(model)
    if remembered is not None:
        return remembered[1]
    try:
        model.path.stat()
        return needs.estimate(model, runtime)
    except FileNotFoundError:
        return None
    except OSError:  # unreadable (that is the figure) or the runtime record not writable
        return needs.estimate(model)


def source_size(model: Model) -> int | None:
    try:
        return sum(p.stat().st_size for p in (model.path, *model.shards))
    except OSError:
        return None


def cached(config: Config, model: Model) -> bool:
    from hoshikage_sd import cache

    try:
        return cache.cached_copy(config, model) is not None
    except OSError:
        return False
