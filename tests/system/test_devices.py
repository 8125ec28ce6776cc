"""Admission over a GPU's memory under real systemd, on lavapipe (Debian's software Vulkan
device, 2 GiB): two models of ~0.9 GiB on the device fit alone and not together, so the
second evicts the idle first although RAM is plentiful; a model larger than the device is
refused at once with the numbers, and nothing is evicted for it."""

from __future__ import annotations

import http.client
import importlib
import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from testbed.deploy import MODELS_IN_CONTAINER, Deployment, deploy
from tests.support import unavailable
from tests.system.conftest import ContainerFactory

pytestmark = pytest.mark.system

#: llama.cpp's Vulkan shaders compile in ~10 s on lavapipe the first time: a cache that
#: outlives the containers (the model unit's own is /var/cache/hoshikage, per container)
SHADER_CACHE = Path("/var/tmp/hoshikage-test-mesa-cache")
DROP_IN = "/etc/systemd/system/hoshikage-model@.service.d/vulkan.conf"
GiB = 1 << 30


@pytest.fixture
def hk(container_factory: ContainerFactory, tmp_path: Path, llama_server_bin: Path
       ) -> Deployment:
    listed = subprocess.run(
        [str(llama_server_bin), "--list-devices"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "GGML_VK_VISIBLE_DEVICES": "0"})
    if "Vulkan0" not in listed.stdout:
        unavailable("no Vulkan device (lavapipe: apt install mesa-vulkan-drivers)")
    make_gguf = importlib.import_module("make_gguf")
    models = tmp_path / "models"
    models.mkdir()
    # 9 layers of the 1g preset: ~0.95 GiB on the device; one file for all three models
    make_gguf.write_model(models / "m.gguf", **{**make_gguf.PRESETS["1g"], "n_layer": 9})
    SHADER_CACHE.mkdir(exist_ok=True)
    SHADER_CACHE.chmod(0o1777)
    args = "[-ngl, '99', -c, '512', -np, '1']"
    text = (f"llama_server: {llama_server_bin}\nargs: {args}\nadmission_wait: 1s\nmodels:\n"
            f"  a: {{path: {MODELS_IN_CONTAINER}/m.gguf}}\n"
            f"  b: {{path: {MODELS_IN_CONTAINER}/m.gguf}}\n"
            # with a context whose KV cache alone outgrows the device
            f"  c: {{path: {MODELS_IN_CONTAINER}/m.gguf, args: [-c, '131072']}}\n")
    hk = deploy(container_factory, models, text,
                binds=[(str(SHADER_CACHE), "/var/tmp/mesa", False)])
    hk.container.exec("sh", "-c", f"mkdir -p {os.path.dirname(DROP_IN)} && printf "
                      "'[Service]\\nEnvironment=GGML_VK_VISIBLE_DEVICES=0 "
                      f"MESA_SHADER_CACHE_DIR=/var/tmp/mesa\\n' > {DROP_IN}")
    hk.container.systemctl("daemon-reload")
    # Mesa keeps a cache only where it may write (else it compiles every shader each start)
    hk.container.exec("chown", "-R", "hoshikage:", "/var/tmp/mesa")
    return hk


def on_device(hk: Deployment, name: str) -> dict[str, int]:
    record = json.loads(hk.container.exec("cat", f"/run/hoshikage/devices/{name}.json").stdout)
    assert record["total"] == {"Vulkan0": 2048 << 20}
    return dict(record["use"])


def tokenize(hk: Deployment, model: str) -> tuple[int, dict[str, object]]:
    """A request that loads the model without running it (lavapipe computes slowly)."""
    return hk.request("POST", "/tokenize", {"model": model, "content": "hello"})


