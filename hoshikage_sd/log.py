"""Logging: plain lines on a terminal, structured entries in the journal under systemd.

Lifecycle events carry a fixed MESSAGE_ID per kind and UPPERCASE fields, so that
`journalctl HOSHIKAGE_EVENT=released` or `journalctl MESSAGE_ID=...` finds them.
"""

from __future__ import annotations

import logging
import os

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

class JournalHandler(logging.Handler):
    """python-systemd's JournalHandler, made when the first record comes: systemd.journal
    costs ~10 ms of imports, which the router must not spend before its head start for the
    request that woke it (router/first_request.py)."""

    def __init__(self, identifier: str) -> None:
        super().__init__()
        self.identifier = identifier
        self.inner: logging.Handler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.inner is None:
            from systemd.journal import JournalHandler as Journal

            self.inner = Journal(SYSLOG_IDENTIFIER=self.identifier)
        self.inner.handle(record)


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
    journal.update({f"HOSHIKAGE_{k.upper()}": str(v) for k, v in fields.items()
                    if v is not None})
    # UPPERCASE attributes of the record are the journal's fields (JournalHandler sends them)
    log.log(level, message, extra=journal)
