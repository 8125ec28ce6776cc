"""Usage statistics, rank and the SSD cache plan (hoshikage_sd.policy: rank, stats, cacheplan)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from hoshikage_sd.manifest import CachePolicy, Weights
from hoshikage_sd.manifest.model import DAY
from hoshikage_sd.policy.cacheplan import Action, CacheState, Candidate, plan_cache
from hoshikage_sd.policy.rank import KEEP_USES, ModelStats, Use, rank
from hoshikage_sd.stats import StatsFile

NOW = 1_800_000_000.0
GB = 1 << 30


def used(*days_ago: float, runtime: float = 0.0) -> ModelStats:
    """Finished loads `days_ago`, each having run `runtime` seconds."""
    uses = tuple(Use(NOW - d * DAY, runtime) for d in sorted(days_ago, reverse=True))
    return ModelStats(uses, len(uses), runtime * len(uses))


def test_rank_formula_by_hand() -> None:
    # 2 uses this week, 3 this month, 4 in all, last 1 day ago, no runtime recorded
    stats = used(1, 3, 20, 40)
    w = Weights()
    expected = 2 * 10 + 3 * 3 + 4 * 0.5 + 20 - 1 * 2
    assert rank(stats, NOW, w) == pytest.approx(expected)


def test_never_used_ranks_zero_and_age_costs() -> None:
    assert rank(ModelStats(), NOW) == 0.0
    assert rank(used(100), NOW) < 0  # one use long ago: the age penalty wins


def test_weights_come_from_config() -> None:
    stats = used(1)
    assert rank(stats, NOW, Weights(week=0, month=0, total=0, recent_bonus=0, age=0,
                                    runtime=0)) == 0.0
    assert rank(stats, NOW, Weights(week=100, month=0, total=0, recent_bonus=0, age=0,
                                    runtime=0)) == 100.0


def test_hours_of_runtime_outrank_many_short_loads() -> None:
    daily_hours = used(1, 2, 3, 4, 5, runtime=4 * 3600)
    twenty_blips = used(*[1 + i * 0.01 for i in range(20)], runtime=5)
    assert rank(daily_hours, NOW) > rank(twenty_blips, NOW)


def test_load_and_stop_record_runtime_and_keep_the_last_100() -> None:
    stats = ModelStats()
    for i in range(KEEP_USES + 5):
        stats = stats.with_load(NOW + i * 100, load_seconds=0.4).with_stop(NOW + i * 100 + 60)
    assert len(stats.uses) == KEEP_USES and stats.total_uses == KEEP_USES + 5
    assert stats.total_runtime == pytest.approx(60 * (KEEP_USES + 5))
    assert stats.uses[-1] == Use(NOW + (KEEP_USES + 4) * 100, 60)
    assert stats.last_load_seconds == 0.4
    assert stats.with_stop(NOW + 10**6) == stats  # a stop without a load changes nothing


def test_a_running_load_counts_its_time_so_far_a_crashed_one_nothing() -> None:
    running = ModelStats().with_load(NOW - 3600)
    assert running.hours(NOW, NOW - 30 * DAY, running=True) == pytest.approx(1.0)
    assert running.hours(NOW, NOW - 30 * DAY, running=False) == 0.0  # no stop record, not up
    crashed_then_running = running.with_load(NOW - 60)
    assert crashed_then_running.hours(NOW, NOW - 30 * DAY, True) == pytest.approx(60 / 3600)


def test_a_long_run_counts_the_part_inside_the_window() -> None:
    sixty_days = ModelStats().with_load(NOW - 60 * DAY).with_stop(NOW)
    assert sixty_days.hours(NOW, NOW - 30 * DAY) == pytest.approx(30 * 24)


def test_an_over_full_cache_shrinks_even_without_a_copy() -> None:
    state = CacheState(16 * GB, 100 * GB, [cand("old1", 8, -40, days=40, cached=True),
                                           cand("old2", 8, -20, days=20, cached=True)])
    assert actions(plan_cache(state, CachePolicy(max_size=10 * GB), NOW)) == \
        {"old1": "expire", "old2": "keep"}


def test_stats_file_round_trip_is_readable_json(tmp_path: Path) -> None:
    f = StatsFile(tmp_path)
    f.record_load("tiny", 0.25)
    f.record_stop("tiny")
    data = json.loads((tmp_path / "stats.json").read_text())
    assert data["version"] == 1
    entry = data["models"]["tiny"]
    assert entry["total_uses"] == 1 and entry["last_load_seconds"] == 0.25
    assert len(entry["uses"]) == 1 and entry["uses"][0]["runtime"] >= 0
    assert f.read()["tiny"].total_uses == 1


def _writer(state_dir: str) -> None:
    f = StatsFile(Path(state_dir))
    i = 0
    while True:
        f.record_load(f"model-{i % 7}", 0.1)
        i += 1


def test_stats_survive_a_writer_killed_mid_write(tmp_path: Path) -> None:
    f = StatsFile(tmp_path)
    f.record_load("seed")
    ctx = multiprocessing.get_context("fork")
    for delay in (0.05, 0.11, 0.17, 0.23, 0.31):
        writer = ctx.Process(target=_writer, args=(str(tmp_path),))
        writer.start()
        time.sleep(delay)
        assert writer.pid is not None
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        data = json.loads((tmp_path / "stats.json").read_text())  # always whole JSON
        assert "seed" in data["models"]
    before = f.read()["seed"].total_uses
    f.record_load("seed")  # the lock died with the writer: the next writer goes on
    assert f.read()["seed"].total_uses == before + 1


def cand(name: str, size: float, r: float, days: float | None = None, **kw: bool) -> Candidate:
    return Candidate(name, int(size * GB), r, None if days is None else NOW - days * DAY, **kw)


def actions(decisions: list) -> dict[str, str]:  # type: ignore[type-arg]
    return {d.name: d.action.value for d in decisions}


def test_copy_highest_ranked_that_fit() -> None:
    state = CacheState(0, 30 * GB, [cand("a", 10, 50), cand("b", 10, 40), cand("c", 15, 30),
                                    cand("never", 1, 0)])
    decisions = plan_cache(state, CachePolicy(max_size=25 * GB), NOW)
    assert actions(decisions) == {"a": "copy", "b": "copy", "c": "skip"}
    assert [d.name for d in decisions if d.action is Action.COPY] == ["a", "b"]


def test_expire_lowest_ranked_unused_for_a_week_to_make_room() -> None:
    state = CacheState(20 * GB, 100 * GB, [
        cand("old-low", 10, -20, days=30, cached=True),
        cand("old-lower", 10, -40, days=40, cached=True),
        cand("new", 10, 60, days=0.1)])
    decisions = plan_cache(state, CachePolicy(max_size=20 * GB), NOW)
    assert actions(decisions) == {"old-lower": "expire", "new": "copy", "old-low": "keep"}
    assert next(d.reason for d in decisions if d.name == "old-lower").endswith(
        "makes room for new (rank 60.0); unused 40 days")
    # unused for less than a day: said in its own unit (it read "unused 0 days")
    state = CacheState(20 * GB, 100 * GB, [cand("old", 10, -40, days=2 / 86400, cached=True),
                                           cand("new", 10, 60, days=0.1)])
    (old,) = [d for d in plan_cache(state, CachePolicy(max_size=20 * GB, expire_after=1),
                                    NOW) if d.name == "old"]
    assert old.reason.endswith("; unused 2 s"), old.reason


@pytest.mark.parametrize("protect", ["busy", "pinned"])
def test_loaded_copying_or_pinned_models_never_expire(protect: str) -> None:
    state = CacheState(10 * GB, 100 * GB, [cand("old", 10, -40, days=40, cached=True,
                                                **{protect: True}),
                                           cand("new", 10, 60, days=0.1)])
    decisions = plan_cache(state, CachePolicy(max_size=10 * GB), NOW)
    assert actions(decisions) == {"old": "keep", "new": "skip"}


def test_recently_used_models_do_not_expire_even_when_ranked_lower() -> None:
    state = CacheState(10 * GB, 100 * GB, [cand("recent", 10, 5, days=2, cached=True),
                                           cand("hot", 10, 60, days=0.1)])
    assert actions(plan_cache(state, CachePolicy(max_size=10 * GB), NOW)) == \
        {"recent": "keep", "hot": "skip"}


def test_min_free_on_the_disk_is_respected_and_fast_tier_is_left_alone() -> None:
    state = CacheState(0, 25 * GB, [cand("a", 10, 50), cand("ssd", 1, 90, fast=True)])
    assert actions(plan_cache(state, CachePolicy(min_free=20 * GB), NOW)) == {"a": "skip"}
    assert actions(plan_cache(state, CachePolicy(min_free=10 * GB), NOW)) == {"a": "copy"}


@pytest.mark.parametrize(("expire_after", "said"), [(7 * 86400.0, "7 days"), (2.0, "2 s")])
def test_a_skip_says_expire_after_as_people_read_it(expire_after: float, said: str) -> None:
    state = CacheState(10 * GB, 100 * GB, [cand("recent", 10, 5, days=0.0, cached=True),
                                           cand("hot", 10, 60, days=0.1)])
    (skip,) = [d for d in plan_cache(state, CachePolicy(max_size=10 * GB,
                                                        expire_after=expire_after), NOW)
               if d.action.value == "skip"]
    assert skip.reason.endswith(f"has been unused for {said}"), skip.reason
