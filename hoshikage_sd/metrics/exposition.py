"""A scrape: the counter file, the facts read at scrape time (runtime records, psutil,
statvfs) and Prometheus' text format 0.0.4."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from hoshikage_sd import __version__
from hoshikage_sd.metrics.families import COUNTED, GAUGES, Family, Labels, bucket_bound
from hoshikage_sd.metrics.tally import Tally, read

logger = logging.getLogger("hoshikage")


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
        running = runtime.serving_record(name)
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
        les = [bucket_bound(b) for b in (*family.buckets, math.inf)]
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
    from hoshikage_sd.runtime import Runtime

    runtime = Runtime(runtime_dir)
    for m in loaded:
        on_devices = runtime.devices(m.name)
        if on_devices is not None:
            for device, used in on_devices[1].items():
                out["hoshikage_model_device_bytes"][(m.name, device)] = used
            for device, total in on_devices[2].items():
                if device in on_devices[1]:
                    out["hoshikage_device_total_bytes"][(device,)] = total
        from hoshikage_sd.rpc.workers import remembered

        for share in remembered(runtime_dir, m.name):  # split over RPC workers
            out["hoshikage_model_worker_bytes"][(m.name, share.worker, share.address)] = \
                share.holds
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
