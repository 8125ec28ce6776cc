"""policy/kept.py: which kept RAM-disk copies a start deletes to make room, on values."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.policy.kept import Kept, to_release

GiB = 1 << 30
COPIES = [Kept("often", 4 * GiB, 30.0), Kept("rare", 3 * GiB, 1.0),
          Kept("sometimes", 2 * GiB, 10.0)]


def test_nothing_goes_while_both_have_room() -> None:
    assert to_release(COPIES, ramdisk_free=8 * GiB, mem_available=8 * GiB, needed=8 * GiB) == []


def test_the_lowest_rank_goes_first_until_both_have_room() -> None:
    # the RAM disk short by 2 GiB: rare (3 GiB) is enough
    assert to_release(COPIES, 6 * GiB, 20 * GiB, 8 * GiB) == ["rare"]
    # the memory short by 4 GiB: rare (3) is not, rare and sometimes (5) are
    assert to_release(COPIES, 20 * GiB, 4 * GiB, 8 * GiB) == ["rare", "sometimes"]
    # each short: the larger shortfall decides
    assert to_release(COPIES, 7 * GiB, 5 * GiB, 8 * GiB) == ["rare"]


def test_every_copy_goes_when_even_that_is_short() -> None:
    """Admission then judges what is left (it may stop running models, or refuse)."""
    assert to_release(COPIES, 0, 0, 100 * GiB) == ["rare", "sometimes", "often"]


def test_equal_ranks_go_in_the_order_given() -> None:
    tied = [Kept("b", GiB, 0.0), Kept("a", GiB, 0.0)]
    assert to_release(tied, 0, 10 * GiB, GiB) == ["b"]
    assert to_release([], 0, 0, GiB) == []


def test_make_room_deletes_what_to_release_names(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The activator's side, on a real RAM-disk directory, runtime and stats file: nothing
    goes while there is room; a start that needs more than the machine has takes every kept
    copy, the least used first, each with its journal record."""
    from hoshikage_sd.model_unit.activate import Activator
    from hoshikage_sd.runtime import Runtime
    from hoshikage_sd.stats import StatsFile

    ramdisk = tmp_path / "ram"
    ramdisk.mkdir()
    models = {n: Model(n, tmp_path / f"{n}.gguf") for n in ("often", "rare", "new")}
    config = Config(source=tmp_path / "models.yaml", runtime_dir=tmp_path / "run",
                    ramdisk=ramdisk, state_dir=tmp_path / "state", models=models)
    runtime = Runtime(config.runtime_dir)
    for name in ("often", "rare"):
        (ramdisk / f"{name}.gguf").write_bytes(bytes(64 << 10))
        runtime.set_kept(name, time.time() + 3600)
    stats = StatsFile(config.state_dir)
    for name in ("often", "often", "rare"):
        stats.record_load(name)
    activator = Activator(config, models["new"])

    activator.make_room(0)
    assert sorted(runtime.names("kept")) == ["often", "rare"]
    with caplog.at_level(logging.INFO, logger="hoshikage"):
        activator.make_room(1 << 60)
    assert runtime.names("kept") == [] and not list(ramdisk.glob("*.gguf"))
    released = [r.getMessage() for r in caplog.records if "kept copy" in r.getMessage()]
    assert [m.split("'")[0] for m in released] == ["released rare", "released often"]
    assert "room for new; freed 64.0 KiB of RAM disk" in released[0]
