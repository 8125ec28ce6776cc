"""`hoshikage check` on the RAM disk's mount: the model unit must wait for the mount that holds
the manifest's ramdisk: (commands/mounts.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hoshikage_sd.commands import mounts
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Config
from hoshikage_sd.sd import units
from testbed import REPO_ROOT
from tests.unit.test_unit_files import sections


def test_the_shipped_unit_covers_the_default_ramdisk() -> None:
    required = sections(REPO_ROOT / "units/hoshikage-model@.service").get(
        "Unit", "RequiresMountsFor").split()
    assert mounts.problem(Config(source=Path("m.yaml")).ramdisk, required) is None


@pytest.mark.parametrize(("ramdisk", "required", "ok"), [
    ("/mnt/hoshikage", ["/mnt/hoshikage"], True),
    ("/mnt/hoshikage/models", ["/mnt/hoshikage"], True),  # every mount down to it
    ("/dev/shm/hoshikage", ["/mnt/hoshikage", "/dev/shm/hoshikage"], True),  # a drop-in's
    ("/dev/shm/hoshikage", ["/mnt/hoshikage"], False),
    ("/mnt/hoshikage2", ["/mnt/hoshikage"], False),  # a path, not a string prefix
    ("/mnt/hoshikage", [], False),
])
def test_covered(ramdisk: str, required: list[str], ok: bool) -> None:
    assert mounts.covered(Path(ramdisk), required) is ok


def test_the_warning_says_what_to_add() -> None:
    text = mounts.problem(Path("/dev/shm/hk"), ["/mnt/hoshikage"])
    assert text is not None
    assert "does not wait for its mount" in text
    assert "systemctl edit hoshikage-model@.service" in text
    assert text.endswith("[Unit] RequiresMountsFor=/dev/shm/hk")


def test_problems_as_systemd_shows_the_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    config = Config(source=Path("m.yaml"), ramdisk=Path("/dev/shm/hk"))
    shown: dict[str, str] = {"LoadState": "loaded", "RequiresMountsFor": "/mnt/hoshikage"}

    writable = {"LoadState": "loaded", "ReadWritePaths": "-/mnt/hoshikage -/dev/shm/hk"}

    def show(unit: str, *props: str) -> dict[str, str]:
        if unit == "hoshikage-idle.service":
            assert set(props) == {"LoadState", "ReadWritePaths"}
            return writable
        assert unit == "hoshikage-model@check.service"
        assert set(props) == {"LoadState", "RequiresMountsFor"}
        return shown

    monkeypatch.setattr(units, "show", show)
    (warning,) = mounts.problems(config)
    assert warning.startswith("ramdisk /dev/shm/hk: ")
    shown["RequiresMountsFor"] = "/mnt/hoshikage /dev/shm/hk"  # with the drop-in
    assert mounts.problems(config) == []
    # the idle watch, which deletes kept copies, may write only to the shipped ramdisk
    writable["ReadWritePaths"] = "-/mnt/hoshikage"
    (warning,) = mounts.problems(config)
    assert warning == ("ramdisk /dev/shm/hk: hoshikage-idle.service may not write to it (no "
                       "ReadWritePaths= covers it), so kept copies never expire; `systemctl "
                       "edit hoshikage-idle.service` and add [Service] "
                       "ReadWritePaths=-/dev/shm/hk")
    writable["ReadWritePaths"] = "-/mnt/hoshikage /dev/shm"
    assert mounts.problems(config) == []
    shown.update(LoadState="not-found", RequiresMountsFor="")  # not installed: no opinion
    assert mounts.problems(config) == []
    shown.clear()  # systemd not running: systemctl show printed nothing
    assert mounts.problems(config) == []

    def fails(unit: str, *props: str) -> dict[str, str]:
        raise HoshikageError("systemctl is missing")

    monkeypatch.setattr(units, "show", fails)
    assert mounts.problems(config) == []
