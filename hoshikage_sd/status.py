"""`hoshikage status` and `hoshikage check`: what an operator looks at."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from hoshikage_sd import systemd
from hoshikage_sd.config import Config
from hoshikage_sd.idle import idle_seconds, pid_alive
from hoshikage_sd.residents import meminfo
from hoshikage_sd.state import Runtime
from hoshikage_sd.store import human


def ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


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
    header = ("MODEL", "STATE", "PID", "MEMORY", "STAGED", "LAST REQUEST", "IDLE STOP IN")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    memory_info = meminfo()
    print()
    if config.ramdisk.is_dir():
        disk = shutil.disk_usage(config.ramdisk)
        print(f"RAM disk {config.ramdisk}: {human(disk.used)} used of {human(disk.total)}")
    else:
        print(f"RAM disk {config.ramdisk}: not mounted")
    print(f"MemAvailable: {human(memory_info['MemAvailable'])} of {human(memory_info['MemTotal'])}")
    return 0


def check(config: Config) -> int:
    """The manifest parsed already (errors raised); report warnings and missing parts."""
    problems = list(config.warnings)
    if not os.access(config.llama_server, os.X_OK):
        problems.append(f"{config.source}: llama_server {config.llama_server} is not an "
                        "executable file")
    for line in problems:
        print(f"warning: {line}")
    print(f"{config.source}: {len(config.models)} model(s): "
          + ", ".join(m.name + (f" ({', '.join(m.aliases)})" if m.aliases else "")
                      for m in config.models.values()))
    if not Path(config.ramdisk).is_dir():
        print(f"note: RAM disk {config.ramdisk} is not mounted now (mnt-hoshikage.mount "
              "mounts it on first use)")
    return 0
