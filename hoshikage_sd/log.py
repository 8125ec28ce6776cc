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

# Fixed per event kind, each a random 128-bit ID (systemd-id128 new), never changed once
# published: scripts and catalog/hoshikage.catalog (journalctl -x) match on them. A new kind
# gets a new entry there (tests/unit/test_catalog.py).
MESSAGE_IDS = {
    "staged": "8d62c50e39ee4594af046a985de9f2ec",
    "ready": "f968d8f0227e4f1a8040d06799ed183b",
    "idle-stop": "99f08abd1036470b858ae708440de923",
    "released": "67fcdfd2515d4dd3bc28242cda7430fb",
    "start-failed": "8a8d1c37ec734e8584c0ba0a3bf08e74",
    "restaged": "a58ddd5b227f4bce899496e445550666",
    "router-exit": "06e3e794e8e64577b7313cd94531f10c",
    "admission": "5e003e44065b4455a734234473f6b9e2",
    "pressure": "a7fced5d59624cc192e7b9ae0f65b7d6",
    "cache-copy": "86ad9fceba484135865674b91d2c3fab",
    "cache-expire": "91fb23af5c4444b4b53a5dc20328b0a0",
}

class JournalHandler(logging.Handler):
    """python-systemd's JournalHandler, made when the first record comes: systemd.journal's
    imports are what the router must not spend before its head start for the
    request that woke it (router/headstart/), nor before READY=1 for the records it
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
