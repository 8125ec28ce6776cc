"""Admission: does a model fit, which idle models make room for it, or why it cannot load.

`decide` is a pure function of two values: a `Snapshot` of the machine (who holds what, what
is free, the manifest's limits) and the `Request` (what the newcomer needs). It reads no
file, process or clock and writes nothing, so the policy is tested with plain numbers and
the simulator's answers are the machine's. The callers gather the snapshot
(hoshikage_sd/admission/gather.py), decide once, and carry the decision out: its journal
record, the evictions, the estimate they admit it with (admission/act.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
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
    #: the RPC workers its llama-server holds (a worker serves one llama-server at a time)
    workers: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Limits:
    """The manifest's rules for admission."""

    margin: float = 1.2            # safety_margin: a model needs its estimate × margin
    max_loaded: int | None = None  # max_loaded_models
    floor: int = 0                 # evict_floor: a model holding less is never evicted
    budget: int | None = None      # memory_budget: what all models may hold together


@dataclass(frozen=True)
class Snapshot:
    """The machine as admission sees it, gathered once."""

    residents: tuple[Resident, ...] = ()
    mem_available: int = 0  # MemAvailable
    #: each GPU device's memory in all, as llama-server lists the devices for the newcomer
    devices: Mapping[str, int] = field(default_factory=dict)
    limits: Limits = Limits()


@dataclass(frozen=True)
class Request:
    """A model to admit: what it will hold."""

    name: str
    estimate: int  # bytes of RAM (memory.estimate)
    devices: Mapping[str, int] = field(default_factory=dict)  # bytes on each GPU device
    workers: frozenset[str] = frozenset()  # the RPC workers it is split over


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    needed: int
    available: int
    victims: tuple[Resident, ...] = ()
    message: str = ""
    #: the devices that lacked room for it: its victims' memory there must be free first
    devices_short: tuple[str, ...] = ()
    #: EVICT for max_loaded_models only, everything else free already: the newcomer need not
    #: wait for its victims to stop, and their staged copies may stay (release.keeps_copy)
    by_count: bool = False
    #: REJECT's reason, as hoshikage_refusals_total counts it
    refusal: str | None = None


def eviction_order(residents: Sequence[Resident], floor: int = 0) -> list[Resident]:
    """Idle, unpinned models at or above the floor: lowest rank, then least recently used,
    then cheapest to load again, first."""
    candidates = [r for r in residents
                  if r.idle is not None and not r.pinned and r.memory >= floor]
    return sorted(candidates, key=lambda r: (r.rank, r.last_used, r.memory, r.name))


#: what a newcomer may lack besides a device's memory: RAM, a place (max_loaded_models), an
#: RPC worker another model holds (llama.cpp's device names never take these forms)
RAM, COUNT, WORKER = "RAM", "count", "RPC worker"


@dataclass(frozen=True)
class Need:
    """The request with the margin applied."""

    name: str
    ram: int
    estimate: int
    margin: float
    devices: Mapping[str, int]  # only those it puts something on

    def says(self) -> str:
        return f"needed {fmt.size(self.ram)} ({fmt.size(self.estimate)} × {self.margin:g})"


@dataclass(frozen=True)
class Room:
    """What the newcomer has: RAM free, models loaded besides it, free memory on each
    device it needs, and the models holding a worker it needs (model -> that worker)."""

    ram: int
    loaded: int
    devices: Mapping[str, int]
    holding: Mapping[str, str]

    def lacking(self, need: Need, max_loaded: int | None) -> list[str]:
        out = [RAM] if self.ram < need.ram else []
        if max_loaded is not None and self.loaded >= max_loaded:
            out.append(COUNT)
        if self.holding:
            out.append(WORKER)
        return out + [d for d, n in need.devices.items() if self.devices.get(d, 0) < n]

    def frees(self, r: Resident, missing: Sequence[str]) -> bool:
        """Would stopping `r` give the newcomer something it lacks?"""
        return (RAM in missing and r.memory > 0) or COUNT in missing or \
            (WORKER in missing and r.name in self.holding) or \
            any(r.devices.get(d, 0) > 0 for d in missing)

    def without(self, r: Resident) -> Room:
        """The room once `r` has stopped."""
        return Room(self.ram + r.memory, self.loaded - 1,
                    {d: f + r.devices.get(d, 0) for d, f in self.devices.items()},
                    {n: w for n, w in self.holding.items() if n != r.name})


def available(snapshot: Snapshot, others: Sequence[Resident]) -> int:
    """Free for a newcomer: MemAvailable less what starting models are about to take, and
    no more than memory_budget less what every model holds."""
    free = snapshot.mem_available - sum(r.memory for r in others if r.starting)
    if snapshot.limits.budget is not None:
        free = min(free, snapshot.limits.budget - sum(r.memory for r in others))
    return max(0, free)


def room_now(snapshot: Snapshot, request: Request, others: Sequence[Resident],
             need: Need) -> Room:
    held = {d: sum(r.devices.get(d, 0) for r in others) for d in need.devices}
    holding = {r.name: min(r.workers & request.workers) for r in others
               if r.workers & request.workers}
    return Room(available(snapshot, others), len(others),
                {d: snapshot.devices.get(d, 0) - held[d] for d in need.devices}, holding)


