"""model_unit/giveway.py: a copy made beside other models waits while another one loads."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from hoshikage_sd import protocol
from hoshikage_sd.model_unit import giveway, release
from hoshikage_sd.runtime import Running, Runtime
from hoshikage_sd.staging import Store
from tests.unit.conftest import one_model


def test_loading_is_admitted_not_serving_not_stopping_and_not_itself(tmp_path: Path) -> None:
    runtime = Runtime(tmp_path)
    assert giveway.loading(runtime, "a") == []
    runtime.set_admitted("a", 1)  # itself
    runtime.set_admitted("b", 1)
    runtime.set_admitted("c", 1)
    runtime.set_admitted("d", 1)
    assert giveway.loading(runtime, "a") == ["b", "c", "d"]
    runtime.set_running("c", Running(os.getpid(), "/mnt/hoshikage/c.gguf", time.time()))
    runtime.set_stop_reason("d", "evicted for a")  # stopped before its activator took over
    assert giveway.loading(runtime, "a") == ["b"]
    # the launcher's record that b's llama-server serves (its activator adopts it later)
    protocol.write_launched(str(tmp_path), "b", os.getpid(), 10.0, 10.5)
    assert giveway.loading(runtime, "a") == []
    os.unlink(protocol.launched_path(str(tmp_path), "b"))
    assert giveway.loading(runtime, "a") == ["b"]
    runtime.clear("admitted", "b")
    assert giveway.loading(runtime, "a") == []


def test_a_copy_waits_while_another_model_loads_and_goes_on_once_it_serves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(giveway, "POLL", 0.01)
    runtime = Runtime(tmp_path)
    pace = giveway.GiveWay(runtime, "a")
    pace(0, 10)
    assert pace.waited == 0.0  # nothing loading: no wait at all
    runtime.set_admitted("b", 1)
    served = threading.Event()

    def serve() -> None:
        served.set()  # before the record: pace cannot return between the two
        runtime.set_running("b", Running(os.getpid(), "/mnt/hoshikage/b.gguf", time.time()))

    # what is asserted is the order (the copy goes on only after b serves), not a duration:
    # on a loaded machine the timer's thread may run long before or after this one looks
    serves = threading.Timer(0.3, serve)
    began = time.monotonic()
    serves.start()
    pace(1, 10)
    assert served.is_set()
    assert time.monotonic() - began < 5
    assert pace.waited > 0
    serves.join()


def test_the_wait_is_bounded_and_ended_by_give_up(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(giveway, "POLL", 0.01)
    runtime = Runtime(tmp_path)
    runtime.set_admitted("b", 1)  # a start that never comes: a stale record
    pace = giveway.GiveWay(runtime, "a", limit=0.2)
    began = time.monotonic()
    pace(1, 10)
    pace(2, 10)  # the limit is for the whole copy, not each chunk
    assert 0.2 <= time.monotonic() - began < 2
    wanted = threading.Event()
    quits = giveway.GiveWay(runtime, "a", give_up=wanted.is_set, limit=30)
    began = time.monotonic()
    threading.Timer(0.2, wanted.set).start()
    quits(1, 10)
    assert wanted.is_set()  # it waited for give_up, not for its limit
    assert time.monotonic() - began < 5


def test_a_copy_to_keep_at_the_stop_waits_for_the_load_that_replaced_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(giveway, "POLL", 0.01)
    config = one_model(tmp_path)
    source = config.models["m"].path
    runtime = Runtime(config.runtime_dir)
    runtime.set_admitted("b", 1)  # b loads; m was stopped for it
    copied_at: list[float] = []
    serves_at: list[float] = []

    def serves() -> None:
        serves_at.append(time.monotonic())
        runtime.set_running("b", Running(os.getpid(), "/mnt/hoshikage/b.gguf", time.time()))

    stage = Store.stage

    def watched(self: Store, *args: object, **kwargs: object) -> object:
        staged = stage(self, *args, **kwargs)  # type: ignore[arg-type]
        copied_at.append(time.monotonic())
        return staged

    monkeypatch.setattr(Store, "stage", watched)
    monkeypatch.setattr(giveway, "lowest_priority", lambda: None)  # not this test's process
    timer = threading.Timer(0.3, serves)
    timer.start()
    assert release.copy_to_keep(config, runtime, Store(config.ramdisk), "m") is True
    timer.join()
    assert serves_at and copied_at and copied_at[0] >= serves_at[0]
    assert Store(config.ramdisk).reusable("m", source)


def test_lowest_priority_is_sched_idle_for_the_calling_thread_only() -> None:
    seen: list[int] = []

    def copy() -> None:
        giveway.lowest_priority()
        seen.append(os.sched_getscheduler(0))

    thread = threading.Thread(target=copy)
    thread.start()
    thread.join()
    assert seen == [os.SCHED_IDLE]
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the test's own thread is untouched
