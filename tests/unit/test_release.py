"""model_unit/release.py's part for a llama-server its launcher started and that was stopped
before an activator adopted it: that load still counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from hoshikage_sd import metrics, protocol
from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.model_unit import release
from hoshikage_sd.policy.stats import StatsFile


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


def test_the_release_runs_below_the_models_cpu_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    """ExecStopPost of a model evicted by count runs while the next model loads."""
    import os

    from hoshikage_sd import cli

    niced: list[int] = []
    monkeypatch.setattr(os, "nice", niced.append)
    monkeypatch.setattr(cli, "run", lambda args, early: 0)
    monkeypatch.setattr("hoshikage_sd.log.setup", lambda *a, **k: None)
    assert cli.main(["release", "m"]) == 0
    assert niced == [cli.RELEASE_NICE]
    assert cli.main(["status"]) == 0 and niced == [cli.RELEASE_NICE]  # nothing else