def take(candidates: Sequence[Resident], room: Room, need: Need, max_loaded: int | None
         ) -> tuple[list[Resident], Room]:
    """Take from `candidates` in order those that free something lacking, until nothing is;
    and the room left then."""
    taken = []
    for r in candidates:
        missing = room.lacking(need, max_loaded)
        if not missing:
            break
        if room.frees(r, missing):
            taken.append(r)
            room = room.without(r)
    return taken, room


def decide(snapshot: Snapshot, request: Request) -> Decision:
    """Load, evict (which), wait, or reject `request`, which needs estimate × margin bytes
    of RAM, devices × margin bytes on each GPU device, and its RPC workers to itself.

    A busy model is never a victim; an idle one is one only where it frees what is lacking
    (RAM, a device, a place, a worker)."""
    limits = snapshot.limits
    need = Need(request.name, math.ceil(request.estimate * limits.margin), request.estimate,
                limits.margin, {d: math.ceil(b * limits.margin)
                                for d, b in request.devices.items() if b > 0})
    others = [r for r in snapshot.residents if r.name != request.name]
    room = room_now(snapshot, request, others, need)
    short = room.lacking(need, limits.max_loaded)
    base = Decision(Verdict.LOAD, need.ram, room.ram,
                    devices_short=tuple(d for d in short if d in need.devices))
    if not short:
        return replace(base, message=loaded(need, room))
    too_big = [d for d in base.devices_short if need.devices[d] > snapshot.devices.get(d, 0)]
    if too_big:
        d = too_big[0]
        return replace(base, verdict=Verdict.REJECT, refusal="memory", message=(
            f"{need.name} cannot fit: needed {fmt.size(need.devices[d])} on {d}, which has "
            f"{fmt.size(snapshot.devices.get(d, 0))} in all (fewer GPU layers: -ngl, or "
            "another device: --device)"))
    why = "; ".join(reasons(need, room, short, limits.max_loaded))
    victims, after = take(eviction_order(others, limits.floor), room, need, limits.max_loaded)
    if not after.lacking(need, limits.max_loaded):
        stops = ", ".join(f"{v.name} ({fmt.size(v.memory)}, idle {fmt.ago(v.idle or 0)})"
                          for v in victims)
        return replace(base, verdict=Verdict.EVICT, victims=tuple(victims),
                       by_count=short == [COUNT], message=f"{why}: stopping {stops}")
    busy = [r for r in others if r.idle is None and not r.pinned and r.memory >= limits.floor]
    waited, then = take(busy, after, need, limits.max_loaded)
    if waited and not then.lacking(need, limits.max_loaded):
        return replace(base, verdict=Verdict.WAIT,
                       message=f"{why}: waiting for busy {', '.join(r.name for r in waited)}")
    return replace(base, verdict=Verdict.REJECT, refusal=refusal(short),
                   message=cannot_fit(need, short, after, busy, others, limits.floor))


def loaded(need: Need, room: Room) -> str:
    on = "".join(f", {d} free {fmt.size(room.devices[d])} >= {fmt.size(n)}"
                 for d, n in need.devices.items())
    return f"loading {need.name}: available {fmt.size(room.ram)} >= {need.says()}{on}"


def reasons(need: Need, room: Room, short: Sequence[str], max_loaded: int | None
            ) -> list[str]:
    """What the newcomer lacks now, one phrase each, with the numbers."""
    whys = []
    if RAM in short:
        whys.append(f"available {fmt.size(room.ram)} < {need.says()}")
    if COUNT in short:
        whys.append(f"{room.loaded} models loaded, max_loaded_models is {max_loaded}")
    if WORKER in short:
        whys += [f"worker '{w}' serves '{n}' now" for n, w in room.holding.items()]
    return whys + [f"{d} free {fmt.size(room.devices[d])} < needed "
                   f"{fmt.size(need.devices[d])}" for d in short if d in need.devices]


def cannot_fit(need: Need, short: Sequence[str], after: Room, busy: Sequence[Resident],
               others: Sequence[Resident], floor: int) -> str:
    """A refusal's message: what it needs, the most that could be freed, and which models
    (pinned or below evict_floor) keep the rest."""
    kept = [r.name for r in others if r.pinned or r.memory < floor]
    because = f" ({', '.join(kept)} pinned or below evict_floor)" if kept else ""
    devices_short = [d for d in short if d in need.devices]
    if RAM not in short and devices_short:  # a device is what cannot be made room on
        device = devices_short[0]
        at_most = after.devices[device] + sum(r.devices.get(device, 0) for r in busy)
        where = f"needed {fmt.size(need.devices[device])} on {device}"
    elif RAM not in short and WORKER in after.lacking(need, None):
        holders = ", ".join(f"worker '{w}' serves '{n}' now" for n, w in after.holding.items())
        return f"{need.name} cannot load: {holders}{because}"
    elif RAM not in short and COUNT in short:  # a place, not memory, is what is lacking
        return (f"{need.name} cannot load: max_loaded_models is reached by models that stay"
                f"{because}")
    else:
        at_most = after.ram + sum(r.memory for r in busy)
        where = need.says()
    return (f"{need.name} cannot fit: {where}, but at most {fmt.size(at_most)} can be "
            f"freed{because}")


def refusal(short: Sequence[str]) -> str:
    """Why a model can never load, as hoshikage_refusals_total counts it: not enough memory
    (RAM or a device's), a worker kept by a model that stays, or max_loaded_models."""
    if RAM in short or any(d not in (COUNT, WORKER) for d in short):
        return "memory"
    return "rpc_worker" if WORKER in short else "max_loaded_models"
