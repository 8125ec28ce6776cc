"""Issue 19 with a real llama-server: a split GGUF with a projector served from its RAM-disk
copy (an image answered through it), the unit's GPU environment and the manifest's env
reaching llama-server, and layers offloaded to a Vulkan device (lavapipe, Debian's software
one: mesa-vulkan-drivers)."""

from __future__ import annotations

import base64
import importlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from hoshikage_sd import protocol
from testbed.unixhttp import UnixHTTPConnection
from tests.support import eventually, unavailable

from .conftest import NotifyListener, popen_logged, stderr_of, stop

pytestmark = pytest.mark.integration

#: a shader cache that outlives the test: lavapipe compiles llama.cpp's shaders in ~10 s
#: the first time (the model unit gets one the same way: CacheDirectory=, README "GPUs")
SHADER_CACHE = Path("/var/tmp/hoshikage-test-mesa-cache")


def png(width: int = 32, height: int = 32) -> bytes:
    """A small RGB PNG, made by hand: no imaging library in the test bed."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\0" + bytes(c for x in range(width)
                                   for c in (x * 8 % 256, y * 8 % 256, 128))
                    for y in range(height))
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def post(sock: Path, route: str, body: dict[str, object], timeout: float = 120.0
         ) -> tuple[int, dict[str, object]]:
    conn = UnixHTTPConnection(str(sock), timeout=timeout)
    try:
        conn.request("POST", route, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in raw if b"=" in e)


def cmdline_of(pid: int) -> list[str]:
    return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]


def manifest(root: Path, llama_server: Path, models: str, top: str = "") -> Path:
    for d in ("rd", "run", "state"):
        (root / d).mkdir(exist_ok=True)
    path = root / "models.yaml"
    path.write_text(f"ramdisk: {root / 'rd'}\nruntime_dir: {root / 'run'}\n"
                    f"state_dir: {root / 'state'}\nllama_server: {llama_server}\n{top}"
                    f"models:\n{models}")
    return path


def activate(root: Path, config: Path, name: str, listener: NotifyListener,
             **env: str) -> subprocess.Popen[bytes]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("LISTEN_", "NOTIFY_SOCKET", "JOURNAL_STREAM"))}
    base.update(HOSHIKAGE_CONFIG=str(config), NOTIFY_SOCKET=str(listener.path), **env)
    return popen_logged([sys.executable, "-m", "hoshikage_sd", "activate", name], base,
                        root / "activator.stderr")


@pytest.fixture(scope="module")
def make_gguf() -> object:
    return importlib.import_module("make_gguf")  # tools/make_gguf.py


def test_a_split_model_with_a_projector_serves_an_image_from_its_ram_disk_copy(
        tmp_path: Path, llama_server_bin: Path, notify_socket: NotifyListener,
        make_gguf: object) -> None:
    src = tmp_path / "src"
    src.mkdir()
    count = make_gguf.split_count(2, 8)  # type: ignore[attr-defined]
    first = src / f"vis-00001-of-{count:05d}.gguf"
    make_gguf.write_model(first, split_max_tensors=8)  # type: ignore[attr-defined]
    make_gguf.write_projector(src / "mmproj-vis-f32.gguf")  # type: ignore[attr-defined]
    for f in src.iterdir():
        f.chmod(0o444)  # staging never writes to a source
    config = manifest(tmp_path, llama_server_bin,
                      f"  vis: {{path: {first}, mmproj: {src / 'mmproj-vis-f32.gguf'}, "
                      "args: [-c, '512', -np, '1']}\n")
    rd, sock = tmp_path / "rd", tmp_path / "run" / "vis.sock"
    activator = activate(tmp_path, config, "vis", notify_socket)
    try:  # first start: from the source's shards, the RAM-disk copy made alongside
        notify_socket.wait_for("READY", timeout=120)
        staged = [f"vis-{k:05d}-of-{count:05d}.gguf" for k in range(1, count + 1)]
        assert eventually(lambda: (rd / ".vis.source.json").exists(), timeout=30)
        assert sorted(p.name for p in rd.iterdir() if not p.name.startswith(".")) == \
            sorted([*staged, "vis.mmproj.gguf"])
    finally:
        assert stop(activator) == 0, stderr_of(activator)
    activator = activate(tmp_path, config, "vis", notify_socket)
    try:  # second start: every file from the RAM disk
        notify_socket.wait_for("READY", timeout=120)
        running = json.loads((tmp_path / "run" / "running" / "vis.json").read_text())
        argv = cmdline_of(running["pid"])
        assert argv[argv.index("-m") + 1] == str(rd / staged[0])
        assert argv[argv.index("--mmproj") + 1] == str(rd / "vis.mmproj.gguf")
        image = "data:image/png;base64," + base64.b64encode(png()).decode()
        status, reply = post(sock, "/v1/chat/completions", {
            "max_tokens": 4, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": image}}]}]})
        assert status == 200, reply
        usage = reply["usage"]
        assert isinstance(usage, dict) and usage["prompt_tokens"] > 4  # the image's tokens
    finally:
        assert stop(activator) == 0, stderr_of(activator)
    assert all(p.stat().st_mode & 0o222 == 0 for p in src.iterdir())


def vulkan_env() -> dict[str, str]:
    SHADER_CACHE.mkdir(exist_ok=True)
    return {"GGML_VK_VISIBLE_DEVICES": "0", "MESA_SHADER_CACHE_DIR": str(SHADER_CACHE)}


def test_the_units_gpu_environment_reaches_llama_server_and_layers_go_to_the_device(
        tmp_path: Path, llama_server_bin: Path, tiny_gguf: Path,
        notify_socket: NotifyListener) -> None:
    """As a drop-in's Environment= would set them on the model unit; the manifest's `env:`
    wins where both say; -ngl from the manifest's top-level args (every model's)."""
    listed = subprocess.run([str(llama_server_bin), "--list-devices"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, **vulkan_env()})
    if "Vulkan0" not in listed.stdout:
        unavailable("no Vulkan device (lavapipe: apt install mesa-vulkan-drivers)")
    config = manifest(tmp_path, llama_server_bin,
                      f"  tiny: {{path: {tiny_gguf}, env: {{OMP_NUM_THREADS: '1'}}}}\n",
                      top="args: [-ngl, '99', -c, '512', -np, '1', -lv, '4']\n"
                          "env: {LLAMA_ARG_NO_WEBUI: '1', GGML_VK_VISIBLE_DEVICES: '0'}\n")
    activator = activate(tmp_path, config, "tiny", notify_socket,
                         **{**vulkan_env(), "CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "2",
                            "GGML_VK_VISIBLE_DEVICES": "9", "SECRET_TOKEN": "x"})
    try:
        notify_socket.wait_for("READY", timeout=180)
        running = json.loads((tmp_path / "run" / "running" / "tiny.json").read_text())
        env = environ_of(running["pid"])
        assert env["CUDA_VISIBLE_DEVICES"] == "0"          # the unit's
        assert env["MESA_SHADER_CACHE_DIR"] == str(SHADER_CACHE)
        assert env["OMP_NUM_THREADS"] == "1"               # the model's env: over the unit's
        assert env["GGML_VK_VISIBLE_DEVICES"] == "0"       # the manifest's over the unit's 9
        assert env["LLAMA_ARG_NO_WEBUI"] == "1"
        assert "SECRET_TOKEN" not in env and "NOTIFY_SOCKET" not in env
        status, reply = post(tmp_path / "run" / "tiny.sock", "/v1/chat/completions",
                             {"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
                             timeout=180)
        assert status == 200, reply
    finally:
        assert stop(activator) == 0, stderr_of(activator)
    log = stderr_of(activator)
    assert "offloaded 3/3 layers to GPU" in log, log[-3000:]
    assert "Vulkan0" in log
    # its unit listed Vulkan0 as llama-server sees it, estimated its use there, and (stage:
    # auto, every layer on the device) served it from its source without a RAM-disk copy
    record = json.loads((tmp_path / "run" / "devices" / "tiny.json").read_text())
    assert record["full"] is True and record["total"] == {"Vulkan0": 2048 << 20}
    assert 0 < record["use"]["Vulkan0"] < 256 << 20
    assert not [p for p in (tmp_path / "rd").iterdir() if p.suffix == ".gguf"]
    assert protocol.passed_env("GGML_VK_VISIBLE_DEVICES")
