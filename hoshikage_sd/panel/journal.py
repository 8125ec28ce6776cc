"""hoshikage's journal records for the panel: its lifecycle events (log.MESSAGE_IDS:
admissions with their numbers, evictions, releases, refusals), newest first, and one model's
unit lines (llama-server's own) as `hoshikage logs NAME` shows them.

journalctl as a child, in JSON: the router reads the journal as user hoshikage, which the
group systemd-journal lets it (hoshikage.service's SupplementaryGroups=).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from hoshikage_sd import log, proc
from hoshikage_sd.errors import HoshikageError

TIMEOUT = 5.0
#: what journalctl says on stderr when this user may not read the system journal
NO_PERMISSION = "insufficient permissions"


@dataclass(frozen=True)
class Record:
    time: float           # Unix time
    message: str
    event: str | None     # HOSHIKAGE_EVENT (None: a unit's own line)
    model: str | None     # HOSHIKAGE_MODEL
    priority: int         # syslog's: 3 error, 4 warning, 6 info
    unit: str | None


def text_of(value: object) -> str:
    """A journal field as JSON output gives it: a string, or an array of bytes where it is
    not UTF-8 text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(b, int) for b in value):
        return bytes(b & 0xFF for b in value).decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def parse(output: str) -> list[Record]:
    """journalctl -o json's lines, as records (a line it cannot read is skipped)."""
    records = []
    for line in output.splitlines():
        try:
            entry = json.loads(line)
            stamp = int(entry.get("__REALTIME_TIMESTAMP", "0")) / 1e6
        except (ValueError, TypeError, AttributeError):
            continue
        if not isinstance(entry, dict):
            continue
        priority = text_of(entry.get("PRIORITY"))
        records.append(Record(
            stamp, text_of(entry.get("MESSAGE")),
            text_of(entry.get("HOSHIKAGE_EVENT")) or None,
            text_of(entry.get("HOSHIKAGE_MODEL")) or None,
            int(priority) if priority.isdigit() else 6,
            text_of(entry.get("_SYSTEMD_UNIT")) or None))
    return records


def events_argv(model: str | None, lines: int) -> list[str]:
    """hoshikage's event records (any kind), newest first; one model's with `model`."""
    matches = [f"MESSAGE_ID={mid}" for mid in log.MESSAGE_IDS.values()]
    if model is not None:
        matches.append(f"HOSHIKAGE_MODEL={model}")
    return ["journalctl", "--output=json", f"--lines={lines}", "--reverse", "--quiet",
            "--no-pager", *matches]


def unit_argv(model: str, lines: int) -> list[str]:
    """The model's unit lines and records, as `hoshikage logs MODEL` (newest first)."""
    from hoshikage_sd.commands import logs

    return ["journalctl", "--output=json", f"--lines={lines}", "--reverse", "--quiet",
            "--no-pager", *logs.matches(model)]


def read(argv: Sequence[str]) -> tuple[list[Record], str | None]:
    """The records, and what kept journalctl from reading them (None: nothing)."""
    try:
        result = proc.run(argv, check=False, timeout=TIMEOUT)
    except HoshikageError as err:
        return [], err.message
    problem = None
    if NO_PERMISSION in (result.stderr or ""):
        problem = ("the router may not read the system journal (the group systemd-journal: "
                   "SupplementaryGroups= in hoshikage.service)")
    elif result.returncode != 0:
        lines = (result.stderr or "").strip().splitlines()
        problem = f"journalctl failed: {lines[-1] if lines else result.returncode}"
    return parse(result.stdout or ""), problem
