"""Prometheus metrics: counters that outlive every hoshikage process, gauges read at scrape
time, and the text exposition format 0.0.4, written by hand.

Where the counters live
-----------------------
Several short-lived processes count things: the router (requests; it exits when idle), each
model unit's activator (loads, their phases, the evictions it makes, refusals; it lives as
long as its model), the router and the activator both through admission records
(policy/residents.record), and the idle watch (idle and pressure stops; it runs for a
moment per timer tick). No process outlives the others, so the totals live in one file,
``runtime_dir/metrics/counters.json`` (/run/hoshikage/metrics/ under the units;
RuntimeDirectoryPreserve=yes keeps it across every unit's stop). A writer takes flock on
``metrics/counters.lock``, reads the totals, adds its increments and replaces the file
(temp + rename): a reader needs no lock and never sees half a write. The router batches:
it keeps increments in memory and adds them at most once per FLUSH_INTERVAL and when it
exits (``Metrics.flush``); its own scrape adds what it has not written yet. A router killed
outright loses at most FLUSH_INTERVAL of request counts.

/run is a tmpfs, so the counters start again at boot; Prometheus treats that as any counter
reset (rate() and increase() handle it), and hoshikage_counters_start_time_seconds says
when they started.

Measured with bench/metrics_store.py (docs/metrics.md; 2 shared cores, a file of 376 label
sets, 18 KB, on a tmpfs as /run is): counting a request in memory 4 µs; the router's flush
(a second's 50 requests added under the lock) 1.2 ms, once a second at most; the
activator's one write per start (once it serves or has failed: nothing is written on a
cold start's way) or an idle watch's count 1.0 ms; a whole scrape (file, runtime records, psutil,
218 KB of text) 2.2 ms. The alternatives, measured the same way:

- the journal (HOSHIKAGE_EVENT records exist for loads and stops): a scrape must walk every
  matching record since boot, 45 µs per record (450 ms at 10,000), growing with uptime;
  journald's vacuuming would make totals go down; and journal.send costs 48 µs a record,
  as much as proxying the request, so requests could not be counted there.
- prometheus_client's multiprocess mode: one file per PID that must stay after the process
  exits (else its counts go with it); every load is a new activator PID, so the directory
  and each scrape grow with every load since boot (3 ms after 10 loads, 16 ms after 100,
  110 ms after 1,000), every process must set PROMETHEUS_MULTIPROC_DIR before the import,
  and the import costs an activator 42 ms.
- a node_exporter textfile: needs node_exporter, and somebody to merge the processes'
  counts into it: the same problem, moved. (``hoshikage metrics`` prints this module's text
  for such a collector.)

So prometheus_client is no run-time dependency; the tests read this module's text back
with its parser.

What a scrape reads
-------------------
The counter file, the runtime records (which models run, their llama-server PID), psutil
(MemAvailable, each llama-server's RSS) and statvfs of the RAM disk. It starts nothing, asks
systemd nothing, and writes nothing: not the activity records the idle watch reads, so a
scrape keeps no model alive. Keeping the router's own idle clock still is the router's part.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from hoshikage_sd import __version__
from hoshikage_sd.files import write_atomic

logger = logging.getLogger("hoshikage")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FLUSH_INTERVAL = 1.0  # seconds: how stale the file may be behind a busy router
#: label sets kept per family: a guard against a client inventing names (the router is to
#: pass resolved model names and route_label()s, but the file is rewritten every second)
MAX_SERIES = 2000
FORMAT = 1

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                300.0, 600.0)


# NamedTuples and plain classes, not dataclasses: this module is on the activator's cold
# path, where they cost 2.1 ms of import against 0.85 ms (python -X importtime, .pyc).
class Family(NamedTuple):
    name: str
    kind: str  # counter | histogram | gauge
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


def _families(*items: Family) -> dict[str, Family]:
    return {f.name: f for f in items}


#: Counted by the processes above and kept in the counter file.
COUNTED = _families(
    Family("hoshikage_requests_total", "counter",
           "Requests the router answered, by model, route and HTTP status.",
           ("model", "route", "status")),
    Family("hoshikage_request_duration_seconds", "histogram",
           "Time from a request's arrival to the end of its reply (model start included).",
           ("model", "route"), REQUEST_BUCKETS),
    Family("hoshikage_time_to_first_byte_seconds", "histogram",
           "Time from a request's arrival to the first byte of its reply's body.",
           ("model", "route"), REQUEST_BUCKETS),
    Family("hoshikage_loads_total", "counter",
           "Models loaded (llama-server answered /health), by how: path=launcher when the "
           "router admitted it and the unit's launcher started llama-server at once, "
           "path=activator when the activator admitted and staged it first.",
           ("model", "path")),
    Family("hoshikage_load_phase_seconds", "histogram",
           "Seconds a load spent per phase: admission (deciding, evicting, waiting for "
           "room), staging (copying into the RAM disk or checking the copy), llama_server "
           "(from its start to /health 200). A load by the launcher path has only "
           "llama_server (the router admitted it; the copy was current).",
           ("model", "phase"), LOAD_BUCKETS),
    Family("hoshikage_load_failures_total", "counter",
           "Model unit starts that failed before the model served (refusals included).",
           ("model",)),
    Family("hoshikage_admission_decisions_total", "counter",
           "Admission verdicts (load, evict, wait, reject) for a model about to load.",
           ("model", "verdict")),
    Family("hoshikage_evictions_total", "counter",
           "Models stopped by hoshikage, by reason: admission (to make room for another "
           "model), pressure (memory pressure), idle (idle past its TTL).",
           ("model", "reason")),
    Family("hoshikage_refusals_total", "counter",
           "Loads refused, by reason: memory (can never fit), max_loaded_models, "
           "wait_timeout (busy models did not go idle within admission_wait).",
           ("model", "reason")),
)

#: Read at scrape time.
GAUGES = _families(
    Family("hoshikage_in_flight_requests", "gauge",
           "Requests the router is answering now.", ("model",)),
    Family("hoshikage_models_loaded", "gauge",
           "Models whose llama-server runs (from the runtime records)."),
    Family("hoshikage_model_resident_bytes", "gauge",
           "Resident memory of a loaded model's llama-server (RSS, the mapped staged copy "
           "included).", ("model",)),
    Family("hoshikage_model_idle_seconds", "gauge",
           "Seconds since a loaded model's last request ended (absent while busy).",
           ("model",)),
    Family("hoshikage_ramdisk_used_bytes", "gauge", "Bytes used on the RAM disk."),
    Family("hoshikage_ramdisk_size_bytes", "gauge", "Size of the RAM disk."),
    Family("hoshikage_memory_available_bytes", "gauge", "MemAvailable from /proc/meminfo."),
    Family("hoshikage_memory_total_bytes", "gauge", "MemTotal from /proc/meminfo."),
    Family("hoshikage_counters_start_time_seconds", "gauge",
           "When the counters started (Unix time): the first count since boot."),
    Family("hoshikage_build_info", "gauge", "hoshikage's version.", ("version",)),
)

#: route_label's known routes; every other path is "other" (a label per path would let
#: any client grow the counter file)
ROUTES = frozenset((
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages",
    "/v1/messages/count_tokens", "/v1/models", "/v1/rerank", "/v1/responses",
    "/completion", "/completions", "/chat/completions", "/embedding", "/embeddings",
    "/infill", "/rerank", "/reranking", "/tokenize", "/detokenize", "/apply-template",
    "/health", "/props", "/slots", "/metrics",
    "/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/tags", "/api/ps",
    "/api/show", "/api/version", "/api/pull", "/api/push", "/api/create", "/api/delete",
    "/api/copy",
))


def route_label(path: str) -> str:
    """A request path as a bounded label: a known route, /v1/models/{id}, or "other"."""
    path = path.split("?", 1)[0]
    if len(path) > 1:
        path = path.rstrip("/")
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return "other"


Labels = tuple[str, ...]


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
            les = [_le(b) for b in (*family.buckets, math.inf)]
            for key, hist in sorted(totals.histograms.get(family.name, {}).items()):
                cumulative = [sum(hist.counts[:i + 1]) for i in range(len(hist.counts))]
                rows.append({"labels": dict(zip(family.labels, key, strict=True)),
                             "count": hist.count, "sum": hist.sum,
                             "buckets": dict(zip(les, cumulative, strict=True))})
        out[family.name] = rows
    return out


# -- scrape-time facts ------------------------------------------------------------------------
class LoadedModel(NamedTuple):
    name: str
    pid: int
    started: float           # wall clock, when it became ready
    resident_bytes: int | None
    idle_seconds: float | None  # None: a request in flight


def loaded_models(runtime_dir: Path, now: float | None = None) -> list[LoadedModel]:
    """Models whose llama-server runs, from the runtime records (no systemd round trip)."""
    import psutil

    from hoshikage_sd.runtime import Runtime

    runtime = Runtime(runtime_dir)
    now = time.time() if now is None else now
    out = []
    for name in runtime.recorded():
        running = runtime.running(name)
        if running is None:
            continue
        try:
            rss: int | None = psutil.Process(running.pid).memory_info().rss
        except psutil.NoSuchProcess:
            continue
        except psutil.Error:
            rss = None  # another user's process without access: it runs, size unknown
        out.append(LoadedModel(name, running.pid, running.started, rss,
                               runtime.idle_seconds(name, now)))
    return out


def ramdisk_usage(ramdisk: Path | None) -> tuple[int, int] | None:
    """(used, total) bytes of the RAM disk, or None when it is not mounted (a stat, which
    starts nothing: mnt-hoshikage.mount is a plain mount, not an automount)."""
    if ramdisk is None:
        return None
    try:
        if not os.path.ismount(ramdisk):
            return None
        st = os.statvfs(ramdisk)
    except OSError:
        return None
    total = st.f_blocks * st.f_frsize
    return total - st.f_bfree * st.f_frsize, total


# -- the text format ------------------------------------------------------------------------
def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _labels(names: Iterable[str], values: Iterable[str]) -> str:
    pairs = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _header(lines: list[str], family: Family) -> None:
    lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
    lines.append(f"# TYPE {family.name} {family.kind}")


def exposition(totals: Tally, gauges: Mapping[str, Mapping[Labels, float]]) -> bytes:
    """The text format 0.0.4: every family's HELP and TYPE (samples where there are any),
    label sets in a stable order."""
    lines: list[str] = []
    for family in COUNTED.values():
        _header(lines, family)
        if family.kind == "counter":
            for key, value in sorted(totals.counters.get(family.name, {}).items()):
                lines.append(f"{family.name}{_labels(family.labels, key)} {_number(value)}")
            continue
        # A histogram's lines differ only in le: escape its labels once, not per bucket.
        les = [_le(b) for b in (*family.buckets, math.inf)]
        for key, hist in sorted(totals.histograms.get(family.name, {}).items()):
            labels = _labels(family.labels, key)
            bucket = f"{family.name}_bucket{labels[:-1]}," if labels else \
                f"{family.name}_bucket{{"
            cumulative = 0
            for le, n in zip(les, hist.counts, strict=True):
                cumulative += n
                lines.append(f'{bucket}le="{le}"}} {cumulative}')
            lines.append(f"{family.name}_sum{labels} {_number(hist.sum)}")
            lines.append(f"{family.name}_count{labels} {hist.count}")
    for family in GAUGES.values():
        _header(lines, family)
        for key, value in sorted(gauges.get(family.name, {}).items()):
            lines.append(f"{family.name}{_labels(family.labels, key)} {_number(value)}")
    return ("\n".join(lines) + "\n").encode()


def gauges(runtime_dir: Path, ramdisk: Path | None, totals: Tally,
           in_flight: Mapping[str, int] | None = None) -> dict[str, dict[Labels, float]]:
    import psutil

    out: dict[str, dict[Labels, float]] = {name: {} for name in GAUGES}
    for name, n in (in_flight or {}).items():
        out["hoshikage_in_flight_requests"][(name,)] = n
    loaded = loaded_models(runtime_dir)
    out["hoshikage_models_loaded"][()] = len(loaded)
    for m in loaded:
        if m.resident_bytes is not None:
            out["hoshikage_model_resident_bytes"][(m.name,)] = m.resident_bytes
        if m.idle_seconds is not None:
            out["hoshikage_model_idle_seconds"][(m.name,)] = round(m.idle_seconds, 3)
    usage = ramdisk_usage(ramdisk)
    if usage is not None:
        out["hoshikage_ramdisk_used_bytes"][()] = usage[0]
        out["hoshikage_ramdisk_size_bytes"][()] = usage[1]
    vm = psutil.virtual_memory()
    out["hoshikage_memory_available_bytes"][()] = vm.available
    out["hoshikage_memory_total_bytes"][()] = vm.total
    if totals.since is not None:
        out["hoshikage_counters_start_time_seconds"][()] = totals.since
    out["hoshikage_build_info"][(__version__,)] = 1
    return out


def render(runtime_dir: Path, ramdisk: Path | None = None, pending: Tally | None = None,
           in_flight: Mapping[str, int] | None = None) -> bytes:
    """A scrape from any process: the file's totals plus `pending` (not written yet)."""
    totals = read(runtime_dir).merged(pending)
    return exposition(totals, gauges(runtime_dir, ramdisk, totals, in_flight))


