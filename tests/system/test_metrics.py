"""Metrics under real systemd: what the model units, admission and the idle watch count
(each as user hoshikage, in its own short-lived process), read back through
`hoshikage metrics` (metrics.render, what the router's GET /metrics answers) and checked with
prometheus_client's parser; and `hoshikage status --json`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import parser

from hoshikage_sd.admit.needs import estimate
from hoshikage_sd.manifest import Model
from testbed.deploy import Deployment, deploy, manifest
from tests.support import eventually
from tests.system.conftest import ContainerFactory
from tests.system.test_serving import stage_inside

pytestmark = pytest.mark.system
ARGS = ("-c", "512", "-np", "1")


@pytest.fixture
def models_dir(tmp_path: Path, tiny_gguf: Path) -> Path:
    from make_gguf import write_model

    directory = tmp_path / "models"
    directory.mkdir()
    shutil.copyfile(tiny_gguf, directory / "tiny.gguf")
    shutil.copyfile(tiny_gguf, directory / "twin.gguf")
    write_model(directory / "huge.gguf", n_embd=512, n_ff=1024, n_layer=8, seed=9)
    return directory


@pytest.fixture
def hk(container_factory: ContainerFactory, models_dir: Path,
       llama_server_bin: Path) -> Deployment:
    tiny = estimate(Model("tiny", models_dir / "tiny.gguf", args=ARGS))
    huge = estimate(Model("huge", models_dir / "huge.gguf", args=ARGS))
    budget = int(tiny * 1.2 * 1.5)
    assert huge * 1.2 > budget  # the premises: huge can never fit, tiny can, not with twin
    args = 'args: ["-c", "512", "-np", "1"]'
    text = manifest(llama_server_bin, {"tiny": f"{args}\nttl: 3s", "huge": args,
                                       "twin": f"{args}\nttl: 1h"},
                    memory_budget=str(budget), router_idle_exit="5s")
    return deploy(container_factory, models_dir, text)


def hoshikage(hk: Deployment, *args: str) -> str:
    return hk.hoshikage(*args)


def scrape(hk: Deployment) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """`hoshikage metrics` inside, parsed: (sample name, sorted labels) -> value."""
    text = hoshikage(hk, "metrics")
    out = {}
    for family in parser.text_string_to_metric_families(text):  # raises on bad text
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
        **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_loads_refusals_and_idle_stops_are_counted(hk: Deployment, models_dir: Path) -> None:
    before = scrape(hk)
    assert get(before, "hoshikage_models_loaded") == 0
    assert not [k for k in before if k[0] == "hoshikage_loads_total"]
    assert get(before, "hoshikage_memory_available_bytes")
    # a scrape starts nothing
    assert hk.state("hoshikage.service") == "inactive"
    assert hk.state("hoshikage-model@tiny.service") == "inactive"
    assert hk.state("mnt-hoshikage.mount") == "inactive"

    status, body = hk.chat("tiny")
    assert status == 200, body
    hk.wait_for("the ready record", lambda: bool(hk.events("ready", "tiny")))
    loaded = scrape(hk)
    assert get(loaded, "hoshikage_loads_total", model="tiny", path="activator") == 1
    for phase in ("admission", "llama_server"):
        assert get(loaded, "hoshikage_load_phase_seconds_count", model="tiny",
                   phase=phase) == 1, phase
    # nothing staged before the load: it served from the source, the copy came after
    assert get(loaded, "hoshikage_load_phase_seconds_count", model="tiny",
               phase="staging") is None
    hk.wait_for("the copy alongside", lambda: bool(hk.events("staged", "tiny")))
    (ready,) = hk.events("ready", "tiny")
    assert get(loaded, "hoshikage_load_phase_seconds_sum", model="tiny",
               phase="llama_server") == pytest.approx(float(ready["HOSHIKAGE_LOAD_SECONDS"]),
                                                      abs=0.002)
    assert get(loaded, "hoshikage_admission_decisions_total", model="tiny", verdict="load") == 1
    assert get(loaded, "hoshikage_models_loaded") == 1
    assert (get(loaded, "hoshikage_model_resident_bytes", model="tiny") or 0) > 1 << 20
    staged = (hk.container.root / "mnt/hoshikage/tiny.gguf").stat().st_size
    loaded = scrape(hk)
    assert (get(loaded, "hoshikage_ramdisk_used_bytes") or 0) >= staged
    assert (get(loaded, "hoshikage_ramdisk_size_bytes") or 0) > staged

    facts: dict[str, Any] = json.loads(hoshikage(hk, "status", "--json"))
    assert facts["loaded"] == ["tiny"]
    tiny = next(m for m in facts["models"] if m["name"] == "tiny")
    assert tiny["state"] == "active" and tiny["llama_server_pid"] == int(ready["HOSHIKAGE_PID"])
    assert tiny["memory_bytes"] > staged and tiny["ttl_seconds"] == 3
    assert tiny["ttl_left_seconds"] is None or tiny["ttl_left_seconds"] <= 3
    assert facts["ramdisk"]["mounted"] and facts["ramdisk"]["used_bytes"] >= staged
    assert facts["counters"]["hoshikage_loads_total"] == [
        {"labels": {"model": "tiny", "path": "activator"}, "value": 1.0}]

    status, body = hk.chat("huge")
    assert status == 503, body
    refused = scrape(hk)
    assert get(refused, "hoshikage_refusals_total", model="huge", reason="memory") == 1
    assert get(refused, "hoshikage_admission_decisions_total", model="huge",
               verdict="reject") == 1
    assert get(refused, "hoshikage_load_failures_total", model="huge") == 1
    assert get(refused, "hoshikage_loads_total", model="huge", path="activator") is None

    hk.wait_for("the idle stop", lambda: hk.state("hoshikage-model@tiny.service") == "inactive")
    stopped = eventually(lambda: scrape(hk),
                         lambda s: get(s, "hoshikage_models_loaded") == 0)
    assert get(stopped, "hoshikage_evictions_total", model="tiny", reason="idle") == 1
    assert get(stopped, "hoshikage_models_loaded") == 0
    assert get(stopped, "hoshikage_model_resident_bytes", model="tiny") is None
    # the counters outlived every process that wrote them
    assert get(stopped, "hoshikage_loads_total", model="tiny", path="activator") == 1


def test_a_load_by_the_launcher_is_counted(hk: Deployment, models_dir: Path) -> None:
    status, _ = hk.chat("nobody")  # brings the router up without loading anything
    assert status == 404
    source = models_dir / "tiny.gguf"
    stage_inside(hk, source, source.read_bytes())
    status, body = hk.chat("tiny")
    assert status == 200, body
    hk.wait_for("the ready record", lambda: bool(hk.events("ready", "tiny")))
    (ready,) = hk.events("ready", "tiny")
    assert ready["HOSHIKAGE_LAUNCHED"] == "1"
    samples = scrape(hk)
    assert get(samples, "hoshikage_loads_total", model="tiny", path="launcher") == 1
    assert get(samples, "hoshikage_load_phase_seconds_count", model="tiny",
               phase="llama_server") == 1
    # admitted by the router, staged before: the activator saw neither phase
    assert get(samples, "hoshikage_load_phase_seconds_count", model="tiny",
               phase="staging") is None


def test_a_stop_for_memory_pressure_is_counted(container_factory: ContainerFactory,
                                               models_dir: Path,
                                               llama_server_bin: Path) -> None:
    """With pressure_critical at 1% of RAM, the idle watch's next tick stops the idle model."""
    text = manifest(llama_server_bin, {"tiny": 'args: ["-c", "512", "-np", "1"]\nttl: 1h'},
                    pressure_warn="0.005", pressure_critical="0.01")
    hk = deploy(container_factory, models_dir, text)
    status, body = hk.chat("tiny")
    assert status == 200, body
    hk.wait_for("the pressure stop", lambda: hk.state("hoshikage-model@tiny.service")
                == "inactive")
    (released,) = hk.events("released", "tiny")
    assert released["HOSHIKAGE_REASON"] == "memory pressure"
    samples = scrape(hk)
    assert get(samples, "hoshikage_evictions_total", model="tiny", reason="pressure") == 1
    assert get(samples, "hoshikage_evictions_total", model="tiny", reason="idle") is None


def test_an_eviction_for_another_model_is_counted(hk: Deployment) -> None:
    status, body = hk.chat("twin")
    assert status == 200, body
    status, body = hk.chat("tiny")  # twin is idle: stopped to make room
    assert status == 200, body
    samples = scrape(hk)
    assert get(samples, "hoshikage_evictions_total", model="twin", reason="admission") == 1
    assert get(samples, "hoshikage_admission_decisions_total", model="tiny",
               verdict="evict") == 1
    assert get(samples, "hoshikage_loads_total", model="tiny", path="activator") == 1
    assert get(samples, "hoshikage_loads_total", model="twin", path="activator") == 1
