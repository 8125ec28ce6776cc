"""Names as people have them (with '-', escaped as \\x2d in unit names) under real systemd:
`hoshikage logs NAME` and README's `systemctl stop "$(systemd-escape ...)"`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hoshikage_sd.sd.units import model_unit
from testbed.deploy import Deployment, hoshikage_bin
from tests.system.conftest import TinyDeployer

pytestmark = pytest.mark.system

QWEN = "Qwen3-8B-Q4_K_M"
OTHER = "tiny-1"
#: 96 characters: /run/hoshikage/NAME.sock would not fit a unix socket's address
LONG = ("DeepSeek-R1-Distill-Qwen-32B-abliterated-uncensored-instruct-"
        "reasoning-long-context-v2-it-Q4_K_M")


@pytest.fixture
def hk(deploy_tiny: TinyDeployer) -> Deployment:
    return deploy_tiny({QWEN: "aliases: [qwen]\nttl: 2s", OTHER: "ttl: 1h", LONG: "ttl: 1h"})


def cursors(entries: list[dict[str, Any]]) -> set[str]:
    return {e["__CURSOR"] for e in entries}


def test_logs_of_a_name_with_a_dash_and_readme_s_stop(hk: Deployment) -> None:
    cli = str(hoshikage_bin())
    unit, other_unit = model_unit(QWEN), model_unit(OTHER)
    assert unit == "hoshikage-model@Qwen3\\x2d8B\\x2dQ4_K_M.service"

    # README: systemctl stop "$(systemd-escape --template=hoshikage-model@.service NAME)"
    status, body = hk.chat(OTHER)
    assert status == 200, body
    assert hk.state(other_unit) == "active"
    hk.container.exec("sh", "-c", 'systemctl stop '
                      f'"$(systemd-escape --template=hoshikage-model@.service {OTHER})"')
    assert hk.state(other_unit) == "inactive"
    hk.wait_for("the release", lambda: bool(hk.events("released", OTHER)))
    assert hk.events("released", OTHER)[0]["HOSHIKAGE_REASON"] == "manual stop"

    # Served by its alias, stopped by the idle watch (another unit, hoshikage-idle.service).
    status, body = hk.chat("qwen")
    assert status == 200, body
    hk.wait_for("the idle stop", lambda: bool(hk.events("idle-stop", QWEN)), timeout=30)
    hk.wait_for("the release", lambda: bool(hk.events("released", QWEN)))

    # What `journalctl -u UNIT` shows, and hoshikage's records about the model: nothing else.
    before = cursors(hk.container.journal("-u", unit)) | \
        cursors(hk.container.journal(f"HOSHIKAGE_MODEL={QWEN}"))
    hk.container.exec("journalctl", "--sync")
    out = hk.container.exec(cli, "logs", "qwen", "-n", "all", "-o", "json").stdout
    shown = [json.loads(line) for line in out.splitlines() if line.strip()]
    after = cursors(hk.container.journal("-u", unit, sync=False)) | \
        cursors(hk.container.journal(f"HOSHIKAGE_MODEL={QWEN}", sync=False))
    assert before <= cursors(shown) <= after, (before - cursors(shown), cursors(shown) - after)
    llama = [e for e in shown if e.get("_COMM") == "llama-server"]
    assert llama and all(e["_SYSTEMD_UNIT"] == unit for e in llama)
    (ready,) = [e for e in shown if e.get("HOSHIKAGE_EVENT") == "ready"]
    assert any(e.get("_SYSTEMD_UNIT") == "hoshikage-idle.service"
               and e.get("HOSHIKAGE_EVENT") == "idle-stop" for e in shown)
    assert any(e.get("UNIT") == unit and e.get("_PID") == "1" for e in shown)  # PID 1's own
    assert not [e for e in shown if e.get("HOSHIKAGE_MODEL") == OTHER
                or e.get("_SYSTEMD_UNIT") == other_unit]

    # The plain output, by the model's full name.
    text = hk.container.exec(cli, "logs", QWEN, "--lines=all").stdout
    assert str(ready["MESSAGE"]) in text
    assert str(llama[-1]["MESSAGE"]).strip() in text

    unknown = hk.container.exec(cli, "logs", "nope", check=False)
    assert unknown.returncode == 1 and "no model named 'nope'" in unknown.stderr


def test_a_name_too_long_for_a_socket_path_serves(hk: Deployment) -> None:
    assert len(LONG) == 96 and len(f"/run/hoshikage/{LONG}.sock") >= 108
    status, body = hk.chat(LONG)
    assert status == 200, body
    sockets = hk.container.exec("sh", "-c", "ls /run/hoshikage/*.sock").stdout.split()
    assert [s for s in sockets if "/_" in s], sockets  # a hash of the name
    hk.container.systemctl("stop", model_unit(LONG))
