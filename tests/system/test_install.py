"""README's install path: tools/install from a checkout, then enable the socket, then ask;
what it puts in /usr/local (the command on PATH, the journal's catalog, the man page, bash
completion) found and working as the package tier checks the package's."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hoshikage_sd.log import MESSAGE_IDS
from testbed import REPO_ROOT
from testbed.deploy import Deployment, free_port
from tests.support import completions
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
    # the container's /usr is the host's, read-only: a /usr/local of its own, as a machine's
    local = tmp_path / "usr-local"
    local.mkdir()
    c = container_factory(binds=[(str(checkout), "/src", False), (str(models), "/srv/models", True),
                                 (str(llama_server_bin.parent), "/opt/llama", True),
                                 (str(local), "/usr/local", False)])
    result = c.exec("/src/tools/install", timeout=300)
    assert "install: done" in result.stdout, result.stdout + result.stderr
    manifest = c.root / "etc/hoshikage/models.yaml"
    assert "/srv/models/tiny.gguf" in manifest.read_text()  # the example, unedited
    manifest.write_text(manifest.read_text().replace("/usr/bin/llama-server",
                                                     "/opt/llama/llama-server"))
    assert "1 model(s): tiny (small)" in c.exec("hoshikage", "check").stdout  # on PATH
    port = free_port()
    dropin = c.root / "etc/systemd/system/hoshikage.socket.d"
    dropin.mkdir(parents=True)
    (dropin / "port.conf").write_text(f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
    c.systemctl("daemon-reload")
    c.systemctl("enable", "--now", "hoshikage.socket")
    status, body = Deployment(c, port, models).chat("small")
    assert status == 200, body
    # journalctl -x explains the record of the load with the catalog's entry
    ready = c.exec("journalctl", "-x", "--no-pager", f"MESSAGE_ID={MESSAGE_IDS['ready']}").stdout
    assert "the model unit is ready and the router forwards requests to it" in ready, ready
    # hoshikage(1), written from the installed CLI's parser; man finds it (with man-db's
    # configuration: the container's /etc has none of its own)
    (c.root / "etc/manpath.config").write_text(Path("/etc/manpath.config").read_text())
    page = c.exec("man", "-w", "hoshikage").stdout.strip()
    assert page == "/usr/local/share/man/man1/hoshikage.1", page
    text = (local / "share/man/man1/hoshikage.1").read_text()
    assert ".SH COMMANDS" in text and '.SS "hoshikage status' in text, text[:2000]
    # bash completion: argcomplete's script asks hoshikage for the candidates
    completion = "/usr/local/share/bash-completion/completions/hoshikage"

    assert completions(c, completion, "hoshikage sta") == ["status"]
    assert completions(c, completion, "hoshikage load ti") == ["tiny"]  # the manifest's names
