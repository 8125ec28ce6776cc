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

