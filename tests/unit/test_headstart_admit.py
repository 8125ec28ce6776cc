"""The head start's admission (router/headstart/admit.py): the policy's answer for a model
when nothing else is up, from the name index's numbers, and the ticket it leaves."""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import pytest

from hoshikage_sd import lastgood, protocol
from hoshikage_sd.manifest import Files
from hoshikage_sd.policy import admission
from hoshikage_sd.router.config import load_config, refresh_index
from hoshikage_sd.router.headstart import admit
from hoshikage_sd.router.headstart import index as name_index
from hoshikage_sd.runtime import Runtime, estimate_key
from hoshikage_sd.sd import bus

GIB = 1 << 30


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    run = tmp_path / "run"
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.gguf").write_bytes(b"GGUF" + bytes(1000))
    (models / "b.gguf").write_bytes(b"GGUF" + bytes(1000))
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(f"""
        runtime_dir: {run}
        state_dir: {tmp_path / 'state'}
        ramdisk: {tmp_path / 'ram'}
        llama_server: /usr/bin/llama-server
        models:
          a: {{path: {models / 'a.gguf'}, args: ["-c", "512"]}}
          b: {{path: {models / 'b.gguf'}}}
    """))
    monkeypatch.setenv("HOSHIKAGE_CONFIG", str(path))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(run))
    # the test's own writes count as settled however soon a parse follows them
    # (lastgood.RACY: none is made during one; test_lastgood.py checks the rule)
    monkeypatch.setattr(lastgood, "RACY", 0.0)
    return path


def remember(path: Path, name: str, estimate: int,
             devices: tuple[dict[str, int], dict[str, int]] = ({}, {})) -> None:
    """What a start of the model leaves: its estimate and its use of GPU devices (what its
    unit listed: none here), for the file as it is; and the name index written again, as
    the router does once the model serves."""
    config = load_config(path)
    model = config.models[name]
    key = estimate_key(model, model.path.stat())
    runtime = Runtime(config.runtime_dir)
    runtime.set_estimate(name, key, estimate)
    runtime.set_devices(name, [key, "listing"], *devices)
    refresh_index(config)


def entry(name: str) -> tuple[dict, dict]:  # type: ignore[type-arg]
    index = name_index.read()
    assert index is not None
    return index, next(m for m in index["models"] if m["name"] == name)


