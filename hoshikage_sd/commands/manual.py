"""`hoshikage load NAME` and `hoshikage unload NAME`: by hand, through systemd, no flapping."""

from __future__ import annotations

import time

from hoshikage_sd.errors import die
from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.policy.stats import StatsFile
from hoshikage_sd.resolve import resolve
from hoshikage_sd.runtime import Runtime
from hoshikage_sd.sd import units as systemd


def find(config: Config, name: str) -> Model:
    model = resolve(config, name)
    if model is None:
        die(f"no model named '{name}'", hint="hoshikage list shows the names")
    return model


def too_soon(config: Config, model: Model, now: float) -> float:
    """Seconds still to wait before this model may be loaded again (0: go ahead)."""
    stats = StatsFile(config.state_dir).read().get(model.name)
    if stats is None or not stats.uses:
        return 0.0
    return max(0.0, stats.uses[-1].at + config.min_reload_seconds - now)


def load(config: Config, name: str) -> int:
    model = find(config, name)
    unit = systemd.model_unit(model.name)
    if model.name in systemd.active_model_units():
        print(f"{model.name} is already loaded")
        return 0
    wait = too_soon(config, model, time.time())
    if wait > 0:
        die(f"too soon, wait {wait:.0f} s: {model.name} was loaded less than "
            f"{config.min_reload_seconds:.0f} s ago", hint="min_reload_seconds in the manifest",
            code=3)
    systemd.systemctl("start", unit, check=False)  # returns once READY=1, or failed
    if model.name not in systemd.active_model_units():
        reason = Runtime(config.runtime_dir).error(model.name) or \
            f"see hoshikage logs {model.name} (or journalctl -u {systemd.shell_unit(model.name)})"
        die(f"{model.name} did not start: {reason}")
    print(f"{model.name} loaded")
    return 0


def unload(config: Config, name: str) -> int:
    model = find(config, name)
    if model.name not in systemd.active_model_units():
        print(f"{model.name} is not loaded")
        return 0
    Runtime(config.runtime_dir).set_stop_reason(model.name, "manual unload")
    systemd.systemctl("stop", systemd.model_unit(model.name))
    print(f"{model.name} unloaded")
    return 0
