"""The router under real systemd with a manifest or names file that cannot be used: it starts
and answers anyway, and serves again once the file is fixed, without anyone resetting units."""

from __future__ import annotations

import pytest

from testbed.deploy import Deployment
from tests.system.conftest import TinyDeployer

pytestmark = pytest.mark.system
CONFIG = "etc/hoshikage/models.yaml"


@pytest.fixture
def hk(deploy_tiny: TinyDeployer) -> Deployment:
    return deploy_tiny({"tiny": "ttl: 1h"}, router_idle_exit="1h")


def hoshikage(hk: Deployment, *args: str) -> str:
    return hk.hoshikage(*args)


def test_a_broken_manifest_at_start_is_a_503_with_the_reason_not_a_dead_socket(
        hk: Deployment) -> None:
    path = hk.container.root / CONFIG
    good = path.read_text()
    path.write_text(good.replace("ttl: 1h", "ttl: whenever"))
    for _ in range(3):  # each a new connection; the router stays up and answers
        status, body = hk.chat("tiny")
        assert status == 503, body
        message = body["error"]["message"]
        assert "/etc/hoshikage/models.yaml:" in message and "whenever" in message, message
    status, body = hk.request("GET", "/v1/models")
    assert status == 503 and "whenever" in body["error"]["message"], body
    assert hk.state("hoshikage.socket") == "active"
    assert hk.state("hoshikage.service") == "active"
    assert hk.state("hoshikage-model@tiny.service") == "inactive"  # nothing started
    errors = [str(e.get("MESSAGE")) for e in hk.container.journal(
        "-u", "hoshikage.service", "-p", "err")]
    assert any("whenever" in m for m in errors), errors
    path.write_text(good)
    hoshikage(hk, "reload")  # no waiting for the once-a-second check
    status, body = hk.chat("tiny")
    assert status == 200, body


def test_a_broken_names_file_at_start_is_reported_and_the_manifest_serves(
        hk: Deployment) -> None:
    names = hk.container.root / "var/lib/hoshikage/names.json"
    names.parent.mkdir(parents=True, exist_ok=True)
    names.write_text('{"aliases": "wee"}')
    status, body = hk.chat("tiny")
    assert status == 200, body
    assert hk.chat("wee")[0] == 404
    warnings = [str(e.get("MESSAGE")) for e in hk.container.journal(
        "-u", "hoshikage.service", "-p", "warning")]
    assert any("names.json" in m and "aliases" in m for m in warnings), warnings
    names.write_text('{"aliases": {"wee": "tiny"}}')  # hoshikage-reload.path tells the router
    hk.wait_for("the router to read the fixed file", lambda: hk.chat("wee")[0] == 200,
                timeout=10)


def test_reload_with_no_router_running_does_nothing(hk: Deployment) -> None:
    assert hk.state("hoshikage.service") == "inactive"
    hoshikage(hk, "reload")  # exits 0 (exec raises otherwise)
    assert hk.state("hoshikage.service") == "inactive"
