"""The router's load/unload API, a model's own --api-key, the "loading" word to streaming
clients, preload (across a real reboot of its container) and pin, under real systemd (issue
23). A container each, a few seconds to about fifteen."""

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
    # answered once the unit is down (README): a second unload finds nothing to stop
    assert (status, answer["status"]) == (200, "unloaded") and hk.state(tiny) == "inactive"
    assert post(hk, "/models/unload", {"model": "tiny"})[1]["status"] == "not loaded"
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


#: the preload models in the manifest's order, the order the router starts them in
PRELOADED = ("kept", "held", "plain")
#: the pinned ones' TTL (plain's is longer: when it runs out, theirs has too)
PINNED_TTL = 1.0


def this_boot(hk: Deployment, *matches: str) -> list[dict[str, Any]]:
    """This boot's journal entries (the journal is kept across the reboot)."""
    return hk.container.journal("-b", *matches)


def events(hk: Deployment, kind: str) -> dict[str, float]:
    """This boot's records of `kind`: model -> when (the last one's, seconds)."""
    return {e["HOSHIKAGE_MODEL"]: int(e["__REALTIME_TIMESTAMP"]) / 1e6
            for e in this_boot(hk, f"HOSHIKAGE_EVENT={kind}")}


def preloaded_and_pinned(hk: Deployment) -> None:
    """What a boot with hoshikage-preload.service enabled gives. Seen without a request
    until the TTL has done its work: a request would start the router (which preloads in the
    unit's place) and reset a model's idle clock."""
    hk.wait_for("the preload models to serve",
                lambda: set(PRELOADED) <= set(events(hk, "ready")), timeout=30)
    said = [e["MESSAGE"] for e in this_boot(hk, "-u", "hoshikage.service")]
    assert [m for m in said if m.endswith(": preloading (preload: true)")] == \
        [f"{name}: preloading (preload: true)" for name in PRELOADED], said
    assert "preloaded 3 of 3 model(s): kept, held, plain" in said, said
    for unit in ("hoshikage.socket", "hoshikage-preload.service", "hoshikage.service"):
        assert hk.state(unit) == "active", unit
    # The RAM disk is empty at boot, so each started on its source with its copy made
    # alongside (README "What stays in RAM, when"): the copies of the pinned two, which
    # stay, are on the RAM disk, a tmpfs mounted in this boot. `idle` is not started.
    for entry in this_boot(hk, "HOSHIKAGE_EVENT=ready"):
        assert entry["HOSHIKAGE_SERVED_FROM"] == f"/srv/models/{entry['HOSHIKAGE_MODEL']}.gguf"
    hk.wait_for("kept's and held's RAM-disk copies",
                lambda: {"kept", "held"} <= set(events(hk, "staged")))
    c = hk.container
    assert c.exec("findmnt", "-n", "-o", "FSTYPE", "/mnt/hoshikage").stdout.strip() == "tmpfs"
    on_ramdisk = c.exec("ls", "-A", "/mnt/hoshikage").stdout.split()
    assert {"kept.gguf", "held.gguf"} <= set(on_ramdisk), on_ramdisk
    assert "idle.gguf" not in on_ramdisk and "idle" not in events(hk, "ready")
    assert hk.state("hoshikage-model@idle.service") == "inactive"
    assert not hk.processes("idle.gguf")

    # The idle watch stops plain at its TTL, and only plain: the sweep that stopped it saw
    # kept and held idle past their own TTL (each has served since its ready record at the
    # latest, and nothing asked them since), so only their pins (the manifest's,
    # names.json's) kept them.
    hk.wait_for("plain's idle stop", lambda: "plain" in events(hk, "idle-stop"), timeout=30)
    stopped, ready = events(hk, "idle-stop"), events(hk, "ready")
    assert list(stopped) == ["plain"], stopped
    for name in ("kept", "held"):
        assert stopped["plain"] - ready[name] >= PINNED_TTL + 0.5, (name, stopped, ready)
        assert hk.state(f"hoshikage-model@{name}.service") == "active", name

    # and the router serves what the boot loaded: its health through the router, by the
    # llama-server the boot started (this request started none)
    pid = c.systemctl("show", "-P", "MainPID", "hoshikage-model@kept.service").strip()
    status, health = hk.request("GET", "/health?model=kept")
    assert status == 200 and health.get("status") == "ok", health
    assert c.systemctl("show", "-P", "MainPID", "hoshikage-model@kept.service").strip() == pid
    assert not loaded(hk, "idle")
    models = {m["name"]: m for m in json.loads(hk.hoshikage("status", "--json"))["models"]}
    for name in ("kept", "held"):
        assert models[name]["pinned"] and models[name]["preload"], models[name]
        assert models[name]["ttl_left_seconds"] is None, models[name]
    assert models["plain"]["preload"] and not models["plain"]["pinned"]


def test_preload_at_boot_and_a_pin_that_holds_against_the_ttl(
        deploy_tiny: TinyDeployer) -> None:
    hk = deploy_tiny({"kept": f"ttl: {PINNED_TTL:g}s\npreload: true\npinned: true",
                      "held": f"ttl: {PINNED_TTL:g}s\npreload: true",
                      "plain": "ttl: 3s\npreload: true",
                      "idle": "ttl: 2s"}, reboots=True, router_idle_exit="1h",
                     max_connections="5000")
    c = hk.container
    assert hk.state("hoshikage.service") == "inactive"  # the socket pulls nothing in
    # check: preload without its unit enabled, and limits past the router unit's
    checked = c.exec(str(hoshikage_bin()), "check", check=False)
    assert checked.returncode == 1
    assert "kept, held, plain: preload: true, but hoshikage-preload.service is disabled" \
        in checked.stdout, checked.stdout
    assert "above hoshikage.service's LimitNOFILE=4096" in checked.stdout
    # the admin enables it, as README says; held is pinned from the CLI (names.json)
    c.systemctl("enable", "hoshikage-preload.service")
    assert "preload" not in c.exec(str(hoshikage_bin()), "check", check=False).stdout
    hk.hoshikage("pin", "held")
    # what a boot does, first as multi-user.target would start the unit
    c.systemctl("start", "hoshikage-preload.service")
    preloaded_and_pinned(hk)
    # once a boot: a router started again does not preload again
    c.systemctl("stop", "hoshikage.service")
    hk.chat("kept")
    time.sleep(2)
    assert hk.state("hoshikage-model@plain.service") == "inactive"

    # then a real reboot: the same root (the enabled unit, names.json in /var/lib), a fresh
    # /run (no marker, an empty RAM disk) and the units ordered by systemd at boot
    c.reboot()
    preloaded_and_pinned(hk)


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