def test_no_head_start_for_a_model_whose_gpu_use_is_unknown_or_too_big(
        setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The router's environment is not the model unit's: on a machine with GPUs only what a
    unit listed and estimated for the model's devices lets the head start admit it."""
    from hoshikage_sd.admit import needs

    monkeypatch.setattr(needs, "deviceless", lambda model: False)
    config = load_config(setup)
    model = config.models["a"]
    key = estimate_key(model, model.path.stat())
    Runtime(config.runtime_dir).set_estimate("a", key, 100 << 20)

    def launch() -> object:
        index = name_index.build(config)
        return next(m for m in index["models"] if m["name"] == "a")["launch"]

    assert launch() is None  # devices never judged by its unit
    remember(setup, "a", 100 << 20, ({"Vulkan0": 1 << 30}, {"Vulkan0": 2 << 30}))
    assert launch() is not None  # 1 GiB × 1.2 fits 2 GiB
    remember(setup, "a", 100 << 20, ({"Vulkan0": 1900 << 20}, {"Vulkan0": 2 << 30}))
    assert launch() is None  # 1.9 GiB × 1.2 does not: its unit refuses it


def test_the_index_carries_a_ticket_only_for_a_model_with_a_remembered_estimate(
        setup: Path) -> None:
    remember(setup, "a", 100 << 20)
    config = load_config(setup)
    _, a = entry("a")
    _, b = entry("b")
    assert b["launch"] is None
    model = config.models["a"]
    assert a["launch"]["argv"] == config.server_argv(model, Files.of(model))
    assert a["launch"]["estimate"] == 100 << 20
    assert a["launch"]["needed"] == math.ceil((100 << 20) * config.safety_margin)


@pytest.mark.parametrize("rules", ["", "memory_budget: 1G", "memory_budget: 100M",
                                   "max_loaded_models: 1", "memory_budget: 126M",
                                   "safety_margin: 2.5"])
def test_the_head_start_admits_where_the_policy_loads_with_nothing_up(
        setup: Path, monkeypatch: pytest.MonkeyPatch, rules: str) -> None:
    """Whatever MemAvailable reads, the head start admits exactly when admission.decide,
    asked about the machine with no other model up, says LOAD."""
    setup.write_text(setup.read_text() + rules + "\n")
    remember(setup, "a", 100 << 20)
    config = load_config(setup)
    _, a = entry("a")
    for mem in (0, 100 << 20, 120 << 20, (120 << 20) + 1, 250 << 20, 1 << 40):
        monkeypatch.setattr(admit, "mem_available", lambda mem=mem: mem)
        decision = admission.decide(
            admission.Snapshot(mem_available=mem, limits=admission.Limits(
                config.safety_margin, config.max_loaded_models, config.evict_floor,
                config.memory_budget)),
            admission.Request("a", 100 << 20))
        admitted = a["launch"] is not None and admit.fits(a["launch"]) is not None
        assert admitted == (decision.verdict is admission.Verdict.LOAD), (rules, mem)


def test_fits_only_the_file_the_estimate_was_for(setup: Path) -> None:
    remember(setup, "a", 100 << 20)
    load_config(setup)
    _, a = entry("a")
    launch = a["launch"]
    estimate, available = admit.fits(launch) or (0, 0)
    assert estimate == 100 << 20 and available > 0
    Path(launch["source"]).write_bytes(b"GGUF" + bytes(2000))  # another file now
    assert admit.fits(launch) is None


def test_a_staged_copy_is_the_routers_call(setup: Path) -> None:
    remember(setup, "a", 100 << 20)
    load_config(setup)
    _, a = entry("a")
    Path(a["launch"]["staged"]).parent.mkdir(parents=True)
    Path(a["launch"]["staged"]).write_bytes(b"GGUF")
    assert admit.fits(a["launch"]) is None


def test_admit_leaves_the_ticket_and_the_promise_only_with_nothing_else_up(
        setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    remember(setup, "a", 100 << 20)
    config = load_config(setup)
    index, a = entry("a")
    runtime = Runtime(config.runtime_dir)
    up: list[bus.UnitState] = [bus.UnitState("hoshikage-model@b.service", "loaded",
                                             "active", "running", 0)]
    asked: list[tuple[list[str], list[str] | None]] = []

    def list_units(patterns: list[str], states: list[str] | None = None,
                   conn: object = None) -> list[object]:
        asked.append((patterns, states))
        return list(up)

    monkeypatch.setattr(bus, "list_units", list_units)
    assert admit.admit(index, a) == (None, "inactive")  # b is up; a not loaded
    assert runtime.admitted("a") is None
    assert not os.path.exists(protocol.ticket_path(str(config.runtime_dir), "a"))
    assert asked == [(["hoshikage-model@*.service"], None)]  # every state: a's too
    up[:] = [bus.UnitState("hoshikage-model@a.service", "loaded", "failed", "failed", 0)]
    numbers, state = admit.admit(index, a)
    assert numbers is not None and state == "failed"  # the start resets it first
    estimate, _ = numbers
    assert estimate == 100 << 20 and runtime.admitted("a") == 100 << 20
    ticket = protocol.take_ticket(str(config.runtime_dir), "a")
    model = config.models["a"]
    assert [arg.decode() for arg in ticket.argv] == config.server_argv(model, Files.of(model))
    protocol.write_admitted(str(config.runtime_dir), "b", 5)
    assert runtime.admitted("b") == 5  # one record, one writer: Runtime reads it
    admit.withdraw(str(config.runtime_dir), "b")
    assert runtime.admitted("b") is None
