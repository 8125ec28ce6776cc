"""`hoshikage status` and `hoshikage list`: the facts (facts.py) and the manifest's models
written for people."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hoshikage_sd import fmt
from hoshikage_sd.commands.facts import SOCKET_UNIT, gather, loaded_units
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.policy.rank import ModelStats
from hoshikage_sd.runtime import Runtime
from hoshikage_sd.staging import Store


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
        if m["outdated"]:
            print(f"{m['name']} runs the settings it started with: the manifest has changed "
                  f"them since (its next start applies them: hoshikage unload {m['name']})")
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
        for orphan in disk["orphans"]:
            print(f"  a kept copy of {orphan['name']!r}, no longer in the manifest: "
                  f"{fmt.size(orphan['bytes'])} (it goes at its TTL)")
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
    if router["socket_state"] == "active":
        return f"router: {what}, listening on {listen}"
    state = fmt.state(router["socket_state"] or "?", colour, "failed")
    return f"router: {what}, {SOCKET_UNIT} is {state} (nothing listens on {listen})"


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
    state: str  # loaded, kept (its RAM-disk copy stays), not-loaded: as status says
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
    #: a split model's other shards, and its projector (llama-server's --mmproj)
    shards: list[str] = dataclasses.field(default_factory=list)
    mmproj: str | None = None


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
                   "kept" if Store(config.ramdisk).has_copy(model.name) else "not-loaded",
                   last_used=last_used,
                   rank=round(ranks.get(model.name, 0.0), 1),
                   cached=cache.cached_copy(config, model) is not None,
                   shards=[str(p) for p in model.shards],
                   mmproj=str(model.mmproj) if model.mmproj else None)
    try:
        info = gguf.read_model_info((model.path, *model.shards))
    except (OSError, HoshikageError) as exc:
        return dataclasses.replace(base, error=str(exc).splitlines()[0])
    return dataclasses.replace(
        base, size=info.file_size, architecture=info.architecture, parameters=info.n_params,
        quantisation=info.quantisation,
        context=memory.load_params(info, model.effective_args).n_ctx,
        estimate=estimate(model))


def list_models(config: Config, as_json: bool) -> int:
    from hoshikage_sd.stats import StatsFile

    try:
        active = set(loaded_units())
    except HoshikageError as err:  # a machine being prepared: the models, states unknown
        print(f"warning: no states: {err.message}", file=sys.stderr)
        active = set()
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
                                     else "kept" if text.startswith("kept") else None)})
    for e in entries:
        if e.error:
            print(fmt.paint("warning:", "33", colour), f"{e.name}: {e.error}")
    return 0
