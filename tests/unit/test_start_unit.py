"""units.start_unit after a crash (issue 14): a unit still up while its model does not serve
is let go down first, a failed one is reset, then the start is queued: the caller never reads
the old unit's failure as the new start's. (Under real systemd: tests/system/test_chaos.py.)"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.sd import bus, units

UNIT = "hoshikage-model@tiny.service"


class FakeManager:
    """PID 1 as start_unit sees it: the unit's states, one per call of units()."""

    def __init__(self, states: list[str], reset_error: bool = False) -> None:
        self.states: Iterator[str] = iter(states)
        self.last = states[-1]
        self.calls: list[str] = []
        self.reset_error = reset_error

    def units(self, names: list[str]) -> list[bus.UnitState]:
        state = next(self.states, self.last)
        self.calls.append(f"state={state}")
        return [bus.UnitState(names[0], "loaded", state, "", 0)]

    def reset_failed_unit(self, unit: str, conn: object = None) -> None:
        self.calls.append("reset")
        if self.reset_error:
            raise bus.BusError("org.freedesktop.DBus.Error.AccessDenied", "no")

    def start_unit(self, unit: str, mode: str = "replace", conn: object = None) -> str:
        self.calls.append("start")
        return "/job/1"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeManager]:
    manager = FakeManager(["inactive"])
    for name in ("units", "reset_failed_unit", "start_unit"):
        monkeypatch.setattr(bus, name, lambda *a, _n=name, **k: getattr(manager, _n)(*a, **k))
    monkeypatch.setattr(units, "SETTLE_POLL", 0.001)
    yield manager


@pytest.mark.parametrize(("states", "calls"), [
    (["inactive"], ["state=inactive", "start"]),
    (["activating"], ["state=activating", "start"]),  # someone else's start: join it
    (["failed"], ["state=failed", "reset", "start"]),
    # llama-server was killed; its activator and then its release are still going:
    (["active", "active", "deactivating", "failed"],
     ["state=active", "state=active", "state=deactivating", "state=failed", "reset", "start"]),
    (["deactivating", "inactive"], ["state=deactivating", "state=inactive", "start"]),
])
def test_start_waits_for_a_dying_unit_and_resets_a_failed_one(
        fake: FakeManager, states: list[str], calls: list[str]) -> None:
    fake.states, fake.last = iter(states), states[-1]
    units.start_unit(UNIT)
    assert fake.calls == calls


def test_a_unit_that_stays_up_is_started_anyway_after_the_limit(
        fake: FakeManager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(units, "SETTLE_LIMIT", 0.05)
    fake.states, fake.last = iter(["active"]), "active"
    units.start_unit(UNIT)
    assert fake.calls[-1] == "start" and "reset" not in fake.calls


def test_a_refused_reset_is_a_warning_and_the_start_goes_on(
        fake: FakeManager, caplog: pytest.LogCaptureFixture) -> None:
    fake.states, fake.last, fake.reset_error = iter(["failed"]), "failed", True
    units.start_unit(UNIT)
    assert fake.calls == ["state=failed", "reset", "start"]
    assert any("cannot reset the failed state" in r.getMessage() and
               r.levelno == logging.WARNING for r in caplog.records)


def test_a_refused_start_is_an_error_with_the_reason(
        fake: FakeManager, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(unit: str, mode: str = "replace", conn: object = None) -> str:
        raise bus.BusError("org.freedesktop.systemd1.NoSuchUnit", "no such unit")
    monkeypatch.setattr(bus, "start_unit", refuse)
    with pytest.raises(HoshikageError, match=r"cannot start .*no such unit"):
        units.start_unit(UNIT)
