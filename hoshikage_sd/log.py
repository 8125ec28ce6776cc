"""Logging: plain lines on a terminal, structured entries in the journal under systemd.

Lifecycle events carry a fixed MESSAGE_ID per kind and UPPERCASE fields, so that
`journalctl HOSHIKAGE_EVENT=released` or `journalctl MESSAGE_ID=...` finds them.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

log = logging.getLogger("hoshikage")
JOURNAL_SOCKET = "/run/systemd/journal/socket"

# Fixed per event kind; never change a published one.
MESSAGE_IDS = {
    "staged": "5c1a3e0f8b9d4a62a1f0e7d3b6c48a01",
    "ready": "5c1a3e0f8b9d4a62a1f0e7d3b6c48a02",
    "idle-stop": "5c1a3e0f8b9d4a62a1f0e7d3b6c48a03",
    "released": "5c1a3e0f8b9d4a62a1f0e7d3b6c48a04",
    "start-failed": "5c1a3e0f8b9d4a62a1f0e7d3b6c48a05",
    "restaged": "5c1a3e0f8b9d4a62a1f0e7d3b6c48a06",
    "router-exit": "5c1a3e0f8b9d4a62a1f0e7d3b6c48a07",
    "admission": "5c1a3e0f8b9d4a62a1f0e7d3b6c48a08",
    "pressure": "5c1a3e0f8b9d4a62a1f0e7d3b6c48a09",
    "cache-copy": "5c1a3e0f8b9d4a62a1f0e7d3b6c48a0a",
    "cache-expire": "5c1a3e0f8b9d4a62a1f0e7d3b6c48a0b",
}

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class JournalHandler(logging.Handler):
    def __init__(self, identifier: str) -> None:
        super().__init__()
        self.identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        from hoshikage_sd.sd import journal  # see sd/journal.py: not before it is needed

        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + "".join(traceback.format_exception(*record.exc_info))
            fields: dict[str, object] = {
                "PRIORITY": _PRIORITY.get(record.levelno, 6),
                "SYSLOG_IDENTIFIER": self.identifier,
                "CODE_FILE": record.pathname,
                "CODE_LINE": record.lineno,
                "CODE_FUNC": record.funcName,
            }
            fields.update(getattr(record, "journal", {}))
            if not journal.send(message, fields):
                sys.stderr.write(message + "\n")
        except Exception:  # logging.Handler's contract: a log line must never raise
            self.handleError(record)


def under_journal() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM")) and os.path.exists(JOURNAL_SOCKET)


def setup(identifier: str = "hoshikage", debug: bool = False) -> None:
    """Journal when our stderr is the journal (JOURNAL_STREAM), else stderr."""
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler
    if under_journal():
        handler = JournalHandler(identifier)
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s" if debug
                                               else "%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def event(kind: str, model: str, message: str, level: int = logging.INFO,
          **fields: object) -> None:
    """A lifecycle record: HOSHIKAGE_EVENT=kind, HOSHIKAGE_MODEL=model, plus HOSHIKAGE_<KEY>."""
    journal: dict[str, object] = {
        "MESSAGE_ID": MESSAGE_IDS[kind],
        "HOSHIKAGE_EVENT": kind,
        "HOSHIKAGE_MODEL": model,
    }
    journal.update({f"HOSHIKAGE_{k.upper()}": v for k, v in fields.items()})
    log.log(level, message, extra={"journal": journal})
