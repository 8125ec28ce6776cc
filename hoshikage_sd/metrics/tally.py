"""Counting: in-memory tallies and the counter file every process adds to (flock, atomic
replace), which outlives the router's idle exits."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from hoshikage_sd.files import write_atomic
from hoshikage_sd.metrics.families import (
    COUNTED,
    FORMAT,
    MAX_SERIES,
    Family,
    Labels,
    bucket_bound,
)

logger = logging.getLogger("hoshikage")


class Counts(Protocol):
    """Where a count goes: a Tally to commit later, or the router's Metrics (its batch)."""

    def count(self, name: str, by: float = 1.0, **labels: object) -> object: ...


class Histogram:
    """Counts per bucket (not cumulative; the last is +Inf), their sum and count."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self, counts: list[int], total: float = 0.0, count: int = 0) -> None:
        self.counts = counts
        self.sum = total
        self.count = count

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Histogram) and \
            (self.counts, self.sum, self.count) == (other.counts, other.sum, other.count)

    def __repr__(self) -> str:
        return f"Histogram({self.counts}, {self.sum}, {self.count})"

    def observe(self, value: float, buckets: tuple[float, ...]) -> None:
        i = 0
        while i < len(buckets) and value > buckets[i]:
            i += 1
        self.counts[i] += 1
        self.sum += value
        self.count += 1

    def add(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum
        self.count += other.count


class Tally:
    """Counts by family and label values: a process's increments, or the file's totals."""

    def __init__(self, since: float | None = None) -> None:
        self.counters: dict[str, dict[Labels, float]] = {}
        self.histograms: dict[str, dict[Labels, Histogram]] = {}
        self.since = since  # the file's: when its first count was added

    def __bool__(self) -> bool:
        return bool(self.counters or self.histograms)

    @staticmethod
    def _labels(family: Family, labels: Mapping[str, object]) -> Labels:
        if set(labels) != set(family.labels):
            raise ValueError(f"{family.name} takes labels {family.labels}, not "
                             f"{tuple(labels)}")
        return tuple(str(labels[k]) for k in family.labels)

    def count(self, name: str, by: float = 1.0, **labels: object) -> Tally:
        family = COUNTED[name]
        assert family.kind == "counter", name
        series = self.counters.setdefault(name, {})
        key = self._labels(family, labels)
        series[key] = series.get(key, 0.0) + by
        return self

    def observe(self, name: str, value: float, **labels: object) -> Tally:
        family = COUNTED[name]
        assert family.kind == "histogram", name
        series = self.histograms.setdefault(name, {})
        key = self._labels(family, labels)
        hist = series.get(key)
        if hist is None:
            hist = series[key] = Histogram([0] * (len(family.buckets) + 1))
        hist.observe(max(0.0, value), family.buckets)
        return self

    def add(self, other: Tally) -> None:
        """Add `other` into this one (label sets beyond MAX_SERIES are dropped)."""
        for name, series in other.counters.items():
            mine = self.counters.setdefault(name, {})
            for key, value in series.items():
                if key in mine or len(mine) < MAX_SERIES:
                    mine[key] = mine.get(key, 0.0) + value
                else:
                    logger.warning("metrics: %s has %d label sets; dropping %s", name,
                                   MAX_SERIES, key)
        for name, hseries in other.histograms.items():
            hmine = self.histograms.setdefault(name, {})
            for key, hist in hseries.items():
                if key in hmine:
                    hmine[key].add(hist)
                elif len(hmine) < MAX_SERIES:
                    hmine[key] = Histogram(list(hist.counts), hist.sum, hist.count)
                else:
                    logger.warning("metrics: %s has %d label sets; dropping %s", name,
                                   MAX_SERIES, key)

    def merged(self, other: Tally | None) -> Tally:
        out = Tally(since=self.since)
        out.add(self)
        if other:
            out.add(other)
        return out

    # -- the file -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "since": self.since,
            "counters": {name: [[list(k), v] for k, v in series.items()]
                         for name, series in self.counters.items()},
            "histograms": {name: {"buckets": list(COUNTED[name].buckets),
                                  "series": [[list(k), h.counts, h.sum, h.count]
                                             for k, h in series.items()]}
                           for name, series in self.histograms.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Tally:
        """What a file holds; families this version does not know, label sets of another
        shape and histograms with other buckets (an upgrade changed them) start over."""
        out = cls(since=data.get("since"))
        for name, rows in (data.get("counters") or {}).items():
            family = COUNTED.get(name)
            if family is None or family.kind != "counter":
                continue
            out.counters[name] = {tuple(k): float(v) for k, v in rows
                                  if len(k) == len(family.labels)}
        for name, entry in (data.get("histograms") or {}).items():
            family = COUNTED.get(name)
            if family is None or family.kind != "histogram" or \
                    tuple(entry.get("buckets", ())) != family.buckets:
                continue
            out.histograms[name] = {
                tuple(k): Histogram([int(c) for c in counts], float(total), int(n))
                for k, counts, total, n in entry["series"]
                if len(k) == len(family.labels) and len(counts) == len(family.buckets) + 1}
        return out


def counter_file(runtime_dir: Path) -> Path:
    return runtime_dir / "metrics" / "counters.json"


def read(runtime_dir: Path) -> Tally:
    """The totals every process has added so far (empty before the first count)."""
    try:
        data = json.loads(counter_file(runtime_dir).read_bytes())
        return Tally.from_json(data) if isinstance(data, dict) else Tally()
    except FileNotFoundError:
        return Tally()
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        logger.warning("metrics: cannot read %s (%s): counting from zero",
                       counter_file(runtime_dir), exc)
        return Tally()


@contextlib.contextmanager
def _locked(runtime_dir: Path) -> Iterator[None]:
    path = counter_file(runtime_dir).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Read-only is enough for flock, so a lock file root created stays usable by the user.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def commit(runtime_dir: Path, increments: Tally) -> bool:
    """Add `increments` to the counter file. Bookkeeping: a failure is logged, never raised
    (a load or a request must not fail for a count); False then, and nothing was added."""
    if not increments:
        return True
    try:
        with _locked(runtime_dir):
            totals = read(runtime_dir)
            totals.add(increments)
            if totals.since is None:
                totals.since = time.time()
            write_atomic(counter_file(runtime_dir),
                         json.dumps(totals.to_json(), separators=(",", ":")))
    except OSError as exc:
        logger.warning("metrics: cannot add to %s: %s", counter_file(runtime_dir), exc)
        return False
    return True


def count(runtime_dir: Path, name: str, by: float = 1.0, **labels: object) -> None:
    """One increment straight into the file (for processes that count once or twice)."""
    commit(runtime_dir, Tally().count(name, by, **labels))


def as_json(totals: Tally) -> dict[str, list[dict[str, Any]]]:
    """The counters for scripts (`status --json`): per family, each label set with its
    value, or a histogram's count, sum and cumulative buckets ({"0.5": n, ..., "+Inf": n})."""
    out: dict[str, list[dict[str, Any]]] = {}
    for family in COUNTED.values():
        rows: list[dict[str, Any]] = []
        if family.kind == "counter":
            for key, value in sorted(totals.counters.get(family.name, {}).items()):
                rows.append({"labels": dict(zip(family.labels, key, strict=True)),
                             "value": value})
        else:
            les = [bucket_bound(b) for b in (*family.buckets, math.inf)]
            for key, hist in sorted(totals.histograms.get(family.name, {}).items()):
                cumulative = [sum(hist.counts[:i + 1]) for i in range(len(hist.counts))]
                rows.append({"labels": dict(zip(family.labels, key, strict=True)),
                             "count": hist.count, "sum": hist.sum,
                             "buckets": dict(zip(les, cumulative, strict=True))})
        out[family.name] = rows
    return out
