"""model_unit/release.py's part for a llama-server its launcher started and that was stopped
before an activator adopted it: that load still counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from hoshikage_sd import metrics, protocol
from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.model_unit import release
from hoshikage_sd.stats import StatsFile
from tests.unit.conftest import one_model


def test_a_load_stopped_before_the_hand_over_is_counted_by_the_release(tmp_path: Path) -> None:
    config = Config(source=tmp_path / "models.yaml", runtime_dir=tmp_path / "run",
                    state_dir=tmp_path / "state", models={"m": Model("m", tmp_path / "m.gguf")})
    assert release.launched_only(config, "m") is None  # none launched: nothing to count
    protocol.write_launched(str(config.runtime_dir), "m", 4321, 10.0, 10.25)
    assert release.launched_only(config, "m") == (4321, pytest.approx(0.25))
    assert protocol.read_launched(str(config.runtime_dir), "m") is None  # taken
    (stats,) = StatsFile(config.state_dir).read().values()
    assert stats.total_uses == 1 and stats.last_load_seconds == pytest.approx(0.25)
    totals = metrics.read(config.runtime_dir)
    assert totals.counters["hoshikage_loads_total"] == {("m", "launcher"): 1.0}



@pytest.mark.parametrize("stage", ["always", "never"])
def test_a_model_swapped_out_before_its_copy_was_made_keeps_one_made_by_its_keep_unit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    """Stopped by count while memory is plentiful before its activator took over (the
    launcher's start): the release asks hoshikage-keep@m for the copy and ends at once;
    that unit's `hoshikage keep m` makes it, so the swap back is a load from RAM."""
    from hoshikage_sd.runtime import Runtime
    from hoshikage_sd.staging import Store

    config = one_model(tmp_path, stage=stage)
    source = config.models["m"].path
    runtime = Runtime(config.runtime_dir)
    runtime.set_stop_reason("m", "evicted for b")
    runtime.set_keep_copy("m")
    monkeypatch.setattr(release, "others_up", lambda name: ["b"])
    monkeypatch.setattr(release, "memory", lambda: (20 << 30, 24 << 30))
    started: list[str] = []
    monkeypatch.setattr(release.units, "start_helper", started.append)
    events: list[dict[str, object]] = []
    monkeypatch.setattr(release.log, "event",
                        lambda kind, name, message, **fields: events.append(
                            {"kind": kind, "message": message, **fields}))
    assert release.main(config, "m") == 0
    store = Store(config.ramdisk)
    assert not store.has_copy("m")  # not by the release
    assert started == (["hoshikage-keep@m.service"] if stage == "always" else [])
    (record,) = [e for e in events if e["kind"] == "released"]
    assert record["kept"] == int(stage == "always")
    assert record["copied_at_stop"] == int(stage == "always")
    assert (runtime.kept_until("m") is not None) is (stage == "always")

    assert release.keep(config, "m") == 0  # hoshikage-keep@m.service
    assert store.has_copy("m") is (stage == "always")
    assert store.reusable("m", source) is (stage == "always")
    staged = [e for e in events if e["kind"] == "staged"]
    assert [e["bytes"] for e in staged] == ([4100] if stage == "always" else [])
    assert (runtime.kept_until("m") is not None) is (stage == "always")


def test_a_keep_unit_that_cannot_start_leaves_nothing_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hoshikage_sd.errors import HoshikageError
    from hoshikage_sd.runtime import Runtime

    config = one_model(tmp_path)
    runtime = Runtime(config.runtime_dir)
    runtime.set_stop_reason("m", "evicted for b")
    runtime.set_keep_copy("m")
    monkeypatch.setattr(release, "others_up", lambda name: ["b"])
    monkeypatch.setattr(release, "memory", lambda: (20 << 30, 24 << 30))

    def refused(unit: str) -> None:
        raise HoshikageError(f"cannot start {unit}: access denied")

    monkeypatch.setattr(release.units, "start_helper", refused)
    assert release.main(config, "m") == 0
    assert runtime.kept_until("m") is None


def test_a_copy_to_keep_stopped_by_the_models_start_leaves_the_ramdisk_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM (the model unit's start stops hoshikage-keep@: Conflicts=) mid-copy: its
    partial file goes, the rest of the RAM disk is the starting model's."""
    import os
    import signal

    from hoshikage_sd.runtime import Runtime
    from hoshikage_sd.staging import Store

    config = one_model(tmp_path)
    runtime = Runtime(config.runtime_dir)
    runtime.set_kept("m", 1e12)
    config.ramdisk.mkdir(parents=True, exist_ok=True)
    theirs = config.ramdisk / "m.gguf"  # say, the starting model's own copy alongside
    store = Store(config.ramdisk)
    copy = release.copy_to_keep

    def interrupted(*args: object) -> bool:
        def at_progress(_done: int, _total: int) -> None:
            theirs.write_bytes(b"theirs")
            os.kill(os.getpid(), signal.SIGTERM)

        monkeypatch.setattr(release.giveway, "GiveWay", lambda *a, **k: at_progress)
        return copy(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(release, "copy_to_keep", interrupted)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert release.keep(config, "m") == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not list(config.ramdisk.glob(".m.gguf.tmp-*"))
    assert theirs.read_bytes() == b"theirs" and not store.has_copy("m")


def test_a_copy_at_the_stop_that_takes_too_long_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hoshikage_sd.runtime import Runtime
    from hoshikage_sd.staging import Store

    config = one_model(tmp_path)
    monkeypatch.setattr(release, "COPY_BY", -1.0)  # past its time at the first progress
    assert release.copy_to_keep(config, Runtime(config.runtime_dir), Store(config.ramdisk),
                                "m") is False
    assert [p.name for p in config.ramdisk.iterdir()] == [".m.lock"]


def test_a_copy_at_the_stop_is_given_up_for_a_request_that_waits_for_the_stop(
        tmp_path: Path) -> None:
    from hoshikage_sd.runtime import Runtime
    from hoshikage_sd.staging import Store

    config = one_model(tmp_path)
    runtime = Runtime(config.runtime_dir)
    runtime.set_wanted("m")
    assert release.copy_to_keep(config, runtime, Store(config.ramdisk), "m") is False
    assert list(config.ramdisk.iterdir()) == []  # not begun: no lock taken, nothing copied
    runtime.set_wanted("m", False)
    assert release.copy_to_keep(config, runtime, Store(config.ramdisk), "m") is True


def test_a_unit_going_down_is_no_reason_to_keep_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two models stopped together: each sees the other deactivating, and neither may keep
    its copy for it (the RAM disk would hold both with no model up)."""
    units = {"a": "deactivating", "b": "deactivating", "c": "activating", "d": "active"}
    monkeypatch.setattr("hoshikage_sd.sd.units.active_model_units",
                        lambda states: [n for n, state in units.items() if state in states])
    assert release.others_up("a") == ["c", "d"]
    units.update(c="deactivating", d="deactivating")
    assert release.others_up("a") == []


def test_a_copy_made_to_keep_is_not_kept_once_the_others_went_down(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The others stopped while the copy was made (their releases found no kept copy to
    drop yet): the copy goes, or it would stay with no model up."""
    from hoshikage_sd.runtime import Runtime
    from hoshikage_sd.staging import Store

    config = one_model(tmp_path)
    runtime = Runtime(config.runtime_dir)
    runtime.set_stop_reason("m", "evicted for b")
    runtime.set_keep_copy("m")
    answers = [["b"], []]  # b up when the release began, going down once the copy was made
    monkeypatch.setattr(release, "others_up", lambda name: answers.pop(0))
    monkeypatch.setattr(release, "memory", lambda: (20 << 30, 24 << 30))
    monkeypatch.setattr(release.units, "start_helper", lambda unit: None)
    assert release.main(config, "m") == 0
    assert release.keep(config, "m") == 0
    assert answers == []  # asked again after the copy
    assert not Store(config.ramdisk).has_copy("m")
    assert runtime.kept_until("m") is None
    assert [p.name for p in config.ramdisk.glob("*.gguf")] == []


def test_a_copy_to_keep_that_was_dropped_meanwhile_is_not_made(tmp_path: Path) -> None:
    """No kept record (the idle watch or another release dropped it before the unit ran):
    nothing to copy."""
    config = one_model(tmp_path)
    assert release.keep(config, "m") == 0
    assert not config.ramdisk.exists() or list(config.ramdisk.iterdir()) == []


def test_the_last_release_stops_a_copy_to_keep_still_being_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No model up: a kept record goes, and its copy still being made stops first (and is
    waited for), so an idle machine runs nothing and no finished copy is left after it."""
    from hoshikage_sd.runtime import Runtime
    from hoshikage_sd.staging import Store

    config = one_model(tmp_path)
    runtime = Runtime(config.runtime_dir)
    runtime.set_kept("other", 1e12)
    states = {"hoshikage-keep@other.service": ["activating", "deactivating", "inactive"]}
    stopped: list[str] = []
    monkeypatch.setattr(release.units, "unit_state",
                        lambda unit: (states[unit].pop(0) if len(states[unit]) > 1
                                      else states[unit][0], False))
    monkeypatch.setattr(release.units, "stop_unit", stopped.append)
    release.drop_kept(runtime, Store(config.ramdisk), [])
    assert stopped == ["hoshikage-keep@other.service"]
    assert states["hoshikage-keep@other.service"] == ["inactive"]  # waited for its end
    assert runtime.kept_until("other") is None


def test_a_copy_alongside_cut_by_the_stop_is_made_again_by_the_keep_unit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The activator leaves its copy alongside where the stop found it (a partial file,
    its process gone): the release asks hoshikage-keep@ for the copy, which replaces it."""
    from hoshikage_sd.runtime import Runtime
    from hoshikage_sd.staging import Store

    config = one_model(tmp_path)
    runtime = Runtime(config.runtime_dir)
    runtime.set_stop_reason("m", "evicted for b")
    runtime.set_keep_copy("m")
    config.ramdisk.mkdir(parents=True, exist_ok=True)
    partial = config.ramdisk / ".m.gguf.tmp-4242-0"
    partial.write_bytes(b"half")
    monkeypatch.setattr(release, "others_up", lambda name: ["b"])
    monkeypatch.setattr(release, "memory", lambda: (20 << 30, 24 << 30))
    started: list[str] = []
    monkeypatch.setattr(release.units, "start_helper", started.append)
    assert release.main(config, "m") == 0
    assert started == ["hoshikage-keep@m.service"]
    assert release.keep(config, "m") == 0
    store = Store(config.ramdisk)
    assert store.reusable("m", config.models["m"].path) and not partial.exists()


@pytest.mark.parametrize("admitted", [False, True])
def test_a_start_refused_at_admission_leaves_the_kept_copy_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, admitted: bool) -> None:
    """A start refused for room (or given up waiting for it) served nothing: the copy an
    earlier stop kept stays, until when it was kept. One admitted that failed later (its
    llama-server did not load) may have failed on that copy: it goes."""
    from hoshikage_sd.manifest import Files
    from hoshikage_sd.runtime import Runtime
    from hoshikage_sd.staging import Store

    config = one_model(tmp_path)
    runtime, store = Runtime(config.runtime_dir), Store(config.ramdisk)
    store.stage("m", Files.of(config.models["m"]))
    runtime.set_kept("m", 1e12)
    if admitted:
        runtime.set_admitted("m", 4100)
    monkeypatch.setattr(release, "others_up", lambda name: ["b"])
    for key, value in (("SERVICE_RESULT", "exit-code"), ("EXIT_CODE", "exited"),
                       ("EXIT_STATUS", "1")):
        monkeypatch.setenv(key, value)
    assert release.main(config, "m") == 0
    assert store.has_copy("m") is not admitted
    assert runtime.kept_until("m") == (None if admitted else pytest.approx(1e12, abs=1))
