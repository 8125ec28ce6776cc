"""The idle watch's pressure stop: pure, a reading of the memory in, a decision out.

Above pressure_warn of RAM in use the watch says so; above pressure_critical it stops idle
models, lowest rank first (admission's eviction order), before the kernel has to swap or
kill. watch/idle.py gathers the Reading, calls decide once, and carries the decision out.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from hoshikage_sd.policy.admission import Resident, eviction_order


@dataclass(frozen=True)
class Reading:
    """The machine's memory and the models up (not already stopping)."""

    used: int    # bytes of RAM in use: MemTotal - MemAvailable
    total: int
    residents: tuple[Resident, ...] = ()


@dataclass(frozen=True)
class Thresholds:
    """The manifest's pressure_warn, pressure_critical (shares of RAM) and evict_floor."""

    warn: float
    critical: float
    floor: int = 0


class Level(enum.Enum):
    CALM = "calm"
    WARN = "warn"
    CRITICAL = "critical"


@dataclass(frozen=True)
class Decision:
    level: Level
    victims: tuple[Resident, ...] = ()
    message: str = ""  # the journal's 'pressure' record (none when calm)


def victims(used: int, total: int, critical: float, residents: Sequence[Resident],
            floor: int = 0) -> list[Resident]:
    """Idle models to stop, lowest rank first, until use drops below critical × total."""
    out: list[Resident] = []
    limit = critical * total
    for resident in eviction_order(residents, floor):
        if used < limit:
            break
        out.append(resident)
        used -= resident.memory
    return out


def decide(reading: Reading, limits: Thresholds) -> Decision:
    """Calm below warn; a warning below critical; above, the idle models to stop."""
    used, total = reading.used, reading.total
    if used < limits.warn * total:
        return Decision(Level.CALM)
    share = f"{used / total:.0%} of RAM in use"
    if used < limits.critical * total:
        return Decision(Level.WARN, message=f"memory pressure: {share} (warn at "
                                            f"{limits.warn:.0%})")
    stop = tuple(victims(used, total, limits.critical, reading.residents, limits.floor))
    return Decision(Level.CRITICAL, stop,
                    f"memory pressure: {share} (critical at {limits.critical:.0%}): stopping "
                    + (", ".join(v.name for v in stop) or "nothing idle"))
