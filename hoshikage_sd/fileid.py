"""A file's identity, to tell whether it is still the file something was made from (the kept
manifest, lastgood.py). `os` only: the head start checks the kept manifest with it."""

from __future__ import annotations

import os


def identity(path: str) -> list[int] | None:
    """What changes when the file does: device, inode (a rename), size, mtime and ctime.
    None when it is not there (or cannot be looked at)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
