"""Writing state files so that a reader never sees half a write."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomic(path: Path, data: str | bytes, mode: int | None = None) -> None:
    """Replace `path` with `data` (temp name + rename): readers see the old or the new file,
    and a crashed writer leaves the old one intact. `mode` applies from the file's creation
    (a secret is never readable by others, not even for a moment)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    raw = data.encode() if isinstance(data, str) else data
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    created = 0o666 if mode is None else 0o600  # the umask applies; `mode` exactly, below
    try:
        fd = os.open(tmp, flags, created)
    except FileNotFoundError:
        make_dirs(path.parent)
        fd = os.open(tmp, flags, created)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(raw)
        if mode is not None:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def make_dirs(directory: Path) -> None:
    """mkdir -p, each new directory owned as the one it is made in: root's CLI (`hoshikage
    unload` writing a stop record) must not leave /run/hoshikage/stop to root, where the
    service user's release could then not delete the record."""
    if directory.is_dir():
        return
    make_dirs(directory.parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory)
        if os.geteuid() == 0:
            st = os.stat(directory.parent)
            os.chown(directory, st.st_uid, st.st_gid)
