"""Admission: does a model fit, which idle models make room for it, or why it cannot load.

`decide` is a pure function of numbers, so the policy is tested without a machine; the
activator gathers those numbers (MemAvailable, the loaded models, their activity) and acts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from hoshikage_sd import fmt


class Verdict(Enum):
    LOAD = "load"      # fits now
    EVICT = "evict"    # fits once the victims are stopped
    WAIT = "wait"      # fits only once busy models go idle: the request waits, bounded
    REJECT = "reject"  # can never fit, whatever is stopped


@dataclass(frozen=True)
class Resident:
    """A model unit that holds memory now (or is starting and soon will)."""

    name: str
    memory: int               # bytes it holds: its estimate
    idle: float | None        # seconds since its last request ended; None: busy or starting
    pinned: bool = False
    last_used: float = 0.0    # wall clock of the last use: older goes first
    starting: bool = False    # not serving yet: its memory is promised, not yet taken
    rank: float = 0.0         # usage rank (rank.py): lower goes first


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    needed: int
    available: int
    victims: tuple[Resident, ...] = ()
    message: str = ""


def eviction_order(residents: Sequence[Resident], floor: int = 0) -> list[Resident]:
    """Idle, unpinned models at or above the floor: lowest rank, then least recently used,
    then cheapest to load again, first."""
    candidates = [r for r in residents
                  if r.idle is not None and not r.pinned and r.memory >= floor]
    return sorted(candidates, key=lambda r: (r.rank, r.last_used, r.memory, r.name))


def decide(name: str, estimate: int, available: int, residents: Sequence[Resident], *,
           margin: float = 1.2, max_loaded: int | None = None, floor: int = 0) -> Decision:
    """Load, evict (which), wait, or reject `name`, needing estimate × margin bytes.

    `available` is memory free for it now (MemAvailable less what starting models will
    take, and within memory_budget). A busy model is never a victim.
    """
    needed = math.ceil(estimate * margin)
    need = f"needed {fmt.size(needed)} ({fmt.size(estimate)} × {margin:g})"
    others = [r for r in residents if r.name != name]

    def fits(free: int, count: int) -> bool:
        return free >= needed and (max_loaded is None or count < max_loaded)

    if fits(available, len(others)):
        return Decision(Verdict.LOAD, needed, available,
                        message=f"loading {name}: available {fmt.size(available)} >= {need}")
    victims: list[Resident] = []
    free, count = available, len(others)
    for resident in eviction_order(others, floor):
        if fits(free, count):
            break
        victims.append(resident)
        free += resident.memory
        count -= 1
    why = (f"available {fmt.size(available)} < {need}" if available < needed
           else f"{len(others)} models loaded, max_loaded_models is {max_loaded}")
    if fits(free, count):
        stops = ", ".join(f"{v.name} ({fmt.size(v.memory)}, idle {fmt.ago(v.idle or 0)})"
                          for v in victims)
        return Decision(Verdict.EVICT, needed, available, tuple(victims),
                        f"{why}: stopping {stops}")
    busy = [r for r in others if r.idle is None and not r.pinned and r.memory >= floor]
    if fits(free + sum(r.memory for r in busy), count - len(busy)):
        return Decision(Verdict.WAIT, needed, available, (),
                        f"{why}: waiting for busy {', '.join(r.name for r in busy)}")
    kept = [r.name for r in others if r.pinned or r.memory < floor]
    most = free + sum(r.memory for r in busy)
    return Decision(Verdict.REJECT, needed, available, (),
                    f"{name} cannot fit: {need}, but at most {fmt.size(most)} can be freed"
                    + (f" ({', '.join(kept)} pinned or below evict_floor)" if kept else ""))


def pressure_victims(used: int, total: int, critical: float,
                     residents: Sequence[Resident], floor: int = 0) -> list[Resident]:
    """Idle models to stop, lowest rank first, until use drops below critical × total."""
    victims: list[Resident] = []
    limit = critical * total
    for resident in eviction_order(residents, floor):
        if used < limit:
            break
        victims.append(resident)
        used -= resident.memory
    return victims
