"""Admission in the head start, for the one state it can judge before the router's imports:
no other model unit up.

From zero processes, a unit started without a launch ticket goes the activator's way: its
Python imports come before llama-server can start. The router admits with the whole policy
(Router.prepare) and leaves a ticket, but the head start runs before the router's imports.
With no model unit up (nothing to evict, nothing starting) the policy's decision turns on
one number that changes between routers, MemAvailable: the router that wrote the name index
asked the policy (admission.decide, with no residents) for the least MemAvailable at which
it loads the model (index.py: the launch entry's `needed`). The head start compares
MemAvailable with that under the same admission lock and leaves the ticket the router would
have. Anything else (another model up, a staged or SSD-cached copy to choose, no remembered
estimate, a file changed since the index) is the router's, as before.
"""

from __future__ import annotations

import fcntl
import os

from hoshikage_sd import protocol
from hoshikage_sd.sd import units

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from hoshikage_sd.sd import bus


def mem_available() -> int:
    """MemAvailable in bytes (what psutil.virtual_memory().available reads)."""
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            if line.startswith(b"MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise ValueError("no MemAvailable in /proc/meminfo")


def fits(launch: dict[str, Any]) -> tuple[int, int] | None:
    """(estimate, MemAvailable) when the policy loads the model with nothing else up, else
    None."""
    needed = launch.get("needed")
    if not isinstance(needed, int):
        return None
    st = os.stat(launch["source"])
    if [st.st_size, st.st_mtime_ns] != launch["file"]:
        return None  # the estimate was for the file as it was
    if os.path.exists(launch["staged"]):
        return None  # which file to serve (the copy, or the source) is the router's call
    available = mem_available()
    return (launch["estimate"], available) if available >= needed else None


def admit(index: dict[str, Any], model: dict[str, Any], conn: bus.Connection | None = None
          ) -> tuple[tuple[int, int] | None, str | None]:
    """Admit `model` (a name index entry) and leave its launch ticket when no model unit is
    up and it fits: ((estimate, MemAvailable) then, else None; the model's unit's
    ActiveState as the same list of the model units says, None when it was not asked). The
    caller starts the unit, over `conn` too."""
    launch = model.get("launch")
    if not launch:
        return None, None
    numbers = fits(launch)
    if numbers is None:
        return None, None
    from hoshikage_sd.sd import bus

    runtime = index["runtime"]
    lock = os.open(f"{runtime}/admission.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # Runtime.locked("admission")
        loaded = bus.list_units([f"{units.MODEL_UNIT_PREFIX}*.service"], conn=conn)
        state = next((u.active for u in loaded if u.name == model["unit"]), "inactive")
        if any(u.active in units.UP_STATES for u in loaded):
            return None, state
        protocol.write_admitted(runtime, model["name"], numbers[0])
        protocol.write_ticket(runtime, model["name"], model["socket"], model["health"],
                              launch["env"], launch["argv"])
    finally:
        os.close(lock)
    return numbers, state


def withdraw(runtime: str, name: str) -> None:
    """The unit could not be started: no ticket and no promise left behind."""
    for path in (protocol.ticket_path(runtime, name), protocol.admitted_path(runtime, name)):
        try:  # noqa: SIM105 (contextlib: an import more on the head start's path)
            os.unlink(path)
        except OSError:
            pass
