"""Admission: does a model fit, which idle models make room for it, or why it cannot load.

`decide` is a pure function of numbers, so the policy is tested without a machine; the
activator gathers those numbers (MemAvailable, the loaded models, their activity) and acts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    #: bytes it holds on each GPU device (llama.cpp's device names: Vulkan0, CUDA0, ...)
    devices: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    needed: int
    available: int
    victims: tuple[Resident, ...] = ()
    message: str = ""
    #: the devices that lacked room for it: its victims' memory there must be free first
    devices_short: tuple[str, ...] = ()


def eviction_order(residents: Sequence[Resident], floor: int = 0) -> list[Resident]:
    """Idle, unpinned models at or above the floor: lowest rank, then least recently used,
    then cheapest to load again, first."""
    candidates = [r for r in residents
                  if r.idle is not None and not r.pinned and r.memory >= floor]
    return sorted(candidates, key=lambda r: (r.rank, r.last_used, r.memory, r.name))


#: what a newcomer may lack besides a device's memory
RAM, COUNT = "RAM", "count"


def decide(name: str, estimate: int, available: int, residents: Sequence[Resident], *,
           margin: float = 1.2, max_loaded: int | None = None, floor: int = 0,
           device_need: Mapping[str, int] | None = None,
           device_free: Mapping[str, int] | None = None,
           device_total: Mapping[str, int] | None = None) -> Decision:
    """Load, evict (which), wait, or reject `name`, needing estimate × margin bytes of RAM
    and device_need × margin bytes on each GPU device.

    `available` is memory free for it now (MemAvailable less what starting models will
    take, and within memory_budget); `device_free`, each device's memory less what the
    residents hold there (device_total: all of it). A busy model is never a victim; an
    idle one is one only where it frees what is lacking (RAM, a device, a place).
    """
    needed = math.ceil(estimate * margin)
    need = f"needed {fmt.size(needed)} ({fmt.size(estimate)} × {margin:g})"
    dev_needed = {d: math.ceil(b * margin) for d, b in (device_need or {}).items() if b > 0}
    others = [r for r in residents if r.name != name]

    def lacking(free: int, count: int, dfree: Mapping[str, int]) -> list[str]:
        out = [RAM] if free < needed else []
        if max_loaded is not None and count >= max_loaded:
            out.append(COUNT)
        return out + [d for d, n in dev_needed.items() if dfree.get(d, 0) < n]

    dev_free = {d: (device_free or {}).get(d, 0) for d in dev_needed}
    short = lacking(available, len(others), dev_free)
    devices_short = tuple(d for d in short if d not in (RAM, COUNT))
    if not short:
        on = "".join(f", {d} free {fmt.size(dev_free[d])} >= {fmt.size(n)}"
                     for d, n in dev_needed.items())
        return Decision(Verdict.LOAD, needed, available,
                        message=f"loading {name}: available {fmt.size(available)} >= {need}"
                        + on)
    too_big = [d for d in devices_short
               if device_total is not None and dev_needed[d] > device_total.get(d, 0)]
    if too_big:
        d = too_big[0]
        return Decision(Verdict.REJECT, needed, available, (),
                        f"{name} cannot fit: needed {fmt.size(dev_needed[d])} on {d}, which "
                        f"has {fmt.size((device_total or {}).get(d, 0))} in all (fewer GPU "
                        "layers: -ngl, or another device: --device)", devices_short)
    whys = []
    if RAM in short:
        whys.append(f"available {fmt.size(available)} < {need}")
    if COUNT in short:
        whys.append(f"{len(others)} models loaded, max_loaded_models is {max_loaded}")
    whys += [f"{d} free {fmt.size(dev_free[d])} < needed {fmt.size(dev_needed[d])}"
             for d in devices_short]
    why = "; ".join(whys)

    def frees(r: Resident, missing: list[str]) -> bool:
        return (RAM in missing and r.memory > 0) or COUNT in missing or \
            any(r.devices.get(d, 0) > 0 for d in missing)

    def without(rs: Sequence[Resident], free: int, count: int, dfree: dict[str, int]
                ) -> tuple[list[Resident], int, int, dict[str, int]]:
        """Take from `rs` in order those that free something lacking, until nothing is."""
        taken = []
        for r in rs:
            missing = lacking(free, count, dfree)
            if not missing:
                break
            if frees(r, missing):
                taken.append(r)
                free, count = free + r.memory, count - 1
                dfree = {d: dfree[d] + r.devices.get(d, 0) for d in dfree}
        return taken, free, count, dfree

    victims, free, count, dfree = without(eviction_order(others, floor), available,
                                          len(others), dev_free)
    if not lacking(free, count, dfree):
        stops = ", ".join(f"{v.name} ({fmt.size(v.memory)}, idle {fmt.ago(v.idle or 0)})"
                          for v in victims)
        return Decision(Verdict.EVICT, needed, available, tuple(victims),
                        f"{why}: stopping {stops}", devices_short)
    busy = [r for r in others if r.idle is None and not r.pinned and r.memory >= floor]
    waited, at_most, count_then, dev_then = without(busy, free, count, dfree)
    if waited and not lacking(at_most, count_then, dev_then):
        return Decision(Verdict.WAIT, needed, available, (),
                        f"{why}: waiting for busy {', '.join(r.name for r in waited)}",
                        devices_short)
    kept = [r.name for r in others if r.pinned or r.memory < floor]
    most = free + sum(r.memory for r in busy)
    where, at_most = need, most
    if devices_short and RAM not in short:  # a device is what cannot be made room on
        device = devices_short[0]
        where = f"needed {fmt.size(dev_needed[device])} on {device}"
        at_most = dfree[device] + sum(r.devices.get(device, 0) for r in busy)
    return Decision(Verdict.REJECT, needed, available, (),
                    f"{name} cannot fit: {where}, but at most {fmt.size(at_most)} can be "
                    "freed" + (f" ({', '.join(kept)} pinned or below evict_floor)"
                               if kept else ""), devices_short)


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
