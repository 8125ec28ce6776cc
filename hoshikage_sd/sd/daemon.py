"""sd_notify and socket activation, through python-systemd.

(The model unit's launcher speaks sd_notify itself, protocol.notify: it cannot afford the
import before llama-server starts.)
"""

from __future__ import annotations

import os

from systemd import daemon


def listen_fds() -> list[int]:
    """The sockets systemd passed us, with LISTEN_* removed from the environment so that no
    child takes them for its own; not inherited by children either."""
    fds: list[int] = daemon.listen_fds(unset_environment=True)
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)  # sd_listen_fds unsets the C environment, not os.environ
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


def notify(**fields: str | int) -> bool:
    """sd_notify: notify(READY=1, STATUS="..."). False when not run by systemd, or when its
    socket is gone (a notification is never worth a crash)."""
    try:
        return bool(daemon.notify("\n".join(f"{k}={v}" for k, v in fields.items())))
    except OSError:
        return False
