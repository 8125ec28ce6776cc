"""`hoshikage status` and `hoshikage check`: what an operator looks at."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hoshikage_sd import systemd
from hoshikage_sd.admission import ago
from hoshikage_sd.config import Config, Model
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.idle import idle_seconds, pid_alive
from hoshikage_sd.residents import meminfo
from hoshikage_sd.state import Runtime
from hoshikage_sd.store import human


def status(config: Config) -> int:
    runtime = Runtime(config.runtime_dir)
    now = time.time()
    try:
        active = set(systemd.active_model_units())
    except Exception:
        active = set()
    rows = []
    for model in config.models.values():
        unit = systemd.model_unit(model.name)
        props = systemd.show(unit, "ActiveState", "MainPID", "MemoryCurrent") \
            if model.name in active else {}
        state = props.get("ActiveState", "inactive")
        staged = config.staged_path(model.name)
        size = staged.stat().st_size if staged.exists() else 0
        mem = props.get("MemoryCurrent", "")
        memory = human(int(mem)) if mem.isdigit() else "-"
        running = runtime.running(model.name)
        activity = runtime.activity(model.name)
        last = ago(now - activity.last_end) + " ago" if activity else "never"
        left = "-"
        if running and state == "active":
            alive = activity is not None and pid_alive(activity.router_pid)
            idle = idle_seconds(now, running.started, activity, alive)
            left = "busy" if idle is None else ago(max(0.0, model.ttl - idle))
        rows.append((model.name, state, props.get("MainPID", "-") if props else "-", memory,
                     human(size) if size else "-", last, left))
    table(("MODEL", "STATE", "PID", "MEMORY", "STAGED", "LAST REQUEST", "IDLE STOP IN"), rows)
    for model in config.models.values():
        copying = runtime.caching(model.name)
        if copying:
            done, total = copying
            print(f"caching {model.name} to {config.cache.dir if config.cache else '?'}: "
                  f"{human(done)} of {human(total)} ({100 * done // max(total, 1)}%)")
    memory_info = meminfo()
    print()
    if config.ramdisk.is_dir():
        disk = shutil.disk_usage(config.ramdisk)
        print(f"RAM disk {config.ramdisk}: {human(disk.used)} used of {human(disk.total)}")
    else:
        print(f"RAM disk {config.ramdisk}: not mounted")
    print(f"MemAvailable: {human(memory_info['MemAvailable'])} of {human(memory_info['MemTotal'])}")
    return 0


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


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
             ranks: dict[str, float]) -> Listing:
    from hoshikage_sd import cache, gguf, memory
    from hoshikage_sd.residents import estimate

    activity = Runtime(config.runtime_dir).activity(model.name)
    base = Listing(model.name, list(model.aliases), list(model.tags), str(model.path),
                   model.pinned, "loaded" if model.name in active else
                   "staged" if config.staged_path(model.name).exists() else "-",
                   last_used=activity.last_end if activity else None,
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


def count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def list_models(config: Config, as_json: bool) -> int:
    from hoshikage_sd.rank import StatsFile

    active = set(systemd.active_model_units())
    ranks = StatsFile(config.state_dir).ranks(w=config.weights, running=active)
    entries = [describe(config, m, active, ranks) for m in config.models.values()]
    entries.sort(key=lambda e: (-e.rank, -(e.last_used or 0.0), e.name))
    if as_json:
        print(json.dumps([dataclasses.asdict(e) for e in entries], indent=2))
        return 0
    now = time.time()
    table(("MODEL", "ALIASES", "TAGS", "SIZE", "ARCH", "PARAMS", "QUANT", "CTX", "ESTIMATE",
           "STATE", "RANK", "LAST USED"),
          [(e.name, ",".join(e.aliases) or "-", ",".join(e.tags) or "-",
            human(e.size) if e.size is not None else "-", e.architecture or "-",
            count(e.parameters), e.quantisation or "-", str(e.context or "-"),
            human(e.estimate) if e.estimate is not None else "-",
            e.state + (" cached" if e.cached else "") + (" pinned" if e.pinned else ""),
            f"{e.rank:.1f}", ago(now - e.last_used) + " ago" if e.last_used else "never")
           for e in entries])
    for e in entries:
        if e.error:
            print(f"warning: {e.name}: {e.error}")
    return 0


def service_user_problems(config: Config) -> list[str]:
    """What the units' user (not the caller, often root) cannot run or read."""
    from hoshikage_sd import access

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


def check(config: Config) -> int:
    """The manifest parsed already (errors raised); report warnings and missing parts."""
    problems = list(config.warnings)
    if not os.access(config.llama_server, os.X_OK):
        problems.append(f"{config.source}: llama_server {config.llama_server} is not an "
                        "executable file")
    problems += service_user_problems(config)
    for line in problems:
        print(f"warning: {line}")
    print(f"{config.source}: {len(config.models)} model(s): "
          + ", ".join(m.name + (f" ({', '.join(m.aliases)})" if m.aliases else "")
                      for m in config.models.values()))
    if not Path(config.ramdisk).is_dir():
        print(f"note: RAM disk {config.ramdisk} is not mounted now (mnt-hoshikage.mount "
              "mounts it on first use)")
    return 0
