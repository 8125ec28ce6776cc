"""What the host says about its memory and processes, through psutil.

psutil is imported on first use: its import would cost every router, activator and release
start (`python3 -X importtime`), and most of them never ask (a release that keeps no
copy, a router until its first start of a model).
"""

from __future__ import annotations


def memory() -> tuple[int, int]:
    """(MemAvailable, MemTotal) in bytes, as psutil reads /proc/meminfo."""
    import psutil

    vm = psutil.virtual_memory()
    return vm.available, vm.total


def pid_exists(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid)
