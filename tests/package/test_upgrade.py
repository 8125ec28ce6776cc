"""An upgrade of the Debian package: a loaded model is kept and the router restarts on the new
code."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.package.conftest import (
    MANIFEST,
    UNIT,
    Boot,
    apt,
    build_deb,
    install,
    listening,
    processes,
)

pytestmark = pytest.mark.package


def test_upgrade_keeps_a_loaded_model_and_serves_again(
        boot: Boot, deb: Path, tiny_models: Path, llama_server_bin: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    next_deb = build_deb(tmp_path_factory.mktemp("deb-next"), revision="2")
    hk = install(boot, deb, tiny_models, llama_server_bin)
    c = hk.container
    (c.root / "etc/hoshikage/models.yaml").write_text(MANIFEST.replace("ttl: 3s", "ttl: 10m"))
    status, body = hk.chat("tiny")
    assert status == 200, body
    model_pid = c.systemctl("show", "-p", "MainPID", "--value", UNIT).strip()
    router_pid = c.systemctl("show", "-p", "MainPID", "--value", "hoshikage.service").strip()
    assert model_pid != "0" and router_pid != "0"

    c.exec("mkdir", "-p", "/tmp/next")
    (c.root / "tmp/next" / next_deb.name).write_bytes(next_deb.read_bytes())
    output = apt(c, "install", f"/tmp/next/{next_deb.name}")
    assert "Unpacking hoshikage (0.2.0-2) over (0.2.0-1)" in output, output
    assert c.exec("dpkg-query", "-W", "-f", "${Version}", "hoshikage").stdout == "0.2.0-2"

    # The loaded model is kept (same process); the router was restarted on the new code.
    assert hk.state(UNIT) == "active"
    assert c.systemctl("show", "-p", "MainPID", "--value", UNIT).strip() == model_pid
    assert c.systemctl("show", "-p", "MainPID", "--value",
                       "hoshikage.service").strip() != router_pid
    assert hk.state("hoshikage.socket") == "active" and listening(hk)
    status, body = hk.chat("tiny")  # no manual step
    assert status == 200, body
    assert len(hk.events("staged", "tiny")) == 1  # served by the kept model, not a reload
    assert {user for user, _ in processes(c).values()} == {"hoshikage"}
