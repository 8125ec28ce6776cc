"""rpc/placement.py: a worker's `devices:` as llama-server's --device names (RPC<n>,
numbered across the workers as llama.cpp numbers them), and the head's own share of a model
split over workers (what its GPU devices are counted to hold)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hoshikage_sd.devices import Device, parse_list_devices
from hoshikage_sd.manifest import Files, Worker
from hoshikage_sd.manifest.codec import decode, encode
from hoshikage_sd.manifest.model import Config
from hoshikage_sd.manifest.parse import parse
from hoshikage_sd.memory import load_params
from hoshikage_sd.offload import device_estimate, offload_params
from hoshikage_sd.rpc import placement
from hoshikage_sd.rpc.placement import UnknownDevice
from hoshikage_sd.rpc.wire import Answer
from hoshikage_sd.rpc.wire import Device as WorkerDevice
from tests.unit.test_devices import E1024, LAVAPIPE, WITH_RPC

GiB = 1 << 30
MANIFEST = """\
workers:
  box2: 192.0.2.2:50052
  box3: {address: 192.0.2.3:50052, devices: [1]}
models:
  big:
    path: /srv/models/big.gguf
    rpc: [box2, box3]
    args: [-ngl, "99"]
  own:
    path: /srv/models/own.gguf
    rpc: [box2, box3]
    args: [-ngl, "99", --device, Vulkan0]
  plain:
    path: /srv/models/plain.gguf
    rpc: [box2]
"""


def config(tmp_path: Path) -> Config:
    return parse(MANIFEST.replace("workers:", f"runtime_dir: {tmp_path}\nworkers:", 1),
                 Path("/etc/hoshikage/models.yaml"))


def test_devices_parse_and_survive_the_kept_manifest(tmp_path: Path) -> None:
    c = config(tmp_path)
    assert c.workers["box3"] == Worker("box3", "192.0.2.3", 50052, None, (1,))
    assert c.workers["box2"].devices is None
    assert decode(Config, encode(c)) == c


def test_names_are_numbered_across_the_workers_in_rpc_order() -> None:
    """box2 has two devices (RPC0, RPC1, both used), box3 two (RPC2, RPC3: only its
    second), box4 one (RPC4, its only one)."""
    box2 = Worker("box2", "a")
    box3 = Worker("box3", "b", devices=(1,))
    box4 = Worker("box4", "c", devices=(0,))
    assert placement.rpc_names([box2, box3, box4], [2, 2, 1]) == ["RPC0", "RPC1", "RPC3",
                                                                   "RPC4"]
    assert placement.device_list([box2, box3], [2, 2], ["Vulkan0"]) == [
        "RPC0", "RPC1", "RPC3", "Vulkan0"]
    assert placement.device_list([box2], [2], ["Vulkan0"]) == []  # nobody selects: as is


def test_an_unknown_device_is_named() -> None:
    with pytest.raises(UnknownDevice, match=r"worker 'box3' \(b:50052\) has 1 device \(0\): "
                                            r"its devices: names 1, 3"):
        placement.selected(Worker("box3", "b", devices=(0, 1, 3)), 1)


def test_the_model_units_device_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The head's own devices: the model's --device, else every one llama-server lists."""
    c = config(tmp_path)
    monkeypatch.setattr("hoshikage_sd.devices.list_devices",
                        lambda *a, **kw: parse_list_devices(LAVAPIPE))
    counts = {"box2": 1, "box3": 2}
    assert placement.for_model(c, c.models["big"], counts) == ["RPC0", "RPC2", "Vulkan0"]
    assert placement.for_model(c, c.models["plain"], counts) == []
    with pytest.raises(UnknownDevice, match=r"'box3'.*not known"):
        placement.for_model(c, c.models["big"], {"box2": 1})
    own = c.models["own"]
    devices = placement.for_model(c, own, counts)
    argv = c.server_argv(own, Files.of(own), devices)
    # llama-server takes the last --device: hoshikage's, which keeps the model's Vulkan0
    assert argv[-2:] == ["--device", "RPC0,RPC2,Vulkan0"]
    assert argv.index("--rpc") < argv.index("--device")
    assert "--device" not in c.server_argv(c.models["plain"], Files.of(c.models["plain"]))


def answer(*free_gib: float) -> Answer:
    return Answer((4, 0, 3), tuple(WorkerDevice(int(f * GiB), 8 * GiB) for f in free_gib))


def test_the_heads_share_leaves_out_what_goes_to_the_workers() -> None:
    """E1024 (260 MiB, every layer offloaded) on the head's Vulkan0 alone, then split with
    one worker: llama.cpp places the layers over the worker's device and the head's by
    their free memory (2 GiB each here), so the head holds about half, not all."""
    args = ["-ngl", "99", "-c", "4096"]
    params, offload = load_params(E1024, args), offload_params(args)
    local = parse_list_devices(LAVAPIPE)
    alone = device_estimate(E1024, params, offload, local).used["Vulkan0"]
    worker = Worker("box2", "192.0.2.2")
    head = placement.head_estimate(E1024, params, offload, local, [worker], [answer(2)])
    assert set(head.used) == {"Vulkan0"}
    assert 0.35 * alone < head.used["Vulkan0"] < 0.65 * alone
    # as llama-server places it with that worker listed (WITH_RPC: RPC0 with 24105 MiB)
    listed = device_estimate(E1024, params, offload, parse_list_devices(WITH_RPC),
                             {"Vulkan0": 2 * GiB, "RPC0": 2 * GiB})
    assert head.used["Vulkan0"] == listed.used["Vulkan0"]
    # a worker with more free memory takes more of the layers, the head fewer
    fuller = placement.head_estimate(E1024, params, offload, local, [worker], [answer(6)])
    assert fuller.used["Vulkan0"] < head.used["Vulkan0"]
    # the model's own --device none: nothing on the head's devices at all
    none = offload_params([*args, "--device", "none"])
    assert placement.head_estimate(E1024, params, none, local, [worker],
                                   [answer(2)]).used == {}


def test_the_heads_share_follows_the_workers_devices_selection() -> None:
    """box3's devices: [1] puts its layers on its second device only (RPC1), by that
    device's free memory."""
    args = ["-ngl", "99", "-c", "4096"]
    params, offload = load_params(E1024, args), offload_params(args)
    local = [Device("Vulkan0", "x", 8 * GiB, 2 * GiB)]
    chosen = placement.head_estimate(E1024, params, offload, local,
                                     [Worker("box3", "b", devices=(1,))], [answer(6, 2)])
    both = placement.head_estimate(E1024, params, offload, local, [Worker("box3", "b")],
                                   [answer(6, 2)])
    assert chosen.used["Vulkan0"] > both.used["Vulkan0"]  # 2 of 4 GiB, not 2 of 10
