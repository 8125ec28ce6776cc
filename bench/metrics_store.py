#!/usr/bin/env python3
"""Where hoshikage's Prometheus counters live, and what that costs (hoshikage_sd/metrics.py).

  file       the chosen store: one flock'ed JSON file under the runtime dir. Times a
             request counted in memory, the router's once-a-second flush, and a whole
             scrape (file, runtime records, psutil, text) at a realistic label count.
  multiproc  prometheus_client's multiprocess mode: one file per PID, kept after the
             process exits (else its counts go). Every load is a new activator PID, so it
             times a scrape over N such files, and the import an activator would pay.
  journal    the HOSHIKAGE_EVENT records (ready, released, admission, ...) read back at
             scrape time with python-systemd's journal.Reader: N records written inside the
             system tier's container (real journald), then one scrape's pass over them.

  .venv/bin/python bench/metrics_store.py file multiproc
  sudo .venv/bin/python bench/metrics_store.py journal [--records 1000 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO),) if p not in sys.path]

from hoshikage_sd import metrics  # noqa: E402
from hoshikage_sd.runtime import Activity, Running, Runtime  # noqa: E402

MODELS = [f"model-{i}" for i in range(8)]
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages",
          "/api/chat", "other"]
STATUSES = [200, 400, 404, 503]


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    """Seconds per call, one figure per run."""
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def summary(label: str, seconds: list[float], unit: str = "ms") -> str:
    scale = 1e3 if unit == "ms" else 1e6
    s = sorted(seconds)
    p95 = s[min(len(s) - 1, int(len(s) * 0.95))]
    return (f"{label}: median {statistics.median(s) * scale:.3f} {unit}, "
            f"p95 {p95 * scale:.3f} {unit} ({len(s)} runs)")


def realistic_totals() -> metrics.Tally:
    """Every model, route and status seen, histograms for each model and route, loads."""
    t = metrics.Tally()
    for m in MODELS:
        for r in ROUTES:
            for s in STATUSES:
                t.count("hoshikage_requests_total", 17, model=m, route=r, status=s)
            t.observe("hoshikage_request_duration_seconds", 1.3, model=m, route=r)
            t.observe("hoshikage_time_to_first_byte_seconds", 0.2, model=m, route=r)
        t.count("hoshikage_loads_total", 3, model=m, path="activator")
        for phase in ("admission", "staging", "llama_server"):
            t.observe("hoshikage_load_phase_seconds", 0.5, model=m, phase=phase)
        for reason in ("admission", "idle", "pressure"):
            t.count("hoshikage_evictions_total", model=m, reason=reason)
        for verdict in ("load", "evict", "wait", "reject"):
            t.count("hoshikage_admission_decisions_total", model=m, verdict=verdict)
    return t


def bench_file(runs: int, where: str) -> None:
    # /run/hoshikage is a tmpfs: on a disk, the rename alone costs ~1 ms here
    runtime_dir = Path(tempfile.mkdtemp(prefix="hoshikage-metrics-", dir=where))
    try:
        totals = realistic_totals()
        metrics.commit(runtime_dir, totals)
        series = sum(len(s) for s in totals.counters.values()) + \
            sum(len(s) for s in totals.histograms.values())
        size = metrics.counter_file(runtime_dir).stat().st_size
        print(f"counter file: {series} label sets, {size} bytes")
        runtime = Runtime(runtime_dir)
        for m in MODELS[:3]:  # three loaded models; this process stands in for llama-server
            runtime.set_running(m, Running(os.getpid(), f"/mnt/hoshikage/{m}.gguf", time.time()))
            runtime.set_activity(m, Activity(0, time.time(), os.getpid()))

        m = metrics.Metrics(runtime_dir, Path("/dev/shm"))
        per_call = timed(lambda: m.request("model-1", "/v1/chat/completions", 200, 0.8, 0.1),
                         runs * 50)
        m._flushed = float("inf")  # the calls above must not have flushed on their own
        print(summary("Metrics.request (in memory)", per_call, "us"))

        def batch() -> None:  # about a busy second of the router's requests
            for i in range(50):
                m.request(MODELS[i % 3], ROUTES[i % 2], 200, 0.5, 0.05)
        batch()
        m._flushed = -float("inf")

        def flush_one_second() -> None:
            batch()
            m.flush()
        print(summary("router flush (50 requests + commit)", timed(flush_one_second, runs)))
        print(summary("commit of 1 count (activator, idle watch)", timed(
            lambda: metrics.count(runtime_dir, "hoshikage_evictions_total", model="model-0",
                                  reason="idle"), runs)))
        print(summary("scrape (render, 3 models loaded)", timed(m.render, runs)))
        print(f"scrape text: {len(m.render())} bytes")
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


CHILD = """
import sys
from prometheus_client import Counter, Histogram
c = Counter("hoshikage_loads", "loads", ["model", "path"])
h = Histogram("hoshikage_load_phase_seconds", "phase", ["model", "phase"])
c.labels(sys.argv[1], "activator").inc()
for phase in ("admission", "staging", "llama_server"):
    h.labels(sys.argv[1], phase).observe(0.5)
