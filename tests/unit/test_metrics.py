"""hoshikage_sd.metrics: counting, the shared counter file, and the text it renders, read
back with prometheus_client's own parser (what Prometheus' Python tooling accepts)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
from pathlib import Path

import pytest
from prometheus_client import parser  # Debian python3-prometheus-client (bootstrap)

from hoshikage_sd import metrics
from hoshikage_sd.metrics import COUNTED, GAUGES, Metrics, Tally, route_label
from hoshikage_sd.runtime import Activity, Running, Runtime

NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def parse(text: bytes) -> dict[str, object]:
    """name -> prometheus_client Metric; the parser raises on anything malformed."""
    return {f.name: f for f in parser.text_string_to_metric_families(text.decode())}


def samples(text: bytes, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in parser.text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(text: bytes, name: str, **labels: str) -> float | None:
    return samples(text, name).get(tuple(sorted(labels.items())))


def test_tally_counts_by_label_set_and_checks_labels() -> None:
    t = Tally()
    t.count("hoshikage_loads_total", model="a", path="activator")
    t.count("hoshikage_loads_total", 2, model="a", path="activator")
    t.count("hoshikage_loads_total", model="b", path="launcher")
    assert t.counters["hoshikage_loads_total"] == {("a", "activator"): 3.0,
                                                   ("b", "launcher"): 1.0}
    with pytest.raises(ValueError, match="takes labels"):
        t.count("hoshikage_loads_total", model="a")
    with pytest.raises(KeyError):
        t.count("hoshikage_no_such_total", model="a")


def test_histogram_buckets_are_le_and_cumulative_in_the_text(tmp_path: Path) -> None:
    t = Tally()
    for seconds in (0.005, 0.006, 1.0, 1000.0):  # on a bound, above it, on 1, past the last
        t.observe("hoshikage_request_duration_seconds", seconds, model="a", route="/x")
    hist = t.histograms["hoshikage_request_duration_seconds"][("a", "/x")]
    assert hist.counts[0] == 1 and hist.counts[1] == 1 and hist.counts[-1] == 1
    text = metrics.exposition(t, {})
    name = "hoshikage_request_duration_seconds_bucket"
    assert value(text, name, model="a", route="/x", le="0.005") == 1
    assert value(text, name, model="a", route="/x", le="0.01") == 2
    assert value(text, name, model="a", route="/x", le="1.0") == 3
    assert value(text, name, model="a", route="/x", le="300.0") == 3
    assert value(text, name, model="a", route="/x", le="+Inf") == 4
    assert value(text, "hoshikage_request_duration_seconds_count", model="a", route="/x") == 4
    assert value(text, "hoshikage_request_duration_seconds_sum", model="a",
                 route="/x") == pytest.approx(1001.011)


def test_every_family_has_help_and_type_and_a_valid_name() -> None:
    text = metrics.exposition(Tally(), {})
    families = parse(text)
    for family in [*COUNTED.values(), *GAUGES.values()]:
        assert NAME_RE.match(family.name), family.name
        # the parser names a counter's family without _total
        key = family.name.removesuffix("_total") if family.kind == "counter" else family.name
        assert families[key].type == family.kind, family.name
        assert families[key].documentation, family.name
        if family.kind == "counter":
            assert family.name.endswith("_total"), family.name
        assert "le" not in family.labels and "quantile" not in family.labels
    assert len(families) == len(COUNTED) + len(GAUGES)


def test_label_values_are_escaped() -> None:
    odd = 'we"ird\\na\nme'
    text = metrics.exposition(Tally().count("hoshikage_refusals_total", model=odd,
                                            reason="memory"), {})
    assert value(text, "hoshikage_refusals_total", model=odd, reason="memory") == 1


def test_counts_from_other_processes_add_up_under_the_lock(tmp_path: Path) -> None:
    """Writers in separate processes (activators, idle watch, router) never lose a count."""
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_add_many, args=(tmp_path, i)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    totals = metrics.read(tmp_path)
    assert totals.counters["hoshikage_evictions_total"][("a", "idle")] == 4 * 25
    for i in range(4):
        assert totals.counters["hoshikage_loads_total"][(f"m{i}", "activator")] == 25


def _add_many(runtime_dir: Path, i: int) -> None:
    for _ in range(25):
        metrics.commit(runtime_dir, Tally()
                       .count("hoshikage_evictions_total", model="a", reason="idle")
                       .count("hoshikage_loads_total", model=f"m{i}", path="activator"))


def test_router_counts_survive_its_exit(tmp_path: Path) -> None:
    first = Metrics(tmp_path)
    first.request("a", "/v1/chat/completions", 200, 0.5, 0.1)
    first.request("a", "/v1/chat/completions", 503, 2.0, None)
    # not written yet (the flush is batched), but its own scrape shows them
    text = first.render()
    assert value(text, "hoshikage_requests_total", model="a", route="/v1/chat/completions",
                 status="200") == 1
    first.flush()  # what the router does when it exits
    second = Metrics(tmp_path)  # the next router, started by the socket
    second.request("a", "/v1/chat/completions", 200, 0.25, 0.05)
    text = second.render()
    assert value(text, "hoshikage_requests_total", model="a", route="/v1/chat/completions",
                 status="200") == 2
    assert value(text, "hoshikage_requests_total", model="a", route="/v1/chat/completions",
                 status="503") == 1
    assert value(text, "hoshikage_time_to_first_byte_seconds_count", model="a",
                 route="/v1/chat/completions") == 2
    assert value(text, "hoshikage_request_duration_seconds_count", model="a",
                 route="/v1/chat/completions") == 3
    start = value(text, "hoshikage_counters_start_time_seconds")
    assert start is not None and abs(start - time.time()) < 600


def test_router_writes_at_most_once_per_interval(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
    m = Metrics(tmp_path)
    m.request("a", "/v1/completions", 200, 0.1, 0.01)
    assert not metrics.counter_file(tmp_path).exists()
    clock[0] += metrics.FLUSH_INTERVAL
    m.request("a", "/v1/completions", 200, 0.1, 0.01)
    assert metrics.read(tmp_path).counters["hoshikage_requests_total"][
        ("a", "/v1/completions", "200")] == 2
    m.request("a", "/v1/completions", 200, 0.1, 0.01)
    assert metrics.read(tmp_path).counters["hoshikage_requests_total"][
        ("a", "/v1/completions", "200")] == 2


def test_an_idle_router_s_counts_reach_the_file_within_a_flush_interval(
        tmp_path: Path) -> None:
    """`hoshikage metrics` reads the file: a router that answered one request and then
    none (an idle one, up to router_idle_exit) wrote it at its exit only."""
    m = Metrics(tmp_path)
    m.flush()
    m.request("a", "/v1/models", 200, 0.01, 0.01)

    def in_file() -> float | None:
        return metrics.read(tmp_path).counters.get("hoshikage_requests_total", {}).get(
            ("a", "/v1/models", "200"))

    assert in_file() is None  # batched
    deadline = time.monotonic() + 10 * metrics.FLUSH_INTERVAL
    while in_file() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_file() == 1


def test_a_failed_flush_keeps_the_counts(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    m = Metrics(blocked)  # runtime_dir is a file: metrics/ cannot be made
    m.request("a", "/v1/completions", 200, 0.1, None)
    m.flush()
    assert value(m.render(), "hoshikage_requests_total", model="a", route="/v1/completions",
                 status="200") == 1


def test_in_flight_gauge(tmp_path: Path) -> None:
    m = Metrics(tmp_path)
    m.in_flight("a", +1)
    m.in_flight("a", +1)
    m.in_flight("b", +1)
    m.in_flight("b", -1)
    text = m.render()
    assert value(text, "hoshikage_in_flight_requests", model="a") == 2
    assert value(text, "hoshikage_in_flight_requests", model="b") == 0


def test_gauges_from_the_runtime_records_and_the_ramdisk(tmp_path: Path) -> None:
    runtime = Runtime(tmp_path)
    # this test's own process stands in for llama-server: it is alive and has an RSS
    runtime.set_running("a", Running(os.getpid(), "/x/a.gguf", time.time() - 30))
    runtime.set_activity("a", Activity(0, time.time() - 10, os.getpid()))
    runtime.set_running("gone", Running(2**22 + 7, "/x/gone.gguf", time.time()))  # no such pid
    runtime.set_admitted("starting", 1 << 20)  # admitted, not serving: not loaded
    shm = Path("/dev/shm")
    text = metrics.render(tmp_path, shm if os.path.ismount(shm) else None)
    assert value(text, "hoshikage_models_loaded") == 1
    rss = value(text, "hoshikage_model_resident_bytes", model="a")
    assert rss is not None and rss > 1 << 20
    idle = value(text, "hoshikage_model_idle_seconds", model="a")
    assert idle is not None and 9 <= idle < 600
    assert value(text, "hoshikage_memory_available_bytes")
    total = value(text, "hoshikage_memory_total_bytes")
    assert total and total >= (value(text, "hoshikage_memory_available_bytes") or 0)
    if os.path.ismount(shm):
        size = value(text, "hoshikage_ramdisk_size_bytes")
        assert size == os.statvfs(shm).f_blocks * os.statvfs(shm).f_frsize
        assert value(text, "hoshikage_ramdisk_used_bytes") is not None
    assert samples(text, "hoshikage_build_info")


def test_a_busy_model_has_no_idle_gauge(tmp_path: Path) -> None:
    runtime = Runtime(tmp_path)
    runtime.set_running("a", Running(os.getpid(), "/x/a.gguf", time.time() - 30))
    runtime.set_activity("a", Activity(1, time.time() - 10, os.getpid()))
    text = metrics.render(tmp_path)
    assert value(text, "hoshikage_models_loaded") == 1
    assert value(text, "hoshikage_model_idle_seconds", model="a") is None


def test_a_ramdisk_not_mounted_has_no_gauges(tmp_path: Path) -> None:
    plain = tmp_path / "mnt"
    plain.mkdir()
    text = metrics.render(tmp_path, plain)
    assert value(text, "hoshikage_ramdisk_size_bytes") is None


def test_a_scrape_writes_nothing(tmp_path: Path) -> None:
    """Not the activity records (which keep a model alive), not even the lock file."""
    runtime = Runtime(tmp_path)
    runtime.set_running("a", Running(os.getpid(), "/x/a.gguf", time.time() - 30))
    metrics.count(tmp_path, "hoshikage_loads_total", model="a", path="launcher")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    Metrics(tmp_path).render()
    metrics.render(tmp_path)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_a_broken_file_counts_from_zero(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = metrics.counter_file(tmp_path)
    path.parent.mkdir()
    path.write_text("{not json")
    assert not metrics.read(tmp_path)
    assert "cannot read" in caplog.text
    metrics.count(tmp_path, "hoshikage_load_failures_total", model="a")
    assert metrics.read(tmp_path).counters["hoshikage_load_failures_total"] == {("a",): 1.0}


def test_an_upgrade_that_changes_buckets_or_labels_starts_those_over(tmp_path: Path) -> None:
    t = Tally().observe("hoshikage_load_phase_seconds", 1.0, model="a", phase="staging")
    t.count("hoshikage_loads_total", model="a", path="launcher")
    data = t.to_json()
    data["histograms"]["hoshikage_load_phase_seconds"]["buckets"] = [1.0, 2.0]
    data["counters"]["hoshikage_old_total"] = [[["a"], 5]]
    data["counters"]["hoshikage_loads_total"].append([["a"], 9])  # another label shape
    back = Tally.from_json(json.loads(json.dumps(data)))
    assert back.histograms == {}
    assert back.counters == {"hoshikage_loads_total": {("a", "launcher"): 1.0}}


def test_the_file_round_trips(tmp_path: Path) -> None:
    t = (Tally().count("hoshikage_requests_total", model="a", route="other", status=404)
         .observe("hoshikage_load_phase_seconds", 0.3, model="a", phase="admission"))
    assert metrics.commit(tmp_path, t)
    assert metrics.commit(tmp_path, t)
    back = metrics.read(tmp_path)
    assert back.counters["hoshikage_requests_total"][("a", "other", "404")] == 2
    hist = back.histograms["hoshikage_load_phase_seconds"][("a", "admission")]
    assert hist.count == 2 and hist.sum == pytest.approx(0.6)
    assert back.since is not None


def test_label_sets_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(metrics.tally, "MAX_SERIES", 3)
    t = Tally()
    for i in range(5):
        t.count("hoshikage_requests_total", model=f"m{i}", route="other", status=404)
    metrics.commit(tmp_path, t)
    assert len(metrics.read(tmp_path).counters["hoshikage_requests_total"]) == 3
    assert "dropping" in caplog.text


@pytest.mark.parametrize(("path", "label"), [
    ("/v1/chat/completions", "/v1/chat/completions"),
    ("/v1/chat/completions/", "/v1/chat/completions"),
    ("/v1/embeddings?x=1", "/v1/embeddings"),
    ("/v1/models/qwen3-8b", "/v1/models/{id}"),
    ("/api/chat", "/api/chat"),
    ("/models/load", "/models/load"),
    ("/panel/", "/panel"), ("/panel/app.js", "/panel"), ("/panel/api/state", "/panel/api/*"),
    ("/panelx", "other"), ("/slots/0", "/slots/{id}"), ("/lora-adapters", "/lora-adapters"),
    ("/api/blobs/sha256:abc", "/api/blobs/{digest}"),
    ("/", "other"),
    ("/wp-login.php", "other"),
    ("/v1/chat/completions/../../etc", "other"),
])
def test_route_label(path: str, label: str) -> None:
    assert route_label(path) == label


# -- the writers outside the router, and status --json ---------------------------------------
def test_admission_records_count_verdicts_and_refusals(tmp_path: Path) -> None:
    from hoshikage_sd.admit.act import record
    from hoshikage_sd.policy.admission import Decision, Limits, Request, Snapshot, decide

    def decision(name: str, estimate: int, max_loaded: int | None = None) -> Decision:
        return decide(Snapshot(mem_available=1000, limits=Limits(max_loaded=max_loaded)),
                      Request(name, estimate))

    counts = Tally()
    record("a", decision("a", 100), counts)
    record("huge", decision("huge", 10_000), counts)
    record("c", decision("c", 100, max_loaded=0), counts)
    record("not-counted", decision("not-counted", 100))
    router = Metrics(tmp_path)  # the router counts into its batch
    record("d", decision("d", 100), router)
    assert not metrics.counter_file(tmp_path).exists()  # nothing written on the way
    router.flush()
    metrics.commit(tmp_path, counts)
    totals = metrics.read(tmp_path)
    assert totals.counters["hoshikage_admission_decisions_total"] == {
        ("a", "load"): 1, ("huge", "reject"): 1, ("c", "reject"): 1, ("d", "load"): 1}
    assert totals.counters["hoshikage_refusals_total"] == {
        ("huge", "memory"): 1, ("c", "max_loaded_models"): 1}


def test_status_json_has_the_same_facts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from hoshikage_sd.commands import status
    from hoshikage_sd.manifest import Config, Model
    from hoshikage_sd.sd import units

    config = Config(source=tmp_path / "models.yaml", ramdisk=tmp_path / "mnt",
                    runtime_dir=tmp_path / "run",
                    models={"a": Model("a", tmp_path / "a.gguf", ttl=600.0),
                            "b": Model("b", tmp_path / "b.gguf")})
    runtime = Runtime(config.runtime_dir)
    runtime.set_running("a", Running(os.getpid(), "/x/a.gguf", time.time() - 100))
    runtime.set_activity("a", Activity(0, time.time() - 60, os.getpid()))
    metrics.count(config.runtime_dir, "hoshikage_loads_total", model="a", path="activator")
    # systemd is the system tier's to bring: here its two answers stand in
    monkeypatch.setattr(units, "active_model_units",
                        lambda states=("active",): [] if states == ("failed",) else ["a"])
    monkeypatch.setattr(units, "show", lambda _unit, *_p: {
        "ActiveState": "active", "MainPID": "4242", "MemoryCurrent": "1048576"})
    assert status.status(config, as_json=True) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["loaded"] == ["a"]
    a, b = facts["models"]
    assert a["name"] == "a" and a["pid"] == 4242 and a["llama_server_pid"] == os.getpid()
    assert a["memory_bytes"] == 1 << 20 and a["resident_bytes"] > 0
    assert 59 <= a["idle_seconds"] < 600 and a["busy"] is False
    assert a["ttl_seconds"] == 600 and a["ttl_left_seconds"] == pytest.approx(
        600 - a["idle_seconds"])
    assert b["state"] == "inactive" and b["llama_server_pid"] is None
    assert b["ttl_left_seconds"] is None
    assert facts["ramdisk"] == {"path": str(config.ramdisk), "mounted": False,
                                "used_bytes": None, "size_bytes": None, "orphans": []}
    # a kept copy of a model since taken out of the manifest: said, with what it holds
    config.ramdisk.mkdir(parents=True, exist_ok=True)
    (config.ramdisk / "gone.gguf").write_bytes(b"x" * 8192)
    runtime.set_kept("gone", time.time() + 60)
    status.status(config, as_json=True)
    (orphan,) = json.loads(capsys.readouterr().out)["ramdisk"]["orphans"]
    assert orphan["name"] == "gone" and orphan["bytes"] >= 8192
    assert facts["memory"]["available_bytes"] > 0
    assert facts["counters"]["hoshikage_loads_total"] == [
        {"labels": {"model": "a", "path": "activator"}, "value": 1.0}]
    assert facts["counters_since"] is not None


def test_counters_as_json_match_the_text(tmp_path: Path) -> None:
    t = Tally().observe("hoshikage_load_phase_seconds", 0.3, model="a", phase="staging")
    t.observe("hoshikage_load_phase_seconds", 7.0, model="a", phase="staging")
    (row,) = metrics.as_json(t)["hoshikage_load_phase_seconds"]
    text = metrics.exposition(t, {})
    for le, n in row["buckets"].items():
        assert value(text, "hoshikage_load_phase_seconds_bucket", model="a", phase="staging",
                     le=le) == n
    assert row["count"] == 2 and row["sum"] == pytest.approx(7.3)