def test_a_model_that_does_not_fit_the_gpu_evicts_the_idle_one_there(hk: Deployment) -> None:
    assert "Vulkan0: llvmpipe" in hk.hoshikage("check")  # as user hoshikage sees it

    status, body = tokenize(hk, "a")
    assert status == 200, body
    (admitted,) = hk.events("admission", "a")
    assert admitted["HOSHIKAGE_VERDICT"] == "load"
    assert "Vulkan0 free 2.0 GiB" in admitted["MESSAGE"]
    use_a = on_device(hk, "a")["Vulkan0"]
    assert 0.8 * GiB < use_a < 1.2 * GiB  # 1.2 × it fits 2 GiB once, not twice

    status, body = tokenize(hk, "b")
    assert status == 200, body
    (admitted,) = hk.events("admission", "b")
    assert admitted["HOSHIKAGE_VERDICT"] == "evict" and admitted["HOSHIKAGE_VICTIMS"] == "a"
    assert "Vulkan0 free" in admitted["MESSAGE"] and "< needed" in admitted["MESSAGE"]
    hk.wait_for("a's release", lambda: bool(hk.events("released", "a")))
    assert hk.events("released", "a")[0]["HOSHIKAGE_REASON"] == "evicted for b"
    assert hk.state("hoshikage-model@b.service") == "active"
    llama = [p for p in hk.processes("llama-server") if "--alias b" in p]
    assert len(llama) == 1 and "-ngl 99" in llama[0]

    # device memory where operators and clients look
    use_b = on_device(hk, "b")["Vulkan0"]
    state = json.loads(hk.hoshikage("status", "--json"))
    (row,) = [m for m in state["models"] if m["name"] == "b"]
    assert row["device_bytes"] == {"Vulkan0": use_b}
    assert state["devices"] == [{"name": "Vulkan0", "total_bytes": 2048 << 20,
                                 "used_bytes": use_b}]
    assert "Vulkan0" in hk.hoshikage("status")
    status, ps = hk.request("GET", "/api/ps")
    assert status == 200 and [m["size_vram"] for m in ps["models"]] == [use_b]
    with urllib.request.urlopen(f"http://127.0.0.1:{hk.port}/metrics", timeout=30) as r:
        text = r.read().decode()
    assert f'hoshikage_model_device_bytes{{model="b",device="Vulkan0"}} {use_b}' in text
    assert f'hoshikage_device_total_bytes{{device="Vulkan0"}} {2048 << 20}' in text

    # b busy (lavapipe takes seconds for a prompt): a waits for it, then is refused, and
    # b keeps serving
    busy = http.client.HTTPConnection("127.0.0.1", hk.port, timeout=120)
    busy.request("POST", "/completion", json.dumps(
        {"model": "b", "prompt": "once upon a time " * 8, "n_predict": 64, "stream": True}),
        {"Content-Type": "application/json"})
    hk.wait_for("b busy", lambda: any(
        m["busy"] for m in json.loads(hk.hoshikage("status", "--json"))["models"]
        if m["name"] == "b"))
    status, body = tokenize(hk, "a")
    assert status == 503, body
    assert "waiting for busy b" in json.dumps(body), body
    assert hk.state("hoshikage-model@b.service") == "active"
    busy.close()  # the client goes: b is idle again

    status, body = tokenize(hk, "c")
    assert status >= 500, body
    reason = json.dumps(body)
    assert "on Vulkan0, which has 2.0 GiB in all" in reason, reason
    assert hk.state("hoshikage-model@b.service") == "active"  # nothing evicted for it
    assert not hk.events("released", "b")


def test_a_device_selected_after_a_first_start_is_counted_at_the_next(hk: Deployment) -> None:
    """The model ran once without the unit selecting lavapipe (no device: nothing on one);
    then the admin sets GGML_VK_VISIBLE_DEVICES in /etc/default/hoshikage (README "GPUs"):
    its next start runs on the device and admission counts it there (it counted nothing,
    from the first start's record)."""
    hk.container.exec("rm", "-f", DROP_IN)
    hk.container.systemctl("daemon-reload")
    status, body = tokenize(hk, "a")
    assert status == 200, body
    record = json.loads(hk.container.exec("cat", "/run/hoshikage/devices/a.json").stdout)
    assert record["use"] == {}  # no device seen
    hk.container.systemctl("stop", "hoshikage-model@a.service")
    hk.container.exec("sh", "-c", "mkdir -p /etc/default && printf 'GGML_VK_VISIBLE_DEVICES=0\\n"
                      "MESA_SHADER_CACHE_DIR=/var/tmp/mesa\\n' > /etc/default/hoshikage")
    status, body = tokenize(hk, "a")
    assert status == 200, body
    assert 0.8 * GiB < on_device(hk, "a")["Vulkan0"] < 1.2 * GiB
    assert "Vulkan0 free" in hk.events("admission", "a")[-1]["MESSAGE"]