"""


def bench_multiproc(counts: list[int], runs: int) -> None:
    """Files as N finished activators leave them; forking N children makes them real."""
    import prometheus_client  # noqa: F401  (imported before forking: children share it)

    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import prometheus_client"], check=True)
    with_import = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare = time.perf_counter() - t
    print(f"import prometheus_client in a fresh python3: ~{(with_import - bare) * 1e3:.0f} ms")
    for n in counts:
        directory = Path(tempfile.mkdtemp(prefix="hoshikage-multiproc-"))
        try:
            env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
            script = CHILD
            code = ("import os, sys\n"
                    f"for i in range({n}):\n"
                    "    pid = os.fork()\n"
                    "    if pid == 0:\n"
                    "        sys.argv[1:] = [f'model-{i % 8}']\n"
                    f"        exec({script!r})\n"
                    "        os._exit(0)\n"
                    "    os.waitpid(pid, 0)\n")
            subprocess.run([sys.executable, "-c", code], check=True, env=env)
            files = len(list(directory.iterdir()))
            scrape = ("import time, sys\n"
                      "from prometheus_client import CollectorRegistry, generate_latest\n"
                      "from prometheus_client.multiprocess import MultiProcessCollector\n"
                      "out = []\n"
                      f"for _ in range({runs}):\n"
                      "    t = time.perf_counter()\n"
                      "    r = CollectorRegistry(); MultiProcessCollector(r); generate_latest(r)\n"
                      "    out.append(time.perf_counter() - t)\n"
                      "print(sorted(out)[len(out) // 2])\n")
            median = float(subprocess.run([sys.executable, "-c", scrape], check=True, env=env,
                                          capture_output=True, text=True).stdout)
            print(f"multiprocess scrape after {n} loads ({files} files): median "
                  f"{median * 1e3:.2f} ms")
        finally:
            shutil.rmtree(directory, ignore_errors=True)


READER = """
import json, sys, time
from systemd import journal
n = int(sys.argv[1])
kinds = ("ready", "released", "admission", "idle-stop")
t = time.perf_counter()
for i in range(n):
    kind = kinds[i % 4]
    journal.send(f"bench {kind} {i}", HOSHIKAGE_EVENT=kind, HOSHIKAGE_MODEL=f"model-{i % 8}",
                 HOSHIKAGE_REASON="idle", HOSHIKAGE_VERDICT="load", HOSHIKAGE_SECONDS="0.5")
sent = time.perf_counter() - t
print(json.dumps({"sent_per_record_us": sent / n * 1e6}))
"""

SCRAPE = """
import json, sys, time
from collections import Counter
from systemd import journal
runs = int(sys.argv[1])
out = []
for _ in range(runs):
    t = time.perf_counter()
    r = journal.Reader()
    r.this_boot()
    for kind in ("ready", "released", "admission", "idle-stop"):
        r.add_match(HOSHIKAGE_EVENT=kind)
        r.add_disjunction()
    counts = Counter()
    for entry in r:
        counts[(entry["HOSHIKAGE_EVENT"], entry.get("HOSHIKAGE_MODEL"))] += 1
    r.close()
    out.append(time.perf_counter() - t)
print(json.dumps({"median_s": sorted(out)[len(out) // 2], "records": sum(counts.values())}))
"""


def bench_journal(records: list[int], runs: int) -> None:
    from testbed.container import Container

    c = Container("hk-bench-metrics", [(str(REPO), str(REPO), True)])
    try:
        c.start(60)
        written = 0
        for n in sorted(records):
            out = json.loads(c.exec(sys.executable, "-c", READER, str(n - written),
                                    timeout=600).stdout)
            written = n
            c.exec("journalctl", "--sync", timeout=60)
            got = json.loads(c.exec(sys.executable, "-c", SCRAPE, str(runs), timeout=600).stdout)
            per_record = got["median_s"] / max(1, got["records"]) * 1e6
            print(f"journal: {got['records']} records: scrape median "
                  f"{got['median_s'] * 1e3:.1f} ms ({per_record:.1f} us per record); "
                  f"journal.send {out['sent_per_record_us']:.0f} us per record")
    finally:
        c.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=("file", "multiproc", "journal"))
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--dir", default="/dev/shm", help="file: a tmpfs, as /run is")
    ap.add_argument("--loads", type=int, nargs="+", default=[10, 100, 1000],
                    help="multiproc: finished activators (files) to scrape over")
    ap.add_argument("--records", type=int, nargs="+", default=[1000, 10000],
                    help="journal: HOSHIKAGE_EVENT records to scrape over")
    args = ap.parse_args()
    if "file" in args.parts:
        bench_file(args.runs, args.dir)
    if "multiproc" in args.parts:
        bench_multiproc(args.loads, max(5, args.runs // 20))
    if "journal" in args.parts:
        bench_journal(args.records, max(3, args.runs // 40))


if __name__ == "__main__":
    main()
