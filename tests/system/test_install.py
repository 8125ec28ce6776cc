"""README's install path: tools/install from a checkout, then enable the socket, then ask."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from testbed import REPO_ROOT
from testbed.deploy import Deployment, free_port
from tests.system.conftest import ContainerFactory

pytestmark = pytest.mark.system


def test_tools_install_then_enable_socket(container_factory: ContainerFactory, tmp_path: Path,
                                          tiny_gguf: Path, llama_server_bin: Path) -> None:
    checkout = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO_ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, checkout / name)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_gguf, models / "tiny.gguf")
    c = container_factory(binds=[(str(checkout), "/src", False), (str(models), "/srv/models", True),
                                 (str(llama_server_bin.parent), "/opt/llama", True)])
    result = c.exec("/src/tools/install", timeout=300)
    assert "install: done" in result.stdout, result.stdout + result.stderr
    manifest = c.root / "etc/hoshikage/models.yaml"
    assert "/srv/models/tiny.gguf" in manifest.read_text()  # the example, unedited
    manifest.write_text(manifest.read_text().replace("/usr/bin/llama-server",
                                                     "/opt/llama/llama-server"))
    assert "1 model(s): tiny (small)" in c.exec("/opt/hoshikage/bin/hoshikage", "check").stdout
    port = free_port()
    dropin = c.root / "etc/systemd/system/hoshikage.socket.d"
    dropin.mkdir(parents=True)
    (dropin / "port.conf").write_text(f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
    c.systemctl("daemon-reload")
    c.systemctl("enable", "--now", "hoshikage.socket")
    status, body = Deployment(c, port, models).chat("small")
    assert status == 200, body
