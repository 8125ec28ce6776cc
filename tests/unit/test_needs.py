"""admit/needs.py: what a model split over RPC workers puts on the head's own GPU devices.

Real parts: a GGUF written by tools/make_gguf.py, a llama-server stand-in that prints
llama-server b10068's --list-devices for lavapipe (test_devices.fake_server), and a
ggml-rpc-server stand-in speaking protocol 4 on a real socket (test_rpc.serve), which counts
the connections it was asked on.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hoshikage_sd import gguf, memory, offload
from hoshikage_sd.admit import gather, needs
from hoshikage_sd.devices import parse_list_devices
from hoshikage_sd.manifest.model import Config
from hoshikage_sd.manifest.parse import parse
from hoshikage_sd.rpc import placement, wire, workers
from hoshikage_sd.runtime import Running, Runtime
from tests.unit.test_devices import LAVAPIPE, fake_server
from tests.unit.test_rpc import serve

ARGS = '["-ngl", "99", "-c", "512"]'


class Worker:
    """A ggml-rpc-server on 127.0.0.1: answers as test_rpc's fake (two devices, 1 and
    2 GiB free of 8) and counts the connections made to it."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.asked = 0
        threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.asked += 1
            serve(conn, bytes([4, 0, 3]), silent=False)

    def down(self) -> None:
        # shutdown first: a close alone leaves the thread's accept() taking connections
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


@pytest.fixture
def worker() -> Iterator[Worker]:
    w = Worker()
    yield w
    w.down()


@pytest.fixture
def config(tmp_path: Path, worker: Worker) -> Config:
    import make_gguf  # tools/make_gguf.py (tests/conftest.py puts tools/ on the path)

    make_gguf.write_model(tmp_path / "m.gguf", n_layer=8)
    server = fake_server(tmp_path / "llama-server", LAVAPIPE)
    path = f"{{path: {tmp_path}/m.gguf, args: {ARGS}"
    return parse(f"runtime_dir: {tmp_path}/run\nstate_dir: {tmp_path}/state\n"
                 f"llama_server: {server}\n"
                 f"workers:\n  box2: 127.0.0.1:{worker.port}\n"
                 f"models:\n  solo: {path}}}\n  split: {path}, rpc: [box2]}}\n"
                 f"  other: {path}, rpc: [box2]}}\n", tmp_path / "models.yaml")


def vulkan0(config: Config, name: str, up: list[str] | None = None) -> int:
    use = needs.device_use(config, config.models[name], Runtime(config.runtime_dir),
                           up=up or [])
    assert use is not None
    return use[0]["Vulkan0"]


def test_a_split_models_head_holds_its_share_not_every_layer(config: Config,
                                                             worker: Worker) -> None:
    """The worker's two devices (1 and 2 GiB free) take their part of the layers before
    the head's Vulkan0 (2 GiB): the head is counted with about two fifths, as
    placement.head_estimate places it from the worker's answer."""
    alone = vulkan0(config, "solo")
    split = vulkan0(config, "split")
    assert worker.asked == 1
    assert split < 0.6 * alone
    info = gguf.read_model_info((config.models["split"].path,))
    args = config.models["split"].server_args
    answer = wire.Answer((4, 0, 3), (wire.Device(1 << 30, 8 << 30),
                                     wire.Device(2 << 30, 8 << 30)))
    expected = placement.head_estimate(info, memory.load_params(info, args),
                                       offload.offload_params(args),
                                       parse_list_devices(LAVAPIPE),
                                       [config.workers["box2"]], [answer])
    assert split == expected.used["Vulkan0"]


def test_the_split_is_asked_again_and_a_worker_down_counts_every_layer(
        config: Config, worker: Worker) -> None:
    """The head's share follows the workers' free memory, so the record is not reused
    for the next admission; a worker that does not answer leaves the head counted with
    every offloaded layer (too high, never too low), and the record says so."""
    split = vulkan0(config, "split")
    assert vulkan0(config, "split") == split and worker.asked == 2  # asked each time
    worker.down()
    assert vulkan0(config, "split") == vulkan0(config, "solo")
    record = Runtime(config.runtime_dir).devices("split")
    assert record is not None and record[1]["Vulkan0"] > split


def test_a_worker_another_model_holds_is_not_asked(config: Config, worker: Worker,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """'other' is up on box2, which serves one llama-server at a time: admission does not
    ask it for the split (the ask would wait out its timeout) and counts every layer."""
    runtime = Runtime(config.runtime_dir)
    runtime.set_running("other", Running(os.getpid(), "", time.time()))
    monkeypatch.setattr(gather.units, "active_model_units", lambda **_: ["other"])
    snapshot, request = gather.inputs(config, config.models["split"], runtime)
    assert [r.name for r in snapshot.residents] == ["other"]
    assert worker.asked == 0
    assert request.devices["Vulkan0"] == vulkan0(config, "solo")
    monkeypatch.setattr(gather.units, "active_model_units", lambda **_: [])
    _, request = gather.inputs(config, config.models["split"], runtime)
    assert worker.asked == 1 and request.devices["Vulkan0"] < vulkan0(config, "solo")


def test_a_device_the_worker_does_not_have_counts_every_layer(config: Config,
                                                              worker: Worker) -> None:
    """devices: [5] names a device box2 does not list: admission's own ask refuses the
    load naming it (rpc/workers.admit); the estimate falls back meanwhile."""
    from dataclasses import replace

    box2 = replace(config.workers["box2"], devices=(5,))
    odd = replace(config, workers={"box2": box2})
    with pytest.raises(workers.WorkerUnavailable, match="has 2 devices"):
        workers.admit(odd, odd.models["split"], 1 << 20)
    assert vulkan0(odd, "split") == vulkan0(odd, "solo")
