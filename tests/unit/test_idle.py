"""runtime.idle_seconds and the idle watch: idle time, and whether the TTL has run out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hoshikage_sd.runtime import Activity, Running, Runtime, idle_seconds
from hoshikage_sd.watch.idle import should_stop

READY = 1_000_000.0  # wall-clock time the model became ready
TTL = 600.0


def test_in_flight_request_is_never_idle() -> None:
    busy = Activity(in_flight=1, last_end=READY + 10, router_pid=1)
    for now in (READY + 1, READY + TTL, READY + 100 * TTL):
        idle = idle_seconds(now, READY, busy)
        assert idle is None
        assert should_stop(idle, TTL) is False
    assert idle_seconds(READY + 100 * TTL, READY, Activity(3, 0.0, 1)) is None


def test_in_flight_but_router_dead_counts_as_idle() -> None:
    orphaned = Activity(in_flight=2, last_end=READY + 100, router_pid=12345)
    idle = idle_seconds(READY + 100 + TTL, READY, orphaned, router_alive=False)
    assert idle == TTL
    assert should_stop(idle, TTL) is True


def test_no_activity_counts_from_ready() -> None:
    assert idle_seconds(READY + 42.5, READY, None) == 42.5
    assert idle_seconds(READY + 42.5, READY, None, router_alive=False) == 42.5


def test_last_end_after_ready_counts_from_last_end() -> None:
    activity = Activity(in_flight=0, last_end=READY + 500, router_pid=1)
    assert idle_seconds(READY + 530, READY, activity) == 30.0
    assert should_stop(idle_seconds(READY + 530, READY, activity), TTL) is False


def test_last_end_before_ready_counts_from_ready() -> None:
    # activity left over from an earlier run of the model: the new run starts fresh
    stale = Activity(in_flight=0, last_end=READY - 5000, router_pid=1)
    assert idle_seconds(READY + 30, READY, stale) == 30.0


def test_idle_is_never_negative() -> None:
    # clock skew: the record is from "the future"
    activity = Activity(in_flight=0, last_end=READY + 100, router_pid=1)
    assert idle_seconds(READY + 50, READY, activity) == 0.0
    assert idle_seconds(READY - 10, READY, None) == 0.0


def test_ttl_boundary() -> None:
    activity = Activity(in_flight=0, last_end=READY + 100, router_pid=1)
    at_ttl = idle_seconds(READY + 100 + TTL, READY, activity)
    just_below = idle_seconds(READY + 100 + TTL - 0.001, READY, activity)
    assert at_ttl == TTL
    assert should_stop(at_ttl, TTL) is True
    assert just_below is not None and just_below < TTL
    assert should_stop(just_below, TTL) is False


@pytest.mark.parametrize(("idle", "ttl", "stop"), [
    (None, 0.0, False),
    (None, 10.0, False),
    (0.0, 0.0, True),
    (9.999, 10.0, False),
    (10.0, 10.0, True),
    (10.001, 10.0, True),
    (1e9, float("inf"), False),
])
def test_should_stop(idle: float | None, ttl: float, stop: bool) -> None:
    assert should_stop(idle, ttl) is stop


def test_runtime_idle_seconds_from_its_records(tmp_path: Path) -> None:
    """One answer for the idle watch, admission and status: busy while the router that
    counted a request in flight lives, idle once it is gone; None before the model serves."""
    runtime = Runtime(tmp_path)
    assert runtime.idle_seconds("tiny", READY + 5) is None  # not serving yet
    runtime.set_running("tiny", Running(pid=1, staged="/x", started=READY))
    assert runtime.idle_seconds("tiny", READY + 5) == 5.0
    runtime.set_activity("tiny", Activity(1, READY + 2, os.getpid()))
    assert runtime.idle_seconds("tiny", READY + 5) is None  # our (live) router is busy
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    runtime.set_activity("tiny", Activity(1, READY + 2, child.pid))
    assert runtime.idle_seconds("tiny", READY + 5) == 3.0  # its router died mid-request


def test_the_idle_watch_never_stops_a_pinned_model(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A pin holds against the TTL (and a keep_alive's) as it does against eviction."""
    from hoshikage_sd.manifest import Config, Model
    from hoshikage_sd.watch import idle

    config = Config(source=tmp_path / "m.yaml", runtime_dir=tmp_path / "run",
                    ramdisk=tmp_path / "rd", models={
                        "kept": Model("kept", tmp_path / "a.gguf", ttl=10.0, pinned=True),
                        "free": Model("free", tmp_path / "b.gguf", ttl=10.0)})
    runtime = Runtime(config.runtime_dir)
    long_ago = 1000.0
    for name in config.models:
        runtime.set_running(name, Running(pid=1, staged="/x", started=long_ago))
    runtime.set_ttl("kept", 5.0)
    stopped: list[str] = []
    monkeypatch.setattr(idle.units, "active_model_units", lambda *a: ["kept", "free"])
    monkeypatch.setattr(idle.units, "systemctl",
                        lambda *a, **k: stopped.append(a[-1]))
    assert idle.sweep(config, runtime) is None  # nothing left to wait for
    assert stopped == [idle.units.model_unit("free")]


def test_a_model_gone_from_the_manifest_is_stopped_once_it_is_idle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Removed or renamed while loaded: nothing can ask for it, show it or unload it by
    name, so its 1 h idle_ttl would hold its memory unseen. It goes at the next sweep, but
    never with a request in flight."""
    import fcntl
    import time

    from hoshikage_sd.manifest import Config, Model
    from hoshikage_sd.watch import idle

    config = Config(source=tmp_path / "m.yaml", runtime_dir=tmp_path / "run",
                    ramdisk=tmp_path / "rd", models={
                        "stays": Model("stays", tmp_path / "a.gguf", ttl=3600.0)})
    runtime = Runtime(config.runtime_dir)
    now = time.time()
    for name in ("stays", "gone", "streaming"):
        runtime.set_running(name, Running(pid=1, staged="/x", started=now - 5))
    busy = runtime.busy_path("streaming")
    busy.parent.mkdir(parents=True, exist_ok=True)
    stopped: list[str] = []
    monkeypatch.setattr(idle.units, "active_model_units",
                        lambda *a: ["stays", "gone", "streaming"])
    monkeypatch.setattr(idle.units, "systemctl", lambda *a, **k: stopped.append(a[-1]))
    with open(busy, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)  # the router's, while a request is in flight
        wait = idle.sweep(config, runtime)
    assert stopped == [idle.units.model_unit("gone")]
    assert runtime.stop_reason("gone") == "not in the manifest"
    assert wait is not None and wait <= idle.MIN_WAIT  # the streaming one: looked at again
