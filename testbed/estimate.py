"""The memory estimate's acceptance test, shared by tests and bench/memory_estimate.py."""

from __future__ import annotations

import math

MiB = 1 << 20


def within(estimated: int, measured: int, rel: float = 0.10, floor: int = 64 * MiB) -> bool:
    """Within rel of measured, or within floor bytes."""
    return math.isclose(estimated, measured, rel_tol=rel, abs_tol=floor)
