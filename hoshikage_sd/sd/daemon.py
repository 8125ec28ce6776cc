"""sd_notify and socket activation.

listen_fds reads systemd's LISTEN_* itself (sd_listen_fds(3) is that much): the router's
head start takes its sockets before any import it can do without, python-systemd's
included. notify goes through python-systemd. (The model unit's launcher speaks sd_notify
itself, protocol.notify: it cannot afford the import before llama-server starts.)
"""

from __future__ import annotations

import os

#: sd_listen_fds(3)'s SD_LISTEN_FDS_START: the first socket systemd passes
LISTEN_FDS_START = 3


def listen_fds() -> list[int]:
    """The sockets systemd passed this process (sd_listen_fds(3): LISTEN_FDS, when LISTEN_PID
    is ours), with LISTEN_* removed from the environment so that no child takes them for its
    own; not inherited by children either."""
    try:
        mine = int(os.environ.get("LISTEN_PID", "")) == os.getpid()
        count = int(os.environ.get("LISTEN_FDS", "")) if mine else 0
    except ValueError:
        count = 0
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    fds = list(range(LISTEN_FDS_START, LISTEN_FDS_START + max(count, 0)))
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


def notify(**fields: str | int) -> bool:
    """sd_notify: notify(READY=1, STATUS="..."). False when not run by systemd, or when its
    socket is gone (a notification is never worth a crash)."""
    from systemd import daemon

    try:
        return bool(daemon.notify("\n".join(f"{k}={v}" for k, v in fields.items())))
    except OSError:
        return False
