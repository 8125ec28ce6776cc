"""Devices and the per-device estimate against a real llama-server on a real Vulkan device.

Without a GPU that device is Mesa's lavapipe (mesa-vulkan-drivers, tools/bootstrap.sh): a
software Vulkan device of 2048 MiB that llama.cpp lists only when GGML_VK_VISIBLE_DEVICES
names it. Each case generates a model, starts llama-server with the case's arguments until
/health answers, and compares offload.device_estimate() with what llama-server's log says it
allocated on each device ("Vulkan0 model buffer size", "... KV ...", "... compute ...") and
with how many layers it offloaded. Tolerance: the product's ±10 % or ±64 MiB, and, so that a
wrong term fails here, ±10 % or ±8 MiB; weights and KV cache must be exact.

Without a Vulkan device the tests skip (fail where CI is set).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hoshikage_sd import devices, gguf, memory, offload
from testbed.estimate import within
from tests.support import eventually, unavailable

from .test_memory_estimate import server

pytestmark = pytest.mark.integration

MiB = 1 << 20
TIGHT = 8 * MiB
VULKAN_ENV = {"GGML_VK_VISIBLE_DEVICES": "0"}

#: (tools/make_gguf.py write_model arguments, llama-server arguments)
WIDE = dict(n_embd=1024, n_ff=2816, n_layer=6, n_head=16, n_head_kv=4, n_ctx=16384,
            dtype="f16")                                           # 130 MiB, GQA
NARROW = dict(n_embd=512, n_ff=1408, n_layer=8, n_head=8, n_head_kv=2, n_ctx=16384,
              dtype="f16")                                         # 44 MiB
CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "all-layers": (NARROW, ["-ngl", "99", "-c", "4096"]),
    "all-layers-2-slots": (WIDE, ["-ngl", "all", "-c", "16384", "-np", "2"]),
    "partial": (WIDE, ["-ngl", "3", "-c", "8192"]),
    "output-only-ub-128": (WIDE, ["-ngl", "1", "-c", "4096", "-ub", "128"]),
    "none-on-device": (NARROW, ["-ngl", "0", "-c", "4096"]),
    "kv-in-host-memory": (WIDE, ["-ngl", "99", "-c", "8192", "-nkvo"]),
    # -ngl auto with --fit: keep 1950 of the 2048 MiB free, so llama-server offloads fewer
    # layers; the estimate must pick the same number
    "fit-lowers-layers": (WIDE, ["-c", "8192", "-fitt", "1950"]),
}


@pytest.fixture(scope="module")
def vulkan(llama_server_bin: Path) -> list[devices.Device]:
    found = devices.list_devices(llama_server_bin, VULKAN_ENV)
    if not found:
        unavailable("llama-server lists no Vulkan device with GGML_VK_VISIBLE_DEVICES=0: "
                    "apt install mesa-vulkan-drivers (lavapipe, a software device)")
    return found[:1]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    try:
        make_gguf = importlib.import_module("make_gguf")  # tools/make_gguf.py
    except ImportError as e:
        unavailable(f"cannot generate a GGUF: {e} (pip install -e '.[test]')")
    folder = tmp_path_factory.mktemp("device-models")
    paths = {}
    for name, shape in (("wide", WIDE), ("narrow", NARROW)):
        paths[name] = folder / f"{name}.gguf"
        make_gguf.write_model(paths[name], **shape)
    yield paths


def logged(log: str) -> tuple[dict[str, dict[str, float]], int, int]:
    """({device: {"model"|"KV"|"compute": MiB}}, layers offloaded, layers) from the log;
    host buffers (CPU_Mapped, CPU, *_Host) are left out."""
    found: dict[str, dict[str, float]] = {}
    for name, kind, mib in re.findall(r"(\S+) (model|KV|compute) buffer size =\s+([\d.]+) MiB",
                                      log):
        if name.startswith("CPU") or name.endswith("_Host"):
            continue
        device = found.setdefault(name.split("[")[0], {})
        device[kind] = device.get(kind, 0.0) + float(mib)
    layers = re.search(r"offloaded (\d+)/(\d+) layers to GPU", log)
    assert layers, "no 'offloaded N/M layers' in llama-server's log"
    return found, int(layers.group(1)), int(layers.group(2))


def test_list_devices_is_cached_per_build_and_environment(llama_server_bin: Path,
                                                          vulkan: list[devices.Device],
                                                          tmp_path: Path) -> None:
    listed = devices.list_devices(llama_server_bin, VULKAN_ENV, cache_dir=tmp_path)
    assert listed[0] == vulkan[0] and listed[0].total > 0
    assert (tmp_path / devices.CACHE_NAME).is_file()
    assert devices.list_devices(llama_server_bin, VULKAN_ENV, cache_dir=tmp_path) == listed
    # another environment lists again: without GGML_VK_VISIBLE_DEVICES the Vulkan backend
    # skips CPU-type devices such as lavapipe
    other = devices.list_devices(llama_server_bin, {}, cache_dir=tmp_path)
    if "llvmpipe" in vulkan[0].description:
        assert other == []


@pytest.mark.parametrize("case", list(CASES))
def test_device_estimate_matches_what_llama_server_allocates(
        case: str, llama_server_bin: Path, vulkan: list[devices.Device],
        models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shape, args = CASES[case]
    path = models["wide" if shape is WIDE else "narrow"]
    info = gguf.read_info(path)
    est = offload.device_estimate(info, memory.load_params(info, args),
                                  offload.offload_params(args), vulkan)
    for key, value in VULKAN_ENV.items():
        monkeypatch.setenv(key, value)
    with server(llama_server_bin, path, args, tmp_path) as (_, _, log_path):
        # logged from a worker thread: /health can say 200 before the lines are out
        log = eventually(lambda: log_path.read_text(errors="replace"),
                         lambda text: "n_ctx_slot" in text)
    measured, offloaded, n_layers = logged(log)
    rows = []
    for name in sorted(set(measured) | set(est.devices)):
        got = measured.get(name, {})
        use = est.devices.get(name, offload.DeviceUse())
        total = int(sum(got.values()) * MiB)
        rows.append(f"{case:19} {' '.join(args):30} {name:7} {offloaded:>2}/{n_layers:<2} "
                    f"{use.total / MiB:7.1f} = {use.weights / MiB:.2f} + "
                    f"{use.kv_cache / MiB:.2f} + {use.compute / MiB:.2f}   "
                    f"{total / MiB:7.1f} = {got.get('model', 0):.2f} + {got.get('KV', 0):.2f}"
                    f" + {got.get('compute', 0):.2f}   "
                    f"{100 * (use.total - total) / max(total, 1):+5.1f}%")
        report = rows[-1]
        assert use.weights / MiB == pytest.approx(got.get("model", 0.0), abs=0.01), report
        assert use.kv_cache / MiB == pytest.approx(got.get("KV", 0.0), abs=0.01), report
        assert within(use.total, total), report
        assert within(use.total, total, rel=0.10, floor=TIGHT), report
    print("\n".join(rows))
    assert (est.gpu_layers, est.n_layers) == (offloaded, n_layers), rows
    if os.environ.get("HOSHIKAGE_DEVICE_TABLE"):  # docs/memory.md's table
        with open(os.environ["HOSHIKAGE_DEVICE_TABLE"], "a") as out:
            out.write("\n".join(rows) + "\n")
