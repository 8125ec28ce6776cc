"""星影パネル in a real browser (Debian's chromium, driven by Playwright for Python; nothing is
downloaded) against hoshikage under real systemd: one container for the module, its tests in
order (empty, a request from outside, actions, keys, chat, a failure, the idle release).
Screenshots of the main states are its artifacts: in the run's temporary directory, or where
$HOSHIKAGE_PANEL_SHOTS says (docs/panel to refresh README's pictures)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import REPO_ROOT
from testbed.container import unavailable_reason
from testbed.deploy import Deployment, deploy, manifest
from tests.containers import made_for, unique_name
from tests.support import unavailable

pytestmark = pytest.mark.system

CHROMIUM = "/usr/bin/chromium"
ANY_KEY = "sk-panel-system-any-0123456789"
TINY_KEY = "sk-panel-system-tiny-0123456789"
KEY_ITEM = "hoshikage-panel-key"
TTL = 4.0  # tiny's: its idle release comes while the panel is open


@pytest.fixture(scope="module")
def hk(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
       tiny_gguf: Path, llama_server_bin: Path) -> Iterator[Deployment]:
    reason = unavailable_reason()
    if reason:
        unavailable(reason)
    if not Path(CHROMIUM).exists():
        unavailable(f"{CHROMIUM} missing: apt install chromium (tools/bootstrap.sh)")
    models = tmp_path_factory.mktemp("panel") / "models"  # mktemp's own is 0700
    models.mkdir()
    shutil.copyfile(tiny_gguf, models / "tiny.gguf")
    shutil.copyfile(tiny_gguf, models / "other.gguf")
    (models / "broken.gguf").write_bytes(b"GGUF" + b"\xff" * 4096)  # a header no one reads
    shutil.copyfile(tiny_gguf, models / "slow.gguf")
    text = manifest(llama_server_bin, {
        "tiny": f'aliases: [small]\nttl: {TTL:g}s\nargs: ["-c", "512"]',
        "other": 'tags: [chat]\nttl: 1h\nargs: ["-c", "512"]',
        "broken": "ttl: 1h",
        # a server that never says it serves: the unit stays starting (the "loading" shot)
        "slow": 'backend: command\ncommand: [/bin/sleep, "300"]\nttl: 1h',
    }, router_idle_exit="1h", min_reload_seconds="0", api_keys="credential:api-keys")
    with made_for(request) as boot:
        deployment = deploy(lambda binds=(), **_: boot(unique_name("panel"), binds, 60),
                            models, text)
        root = deployment.container.root
        keys = root / "etc/hoshikage/api-keys"
        keys.write_text(f"{ANY_KEY}\n{TINY_KEY}: small\n")
        keys.chmod(0o600)
        dropin = root / "etc/systemd/system/hoshikage.service.d"
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / "api-keys.conf").write_text(
            "[Service]\nLoadCredential=api-keys:/etc/hoshikage/api-keys\n")
        deployment.container.systemctl("daemon-reload")
        yield deployment


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots go (the tree's docs/panel only when asked for)."""
    chosen = os.environ.get("HOSHIKAGE_PANEL_SHOTS")
    path = REPO_ROOT / chosen if chosen else tmp_path_factory.mktemp("panel-shots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


class Panel:
    """One open panel page, with what went wrong on it."""

    def __init__(self, browser: Any, hk: Deployment, key: str | None, shots: Path,
                 origin: str = "127.0.0.1", phone: bool = False) -> None:
        self.shots = shots
        # a laptop in light mode, or a phone in dark mode
        self.context = browser.new_context(
            viewport={"width": 390, "height": 844} if phone else {"width": 1280, "height": 900},
            color_scheme="dark" if phone else "light")
        if key is not None:
            self.context.add_init_script(
                f"sessionStorage.setItem({json.dumps(KEY_ITEM)}, {json.dumps(key)})")
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text)
                     if m.type == "error" else None)
        self.page.on("requestfailed", lambda r: self.errors.append(f"failed: {r.url}"))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.url = f"http://{origin}:{hk.port}/panel/"
        self.page.goto(self.url)
        try:
            self.page.wait_for_selector("#model-rows tr", timeout=10_000)
        except Exception as exc:
            journal = hk.container.exec("journalctl", "-u", "hoshikage.service", "-n", "40",
                                        "--no-pager", check=False).stdout
            raise AssertionError(f"no model rows: {self.errors}; the router's journal:\n"
                                 f"{journal}") from exc

    def phase(self, model: str) -> str | None:
        row = self.page.query_selector(f'tr[data-model="{model}"]')
        return None if row is None else row.get_attribute("data-phase")

    def rows(self) -> list[str]:
        return [r.get_attribute("data-model")
                for r in self.page.query_selector_all("#model-rows tr")]

    def wait_phase(self, model: str, phases: set[str], timeout: float) -> float:
        """Seconds until the page shows the model in one of `phases`."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if self.phase(model) in phases:
                return time.monotonic() - began
            self.page.wait_for_timeout(50)
        raise AssertionError(f"{model} not {phases} on the page after {timeout} s: "
                             f"{self.phase(model)}")

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="module")
def panel(browser: Any, hk: Deployment, shots: Path) -> Iterator[Panel]:
    page = Panel(browser, hk, ANY_KEY, shots)
    yield page
    page.close()


def status_json(hk: Deployment) -> dict[str, Any]:
    return json.loads(hk.hoshikage("status", "--json"))  # type: ignore[no-any-return]


def post(hk: Deployment, path: str, body: object, headers: dict[str, str]
         ) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", hk.port, timeout=60)
    conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
    response = conn.getresponse()
    data = json.loads(response.read() or b"null")
    conn.close()
    return response.status, data


def chat(hk: Deployment, model: str, key: str = ANY_KEY) -> tuple[int, Any]:
    return post(hk, "/v1/chat/completions",
                {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
                {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})


def test_the_empty_panel_matches_status(panel: Panel, hk: Deployment) -> None:
    assert panel.rows() == ["tiny", "other", "broken", "slow"]
    truth = {m["name"]: m for m in status_json(hk)["models"]}
    for name in panel.rows():
        assert panel.phase(name) == truth[name]["phase"] == "not-loaded"
    assert "small" in panel.page.inner_text('tr[data-model="tiny"]')
    assert "#chat" in panel.page.inner_text('tr[data-model="other"]')
    panel.shot("empty")
    assert not hk.processes("llama-server")
    assert panel.errors == []


def test_a_request_from_outside_shows_within_a_second(panel: Panel, hk: Deployment) -> None:
    answered: list[float] = []
    began = time.monotonic()
    caller = threading.Thread(target=lambda: answered.append(
        (chat(hk, "tiny")[0], time.monotonic())[1]))
    caller.start()
    seen = panel.wait_phase("tiny", {"staging", "loading", "serving"}, 5)
    panel.wait_phase("tiny", {"serving"}, 5)
    caller.join(60)
    assert answered, "the request was not answered"
    shown = began + seen
    # the page shows it starting or serving within about a second of the unit's start
    assert time.monotonic() - answered[0] < 2.5 and shown - began < 3.0
    # the RAM disk bar and the row agree with status --json and df, once the copy is made
    hk.wait_for("tiny's RAM-disk copy", lambda: bool(status_json(hk)["models"][0][
        "staged_bytes"]), 20)
    panel.page.wait_for_timeout(1200)
    bar = panel.page.query_selector("#ramdisk-bar")
    assert bar is not None
    used, size = (int(bar.get_attribute(a) or 0) for a in ("data-used-bytes", "data-size-bytes"))
    df = hk.container.exec("df", "-B1", "--output=used,size", "/mnt/hoshikage").stdout
    assert [used, size] == [int(v) for v in df.split()[-2:]], (used, size, df)
    truth = status_json(hk)["ramdisk"]
    assert (truth["used_bytes"], truth["size_bytes"]) == (used, size)
    assert panel.phase("tiny") == status_json(hk)["models"][0]["phase"] == "serving"
    panel.shot("serving")
    assert panel.errors == []


def test_actions_with_a_key_and_refusals(panel: Panel, hk: Deployment, browser: Any,
                                         shots: Path) -> None:
    page = panel.page
    # load from the page
    page.click('button[aria-label="load other"]')
    panel.wait_phase("other", {"serving"}, 30)
    assert hk.state("hoshikage-model@other.service") == "active"
    # pin from the page: the manifest's model is pinned for every reader (status --json)
    page.click('button[aria-label="pin other"]')
    page.wait_for_selector('tr[data-model="other"] .chip.pin')
    assert {m["name"]: m["pinned"] for m in status_json(hk)["models"]}["other"] is True
    page.click('button[aria-label="unpin other"]')
    page.wait_for_selector('button[aria-label="pin other"]')
    # unload from the page
    page.click('button[aria-label="unload other"]')
    panel.wait_phase("other", {"not-loaded", "kept"}, 30)
    assert hk.state("hoshikage-model@other.service") == "inactive"
    assert panel.errors == []

    load = {"model": "other"}
    panel_headers = {"Content-Type": "application/json", "X-Hoshikage-Panel": "1"}
    # without a key
    assert post(hk, "/panel/api/load", load, panel_headers)[0] == 401
    # with a key, from another origin (a page elsewhere posting here)
    status, body = post(hk, "/panel/api/load", load, {
        **panel_headers, "Authorization": f"Bearer {ANY_KEY}", "Origin": "http://evil.example",
        "Sec-Fetch-Site": "cross-site"})
    assert status == 403 and body["error"]["code"] == "cross_site"
    # ... and a real cross-origin page: its preflight is not granted, the browser refuses
    other = Panel(browser, hk, ANY_KEY, shots, origin="localhost")
    outcome = other.page.evaluate(
        """async ([url, key]) => { try { const r = await fetch(url, {method: "POST",
             headers: {"Content-Type": "application/json", "X-Hoshikage-Panel": "1",
                       "Authorization": "Bearer " + key}, body: '{"model": "other"}'});
             return "status " + r.status; } catch (e) { return "refused"; } }""",
        [f"http://127.0.0.1:{hk.port}/panel/api/load", ANY_KEY])
    other.close()
    assert outcome == "refused"
    time.sleep(0.5)
    assert hk.state("hoshikage-model@other.service") == "inactive"


def test_a_key_limited_to_one_model_sees_only_it(browser: Any, hk: Deployment,
                                                 shots: Path) -> None:
    limited = Panel(browser, hk, TINY_KEY, shots, phone=True)
    try:
        assert limited.rows() == ["tiny"]
        limited.shot("phone-dark")
        status, body = post(hk, "/panel/api/load", {"model": "other"}, {
            "Content-Type": "application/json", "X-Hoshikage-Panel": "1",
            "Authorization": f"Bearer {TINY_KEY}"})
        assert status == 403, body
        assert limited.errors == []
    finally:
        limited.close()


def test_the_chat_box_streams_a_reply(panel: Panel) -> None:
    page = panel.page
    page.select_option("#chat-model", "tiny")
    page.fill("#chat-input", "hello there")
    page.click("#chat-send")
    page.wait_for_selector('.msg.assistant[data-done="1"]', timeout=60_000)
    reply = page.inner_text(".msg.assistant")
    assert reply.strip() and "error" not in (page.get_attribute(
        ".msg.assistant", "class") or "")
    assert panel.errors == []


def test_failed_and_loading_states_show_with_the_reason(panel: Panel, hk: Deployment) -> None:
    status, body = chat(hk, "broken")
    assert status >= 500, body
    panel.wait_phase("broken", {"failed"}, 10)
    reason = panel.page.inner_text('tr[data-model="broken"] .detail.error')
    assert reason.strip()
    assert {m["name"]: m["phase"] for m in status_json(hk)["models"]}["broken"] == "failed"
    # its unit's own lines on demand (what `hoshikage logs broken` shows)
    page = panel.page
    page.select_option("#journal-model", "broken")
    page.check("#journal-unit")
    page.wait_for_function("""() => [...document.querySelectorAll('#journal li')]
        .some(li => !li.querySelector('.ev') && li.innerText.includes('broken'))""")
    page.uncheck("#journal-unit")
    page.select_option("#journal-model", "")
    threading.Thread(target=lambda: chat(hk, "slow"), daemon=True).start()
    panel.wait_phase("slow", {"loading", "staging"}, 10)
    panel.shot("failed-and-loading")
    hk.container.systemctl("stop", "hoshikage-model@slow.service")


def test_the_idle_release_comes_on_time_with_the_panel_open(panel: Panel,
                                                           hk: Deployment) -> None:
    assert chat(hk, "tiny")[0] == 200
    answered = time.monotonic()
    panel.wait_phase("tiny", {"serving"}, 5)
    waited = panel.wait_phase("tiny", {"not-loaded", "kept"}, TTL + 15)
    # released about when its TTL ran out (the idle timer fires every second)
    assert time.monotonic() - answered < TTL + 6, waited
    hk.wait_for("the release record", lambda: bool(hk.events("released", "tiny")), 10)
    panel.page.wait_for_selector("#journal li .ev", timeout=10_000)
    assert "released" in panel.page.inner_text("#journal")
    # the panel's own cost meanwhile: the router's CPU time and memory over 10 s of polling
    pid = hk.container.systemctl("show", "--property=MainPID", "--value",
                                 "hoshikage.service").strip()
    assert pid not in ("", "0"), "the router exited with the panel open"

    def cpu_seconds() -> float:
        fields = hk.container.exec("cat", f"/proc/{pid}/stat").stdout.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in USER_HZ

    before = cpu_seconds()
    panel.page.wait_for_timeout(10_000)
    cpu = cpu_seconds() - before
    rss = next(line.split()[1] for line in hk.container.exec(
        "cat", f"/proc/{pid}/status").stdout.splitlines() if line.startswith("VmRSS:"))
    print(f"\npanel open, nothing loaded, 10 s of polling: router CPU {cpu:.2f} s, "
          f"RSS {int(rss) / 1024:.1f} MiB")
    assert cpu < 2.0
    assert panel.errors == []
