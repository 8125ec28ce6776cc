"""`hoshikage status` and `hoshikage check`: what an operator looks at."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hoshikage_sd import fmt
from hoshikage_sd.errors import HoshikageError, die
from hoshikage_sd.host import memory
from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.policy.rank import ModelStats
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
                 now: float, in_flight: Mapping[str, int] | None = None) -> ModelStatus:
    import psutil

    unit = units.model_unit(model.name)
    props = unit_props(unit) if model.name in active else {}
    state = props.get("ActiveState", "inactive")
    if not props and runtime.error(model.name) is not None:
        # not up: failed (a unit in "failed" is listed as loaded, so not here) or never
        # started since its failure was recorded
        state = units.unit_state(unit)[0] or "inactive"
    store = Store(config.ramdisk)
    size = store.copy_size(model.name)
    copying = copying_bytes(config, model.name)
    mem = props.get("MemoryCurrent", "")
    pid = props.get("MainPID", "")
    running = runtime.running(model.name)
    activity = runtime.activity(model.name)
    idle = left = rss = None
    serving = running is not None and state == "active"
    if serving and running is not None:
        idle = runtime.idle_seconds(model.name, now)
        # a pinned model has no TTL: the idle watch never stops it
        left = None if idle is None or model.pinned else max(0.0, model.ttl - idle)
        with contextlib.suppress(psutil.Error):
            rss = psutil.Process(running.pid).memory_info().rss
    error = runtime.error(model.name) if state in ("failed", "inactive") else None
    return ModelStatus(
        model.name, state, int(pid) if pid.isdigit() and pid != "0" else None,
        running.pid if serving and running else None,
        int(mem) if mem.isdigit() else None, rss, size,
        activity.last_end if activity else None, idle, serving and idle is None,
        model.ttl, left,
        on_devices(runtime, model.name) if state not in ("inactive", "failed") else None,
        phase=phase_of(state, serving, copying is not None, size is not None, error),
        error=error, copying_bytes=copying,
        in_flight=None if in_flight is None else in_flight.get(model.name, 0),
        aliases=list(model.aliases), tags=list(model.tags), pinned=model.pinned,
        preload=model.preload,
        status_text=props.get("StatusText") or None,
        since=running.started if serving and running else None)


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
    ranks = usage_ranks(config, active)
    models = [dataclasses.replace(
        model_status(config, m, runtime, active, now, in_flight),
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
                    "size_bytes": usage[1] if usage else None},
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


def status(config: Config, as_json: bool = False) -> int:
    """Every model, the router, the RAM disk and memory: gather()'s facts (what --json
    prints and the panel shows) written for people."""
    facts = gather(config)
    if as_json:
        print(json.dumps(facts, indent=2))
        return 0
    colour = fmt.use_colour(sys.stdout)
    now = facts["time"]
    rows = []
    for m in facts["models"]:
        last = fmt.ago(now - m["last_request_end"]) + " ago" if m["last_request_end"] \
            else "never"
        left = "-"
        if m["llama_server_pid"] is not None:
            left = "busy" if m["busy"] else "pinned" if m["ttl_left_seconds"] is None \
                and m["pinned"] else fmt.ago(m["ttl_left_seconds"] or 0.0)
        rows.append((m["name"], m["phase"], pid_text(m["llama_server_pid"]),
                     fmt.size(m["memory_bytes"]) if m["memory_bytes"] is not None else "-",
                     copy_text(m),
                     ", ".join(f"{d} {fmt.size(n)}" for d, n in m["device_bytes"].items())
                     if m["device_bytes"] else "-", last, left))
    table(("MODEL", "STATE", "PID", "MEMORY", "RAM DISK", "GPU", "LAST REQUEST",
           "IDLE STOP IN"), rows, {1: lambda text: fmt.state(text, colour)})
    for m in facts["models"]:
        if m["phase"] == "failed" and m["error"]:
            print(fmt.paint(f"{m['name']} failed: {m['error']}", "31", colour))
    for copying in facts["caching"]:
        done, total = copying["done_bytes"], copying["total_bytes"]
        print(f"caching {copying['model']} to {copying['cache_dir'] or '?'}: "
              f"{fmt.size(done)} of {fmt.size(total)} ({100 * done // max(total, 1)}%)")
    print()
    print(router_line(facts["router"], colour))
    disk = facts["ramdisk"]
    if disk["mounted"]:
        print(f"RAM disk {disk['path']}: {fmt.size(disk['used_bytes'])} used of "
              f"{fmt.size(disk['size_bytes'])}")
    else:
        print(f"RAM disk {disk['path']}: not mounted (mnt-hoshikage.mount mounts it on "
              "first use)")
    mem = facts["memory"]
    print(f"MemAvailable: {fmt.size(mem['available_bytes'])} of "
          f"{fmt.size(mem['total_bytes'])}")
    for device in facts["devices"]:
        print(f"{device['name']}: {fmt.size(device['used_bytes'])} of "
              f"{fmt.size(device['total_bytes'])} held by hoshikage's models (estimated)")
    for worker in facts["workers"]:  # RPC workers: rpc/workers.status
        held = ", ".join(f"{m} {fmt.size(n)}" for m, n in worker["held_bytes"].items())
        print(f"worker {worker['name']} ({worker['address']}): "
              + (f"serving {held}" if held else "idle") + f"; for {', '.join(worker['models'])}")
    return 0


def pid_text(pid: int | None) -> str:
    return str(pid) if pid is not None else "-"


def copy_text(model: Mapping[str, Any]) -> str:
    """The model's RAM-disk copy for the status table: its size, or how far a copy being
    made is (of its source's size)."""
    copying, total = model["copying_bytes"], model["source_bytes"]
    if copying is not None:
        return f"{progress_text(copying, total)} staging"
    return fmt.size(model["staged_bytes"]) if model["staged_bytes"] else "-"


def progress_text(done: int, total: int | None) -> str:
    """1.2 GiB of 4.0 GiB (30%), or 1.2 GiB where the total is not known."""
    if not total:
        return fmt.size(done)
    return f"{fmt.size(done)} of {fmt.size(total)} ({100 * min(done, total) // total}%)"


def router_line(router: Mapping[str, Any], colour: bool) -> str:
    """The router's state and address: 'router: running (pid 812), listening on
    127.0.0.1:8080'."""
    listen = ", ".join(router["listen"]) or "?"
    if router["state"] is None:
        return f"router: unknown (systemd cannot be asked), socket {SOCKET_UNIT}"
    if router["running"]:
        what = fmt.state("running", colour) + f" (pid {pid_text(router['pid'])})"
    else:
        what = "not running (the socket starts it on the first request)" \
            if router["socket_state"] == "active" else fmt.state(router["state"], colour)
    socket = "" if router["socket_state"] == "active" else \
        f"; {SOCKET_UNIT} is {fmt.state(router['socket_state'] or '?', colour, 'failed')}"
    return f"router: {what}, listening on {listen}{socket}"


def loaded_units() -> list[str]:
    """The model units that are up, or a clear error: never "all inactive" for a failing
    bus."""
    try:
        return units.active_model_units()
    except HoshikageError as err:
        die(f"cannot ask systemd which models are loaded: {err.message}",
            hint="is systemd running, and may this user query it? (systemctl status)")


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]],
          paint: Mapping[int, Callable[[str], str]] | None = None) -> None:
    """Columns padded to their widths; `paint`: a column's cells coloured (after padding,
    whose width counts only the text)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for n, row in enumerate([header, *rows]):
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        for column, colour in (paint or {}).items() if n else ():
            cells[column] = colour(row[column]) + " " * (widths[column] - len(row[column]))
        print("  ".join(cells).rstrip())


@dataclass(frozen=True)
class Listing:
    name: str
    aliases: list[str]
    tags: list[str]
    path: str
    pinned: bool
    state: str
    size: int | None = None
    architecture: str | None = None
    parameters: int | None = None
    quantisation: str | None = None
    context: int | None = None
    estimate: int | None = None
    last_used: float | None = None
    rank: float = 0.0
    cached: bool = False
    error: str | None = None


def describe(config: Config, model: Model, active: set[str],
             ranks: dict[str, float], stats: Mapping[str, ModelStats]) -> Listing:
    from hoshikage_sd import cache, gguf, memory
    from hoshikage_sd.admit.needs import estimate

    activity = Runtime(config.runtime_dir).activity(model.name)
    usage = stats.get(model.name)
    last_used = max((t for t in (activity.last_end if activity else None,
                                 usage.last_used if usage else None) if t), default=None)
    base = Listing(model.name, list(model.aliases), list(model.tags), str(model.path),
                   model.pinned, "loaded" if model.name in active else
                   "staged" if Store(config.ramdisk).has_copy(model.name) else "-",
                   last_used=last_used,
                   rank=round(ranks.get(model.name, 0.0), 1),
                   cached=cache.cached_copy(config, model) is not None)
    try:
        info = gguf.read_info(model.path)
    except (OSError, HoshikageError) as exc:
        return dataclasses.replace(base, error=str(exc).splitlines()[0])
    return dataclasses.replace(
        base, size=info.file_size, architecture=info.architecture, parameters=info.n_params,
        quantisation=info.quantisation, context=memory.load_params(info, model.server_args).n_ctx,
        estimate=estimate(model))


def list_models(config: Config, as_json: bool) -> int:
    from hoshikage_sd.stats import StatsFile

    active = set(loaded_units())
    usage = StatsFile(config.state_dir)
    ranks = usage.ranks(w=config.weights, running=active)
    stats = usage.read()
    entries = [describe(config, m, active, ranks, stats) for m in config.models.values()]
    entries.sort(key=lambda e: (-e.rank, -(e.last_used or 0.0), e.name))
    if as_json:
        print(json.dumps([dataclasses.asdict(e) for e in entries], indent=2))
        return 0
    now = time.time()
    colour = fmt.use_colour(sys.stdout)
    table(("MODEL", "ALIASES", "TAGS", "SIZE", "ARCH", "PARAMS", "QUANT", "CTX", "ESTIMATE",
           "STATE", "RANK", "LAST USED"),
          [(e.name, ",".join(e.aliases) or "-", ",".join(e.tags) or "-",
            fmt.size(e.size) if e.size is not None else "-", e.architecture or "-",
            fmt.count(e.parameters), e.quantisation or "-", str(e.context or "-"),
            fmt.size(e.estimate) if e.estimate is not None else "-",
            e.state + (" cached" if e.cached else "") + (" pinned" if e.pinned else ""),
            f"{e.rank:.1f}", fmt.ago(now - e.last_used) + " ago" if e.last_used else "never")
           for e in entries],
          {9: lambda text: fmt.state(text, colour, "running" if text.startswith("loaded")
                                     else "kept" if text.startswith("staged") else None)})
    for e in entries:
        if e.error:
            print(fmt.paint("warning:", "33", colour), f"{e.name}: {e.error}")
    return 0


def service_user_problems(config: Config) -> list[str]:
    """What the units' user (not the caller, often root) cannot run or read."""
    from hoshikage_sd.commands import access

    user = access.service_user()
    if user is None:
        return []
    problems = []
    if os.access(config.llama_server, os.X_OK):
        why = access.refusal(user, config.llama_server, 5)
        if why:
            problems.append(f"llama_server: {why} (the units run as {user.name})")
    for model in config.models.values():
        if model.path.exists():
            why = access.refusal(user, model.path, 4)
            if why:
                problems.append(f"model {model.name}: {why} (give it the group: chgrp "
                                f"{user.name} FILE and chmod g+r FILE, g+x on directories)")
    return problems


