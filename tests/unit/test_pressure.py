"""policy/pressure.py: the idle watch's pressure stop, decided on a reading of the memory."""

from __future__ import annotations

from hoshikage_sd.policy.admission import Resident
from hoshikage_sd.policy.pressure import Level, Reading, Thresholds, decide, victims

GiB = 1 << 30
TOTAL = 24 * GiB
UP = (Resident("busy", 6 * GiB, idle=None), Resident("old", 3 * GiB, idle=60, last_used=1.0),
      Resident("new", 3 * GiB, idle=60, last_used=2.0))
LIMITS = Thresholds(warn=0.7, critical=0.9)


def test_victims_are_idle_models_until_below_critical() -> None:
    assert victims(21 * GiB, TOTAL, 0.9, UP) == []
    assert [r.name for r in victims(22 * GiB, TOTAL, 0.9, UP)] == ["old"]
    assert [r.name for r in victims(24 * GiB, TOTAL, 0.8, UP)] == ["old", "new"]
    assert victims(24 * GiB, TOTAL, 0.8, UP, floor=4 * GiB) == []  # below evict_floor


def test_calm_below_warn() -> None:
    d = decide(Reading(16 * GiB, TOTAL, UP), LIMITS)
    assert d.level is Level.CALM and d.victims == () and d.message == ""


def test_a_warning_below_critical_stops_nothing() -> None:
    d = decide(Reading(18 * GiB, TOTAL, UP), LIMITS)
    assert d.level is Level.WARN and d.victims == ()
    assert d.message == "memory pressure: 75% of RAM in use (warn at 70%)"


def test_critical_stops_the_idle_models_lowest_rank_first() -> None:
    d = decide(Reading(23 * GiB, TOTAL, UP), LIMITS)
    assert d.level is Level.CRITICAL and [v.name for v in d.victims] == ["old"]  # 20 < 21.6
    assert d.message == "memory pressure: 96% of RAM in use (critical at 90%): stopping old"
    busy_only = decide(Reading(23 * GiB, TOTAL, UP[:1]), LIMITS)
    assert busy_only.victims == () and busy_only.message.endswith("stopping nothing idle")
