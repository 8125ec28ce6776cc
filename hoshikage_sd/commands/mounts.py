"""What `hoshikage check` says of the RAM disk's mount: the model unit waits for the mount that
holds the manifest's ramdisk: only where its RequiresMountsFor= (the shipped unit's
/mnt/hoshikage, or a drop-in's) covers that path. Otherwise a model could be staged into
whatever file system is there before the RAM disk is mounted: the root file system, say.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hoshikage_sd.commands.environment import PROBE_UNIT
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Config
from hoshikage_sd.sd import units

TEMPLATE = "hoshikage-model@.service"


def covered(ramdisk: Path, required: Sequence[str]) -> bool:
    """Whether one of the unit's RequiresMountsFor= paths is `ramdisk` or above it (systemd
    then requires every mount on the way down to it). systemd shows its own paths among
    them too (the units' StateDirectory= and the like)."""
    return any(ramdisk.is_relative_to(path) for path in required if path.startswith("/"))


def problem(ramdisk: Path, required: Sequence[str]) -> str | None:
    """check's warning when the model unit does not wait for `ramdisk`'s mount."""
    if covered(ramdisk, required):
        return None
    return (f"ramdisk {ramdisk}: {TEMPLATE} does not wait for its mount (no "
            f"RequiresMountsFor= covers it), so a model could be staged before it is mounted; "
            f"`systemctl edit {TEMPLATE}` and add [Unit] RequiresMountsFor={ramdisk}")


def problems(config: Config) -> list[str]:
    """The warning for `config`'s ramdisk, as the installed unit and its drop-ins stand; none
    where systemd cannot say (no systemctl, not booted with systemd, the unit not installed)."""
    try:
        shown = units.show(PROBE_UNIT, "LoadState", "RequiresMountsFor")
    except HoshikageError:
        return []
    if shown.get("LoadState") != "loaded":
        return []
    found = problem(Path(config.ramdisk), shown.get("RequiresMountsFor", "").split())
    return ([found] if found else []) + idle_watch_problems(Path(config.ramdisk))


IDLE_UNIT = "hoshikage-idle.service"


def idle_watch_problems(ramdisk: Path) -> list[str]:
    """The idle watch deletes kept copies whose TTL ran out: under its ProtectSystem=strict
    only where a ReadWritePaths= covers the ramdisk (the shipped unit's /mnt/hoshikage)."""
    try:
        shown = units.show(IDLE_UNIT, "LoadState", "ReadWritePaths")
    except HoshikageError:
        return []
    if shown.get("LoadState") != "loaded" or covered(
            ramdisk, [p.lstrip("-") for p in shown.get("ReadWritePaths", "").split()]):
        return []
    return [f"ramdisk {ramdisk}: {IDLE_UNIT} may not write to it (no ReadWritePaths= covers "
            "it), so kept copies never expire; `systemctl edit hoshikage-idle.service` and "
            f"add [Service] ReadWritePaths=-{ramdisk}"]