def check(config: Config, as_json: bool = False) -> int:
    """The manifest parsed already (errors raised: check_source); report what is wrong or
    missing. Exit 1 on any problem, a warning too (a missing llama-server or model file
    fails every load that needs it); notes are facts, not problems."""
    found = findings(config)
    if as_json:
        print(json.dumps({"config": str(config.source), "ok": not found["warnings"],
                          "models": list(config.models), **found}, indent=2))
        return 1 if found["warnings"] else 0
    colour = fmt.use_colour(sys.stdout)
    for line in found["warnings"]:
        print(fmt.paint("warning:", "33", colour), line)
    print(f"{config.source}: {len(config.models)} model(s): "
          + ", ".join(m.name + (f" ({', '.join(m.aliases)})" if m.aliases else "")
                      for m in config.models.values()))
    for line in found["notes"]:
        print(f"note: {line}")
    for line in found["devices"]:
        print(line)
    if found["warnings"]:
        print(f"{len(found['warnings'])} problem(s)", file=sys.stderr)
        return 1
    return 0


def check_source(path: Path | None, as_json: bool) -> int:
    """`hoshikage check [--json]`: a manifest that does not parse is its one problem (as
    JSON too, with --json: a script reads the reason, not a traceback)."""
    from hoshikage_sd import manifest
    from hoshikage_sd.manifest import names

    try:
        config = names.effective(manifest.load(path))
    except HoshikageError as err:
        if not as_json:
            raise
        print(json.dumps({"config": str(path or manifest.config_path()), "ok": False,
                          "models": [], "errors": [err.message], "warnings": [],
                          "notes": [], "devices": []}, indent=2))
        return err.code
    return check(config, as_json)