class Metrics:
    """The router's metrics: requests counted in memory and added to the counter file at
    most once per FLUSH_INTERVAL (and by flush(), which the router calls when it exits),
    in-flight requests as a gauge, and render() for GET /metrics.

    Thread-safe; each call costs a few microseconds, a flush a fraction of a millisecond.
    """

    def __init__(self, runtime_dir: Path, ramdisk: Path | None = None) -> None:
        self.runtime_dir = runtime_dir
        self.ramdisk = ramdisk
        self._pending = Tally()
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()
        self._flushed = time.monotonic()

    def request(self, model: str, route: str, status: int, seconds: float,
                ttfb: float | None) -> None:
        """One answered request. `model`: the resolved manifest name ("" when none
        resolved: never a client's free text); `route`: route_label(path)."""
        with self._lock:
            self._pending.count("hoshikage_requests_total", model=model, route=route,
                                status=int(status))
            self._pending.observe("hoshikage_request_duration_seconds", seconds, model=model,
                                  route=route)
            if ttfb is not None:
                self._pending.observe("hoshikage_time_to_first_byte_seconds", ttfb,
                                      model=model, route=route)
            due = time.monotonic() - self._flushed >= FLUSH_INTERVAL
        if due:
            self.flush()

    def count(self, name: str, by: float = 1.0, **labels: object) -> Metrics:
        """Any other count the router makes (admission records: residents.record(...,
        counts=metrics)); written with the next batch."""
        with self._lock:
            self._pending.count(name, by, **labels)
        return self

    def in_flight(self, model: str, delta: int) -> None:
        with self._lock:
            self._in_flight[model] = max(0, self._in_flight.get(model, 0) + delta)

    def flush(self) -> None:
        """Add what this process counted to the file (at exit, and now and then)."""
        with self._lock:
            pending, self._pending = self._pending, Tally()
            self._flushed = time.monotonic()
        if pending and not commit(self.runtime_dir, pending):
            with self._lock:  # keep the counts for the next try
                pending.add(self._pending)
                self._pending = pending

    def render(self) -> bytes:
        with self._lock:
            pending = Tally().merged(self._pending)
            in_flight = dict(self._in_flight)
        return render(self.runtime_dir, self.ramdisk, pending, in_flight)
