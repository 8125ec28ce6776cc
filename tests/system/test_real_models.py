"""Issue 19 under real systemd: a split GGUF with a projector, found in a Hugging Face cache
layout (symlinks into blobs/), staged onto the RAM disk under its own names, answering an
image, kept on a swap while memory is plentiful and served again from RAM, released whole."""

from __future__ import annotations

import base64
import importlib
import os
import shutil
import sys
from pathlib import Path

import pytest

from testbed.deploy import MODELS_IN_CONTAINER, Deployment, deploy
from tests.integration.test_real_models import png
from tests.system.conftest import ContainerFactory

pytestmark = pytest.mark.system

REVISION = "0123456789abcdef0123456789abcdef01234567"


def hf_layout(models: Path, repo: str, files: dict[str, Path]) -> Path:
    """Files as huggingface_hub caches them: blobs/, snapshots/REV/ symlinks, refs/main."""
    root = models / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REVISION)
    snapshot = root / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    for i, (name, made) in enumerate(files.items()):
        blob = root / "blobs" / f"{i:064x}"
        shutil.move(made, blob)
        blob.chmod(0o644)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.fixture
def hk(container_factory: ContainerFactory, tmp_path: Path, tiny_gguf: Path,
       llama_server_bin: Path) -> Deployment:
    make_gguf = importlib.import_module("make_gguf")
    models = tmp_path / "models"
    made = tmp_path / "made"
    made.mkdir()
    models.mkdir()
    count = make_gguf.split_count(2, 8)
    shards = [f"vis-{k:05d}-of-{count:05d}.gguf" for k in range(1, count + 1)]
    make_gguf.write_model(made / shards[0], split_max_tensors=8)
    make_gguf.write_projector(made / "mmproj-vis-f32.gguf")
    hf_layout(models, "someone/Vis-GGUF",
              {name: made / name for name in [*shards, "mmproj-vis-f32.gguf"]})
    shutil.copyfile(tiny_gguf, models / "plain.gguf")
    text = (f"llama_server: {llama_server_bin}\nmax_loaded_models: 1\n"
            f"args: [-c, '512', -np, '1']\nsources: [{MODELS_IN_CONTAINER}]\n")
    return deploy(container_factory, models, text)


def ramdisk(hk: Deployment) -> list[str]:
    out = hk.container.exec("ls", "-A", "/mnt/hoshikage").stdout
    return sorted(n for n in out.split() if not n.endswith(".lock"))


def image_chat(hk: Deployment, model: str) -> tuple[int, dict[str, object]]:
    image = "data:image/png;base64," + base64.b64encode(png()).decode()
    return hk.request("POST", "/v1/chat/completions", {
        "model": model, "max_tokens": 3, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": image}}]}]})


DROP_IN = "/etc/systemd/system/hoshikage-model@.service.d/gpu.conf"


def test_a_split_multimodal_model_from_a_huggingface_cache(hk: Deployment) -> None:
    # a GPU's settings as README's "GPUs" sets them: a drop-in on the model unit
    hk.container.exec("sh", "-c", f"mkdir -p {os.path.dirname(DROP_IN)} && printf "
                      "'[Service]\\nEnvironment=CUDA_VISIBLE_DEVICES=0 NOT_FOR_LLAMA=1\\n' "
                      f"> {DROP_IN}")
    (hk.container.root / "etc/default").mkdir(exist_ok=True)
    (hk.container.root / "etc/default/hoshikage").write_text("GGML_FROM_FILE=1\n")
    hk.container.systemctl("daemon-reload")
    # the unit's environment as admission reads it (D-Bus) and as systemctl shows it
    both = hk.container.exec(sys.executable, "-c", (
        "from hoshikage_sd.commands import environment as e; "
        "print(e.bus_environment() == e.shown_environment(), sorted(e.bus_environment()))"
    )).stdout
    assert both.startswith("True ") and all(
        k in both for k in ("CUDA_VISIBLE_DEVICES", "NOT_FOR_LLAMA", "GGML_FROM_FILE",
                            "MESA_SHADER_CACHE_DIR")), both
    check = hk.hoshikage("check")
    (gets,) = [line for line in check.splitlines() if "gets from the model unit" in line]
    assert "CUDA_VISIBLE_DEVICES=0" in gets and "NOT_FOR_LLAMA" not in gets, check
    assert "not passed to llama-server" in check and "NOT_FOR_LLAMA" in check
    listing = hk.hoshikage("list")
    assert "vis" in listing and "plain" in listing and "mmproj" not in listing
    staged = [*(f"vis-{k:05d}-of-00003.gguf" for k in (1, 2, 3)), "vis.mmproj.gguf"]

    status, reply = image_chat(hk, "vis")
    assert status == 200, reply
    # served from the source's symlinks; the RAM-disk copy is made alongside, whole
    hk.wait_for("the copy alongside", lambda: ".vis.source.json" in ramdisk(hk), timeout=60)
    assert [n for n in ramdisk(hk) if not n.startswith(".")] == staged

    # a swap by count while memory is plentiful keeps vis's copy (kept, not released)
    status, reply = hk.chat("plain")
    assert status == 200, reply
    hk.wait_for("vis stopped", lambda: bool(hk.events("released", "vis")), timeout=30)
    assert [n for n in ramdisk(hk) if n.startswith("vis")] == staged

    # and vis comes back from RAM: llama-server's -m and --mmproj are the staged copies
    status, reply = image_chat(hk, "vis")
    assert status == 200, reply
    (line,) = [p for p in hk.processes("llama-server") if "--alias vis" in p]
    assert "-m /mnt/hoshikage/vis-00001-of-00003.gguf" in line
    assert "--mmproj /mnt/hoshikage/vis.mmproj.gguf" in line
    pid = line.split()[0]
    environ = hk.container.exec("cat", f"/proc/{pid}/environ").stdout.split("\0")
    assert "CUDA_VISIBLE_DEVICES=0" in environ and "NOT_FOR_LLAMA=1" not in environ
    assert "MESA_SHADER_CACHE_DIR=/var/cache/hoshikage/mesa" in environ
    hk.wait_for("the second ready record", lambda: len(hk.events("ready", "vis")) == 2)
    ready = hk.events("ready", "vis")[-1]
    assert ready["HOSHIKAGE_SERVED_FROM"] == "/mnt/hoshikage/vis-00001-of-00003.gguf"

    # stopped by hand with nothing else loaded: every file of it leaves the RAM disk
    hk.container.systemctl("stop", "hoshikage-model@plain.service")
    hk.hoshikage("unload", "vis")
    hk.wait_for("the release", lambda: not [n for n in ramdisk(hk) if "vis" in n])
