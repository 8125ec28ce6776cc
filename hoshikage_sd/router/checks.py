"""`hoshikage check`'s word on the router's side of the manifest: the API keys file, each
model's own llama-server key, the client limits against hoshikage.service's own
(LimitNOFILE=, MemoryMax=), preload against hoshikage-preload.service, and the router's
file-system confinement (hoshikage-landlock, router/landlock.c) on this kernel.

Each problem is a sentence saying what to change; none is said where systemd cannot be
asked (no systemctl, not booted with systemd, the unit not installed): the file checks still
run.
"""

from __future__ import annotations

import os
import re
from typing import Final

from hoshikage_sd import fmt, proc
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Config
from hoshikage_sd.router import auth, model_keys
from hoshikage_sd.sd import units

ROUTER_UNIT: Final = "hoshikage.service"
PRELOAD_UNIT: Final = "hoshikage-preload.service"
#: file descriptors the router holds besides its clients and upstream connections: the
#: listening socket, the journal, the announcements socket, busy locks, the files it reads
FD_BASE: Final = 64
#: what the router holds besides request bodies (measured: ~30 MiB idle; room for a burst)
MEMORY_BASE: Final = 256 << 20
#: the most a body costs while the router holds it: about its size as a rule (jsonscan.py,
#: ollama/body.py), but an Ollama body of many short strings is decoded whole (several times
#: its size)
BODY_FACTOR: Final = 3


def problems(config: Config) -> list[str]:
    found = keys_problems(config)
    for model in config.models.values():
        found += model_keys.problems(model)
    try:
        router = units.show(ROUTER_UNIT, "LoadState", "LimitNOFILESoft", "MemoryMax",
                            "ExecStart", "ProtectSystem")
        preload = units.show(PRELOAD_UNIT, "LoadState", "UnitFileState")
    except HoshikageError:
        return found
    if router.get("LoadState") == "loaded":
        # the soft limit is the one the router meets (LimitNOFILE=N sets both)
        found += limit_problems(config, router.get("LimitNOFILESoft", ""),
                                router.get("MemoryMax", ""))
        found += confinement_problems(router.get("ExecStart", ""),
                                      router.get("ProtectSystem", ""))
    if preload.get("LoadState") == "loaded" or any(m.preload for m in config.models.values()):
        found += preload_problems(config, preload.get("UnitFileState", ""))
    return found


def confinement_problems(exec_start: str, protect_system: str = "no") -> list[str]:
    """Whether the router runs confined: hoshikage.service's ExecStart= (systemctl show's
    form) starts hoshikage-landlock, which says whether this kernel has Landlock; or a
    drop-in gave it a mount namespace again (ProtectSystem=strict)."""
    if protect_system == "strict":
        return []
    program = re.search(r"argv\[\]=(\S+)", exec_start)
    if program is None or not program.group(1).endswith("/hoshikage-landlock"):
        return [f"{ROUTER_UNIT}'s ExecStart= does not start hoshikage-landlock (a drop-in?): "
                "the router runs without its file-system confinement"]
    try:
        probe = proc.run([program.group(1), "--probe"], check=False)
    except HoshikageError as err:  # not there
        return [f"the router cannot start: {err.message}"]
    if probe.returncode == 0:
        return []
    return [f"the router runs without its file-system confinement: hoshikage-landlock says "
            f"{(probe.stdout or probe.stderr).strip()!r} (README, \"The router's "
            "confinement\": a kernel with Landlock, or a drop-in for a mount namespace)"]


def keys_problems(config: Config, credentials: str | None = None) -> list[str]:
    """The API keys file, read as the router reads it. A credential (`credential:NAME`) is
    read from the file hoshikage.service's LoadCredential= names, which check (as root)
    may read; `credentials`: that property, else asked of systemd."""
    spec = config.api_keys
    if spec is None:
        return []
    if spec.startswith(auth.CREDENTIAL) and not os.environ.get("CREDENTIALS_DIRECTORY"):
        name = spec[len(auth.CREDENTIAL):]
        if credentials is None:
            try:  # systemd 252's show prints this property "[unprintable]": its files
                if units.show(ROUTER_UNIT, "LoadState").get("LoadState") != "loaded":
                    return []  # no systemd to ask here, or the unit not installed
                credentials = load_credentials(units.systemctl("cat", ROUTER_UNIT,
                                                               check=False))
            except HoshikageError:
                return []
        source = credential_source(credentials, name)
        if source is None:
            return [f"api_keys: {spec}: {ROUTER_UNIT} has no LoadCredential={name}:FILE "
                    "(`systemctl edit hoshikage.service`): the router answers every request "
                    "with a 503 until it has"]
        spec = source
    try:
        auth.load(spec)
    except auth.KeysUnusable as exc:
        return [f"{exc} (the router answers every request with a 503 until it is fixed)"]
    return []


def load_credentials(unit_files: str) -> str:
    """The LoadCredential= entries of `systemctl cat`'s text (the unit file, then its
    drop-ins), space-separated: an empty assignment drops the ones before it."""
    entries: list[str] = []
    for line in unit_files.splitlines():
        key, eq, value = line.strip().partition("=")
        if eq and key.strip() == "LoadCredential":
            entries = entries + value.split() if value.strip() else []
    return " ".join(entries)


def credential_source(shown: str, name: str) -> str | None:
    """The file of credential `name` in `systemctl show -p LoadCredential`'s value
    (`LoadCredential=NAME:PATH`, one a line or space-separated as systemd prints them)."""
    for entry in shown.replace("\n", " ").split():
        key, _, path = entry.partition(":")
        if key == name and path:
            return path
    return None


def limit_problems(config: Config, nofile: str, memory_max: str) -> list[str]:
    """max_connections against LimitNOFILE=, body_memory against MemoryMax=."""
    found = []
    pools = sum(m.upstream_pool for m in config.models.values())
    needed = config.max_connections + pools + FD_BASE
    if nofile.isdigit() and needed > int(nofile):
        found.append(
            f"{config.source}: max_connections {config.max_connections} and the upstream "
            f"pools ({pools} connections to the models) need about {needed} file "
            f"descriptors, above {ROUTER_UNIT}'s LimitNOFILE={nofile}: past it the router "
            "cannot accept or reach a model (EMFILE); lower max_connections, or raise "
            "LimitNOFILE= (`systemctl edit hoshikage.service`)")
    held = config.body_memory * BODY_FACTOR + MEMORY_BASE
    if memory_max.isdigit() and held > int(memory_max):
        found.append(
            f"{config.source}: body_memory {fmt.size(config.body_memory)} lets the router "
            f"hold about {fmt.size(held)} (Ollama's routes parse a body at about "
            f"{BODY_FACTOR} times its size, plus the router itself), above {ROUTER_UNIT}'s "
            f"MemoryMax={fmt.size(int(memory_max))}: the kernel would kill it mid-request; "
            "lower body_memory, or raise MemoryMax= (and MemoryHigh=) with `systemctl edit "
            "hoshikage.service`")
    return found


def preload_problems(config: Config, unit_file_state: str) -> list[str]:
    """Models marked preload: true while hoshikage-preload.service is not enabled (nothing
    loads them at boot)."""
    wanted = [m.name for m in config.models.values() if m.preload]
    if wanted and unit_file_state not in ("enabled", "enabled-runtime", "static", "alias"):
        return [f"{', '.join(wanted)}: preload: true, but {PRELOAD_UNIT} is "
                f"{unit_file_state or 'not installed'}: nothing loads "
                f"{'them' if len(wanted) > 1 else 'it'} at boot (`systemctl enable "
                f"{PRELOAD_UNIT}`)"]
    return []

