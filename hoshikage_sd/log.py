"""Logging: plain lines on a terminal, structured entries in the journal under systemd.

Lifecycle events carry a fixed MESSAGE_ID per kind and UPPERCASE fields, so that
`journalctl HOSHIKAGE_EVENT=released` or `journalctl MESSAGE_ID=...` finds them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

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
    request that woke it (router/first_request.py), nor before READY=1 for the records it
    makes on the way: hold() keeps info records back until release()."""

    def __init__(self, identifier: str) -> None:
        super().__init__()
        self.identifier = identifier
        self.inner: logging.Handler | None = None
        self.held: list[logging.LogRecord] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.held is not None:
            if record.levelno < logging.WARNING:
                # the journal stamps it when it is sent: this says when it was made
                record.HOSHIKAGE_HELD_USEC = time.monotonic_ns() // 1000
                self.held.append(record)
                return
            self.send_held()  # a warning goes out now, after what came before it
        self.send(record)

    def send(self, record: logging.LogRecord) -> None:
        if self.inner is None:
            from systemd.journal import JournalHandler as Journal

            self.inner = Journal(SYSLOG_IDENTIFIER=self.identifier)
        self.inner.handle(record)

    def send_held(self) -> None:
        with self.lock or contextlib.nullcontext():  # another thread may be emitting
            held, self.held = self.held or [], None
            for record in held:
                self.send(record)


def _journal_handlers() -> list[JournalHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, JournalHandler)]


def hold() -> None:
    """Keep info records for the journal back, in order, until release() (or a warning).
    Each carries HOSHIKAGE_HELD_USEC: when it was made (CLOCK_MONOTONIC, as systemd's
    timestamps), which its journal timestamp no longer says."""
    for handler in _journal_handlers():
        if handler.held is None:
            handler.held = []


def release() -> None:
    """Send what hold() kept back."""
    for handler in _journal_handlers():
        handler.send_held()


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
