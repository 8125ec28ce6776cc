"""`hoshikage load NAME` and `hoshikage unload NAME`: by hand, through systemd, no flapping."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from hoshikage_sd import fmt
from hoshikage_sd.commands import progress
from hoshikage_sd.errors import die
from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.resolve import resolve
from hoshikage_sd.runtime import Runtime
from hoshikage_sd.sd import units
from hoshikage_sd.sd.failure import why_failed
from hoshikage_sd.staging import Store
from hoshikage_sd.stats import StatsFile


def find(config: Config, name: str) -> Model:
    model = resolve(config, name)
    if model is None:
        die(f"no model named {name!r}", hint="hoshikage list shows the names")
    return model


def too_soon(config: Config, model: Model, now: float) -> float:
    """Seconds still to wait before this model may be loaded again (0: go ahead)."""
    stats = StatsFile(config.state_dir).read().get(model.name)
    if stats is None or not stats.uses:
        return 0.0
    return max(0.0, stats.uses[-1].at + config.min_reload_seconds - now)


#: how often `load` looks at the unit and its copy
POLL = 0.2


def load(config: Config, name: str) -> int:
    """Start the model's unit without waiting in systemctl (--no-block) and watch it: the
    copy into the RAM disk (bytes and rate: its temporary file), then llama-server's load;
    a bar on a terminal, plain lines otherwise; exit 1 with the reason when it fails."""
    model = find(config, name)
    unit = units.model_unit(model.name)
    state, _job = units.unit_state(unit)
    if state == "active":
        print(f"{model.name} is already loaded")
        return 0
    if state != "activating":  # joining a load under way is no new load
        wait = too_soon(config, model, time.time())
        if wait > 0:
            die(f"too soon, wait {wait:.0f} s: {model.name} was loaded less than "
                f"{config.min_reload_seconds:.0f} s ago",
                hint="min_reload_seconds in the manifest", code=3)
    runtime = Runtime(config.runtime_dir)
    before = error_stamp(runtime, model.name)
    began = time.monotonic()
    units.start_unit(unit)  # queued: no systemctl blocking until READY=1
    display = progress.Display(model.name, sys.stdout, sys.stdout.isatty(),
                               fmt.use_colour(sys.stdout))
    try:
        watch(config, model, unit, display, lambda: failure(runtime, model.name, unit, before))
    except KeyboardInterrupt:
        display.finish(None)
        print(f"no longer watching: {model.name} goes on loading (hoshikage unload "
              f"{model.name} stops it)", file=sys.stderr)
        return 130
    running = runtime.running(model.name)
    pid = f", llama-server pid {running.pid}" if running else ""
    if running and not Path(running.staged).is_relative_to(config.ramdisk):
        # a first load serves from the source at once and copies it meanwhile, unless its
        # stage: says it gets no copy (never, or auto with every layer on GPU devices)
        pid += " (from its source; its RAM-disk copy is made alongside)" \
            if model.staged(runtime.fully_offloaded(model.name)) else \
            f" (from its source; stage: {model.stage}, no RAM-disk copy)"
    display.finish(f"{model.name} loaded in {time.monotonic() - began:.1f} s{pid}")
    return 0


def watch(config: Config, model: Model, unit: str, display: progress.Display,
          why: Callable[[], str]) -> None:
    """Show the load's steps until the unit is up; die with `why()` when it went down."""
    staged = False
    while True:
        state, job = units.unit_state(unit)
        if state == "active":
            return
        if state in ("failed", "inactive") and not job:
            display.finish(None)
            die(f"{model.name} did not start: {why()}",
                hint=f"hoshikage logs {model.name} shows its unit's lines "
                     f"(journalctl -u {units.shell_unit(model.name)})")
        step = step_of(config, model, unit, staged)
        if step.phase == "loading" and not staged and not display.tty:
            # a copy quicker than a look at it: say that it was made
            size = Store(config.ramdisk).copy_size(model.name)
            if size is not None:
                print(f"staged {model.name}: {fmt.size(size)}", flush=True)
        staged = staged or step.phase in ("staging", "loading")
        display.show(step)
        time.sleep(POLL)


def step_of(config: Config, model: Model, unit: str, copied: bool = False) -> progress.Step:
    """Where the load is: staging (its RAM-disk temporary's bytes of the source's size),
    waiting (for room, for another copy: the unit's STATUS=), or loading (`copied`: a copy
    was seen being made, so none in the making now means it is done)."""
    from hoshikage_sd.commands import facts

    shown = units.show(unit, "StatusText", "MemoryCurrent")
    text, memory = shown.get("StatusText", ""), shown.get("MemoryCurrent", "")
    copying = facts.copying_bytes(config, model.name)
    if copying is not None:
        return progress.Step("staging", copying,
                             status_total(text) or facts.source_size(model))
    if text.startswith(("waiting", "stopping")):
        return progress.Step("waiting", detail=text)
    if copied or text.startswith("loading") or Store(config.ramdisk).has_copy(model.name):
        return progress.Step("loading", int(memory) if memory.isdigit() else 0)
    return progress.Step("waiting",
                         detail=text if text.startswith(("staging", "decrypting")) else "")


def status_total(text: str) -> int | None:
    """The copy's size where the unit's STATUS= names it ("staging m: 1.0 GiB of 4.0 GiB
    (25%)", rounded): a decrypted copy's size is not its source's."""
    import re

    match = re.search(r" of ([0-9.]+) (B|KiB|MiB|GiB|TiB) \(", text)
    if match is None:
        return None
    scale = 1024 ** ("B", "KiB", "MiB", "GiB", "TiB").index(match[2])
    return int(float(match[1]) * scale)


def error_stamp(runtime: Runtime, name: str) -> float | None:
    """When the model's error record was written (None: there is none)."""
    try:
        return runtime.error_path(name).stat().st_mtime
    except OSError:
        return None


def failure(runtime: Runtime, name: str, unit: str, before: float | None) -> str:
    """Why this start failed: the activator's record when it wrote one for this start,
    else the unit's last STATUS= or its result (a failure before the activator ran)."""
    reason = runtime.error(name)
    stamp = error_stamp(runtime, name)
    if reason and stamp is not None and stamp != before:
        return reason
    shown = units.show(unit, "StatusText", "Result")
    text = shown.get("StatusText", "")
    if text.startswith("failed: "):
        return text.removeprefix("failed: ")
    return why_failed(unit) if shown.get("Result", "success") != "success" else \
        "its unit stopped before it served"


def unload(config: Config, name: str) -> int:
    up = units.active_model_units()
    exact = any(name in (m.name, *m.aliases, *m.tags) for m in config.models.values())
    # a model taken out of the manifest while loaded is named by its unit's name, before
    # any model of the manifest a part of whose name it is
    found = name if not exact and name in up else find(config, name).name
    if found not in up:
        print(f"{found} is not loaded")
        return 0
    Runtime(config.runtime_dir).set_stop_reason(found, "manual unload")
    units.systemctl("stop", units.model_unit(found))
    print(f"{found} unloaded")
    return 0