def findings(config: Config) -> dict[str, list[str]]:
    """check's findings: "warnings" (problems: the exit status), "notes", and "devices"
    (device_report's lines, its warnings also among the warnings)."""
    problems = list(config.warnings)
    if not os.access(config.llama_server, os.X_OK):
        problems.append(f"{config.source}: llama_server {config.llama_server} is not an "
                        "executable file")
    problems += service_user_problems(config)
    from hoshikage_sd import encryption

    problems += encryption.check_problems(config)
    from hoshikage_sd.commands import mounts

    problems += mounts.problems(config)  # the model unit waits for the ramdisk's mount
    from hoshikage_sd.rpc import check as rpc_check

    problems += rpc_check.problems(config)  # RPC workers down or out of the units' reach
    from hoshikage_sd.router import checks

    problems += checks.problems(config)  # API keys, models' own keys, limits, preload
    notes = []
    if not os.path.ismount(config.ramdisk):
        notes.append(f"RAM disk {config.ramdisk} is not mounted now (mnt-hoshikage.mount "
                     "mounts it on first use)")
    from hoshikage_sd.commands import environment

    notes += environment.report(config, environment.unit_environment())
    devices = device_report(config)
    problems += [line.removeprefix("warning: ") for line in devices
                 if line.startswith("warning: ")]
    return {"errors": [], "warnings": problems, "notes": notes,
            "devices": [line for line in devices if not line.startswith("warning: ")]}


