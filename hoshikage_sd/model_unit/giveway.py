"""A RAM-disk copy made beside other models gives way to another model's load.

Two copies run while other models may be loading: a model's copy alongside (it serves from
its source meanwhile: activate.Activator.copy_alongside) and a stopped model's copy to keep
(release.copy_to_keep, run by hoshikage-keep@.service). A
swap's new model loads while the old one's copy runs: gigabytes moved through the kernel
(sendfile) on the other core, which CPU priority does not reach (nice applies to the CPU
only, and there are two of them), and which slowed the new model's load beside it
(docs/performance.md, "At ~2 GiB"). So such a copy waits between its chunks while another
model is loading (admitted and not serving yet: the router or an activator wrote its
admitted record, neither its activator's running record nor its launcher's record of
/health 200 is there) and goes on once it serves,
and runs at the lowest CPU priority the kernel has (SCHED_IDLE) meanwhile.

A copy waits at most WAIT_LIMIT seconds in all: an admitted record whose start never came
(a unit that failed to start before its release could clear it) must not hold it for good.
The copy to keep's own bound (release.COPY_BY) still applies: a copy that
waited past it is given up, as one that copied too slowly is.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable

from hoshikage_sd.protocol import LAUNCHED_DIR
from hoshikage_sd.runtime import Runtime

#: seconds between two looks at the other models (and at a request's mark, Runtime.wanted)
#: while waiting: a swap back waits for this look (docs/performance.md, "At ~2 GiB")
POLL = 0.01
#: seconds a copy waits for other models' loads in all
WAIT_LIMIT = 60.0


def loading(runtime: Runtime, name: str) -> list[str]:
    """The models other than `name` whose load is under way: admitted, not serving yet (no
    running record from its activator, nor the launcher's record that llama-server serves:
    protocol.LAUNCHED_DIR, written at /health 200, long before the activator adopts it),
    and not being stopped (one evicted before its activator took over keeps its admitted
    record until its release)."""
    admitted = set(runtime.names("admitted")) - {name}
    if not admitted:
        return []  # the usual case: one glob
    launched = set()
    with contextlib.suppress(FileNotFoundError):
        launched = set(os.listdir(runtime.dir / LAUNCHED_DIR))
    return sorted(admitted - set(runtime.names("running")) - set(runtime.names("stop"))
                  - launched)


def lowest_priority() -> None:
    """The calling thread runs only on a CPU that nothing else wants (SCHED_IDLE); nice 19
    where that is refused."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class GiveWay:
    """A Store.stage progress callback: between two chunks of the copy, wait while another
    model loads. `give_up()` true ends the wait at once (the caller's own check, after
    this, then stops the copy)."""

    def __init__(self, runtime: Runtime, name: str,
                 give_up: Callable[[], bool] = lambda: False, limit: float = WAIT_LIMIT
                 ) -> None:
        self.runtime = runtime
        self.name = name
        self.give_up = give_up
        self.limit = limit
        self.waited = 0.0  # seconds this copy has waited so far

    def __call__(self, _done: int, _total: int) -> None:
        while self.waited < self.limit and not self.give_up() and \
                loading(self.runtime, self.name):
            began = time.monotonic()
            time.sleep(POLL)
            self.waited += time.monotonic() - began
