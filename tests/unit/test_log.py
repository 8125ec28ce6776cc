"""log.hold(): the router's records before READY=1 wait for the journal's import, in order,
and none is lost."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from hoshikage_sd import cli, log


class Sink(logging.Handler):
    """Stands in for python-systemd's handler: what reached the journal, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.held_usec: list[int | None] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.held_usec.append(getattr(record, "HOSHIKAGE_HELD_USEC", None))


@pytest.fixture
def sink() -> Iterator[Sink]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    handler = log.JournalHandler("hoshikage-test")
    handler.inner = Sink()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    yield handler.inner
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def test_held_records_go_out_in_order_once_released(sink: Sink) -> None:
    log.hold()
    log.log.info("one")
    log.event("admission", "m", "two")
    assert sink.messages == []
    log.release()
    assert sink.messages == ["one", "two"]
    assert sink.held_usec[0] <= sink.held_usec[1] <= time.monotonic_ns() // 1000
    log.log.info("three")  # released: no longer held
    assert sink.messages == ["one", "two", "three"]


def test_a_warning_goes_out_at_once_after_what_was_held(sink: Sink) -> None:
    log.hold()
    log.log.info("before")
    log.log.warning("trouble")
    assert sink.messages == ["before", "trouble"]


def test_nothing_stays_held_once_a_command_ends(sink: Sink,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log, "setup", lambda *a: None)  # keep the sink as the handler

    def body() -> int:
        log.hold()
        log.log.info("held, then the command ends")
        return 3

    assert cli.guarded("router", False, body) == 3
    assert sink.messages == ["held, then the command ends"]
