"""Usage statistics, rank, and the SSD cache policy: pure functions over plain numbers.

The stats file (/var/lib/hoshikage/stats.json) records per model the last 100 loads with how
long each ran. Rank turns that into one number; `plan_cache` turns ranks, sizes and the cache's
room into keep / copy / expire decisions. The simulator replays scenarios through these same
functions, so what it prints is what the machine does.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path

from hoshikage_sd.state import write_atomic
from hoshikage_sd.store import human

DAY = 86400.0
KEEP_USES = 100
STATS_VERSION = 1


@dataclass(frozen=True)
class Weights:
    """rank = week × uses in 7 days + month × uses in 30 days + total × all uses
    + recent bonus if used within 7 days − age × days since last use
    + runtime × hours in use in the last 30 days (load to last request, not the idle tail
    before the idle stop, so a long TTL earns nothing)."""

    week: float = 10.0
    month: float = 3.0
    total: float = 0.5
    recent_bonus: float = 20.0
    age: float = 2.0
    runtime: float = 15.0


@dataclass(frozen=True)
class Use:
    at: float                     # wall clock of the load
    runtime: float | None = None  # seconds from unit start to stop; None while running


@dataclass(frozen=True)
class ModelStats:
    uses: tuple[Use, ...] = ()
    total_uses: int = 0
    total_runtime: float = 0.0
    last_load_seconds: float | None = None

    @property
    def last_used(self) -> float | None:
        return max((u.at + (u.runtime or 0.0) for u in self.uses), default=None)

    def hours(self, now: float, since: float, running: bool = False) -> float:
        """Hours in use between `since` and `now`. A load without a stop record is still
        running only if it is the last one and the model is loaded now; otherwise it
        crashed and counts nothing (or a stale record would outrank everything)."""
        total = 0.0
        for i, u in enumerate(self.uses):
            if u.runtime is not None:
                end = u.at + u.runtime
            elif running and i == len(self.uses) - 1:
                end = now
            else:
                continue
            total += max(0.0, min(end, now) - max(u.at, since))  # the part inside the window
        return total / 3600

    def with_load(self, at: float, load_seconds: float | None = None) -> ModelStats:
        return replace(self, uses=(*self.uses, Use(at))[-KEEP_USES:],
                       total_uses=self.total_uses + 1,
                       last_load_seconds=load_seconds if load_seconds is not None
                       else self.last_load_seconds)

    def with_stop(self, at: float) -> ModelStats:
        """The unit stopped: the last use ran until `at`."""
        if not self.uses or self.uses[-1].runtime is not None:
            return self
        last = self.uses[-1]
        runtime = max(0.0, at - last.at)
        return replace(self, uses=(*self.uses[:-1], Use(last.at, runtime)),
                       total_runtime=self.total_runtime + runtime)


def rank(stats: ModelStats, now: float, w: Weights = Weights(), running: bool = False) -> float:
    """The model's rank at `now`; `running`: it is loaded now."""
    last = stats.last_used
    if last is None:
        return 0.0
    week = sum(1 for u in stats.uses if now - u.at <= 7 * DAY)
    month = sum(1 for u in stats.uses if now - u.at <= 30 * DAY)
    hours = stats.hours(now, now - 30 * DAY, running)
    days = max(0.0, now - last) / DAY
    return (week * w.week + month * w.month + stats.total_uses * w.total
            + (w.recent_bonus if days <= 7 else 0.0) - days * w.age + hours * w.runtime)


# -- the stats file -------------------------------------------------------------------------
class StatsFile:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "stats.json"

    def read(self) -> dict[str, ModelStats]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        out = {}
        for name, entry in (data.get("models") or {}).items():
            with contextlib.suppress(TypeError, KeyError, ValueError):
                out[name] = ModelStats(
                    uses=tuple(Use(float(u["at"]), None if u.get("runtime") is None
                                   else float(u["runtime"])) for u in entry.get("uses", [])),
                    total_uses=int(entry.get("total_uses", 0)),
                    total_runtime=float(entry.get("total_runtime", 0.0)),
                    last_load_seconds=entry.get("last_load_seconds"))
        return out

    def write(self, stats: Mapping[str, ModelStats]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": STATS_VERSION,
                "models": {name: asdict(s) for name, s in sorted(stats.items())}}
        write_atomic(self.path, json.dumps(data, indent=1) + "\n")

    @contextlib.contextmanager
    def update(self) -> Iterator[dict[str, ModelStats]]:
        """Read, let the caller change the dict, write back: one writer at a time."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(".stats.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            stats = self.read()
            yield stats
            self.write(stats)
        finally:
            os.close(fd)

    def record_load(self, name: str, load_seconds: float | None = None) -> None:
        with self.update() as stats:
            stats[name] = stats.get(name, ModelStats()).with_load(time.time(), load_seconds)

    def record_stop(self, name: str, last_request_end: float | None = None) -> None:
        """The unit stopped; it was in use until its last request ended (or until now)."""
        with self.update() as stats:
            if name in stats:
                stats[name] = stats[name].with_stop(last_request_end or time.time())

    def ranks(self, now: float | None = None, w: Weights = Weights(),
              running: Collection[str] = ()) -> dict[str, float]:
        now = time.time() if now is None else now
        return {name: rank(s, now, w, name in running) for name, s in self.read().items()}


# -- the SSD cache policy -------------------------------------------------------------------
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
class CachePolicy:
    max_size: int | None = None  # bytes the cache may hold
    min_free: int = 0            # bytes to leave free on the cache's disk
    expire_after: float = 7 * DAY
    min_rank: float = 1.0        # rank a model needs to earn a place


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
        days = (now - (old.last_used or 0.0)) / DAY
        expired[old.name] = Decision(Action.EXPIRE, old.name, old.rank, old.size,
                                     f"{why}; unused {days:.0f} days")
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
                    f"no room: needs {human(c.size)}, {human(max(room, 0))} free, and no "
                    f"lower-ranked cached model has been unused for "
                    f"{policy.expire_after / DAY:g} days"))
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
