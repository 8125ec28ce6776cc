"""Fixtures of the unit tier."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hoshikage_sd.manifest import Config, Model


@pytest.fixture(autouse=True)
def units_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$RUNTIME_DIRECTORY (systemd sets it for the units) is the test's own: what the router
    and the CLI keep there (the last good manifest, manifest.json) never lands in the host's
    /run/hoshikage."""
    path = tmp_path / "units-runtime"
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(path))
    return path


@pytest.fixture(autouse=True)
def fresh_age_identity() -> None:
    """encryption.py reads a process's age identity once (a unit's credential does not change
    while it runs): each test brings its own."""
    from hoshikage_sd import encryption

    encryption._keys.cache_clear()


@pytest.fixture(autouse=True)
def own_priority() -> Iterator[None]:
    """The test process's scheduling as it was: a release run in-process makes its calling
    thread SCHED_IDLE (giveway.lowest_priority, right in the unit's own process), which would
    leave every later test of this worker to run only on idle CPU."""
    policy, nice = os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)
    yield
    with contextlib.suppress(PermissionError):  # back up from idle: root's, as tools/test runs
        if os.sched_getscheduler(0) != policy:
            os.sched_setscheduler(0, policy, os.sched_param(0))
        if os.getpriority(os.PRIO_PROCESS, 0) != nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)


def one_model(tmp_path: Path, **model: Any) -> Config:
    """A manifest of one model, m (a 4 KiB file that starts as a GGUF does, with `model`'s
    settings), its RAM disk, runtime and state directories in tmp_path."""
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF" + bytes(4096))
    (tmp_path / "ram").mkdir()
    return Config(source=tmp_path / "models.yaml", runtime_dir=tmp_path / "run",
                  ramdisk=tmp_path / "ram", state_dir=tmp_path / "state",
                  models={"m": Model("m", source, **model)})
