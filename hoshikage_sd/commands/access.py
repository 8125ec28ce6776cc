"""What the service user may read and run: `hoshikage check` runs as root, the units do not.

os.access answers for the caller (root may read everything), so this walks the path's
permission bits for the service user's uid and groups instead. ACLs and capabilities are not
looked at: a file they open up reads as refused here, which errs on the side of a warning.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

SERVICE_USER = "hoshikage"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gids: frozenset[int]


def service_user(name: str = SERVICE_USER) -> User | None:
    """The units' user with its groups, or None where it does not exist (a checkout run)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    gids = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
    return User(name, entry.pw_uid, frozenset(gids))


def _allowed(st: os.stat_result, user: User, bits: int) -> bool:
    """Whether `user` has all of `bits` (4 read, 2 write, 1 execute) on a file's mode."""
    if user.uid == 0:
        return True
    if st.st_uid == user.uid:
        shift = 6
    elif st.st_gid in user.gids:
        shift = 3
    else:
        shift = 0
    return (stat.S_IMODE(st.st_mode) >> shift) & bits == bits


def refusal(user: User, path: Path, bits: int) -> str | None:
    """Why `user` cannot open `path` with `bits` (4 read, 2 write, 1 execute), or None when
    it can: through the directories above it, and, for a symlink (a Hugging Face
    snapshot's, into blobs/), above its target too."""
    path = Path(os.path.abspath(path))
    why = _walk(user, path, bits)
    target = Path(os.path.realpath(path))
    return why if why is not None or target == path else _walk(user, target, bits)


def _walk(user: User, path: Path, bits: int) -> str | None:
    for parent in reversed(path.parents):  # search permission on every directory above
        try:
            st = os.stat(parent)
        except OSError as exc:
            return f"{parent}: {exc.strerror}"
        if not _allowed(st, user, 1):
            return f"{user.name} may not enter {parent}"
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not _allowed(st, user, bits):
        what = "write to" if bits & 2 else "run" if bits & 1 else "read"
        return f"{user.name} may not {what} {path}"
    return None
