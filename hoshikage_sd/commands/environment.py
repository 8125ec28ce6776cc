"""What `hoshikage check` says of llama-server's environment: which of the model unit's
variables reach it (protocol.passed_env), which do not, and what the manifest sets over them.

The unit's environment is what systemd would give it: Environment= (drop-ins included) and
its EnvironmentFile=s, read as systemd reads simple KEY=VALUE lines.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from hoshikage_sd.manifest import Config
from hoshikage_sd.protocol import PASSED_ENV_NAMES, PASSED_ENV_PREFIXES, passed_env
from hoshikage_sd.sd import units

#: any instance shows the template's settings and drop-ins
PROBE_UNIT = "hoshikage-model@check.service"
SERVICE = "org.freedesktop.systemd1.Service"


def environment_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (comments and blank lines skipped, quotes removed); {} if unreadable."""
    values = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        try:
            words = shlex.split(value)
        except ValueError:
            words = [value]
        values[key.strip().removeprefix("export ").strip()] = " ".join(words)
    return values


def unit_environment() -> dict[str, str] | None:
    """The model unit's environment as systemd sets it; None when systemd cannot say. Over
    D-Bus (admission asks this: no process), `systemctl show` where the bus is not there."""
    from hoshikage_sd.sd import bus

    try:
        return bus_environment()
    except (bus.BusUnavailable, bus.BusError):
        return shown_environment()


def bus_environment() -> dict[str, str]:
    """unit_environment() over D-Bus (bus.BusUnavailable, bus.BusError when it cannot be)."""
    from hoshikage_sd.sd import bus

    with bus.Connection() as conn:
        target = (bus.MANAGER[0], bus.unit_path(PROBE_UNIT), bus.PROPERTIES)
        (words,) = conn.call("Get", "ss", (SERVICE, "Environment"), target)
        (files,) = conn.call("Get", "ss", (SERVICE, "EnvironmentFiles"), target)
    return environment(words, [str(path) for path, _optional in files])


def shown_environment() -> dict[str, str] | None:
    """unit_environment() from `systemctl show`."""
    shown = units.show(PROBE_UNIT, "Environment", "EnvironmentFiles")
    if not shown:
        return None
    try:
        words = shlex.split(shown.get("Environment", ""))
    except ValueError:
        words = []
    files = [spec.split(" (")[0].strip()
             for spec in shown.get("EnvironmentFiles", "").split("\n") if spec.strip()]
    return environment(words, files)


def environment(words: list[str], files: list[str]) -> dict[str, str]:
    """Environment= (KEY=VALUE words) over the EnvironmentFile=s, as systemd applies them."""
    env: dict[str, str] = {}
    for path in files:
        env.update(environment_file(Path(path)))
    env.update(w.partition("=")[::2] for w in words if "=" in w)
    return env


def report(config: Config, unit_env: dict[str, str] | None) -> list[str]:
    """Lines for `check`: what llama-server gets besides PATH, LANG, LC_ALL, TZ and HOME."""
    lines = []
    if unit_env is None:
        lines.append("llama-server's environment: systemd does not know the model unit "
                     "here; only the manifest's env: applies")
        unit_env = {}
    passed = {k: v for k, v in unit_env.items() if passed_env(k)}
    dropped = sorted(k for k in unit_env if not passed_env(k) and k not in
                     ("PATH", "LANG", "LC_ALL", "TZ", "HOME"))
    if passed:
        lines.append("llama-server gets from the model unit: "
                     + ", ".join(f"{k}={v}" for k, v in sorted(passed.items())))
    if dropped:
        lines.append("not passed to llama-server (only these prefixes and names are: "
                     + ", ".join(p + "*" for p in PASSED_ENV_PREFIXES) + ", "
                     + ", ".join(PASSED_ENV_NAMES) + "; set others with the manifest's "
                     "env:): " + ", ".join(dropped))
    by_env: dict[tuple[str, ...], list[str]] = {}
    for model in config.models.values():
        if model.env:
            by_env.setdefault(model.env, []).append(model.name)
    for env, names in by_env.items():
        over = sorted(k for k in dict(e.split("=", 1) for e in env) if k in passed)
        lines.append(f"manifest env for {', '.join(names)}: {', '.join(env)}"
                     + (f" (over the unit's {', '.join(over)})" if over else ""))
    return lines
