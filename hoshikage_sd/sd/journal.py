"""Structured journal records, through python-systemd.

Imported on first use (log.JournalHandler): systemd.journal costs ~10 ms of imports, which
the router must not spend before its head start for the waking request.
"""

from __future__ import annotations

from collections.abc import Mapping

from systemd import journal


def send(message: str, fields: Mapping[str, object]) -> bool:
    """One entry: MESSAGE plus UPPERCASE fields (None values left out). False without
    journald."""
    try:
        journal.send(message, **{k: v if isinstance(v, int) and k == "CODE_LINE" else str(v)
                                 for k, v in fields.items() if v is not None})
    except OSError:
        return False
    return True
