"""Admission in the head start, for the one case it can decide with built-in modules: no
other model is up.

From zero processes, a unit started without a launch ticket goes the activator's way: its
Python imports come before llama-server can start. The router's own fast path
(Router.prepare) admits with the whole policy and leaves a ticket, but the head start runs
before the router's imports. With no model unit up (nothing to evict, nothing starting) the
policy's answer is a matter of three numbers: the model's estimate × safety_margin against
MemAvailable and memory_budget, and max_loaded_models of at least one. So the head start
decides that case alone, under the same admission lock, and leaves the ticket the router
would have; anything else (another model up, a staged or SSD-cached copy to choose, no
remembered estimate, a file changed since the index) is the router's, as before.

The numbers come from the name index (name_index.build: the estimate the runtime remembers
for the model's file as it was then, with that file's size and mtime).
"""

from __future__ import annotations

import fcntl
import math
import os

from hoshikage_sd import protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from hoshikage_sd.sd import bus

#: sd/units.py's UP_STATES: a unit in any of them holds memory or is about to
UP_STATES = ["active", "activating", "deactivating", "reloading"]
MODEL_UNITS = "hoshikage-model@*.service"


def mem_available() -> int:
    """MemAvailable in bytes (what psutil.virtual_memory().available reads)."""
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            if line.startswith(b"MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise ValueError("no MemAvailable in /proc/meminfo")


def fits(index: dict[str, Any], launch: dict[str, Any]) -> tuple[int, int] | None:
    """(estimate, available) when the model fits by the numbers alone, else None."""
    rules = index["admission"]
    estimate = launch.get("estimate")
    if not isinstance(estimate, int) or (rules["max_loaded"] is not None and \
            rules["max_loaded"] < 1):
        return None
    st = os.stat(launch["source"])
    if [st.st_size, st.st_mtime_ns] != launch["file"]:
        return None  # the estimate was for the file as it was
    if os.path.exists(launch["staged"]):
        return None  # which file to serve (the copy, or the source) is the router's call
    needed = math.ceil(estimate * rules["margin"])
    available = mem_available()
    if rules["budget"] is not None:
        available = min(available, rules["budget"])
    return (estimate, available) if available >= needed else None


def admit(index: dict[str, Any], model: dict[str, Any], conn: bus.Connection | None = None
          ) -> tuple[tuple[int, int] | None, str | None]:
    """Admit `model` (a name index entry) and leave its launch ticket when no model unit is
    up and it fits: ((estimate, available) then, else None; the model's unit's ActiveState as
    the same list of the model units says, None when it was not asked). The caller starts
    the unit, over `conn` too."""
    launch = model.get("launch")
    if not launch:
        return None, None
    numbers = fits(index, launch)
    if numbers is None:
        return None, None
    from hoshikage_sd.sd import bus

    runtime = index["runtime"]
    lock = os.open(f"{runtime}/admission.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # Runtime.locked("admission")
        loaded = bus.list_units([MODEL_UNITS], conn=conn)
        state = next((u.active for u in loaded if u.name == model["unit"]), "inactive")
        if any(u.active in UP_STATES for u in loaded):
            return None, state
        write_admitted(runtime, model["name"], numbers[0])
        protocol.write_ticket(runtime, model["name"], model["socket"], model["health"],
                              launch["env"], launch["argv"])
    finally:
        os.close(lock)
    return numbers, state


def write_admitted(runtime: str, name: str, estimate: int) -> None:
    """Runtime.set_admitted without pathlib: others count the model's memory from now on."""
    protocol.write_file(f"{runtime}/admitted/{name}.json",  # json.dumps's, without json
                        f'{{"estimate": {int(estimate)}}}'.encode(),
                        parents=(runtime, f"{runtime}/admitted"))


def withdraw(runtime: str, name: str) -> None:
    """The unit could not be started: no ticket and no promise left behind."""
    for path in (protocol.ticket_path(runtime, name), f"{runtime}/admitted/{name}.json"):
        try:  # noqa: SIM105 (contextlib: an import more on the head start's path)
            os.unlink(path)
        except OSError:
            pass
