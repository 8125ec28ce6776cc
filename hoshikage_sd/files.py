"""Writing state files so that a reader never sees half a write."""

from __future__ import annotations

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
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, created)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(raw)
        if mode is not None:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.rename(tmp, path)
