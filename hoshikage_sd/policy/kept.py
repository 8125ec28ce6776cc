"""Which kept RAM-disk copies go to make room for a start: pure, values in, names out.

A model stopped by hand or by count while memory was plentiful keeps its staged copy
(model_unit/release.py), so that swapping back is a load from RAM. Such a copy is the first
thing a start takes room from, before admission stops any model that runs
(model_unit/release.py make_room gathers these values and deletes what this names).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Kept:
    """A stopped model's copy on the RAM disk."""

    name: str
    size: int     # bytes it holds there: the RAM disk's and, a tmpfs, the memory's
    rank: float   # policy/rank.py: the lowest goes first


def to_release(kept: Iterable[Kept], ramdisk_free: int, mem_available: int,
               needed: int) -> list[str]:
    """The kept copies to delete, in that order, for the RAM disk and the memory each to have
    `needed` bytes free: lowest rank first (equal ranks in the order given), none once both
    have room. All of them when even that is short: admission then judges the rest."""
    out = []
    for copy in sorted(kept, key=lambda k: k.rank):
        if ramdisk_free >= needed and mem_available >= needed:
            break
        out.append(copy.name)
        ramdisk_free += copy.size
        mem_available += copy.size
    return out
