"""How long moving a process into a cgroup takes on this machine.

systemd before 256 forks each unit process and then writes its PID to the unit's
`cgroup.procs`; on many kernels that write waits for an RCU grace period, so it is part of
every cold start's time before llama-server can run. This forks a child, writes its PID into
a fresh cgroup, and repeats; it prints the times and whether the hierarchy has the
`favordynmods` option (which makes the write cheap at some cost to every fork and exit; on
Linux 6.18 turning it on moves cgroup.procs writes to a per-process lock until reboot, even
if the option is removed again, so a run after that reads cheap with the option off).

    sudo .venv/bin/python bench/cgroup_attach.py [--runs 20] [--hierarchy /sys/fs/cgroup]

Needs root. Creates and removes one cgroup, `hoshikage-bench-attach`, under the hierarchy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def cgroup2_mount() -> tuple[Path, str] | None:
    """The cgroup2 hierarchy (unified or hybrid) and its mount options, if there is one."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, where, kind, options, *_ = line.split()
        if kind == "cgroup2":
            return Path(where), options
    return None


def attach_times(hierarchy: Path, runs: int) -> list[float]:
    """Seconds each write of a fresh child's PID into a new cgroup took."""
    group = hierarchy / "hoshikage-bench-attach"
    group.mkdir()
    times = []
    try:
        for _ in range(runs):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # wait until moved, so the parent measures the move alone
                os.close(write)
                os.read(read, 1)
                os._exit(0)
            os.close(read)
            began = time.perf_counter()
            (group / "cgroup.procs").write_text(f"{pid}\n")
            times.append(time.perf_counter() - began)
            os.close(write)
            os.waitpid(pid, 0)
    finally:
        group.rmdir()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--hierarchy", type=Path,
                        help="a cgroup hierarchy to use (default: the cgroup2 mount)")
    args = parser.parse_args()
    found = cgroup2_mount()
    hierarchy = args.hierarchy or (found[0] if found else None)
    if hierarchy is None:
        print("no cgroup2 hierarchy is mounted; name one with --hierarchy", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("needs root (it creates a cgroup)", file=sys.stderr)
        return 2
    options = found[1] if found and found[0] == hierarchy else "?"
    ms = [t * 1000 for t in attach_times(hierarchy, args.runs)]
    print(f"moving a process into a cgroup under {hierarchy} ({options}), {len(ms)} runs:")
    print(f"  median {statistics.median(ms):.2f} ms, min {min(ms):.2f}, max {max(ms):.2f}")
    print("  each: " + ", ".join(f"{m:.1f}" for m in ms))
    print(f"  favordynmods: {'on' if 'favordynmods' in options.split(',') else 'off'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
