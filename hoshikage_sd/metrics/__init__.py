"""Prometheus metrics: counters that outlive every hoshikage process, gauges read at scrape
time, and the text exposition format 0.0.4, written by hand.

Where the counters live
-----------------------
Several short-lived processes count things: the router (requests; it exits when idle), each
model unit's activator (loads, their phases, the evictions it makes, refusals; it lives as
long as its model), the router and the activator both through admission records
(admit/act.record), and the idle watch (idle and pressure stops; it runs for a
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

The router counts in memory and flushes at most once a second; the activator writes once per
start (once it serves or has failed: nothing is written on a cold start's way). What each
costs, and the alternatives below, are measured by bench/metrics_store.py (docs/metrics.md).
The alternatives:

- the journal (HOSHIKAGE_EVENT records exist for loads and stops): a scrape must walk every
  matching record since boot, growing with uptime; journald's vacuuming would make totals
  go down; and journal.send costs as much as proxying the request, so requests could not
  be counted there.
- prometheus_client's multiprocess mode: one file per PID that must stay after the process
  exits (else its counts go with it); every load is a new activator PID, so the directory
  and each scrape grow with every load since boot, every process must set
  PROMETHEUS_MULTIPROC_DIR before the import, and the import is heavy for an activator.
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

import logging
import threading
import time
from pathlib import Path

from hoshikage_sd.metrics.exposition import (
    exposition,
    gauges,
    loaded_models,
    ramdisk_usage,
    render,
)
from hoshikage_sd.metrics.families import (
    CONTENT_TYPE,
    COUNTED,
    FLUSH_INTERVAL,
    GAUGES,
    LOAD_BUCKETS,
    REQUEST_BUCKETS,
    route_label,
)
from hoshikage_sd.metrics.tally import (
    Counts,
    Histogram,
    Tally,
    as_json,
    commit,
    count,
    counter_file,
    read,
)

__all__ = [
    "CONTENT_TYPE", "COUNTED", "FLUSH_INTERVAL", "GAUGES", "LOAD_BUCKETS", "REQUEST_BUCKETS",
    "Counts", "Histogram", "Metrics", "Tally", "as_json", "commit", "count", "counter_file",
    "exposition", "gauges", "loaded_models", "ramdisk_usage", "read", "render", "route_label",
]

logger = logging.getLogger("hoshikage")


class Metrics:
    """The router's metrics: requests counted in memory and added to the counter file at
    most once per FLUSH_INTERVAL, and no later than that after the last (and by flush(),
    which the router calls when it exits), in-flight requests as a gauge, and render() for
    GET /metrics.

    Thread-safe; each call costs a few microseconds, a flush a fraction of a millisecond.
    """

    def __init__(self, runtime_dir: Path, ramdisk: Path | None = None) -> None:
        self.runtime_dir = runtime_dir
        self.ramdisk = ramdisk
        self._pending = Tally()
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()
        self._flushed = time.monotonic()
        #: the flush of counts no later request flushes (`hoshikage metrics` reads the file)
        self._timer: threading.Timer | None = None

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
            if not due and self._timer is None:
                self._timer = threading.Timer(FLUSH_INTERVAL, self._flush_later)
                self._timer.daemon = True
                self._timer.start()
        if due:
            self.flush()

    def _flush_later(self) -> None:
        with self._lock:
            self._timer = None
        self.flush()

    def count(self, name: str, by: float = 1.0, **labels: object) -> Metrics:
        """Any other count the router makes (admission records: act.record(...,
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
