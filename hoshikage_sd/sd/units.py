"""hoshikage's units as PID 1 knows them: names (escaped), states, start and stop.

D-Bus (bus.py) first: no systemctl fork on a cold start; systemctl where the bus is not there.
The router's head start (router/headstart) starts the waking request's unit through here
before the router's imports: built-in modules at the top, the rest where used (logging,
subprocess and typing each cost that start an import).
"""

from __future__ import annotations

import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

    from hoshikage_sd.sd import bus

MODEL_UNIT_PREFIX = "hoshikage-model@"
#: how long a unit that is up while its model does not serve may take to go down before a
#: start is queued anyway (its release takes about 0.15 s; a hung llama-server that stays
#: up costs a start this much, the router's head start included), and how often to look
SETTLE_LIMIT = 3.0
SETTLE_POLL = 0.01


def escape(text: str) -> str:
    """systemd-escape for a unit instance string: nothing from a request reaches a unit raw."""
    out = []
    for i, byte in enumerate(text.encode()):
        ch = chr(byte)
        if ch == "/":
            out.append("-")
        elif (ch.isascii() and ch.isalnum()) or ch in ":_" or (ch == "." and i > 0):
            out.append(ch)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def model_unit(name: str) -> str:
    return f"{MODEL_UNIT_PREFIX}{escape(name)}.service"


def keep_unit(name: str) -> str:
    """The unit that makes a stopped model's RAM-disk copy to keep (hoshikage-keep@.service)."""
    return f"hoshikage-keep@{escape(name)}.service"


def shell_unit(name: str) -> str:
    """The model's unit name as a person pastes it into a POSIX shell: quoted where its
    escapes need it (`Qwen3-8B` gives 'hoshikage-model@Qwen3\\x2d8B.service'; unquoted,
    the shell eats the backslash and systemd sees another unit), bare where nothing does."""
    import shlex

    return shlex.quote(model_unit(name))


def unescape(text: str) -> str:
    raw = bytearray()
    i = 0
    while i < len(text):
        if text.startswith("\\x", i) and i + 4 <= len(text):
            raw.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:
            raw.extend(b"/" if text[i] == "-" else text[i].encode())
            i += 1
    return raw.decode("utf-8", "replace")


def systemctl(*args: str, check: bool = True, timeout: float | None = None) -> str:
    from hoshikage_sd import proc

    return proc.run(["systemctl", *args], check=check, timeout=timeout).stdout


UP_STATES = ("active", "activating", "deactivating", "reloading")


def active_model_units(states: tuple[str, ...] = UP_STATES, queued: bool = False
                       ) -> list[str]:
    """Instance names (unescaped) of model units in one of `states` (default: any but down);
    with `queued`, also those down with a job queued: a start asked for that PID 1 has not
    begun (admission counts what it admitted a moment ago: two starts at once each saw the
    other's room free)."""
    from hoshikage_sd.sd import bus

    pattern = f"{MODEL_UNIT_PREFIX}*.service"
    try:
        units = [(u.name, u.active, u.job) for u in bus.list_units(
            [pattern], [*states, "inactive", "failed"] if queued else list(states))]
    except bus.BusUnavailable:
        out = systemctl("list-units", "--plain", "--no-legend", "--all", pattern)
        units = [(p[0], p[2], 0) for p in (line.split() for line in out.splitlines())
                 if len(p) >= 3]
    return [unescape(unit[len(MODEL_UNIT_PREFIX) : -len(".service")])
            for unit, active, job in units if active in states or (queued and job)]


def start_unit(unit: str, state: str | None = None, conn: bus.Connection | None = None
               ) -> None:
    """Queue a start job for a model that does not serve now, and return without waiting for
    the job (`systemctl start --no-block`).

    A unit still up then is going down: its llama-server died (a crash, kill -9, the OOM
    killer) and the activator or the release after it has not finished. A start queued now
    would be a no-op on the dying unit, whose failure the caller would then read as the new
    start's. So a unit that is up gets SETTLE_LIMIT to go down first; a failed one is reset
    (its failed state and its start limit: a start on demand is always a fresh try).
    `state`: what wait_down(unit) said just now, if the caller asked already (or a list
    of the units did); `conn`: the bus connection to use (the caller's, for several calls)."""
    from hoshikage_sd.sd import bus

    try:
        if (state or wait_down(unit)) == "failed":
            try:
                bus.reset_failed_unit(unit, conn)
            except bus.BusError as exc:  # a failed unit still starts, below its start limit
                import logging

                logging.getLogger("hoshikage").warning(
                    "cannot reset the failed state of %s: %s", unit, exc.message)
        bus.start_unit(unit, conn=conn)
    except bus.BusUnavailable:
        systemctl("start", "--no-block", "--no-ask-password", unit)
    except bus.BusError as exc:
        cannot_start(unit, exc.message)


def cannot_start(unit: str, why: str) -> NoReturn:
    """die() with the unit's name as a shell takes it (its escapes quoted: shell_unit)."""
    import shlex

    from hoshikage_sd.errors import die

    die(f"cannot start {shlex.quote(unit)}: {why}",
        hint="run it as root (sudo hoshikage ...): systemd lets root, and the router, start "
             "model units" if "authentication" in why.lower() else None)


def start_helper(unit: str) -> None:
    """Queue a start job for a unit other than a model's (no settling: it is down or it
    runs), without waiting for it."""
    from hoshikage_sd.sd import bus

    try:
        bus.start_unit(unit)
    except bus.BusUnavailable:
        systemctl("start", "--no-block", "--no-ask-password", unit)
    except bus.BusError as exc:
        cannot_start(unit, exc.message)


def stop_unit(unit: str) -> None:
    """Queue a stop job and return without waiting for it (`systemctl stop --no-block`)."""
    from hoshikage_sd.sd import bus

    try:
        bus.call("StopUnit", "ss", (unit, "replace"))
    except bus.BusUnavailable:
        systemctl("stop", "--no-block", "--no-ask-password", unit)
    except bus.BusError as exc:
        from hoshikage_sd.errors import die

        die(f"cannot stop {unit}: {exc.message}")


def wait_down(unit: str, waiting: Callable[[], None] | None = None) -> str:
    """The unit's ActiveState once it is not up (or SETTLE_LIMIT passed): see start_unit.
    "unknown" when the bus cannot say (start_unit then finds out what is wrong). `waiting`
    is called once, before the first wait, when the unit is still up."""
    from hoshikage_sd.sd import bus

    try:
        return _settle(unit, waiting)
    except (bus.BusUnavailable, bus.BusError):
        return "unknown"


def _settle(unit: str, waiting: Callable[[], None] | None = None) -> str:
    from hoshikage_sd.sd import bus

    deadline = time.monotonic() + SETTLE_LIMIT
    while True:
        state = bus.units([unit])[0]
        if state.active not in ("active", "reloading", "deactivating") or \
                time.monotonic() > deadline:
            return state.active
        if waiting is not None:
            waiting()
            waiting = None
        time.sleep(SETTLE_POLL)


def unit_state(unit: str) -> tuple[str, bool]:
    """(ActiveState, whether a job is pending) of a unit: ('inactive', False) when unknown."""
    from hoshikage_sd.sd import bus

    try:
        state = bus.units([unit])[0]
        return state.active, state.job != 0
    except bus.BusUnavailable:
        values = show(unit, "ActiveState", "Job")
        return values.get("ActiveState") or "inactive", values.get("Job", "") not in ("", "0")


def show(unit: str, *props: str) -> dict[str, str]:
    out = systemctl("show", unit, *(f"--property={p}" for p in props), check=False)
    values = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        values[key] = value
    return values
