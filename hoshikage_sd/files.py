"""Writing state files so that a reader never sees half a write."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from hoshikage_sd import protocol


def write_atomic(path: Path, data: str | bytes, mode: int | None = None) -> None:
    """Replace `path` with `data` (protocol.write_file: temp name + rename): readers see the
    old or the new file, and a crashed writer leaves the old one intact. `mode` applies from
    the file's creation (a secret is never readable by others, not even for a moment);
    without one, 0666 less the umask. Missing directories are made (make_dirs)."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        protocol.write_file(str(path), raw, mode)
    except FileNotFoundError:
        make_dirs(path.parent)
        protocol.write_file(str(path), raw, mode)


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
