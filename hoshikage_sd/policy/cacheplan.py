"""The SSD cache policy: ranks, sizes and the cache's room into keep / copy / expire
decisions. Pure: cache.py feeds it the machine's facts, the simulator a scenario's."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from hoshikage_sd import fmt
from hoshikage_sd.manifest.model import DAY, CachePolicy, Weights
from hoshikage_sd.policy.rank import ModelStats, rank


class Action(Enum):
    KEEP = "keep"      # cached, stays
    COPY = "copy"      # only on a slow tier, earns a place: copy it to the cache
    EXPIRE = "expire"  # cached, unused for long and lowest-ranked: delete the cached copy
    SKIP = "skip"      # would earn a place but there is no room


@dataclass(frozen=True)
class Candidate:
    name: str
    size: int
    rank: float
    last_used: float | None = None
    cached: bool = False      # a verified copy is in the cache
    fast: bool = False        # its source already is on the cache's disk: nothing to do
    busy: bool = False        # loaded, or being copied: never expired
    pinned: bool = False


@dataclass(frozen=True)
class Decision:
    action: Action
    name: str
    rank: float
    size: int
    reason: str


@dataclass(frozen=True)
class CacheState:
    used: int   # bytes the cache holds now
    free: int   # bytes free on the cache's disk now
    candidates: Sequence[Candidate] = field(default_factory=tuple)


@dataclass(frozen=True)
class Holding:
    """A model as the cache sees it, before ranks: the machine's (cache.py) or a scenario's."""

    name: str
    size: int
    cached: bool
    fast: bool
    pinned: bool


def cache_state(models: Iterable[Holding], stats: Mapping[str, ModelStats],
                busy: Collection[str], free: int, now: float, weights: Weights) -> CacheState:
    """The input plan_cache decides on, built the same way for cache-sync and the
    simulator: ranks at `now` from the usage records, what the cache holds, its room."""
    candidates, used = [], 0
    for m in models:
        usage = stats.get(m.name, ModelStats())
        loaded = m.name in busy
        candidates.append(Candidate(m.name, m.size, rank(usage, now, weights, loaded),
                                    usage.last_used, m.cached, m.fast, loaded, m.pinned))
        used += m.size if m.cached else 0
    return CacheState(used, free, candidates)


def span(seconds: float) -> str:
    """A stretch of time as people read it: "3.5 days", else "2 s", "40 min"."""
    return f"{seconds / DAY:.3g} days" if seconds >= DAY else fmt.ago(seconds)


def plan_cache(state: CacheState, policy: CachePolicy, now: float) -> list[Decision]:
    """Copy the highest-ranked slow-tier models that earn a place; make room by expiring the
    lowest-ranked cached models unused for `expire_after`; keep everything else."""
    room = state.free - policy.min_free
    if policy.max_size is not None:
        room = min(room, policy.max_size - state.used)
    cached = {c.name: c for c in state.candidates if c.cached}
    expired: dict[str, Decision] = {}
    decisions: list[Decision] = []

    def expirable(c: Candidate, above: float) -> bool:
        unused = now - (c.last_used or 0.0)
        return (c.name not in expired and not c.busy and not c.pinned and c.rank < above
                and unused >= policy.expire_after)

    def expire(old: Candidate, why: str) -> None:
        expired[old.name] = Decision(Action.EXPIRE, old.name, old.rank, old.size,
                                     f"{why}; unused {span(now - (old.last_used or 0.0))}")
        decisions.append(expired[old.name])

    # Over its limits already (max_size lowered, the disk filled up): shrink first.
    for old in sorted(cached.values(), key=lambda o: (o.rank, o.name)):
        if room >= 0:
            break
        if expirable(old, math.inf):
            expire(old, "the cache is over max_size or min_free")
            room += old.size

    wanted = sorted((c for c in state.candidates
                     if not c.cached and not c.fast and c.rank >= policy.min_rank),
                    key=lambda c: (-c.rank, c.name))
    for c in wanted:
        if c.size > room:
            victims, gain = [], 0
            for old in sorted(cached.values(), key=lambda o: (o.rank, o.name)):
                if room + gain >= c.size:
                    break
                if expirable(old, c.rank):
                    victims.append(old)
                    gain += old.size
            if room + gain < c.size:
                decisions.append(Decision(
                    Action.SKIP, c.name, c.rank, c.size,
                    f"no room: needs {fmt.size(c.size)}, {fmt.size(max(room, 0))} free, and no "
                    f"lower-ranked cached model has been unused for "
                    f"{span(policy.expire_after)}"))
                continue
            for old in victims:
                expire(old, f"makes room for {c.name} (rank {c.rank:.1f})")
            room += gain
        room -= c.size
        decisions.append(Decision(Action.COPY, c.name, c.rank, c.size,
                                  f"rank {c.rank:.1f} earns a place on the cache"))
    for c in sorted(cached.values(), key=lambda c: (-c.rank, c.name)):
        if c.name not in expired:
            decisions.append(Decision(Action.KEEP, c.name, c.rank, c.size, "cached"))
    return decisions
