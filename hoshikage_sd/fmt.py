"""How hoshikage writes numbers and colour for people: one place, the same everywhere.

Sizes are binary (GiB), as the RAM disk, `hoshikage status` and the journal all show them.
"""

from __future__ import annotations

import os
from typing import TextIO


def size(n: float) -> str:
    """Bytes as 512 B, 1.5 KiB, 300.0 MiB, 22.8 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def ago(seconds: float) -> str:
    """A span as people read it in logs and `hoshikage status`: 42 s, 14 min, 3 h 5 min."""
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def count(n: int | None) -> str:
    """A large count (parameters) as 1.5B, 300.0M, 12.0K."""
    if n is None:
        return "-"
    for unit, step in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= step:
            return f"{n / step:.1f}{unit}"
    return str(n)


def use_colour(stream: TextIO) -> bool:
    # https://no-color.org: any non-empty NO_COLOR turns colour off.
    return stream.isatty() and not os.environ.get("NO_COLOR")


def paint(text: str, code: str, colour: bool) -> str:
    """`text` in SGR colour `code` ("31" red, "32" green, ...) when `colour`."""
    return f"\033[{code}m{text}\033[0m" if colour else text


#: a model's phase (commands/facts.phase_of) as `status` and `ps` colour it: green serves,
#: yellow is on its way, red failed; the rest plain
PHASE_COLOURS = {"serving": "32", "staging": "33", "loading": "33", "stopping": "2",
                 "kept": "2", "failed": "31", "active": "32", "running": "32",
                 "activating": "33", "deactivating": "2"}


def state(text: str, colour: bool, key: str | None = None) -> str:
    """A state word (status, ps) in its colour from PHASE_COLOURS, when `colour`."""
    code = PHASE_COLOURS.get(key or text)
    return paint(text, code, colour) if code else text
