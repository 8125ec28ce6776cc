"""Usage and rank: pure functions over plain numbers.

A model's usage (hoshikage_sd/stats.py keeps it in /var/lib/hoshikage/stats.json) is its
last 100 loads with how long each ran; rank turns that into one number, which orders RAM
eviction, the SSD cache (cacheplan.py) and the choice between models one name matches
(resolve.py). The simulator replays scenarios through these same functions, so what it
prints is what the machine does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hoshikage_sd.manifest.model import DAY, DEFAULT_WEIGHTS, Weights

KEEP_USES = 100


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


def rank(stats: ModelStats, now: float, w: Weights = DEFAULT_WEIGHTS,
         running: bool = False) -> float:
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
