"""The router's load/unload API, a model's own --api-key, the "loading" word to streaming
clients, preload and pin, under real systemd (issue 23). Two containers, a few seconds
each."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

import pytest

from testbed.deploy import Deployment, hoshikage_bin
from tests.system.conftest import TinyDeployer

pytestmark = pytest.mark.system
HELLO = [{"role": "user", "content": "hello"}]
MODEL_KEY = "sk-model-own-key-0123456789"


def post(hk: Deployment, path: str, body: object, headers: dict[str, str] | None = None,
         raw: bool = False) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", hk.port, timeout=60)
    conn.request("POST", path, body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data if raw else json.loads(data)


def loaded(hk: Deployment, name: str) -> bool:
    _, listing = hk.request("GET", "/v1/models")
    return any(m["id"] == name and m["loaded"] for m in listing["data"])


def test_load_and_unload_over_http_a_models_own_key_and_the_loading_word(
        deploy_tiny: TinyDeployer) -> None:
    hk = deploy_tiny({"tiny": 'ttl: 1h\nargs: ["-c", "512"]',
                      "keyed": f'ttl: 1h\nargs: ["-c", "512", "--api-key", "{MODEL_KEY}"]'},
                     router_idle_exit="1h")
    tiny, keyed = "hoshikage-model@tiny.service", "hoshikage-model@keyed.service"
    # bad input starts nothing
    for body, headers, status in (({"model": "tiny", "x": 1}, {}, 400),
                                  ({"model": "nothing"}, {}, 404),
                                  ({"model": "tiny"}, {"Content-Type": "text/plain"}, 415)):
        got, answer = post(hk, "/models/load", body, headers)
        assert got == status, answer
    assert hk.state(tiny) == "inactive"

    # llama.cpp's shape: the load answers at once, /v1/models says when it serves
    status, answer = post(hk, "/models/load", {"model": "tiny"})
    assert status == 200 and answer == {"success": True, "model": "tiny",
                                        "status": "loading"}, answer
    hk.wait_for("tiny to serve", lambda: loaded(hk, "tiny"))
    assert post(hk, "/models/load", {"model": "tiny"})[1]["status"] == "loaded"
    status, answer = post(hk, "/models/unload", {"model": "tiny"})
    assert (status, answer["status"]) == (200, "unloaded") and hk.state(tiny) != "active"
    assert post(hk, "/models/unload", {"model": "keyed"})[1]["status"] == "not loaded"

    # the model's own key: 401 before its unit starts; with it, the model answers
    chat = {"model": "keyed", "max_tokens": 2, "messages": HELLO}
    for headers in ({}, {"Authorization": "Bearer wrong-key-123456"}):
        status, answer = post(hk, "/v1/chat/completions", chat, headers)
        assert status == 401 and "model 'keyed'" in answer["error"]["message"], answer
        assert post(hk, "/models/load", {"model": "keyed"}, headers)[0] == 401
    assert hk.state(keyed) == "inactive" and not hk.processes("keyed.gguf")
    status, answer = post(hk, "/v1/chat/completions", chat,
                          {"Authorization": f"Bearer {MODEL_KEY}"})
    assert status == 200 and answer["choices"], answer

    # the loading word: comment lines before the stream, only for a client that asks
    hk.wait_for("tiny to stop", lambda: hk.state(tiny) == "inactive")
    stream = {"model": "tiny", "max_tokens": 2, "stream": True, "messages": HELLO}
    status, body = post(hk, "/v1/chat/completions", stream, {"X-Hoshikage-Progress": "1"},
                        raw=True)
    assert status == 200 and body.startswith(b": loading tiny"), body[:200]
    comments, _, events = body.partition(b"data: ")
    assert all(line.startswith(b": loading tiny") for line in comments.split(b"\n\n") if line)
    assert b"[DONE]" in events
    status, body = post(hk, "/v1/chat/completions", stream, raw=True)  # loaded, no header
    assert status == 200 and body.startswith(b"data: ") and b": loading" not in body


def test_preload_at_boot_and_a_pin_that_holds_against_the_ttl(
        deploy_tiny: TinyDeployer) -> None:
    hk = deploy_tiny({"kept": "ttl: 2s\npreload: true\npinned: true",
                      "plain": "ttl: 2s\npreload: true",
                      "idle": "ttl: 2s"}, router_idle_exit="1h", max_connections="5000")
    c = hk.container
    assert hk.state("hoshikage.service") == "inactive"  # the socket pulls nothing in
    # check: preload without its unit enabled, and limits past the router unit's
    checked = c.exec(str(hoshikage_bin()), "check", check=False)
    assert checked.returncode == 1
    assert "kept, plain: preload: true, but hoshikage-preload.service is disabled" \
        in checked.stdout, checked.stdout
    assert "above hoshikage.service's LimitNOFILE=4096" in checked.stdout
    # what a boot does once the admin enabled it: multi-user.target starts the unit
    c.systemctl("enable", "hoshikage-preload.service")
    assert "preload" not in c.exec(str(hoshikage_bin()), "check", check=False).stdout
    began = time.monotonic()
    c.systemctl("start", "hoshikage-preload.service")
    hk.wait_for("the preload models to serve", lambda: loaded(hk, "kept") and loaded(
        hk, "plain"), timeout=60)
    assert hk.state("hoshikage-model@idle.service") == "inactive"
    status = json.loads(hk.hoshikage("status", "--json"))
    models = {m["name"]: m for m in status["models"]}
    assert models["kept"]["pinned"] and models["kept"]["preload"]
    assert models["kept"]["ttl_left_seconds"] is None
    assert models["plain"]["preload"] and not models["plain"]["pinned"]
    # the idle watch (every second here) stops the plain one at its TTL, never the pinned
    hk.wait_for("plain's idle stop", lambda: hk.state("hoshikage-model@plain.service")
                == "inactive", timeout=30)
    time.sleep(max(0.0, 4 - (time.monotonic() - began)))
    assert hk.state("hoshikage-model@kept.service") == "active"
    # once a boot: a router started again does not preload again
    c.systemctl("stop", "hoshikage.service")
    hk.chat("kept")
    time.sleep(2)
    assert hk.state("hoshikage-model@plain.service") == "inactive"


def check_lines(hk: Deployment, config: str) -> str:
    return hk.container.exec(str(hoshikage_bin()), "--config", config, "check",
                             check=False).stdout


def test_check_reads_the_keys_credential_through_the_router_units_load_credential(
        deploy_tiny: TinyDeployer) -> None:
    hk = deploy_tiny({"tiny": "ttl: 1h"})
    root = hk.container.root
    keyed = root / "etc/hoshikage/keyed.yaml"
    keyed.write_text((root / "etc/hoshikage/models.yaml").read_text()
                     + "api_keys: credential:api-keys\n")
    said = check_lines(hk, "/etc/hoshikage/keyed.yaml")
    assert "hoshikage.service has no LoadCredential=api-keys:FILE" in said, said
    (root / "etc/hoshikage/api-keys").write_text("short\n")
    dropin = root / "etc/systemd/system/hoshikage.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "keys.conf").write_text("[Service]\nLoadCredential=other:/etc/hostname\n"
                                      "LoadCredential=api-keys:/etc/hoshikage/api-keys\n")
    hk.container.systemctl("daemon-reload")
    said = check_lines(hk, "/etc/hoshikage/keyed.yaml")
    assert "/etc/hoshikage/api-keys:1: a key must have at least 8 characters" in said, said
    (root / "etc/hoshikage/api-keys").write_text("a-long-enough-key\n")
    assert "api_keys" not in check_lines(hk, "/etc/hoshikage/keyed.yaml")
