"""hoshikage_sd/cache.py around the plan: `check`'s word on the cache's directory, a copy
that fails recorded while the run goes on, and check's word on models that never fit."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import pytest

from hoshikage_sd import cache
from hoshikage_sd.commands import fits
from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.manifest.model import Cache
from hoshikage_sd.stats import StatsFile


def with_cache(tmp_path: Path, directory: Path, names: tuple[str, ...] = ("a",)) -> Config:
    models = {}
    for name in names:
        source = tmp_path / "slow" / f"{name}.gguf"
        source.parent.mkdir(exist_ok=True)
        source.write_bytes(b"GGUF" + bytes(8192))
        models[name] = Model(name, source)
    (tmp_path / "ram").mkdir(exist_ok=True)
    return Config(source=tmp_path / "models.yaml", runtime_dir=tmp_path / "run",
                  ramdisk=tmp_path / "ram", state_dir=tmp_path / "state", models=models,
                  cache=Cache(dir=directory, min_rank=0.0))


def test_check_names_a_cache_directory_its_unit_cannot_use(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for unusable in ("/tmp", "/etc"):
        assert cache.check_problems(with_cache(tmp_path, Path(unusable))) == [
            f"cache: dir {unusable} " + dict((str(p), why) for p, why in
                                             cache.UNIT_CANNOT_USE)[unusable]]
    # the rest in tmp_path, which may be in /tmp
    monkeypatch.setattr(cache, "UNIT_CANNOT_USE", ())
    assert cache.check_problems(dataclasses.replace(with_cache(tmp_path, tmp_path),
                                                    cache=None)) == []
    ssd = tmp_path / "ssd"
    (problem,) = cache.check_problems(with_cache(tmp_path, ssd))
    assert problem == (f"cache: dir {ssd} does not exist: make it on the SSD (install -d -o "
                       f"hoshikage -g hoshikage {ssd})")
    ssd.write_bytes(b"")
    assert cache.check_problems(with_cache(tmp_path, ssd)) == [
        f"cache: dir {ssd} is not a directory"]
    ssd.unlink()
    ssd.mkdir()
    assert cache.check_problems(with_cache(tmp_path, ssd)) == []
    (inside,) = cache.check_problems(with_cache(tmp_path, tmp_path / "ram"))
    assert inside.endswith("is on the RAM disk: the cache belongs on an SSD")


def test_a_copy_that_fails_is_recorded_and_the_others_are_still_copied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    config = with_cache(tmp_path, ssd, ("a", "b"))
    stats = StatsFile(config.state_dir)
    for name in ("a", "b"):
        stats.record_load(name)
        stats.record_stop(name, time.time())
    monkeypatch.setattr(cache.units, "active_model_units", lambda *states: [])
    monkeypatch.setattr(cache, "on_cache_disk", lambda config, model: False)  # one disk here
    (ssd / ".a.lock").mkdir()  # a's copy cannot take its lock: a real EISDIR
    with caplog.at_level(logging.INFO, logger="hoshikage"):
        assert cache.sync(config) == 1
    records = [r for r in caplog.records if getattr(r, "HOSHIKAGE_EVENT", "") == "cache-copy"]
    phases = {(r.HOSHIKAGE_MODEL, r.HOSHIKAGE_PHASE) for r in records}  # type: ignore[attr-defined]
    assert phases == {("a", "start"), ("a", "failed"), ("b", "start"), ("b", "done")}, phases
    (failed,) = [r for r in records if r.HOSHIKAGE_PHASE == "failed"]  # type: ignore[attr-defined]
    assert failed.levelno == logging.ERROR
    assert failed.getMessage() == f"cannot cache a: Is a directory: {ssd}/.a.lock"
    assert cache.cached_copy(config, config.models["b"]) is not None
    assert cache.cached_copy(config, config.models["a"]) is None


def test_check_names_a_model_that_can_never_fit(tmp_path: Path) -> None:
    config = with_cache(tmp_path, tmp_path)
    assert fits.problems(config) == []
    small = dataclasses.replace(config, memory_budget=4096)
    (problem,) = fits.problems(small)
    assert problem.startswith("model a needs ") and problem.endswith(
        "more than memory_budget 4.0 KiB: it can never load"), problem
    # a byte below estimate × margin, rounded up as admission rounds it: refused there too
    from hoshikage_sd.admit.needs import estimate

    need = math.ceil(estimate(config.models["a"]) * config.safety_margin)
    assert fits.problems(dataclasses.replace(config, memory_budget=need - 1))
    assert fits.problems(dataclasses.replace(config, memory_budget=need)) == []