def device_report(config: Config) -> list[str]:
    """`check`'s lines on the devices llama-server can offload to: `llama-server
    --list-devices` run as the model units' user (uid, Group=, its groups and the unit's
    SupplementaryGroups=) with the environment the units give it (the model unit's passed
    variables and each model's env:); where it sees none but the machine has GPU device
    nodes, what keeps that user from them and the fix."""
    import grp

    from hoshikage_sd import devices
    from hoshikage_sd.commands import access, environment
    from hoshikage_sd.protocol import passed_env

    if not os.access(config.llama_server, os.X_OK):
        return []
    try:
        shown = units.show(environment.PROBE_UNIT, "SupplementaryGroups")
        unit_env = environment.unit_environment() or {}
    except HoshikageError:  # no systemctl here
        shown, unit_env = {}, {}
    base = {k: v for k, v in unit_env.items() if passed_env(k)}
    envs: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for model in config.models.values():
        envs.setdefault(tuple(sorted({**base, **model.environment}.items())),
                        []).append(model.name)
    user = access.service_user()
    gids = set(user.gids) if user else set()
    for name in shown.get("SupplementaryGroups", "").split():
        with contextlib.suppress(KeyError):
            gids.add(grp.getgrnam(name).gr_gid)
    runner: list[str] = []
    lines = []
    if user is not None and os.geteuid() == 0:
        try:
            gid = grp.getgrnam(access.SERVICE_USER).gr_gid  # the units' Group=
        except KeyError:
            gid = min(user.gids)
        runner, who = devices.as_user(user.uid, gid, gids), user.name
    else:
        who = "this user"
        if user is not None:
            lines.append(f"note: devices are listed as this user, not {user.name}: run "
                         "`hoshikage check` as root to see what the model units see")
    for env, names in (envs or {tuple(sorted(base.items())): []}).items():
        label = f" for {', '.join(names)}" if len(envs) > 1 else ""
        try:
            found = devices.list_devices(config.llama_server, dict(env), runner=runner)
        except HoshikageError as err:
            lines.append(f"warning: llama-server --list-devices{label}: {err.message}")
            continue
        lines += [f"device {d.name}{label}: {d.description}, {fmt.size(d.total)} "
                  f"({fmt.size(d.free)} free)" for d in found]
        if found:
            continue
        lines.append(f"note: llama-server (as {who}) sees no GPU{label}: its models run on "
                     "the CPU")
        if user is not None and devices.has_nodes():
            lines += [f"warning: {p}" for p in devices.node_problems(user.name, user.uid, gids)]
    return lines
