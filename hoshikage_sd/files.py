"""Writing state files so that a reader never sees half a write."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: str | bytes, mode: int | None = None) -> None:
    """Replace `path` with `data` (temp name + rename): readers see the old or the new file,
    and a crashed writer leaves the old one intact."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    raw = data.encode() if isinstance(data, str) else data
    try:
        tmp.write_bytes(raw)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(raw)
    if mode is not None:
        os.chmod(tmp, mode)
    os.rename(tmp, path)
