"""星影パネル in a real browser (Debian's chromium, driven by Playwright for Python; nothing is
downloaded) against hoshikage under real systemd: one container for the module, its tests in
order (empty, a request from outside with its copy to the RAM disk, actions, keys, chat, a
failure, the idle release). Screenshots of the main states are its artifacts: in the run's
temporary directory, or where $HOSHIKAGE_PANEL_SHOTS says (docs/panel to refresh README's
pictures).

How fast the page follows: a MutationObserver in the page notes when each row's phase
changes (the browser's clock), and systemd's journal records say when the unit changed (the
same clock: the container's is the host's): the difference is what a person waits."""

from __future__ import annotations

import http.client
import json
import os
import re
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
#: big's file: tiny's GGUF with a hole after it (what llama-server reads is tiny's; the copy
#: to the RAM disk is all of it)
BIG_BYTES = 1 << 30
#: big's unit is slowed once up, so that the copy to the RAM disk it makes alongside while
#: serving, which the kernel makes (copy_file_range) and charges to the unit's CPU time,
#: takes seconds instead of a blink, long enough for the page's polls to see it move.
#: ExecStartPost= runs once the launcher says READY=1: a quarter of a CPU while the
#: activator takes over (its start is not slowed much), then, from the activator's running
#: record on, 2%. The second step waits in the background, so the unit is active as it would
#: be (the page shows no state of the test's making); a copy that begins before it lands
#: has the first step's pace, over a second for this size.
BIG_SLOWED = ("[Service]\nExecStartPost=+/bin/sh -c 'systemctl set-property --runtime %n "
              "CPUQuota=25%%; (until [ -e /run/hoshikage/running/%i.json ]; do sleep 0.05; "
              "done; systemctl set-property --runtime %n CPUQuota=2%%) &'\n")
#: how late the page may show a unit's change ("within about a second"): it asks every
#: 0.75 s (start to start, panel/serve.POLL_MS), so a change waits up to 0.75 s for the next
#: poll, plus that poll's answer and drawing, which get 0.75 s on this loaded 2-core machine
SHOWN_WITHIN = 1.5
#: the page's own record of when each row's phase changed: [model, phase, Unix time]
WATCH_PHASES = """() => { window.hkPhases = []; const last = {};
  new MutationObserver(() => {
    for (const tr of document.querySelectorAll("#model-rows tr")) {
      const m = tr.dataset.model, p = tr.dataset.phase;
      if (last[m] !== p) { last[m] = p; window.hkPhases.push([m, p, Date.now() / 1000]); }
    }
  }).observe(document.getElementById("model-rows"), {childList: true}); }"""


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
    shutil.copyfile(tiny_gguf, models / "big.gguf")
    os.truncate(models / "big.gguf", BIG_BYTES)
    text = manifest(llama_server_bin, {
        "tiny": f'aliases: [small]\nttl: {TTL:g}s\nargs: ["-c", "512"]',
        "other": 'tags: [chat]\nttl: 1h\nargs: ["-c", "512"]',
        "broken": "ttl: 1h",
        # a server that never says it serves: the unit stays starting (the "loading" shot)
        "slow": 'backend: command\ncommand: [/bin/sleep, "300"]\nttl: 1h',
        "big": 'ttl: 1h\nargs: ["-c", "512"]',
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
        big = root / "etc/systemd/system/hoshikage-model@big.service.d"
        big.mkdir(parents=True)
        (big / "slowed.conf").write_text(BIG_SLOWED)
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
        self.page.evaluate(WATCH_PHASES)

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

    def shown_after(self, model: str, phases: set[str], since: float) -> float:
        """Seconds from `since` (Unix time) until the page showed the model in one of
        `phases`; waits for it until SHOWN_WITHIN has passed, then fails."""
        while True:
            seen = self.page.evaluate("() => window.hkPhases")
            shown = [t for m, p, t in seen if m == model and p in phases and t >= since]
            if shown:
                return float(shown[0]) - since
            if time.time() > since + SHOWN_WITHIN + 1:
                raise AssertionError(f"the page did not show {model} {phases} within "
                                     f"{SHOWN_WITHIN} s of {since}: {seen}")
            self.page.wait_for_timeout(50)

    def answers(self) -> str:
        """How long the page's state requests took (the browser's own timing of them)."""
        took = sorted(self.page.evaluate("""() => performance.getEntriesByType("resource")
            .filter(e => e.name.endsWith("/api/state")).map(e => e.duration / 1000)"""))
        if not took:
            return "none"
        return (f"{len(took)}, median {took[len(took) // 2]:.3f} s, "
                f"the longest {', '.join(f'{t:.3f}' for t in took[-3:])} s")

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="module")
def panel(browser: Any, hk: Deployment, shots: Path) -> Iterator[Panel]:
    page = Panel(browser, hk, ANY_KEY, shots)
    yield page
    page.close()


#: systemd's records of a unit's jobs (their MESSAGE_ID=): it began to start, it serves, it
#: began to stop, it is down
UNIT_EVENTS = {"starting": "7d4958e842da4a758f6c1cdc7b36dcc5",
               "started": "39f53479d3a045ac8e11786248231fbf",
               "stopping": "de5b426a63be47a7b6ac3eaac82e2f6f",
               "stopped": "9d1aaa27d60140bd96365438aad20286"}


def changed_at(hk: Deployment, model: str, *events: str) -> list[float]:
    """When (Unix time) systemd said the model's unit changed, the latest time of each: its
    own journal records (the unit's timestamp properties go with the unit, which systemd
    unloads once it is down)."""
    ids = {UNIT_EVENTS[e]: e for e in events}
    latest: dict[str, float] = {}

    def found() -> bool:
        out = hk.container.exec("journalctl", "--output=json", "--no-pager",
                                f"UNIT=hoshikage-model@{model}.service",
                                *(f"MESSAGE_ID={i}" for i in ids)).stdout
        for line in out.splitlines():
            entry = json.loads(line)
            stamp = entry.get("_SOURCE_REALTIME_TIMESTAMP") or entry["__REALTIME_TIMESTAMP"]
            latest[ids[entry["MESSAGE_ID"]]] = int(stamp) / 1e6
        return len(latest) == len(events)

    hk.wait_for(f"systemd's records of {model}'s unit: {', '.join(events)}", found, 10)
    return [latest[e] for e in events]


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
    assert panel.rows() == ["tiny", "other", "broken", "slow", "big"]
    truth = {m["name"]: m for m in status_json(hk)["models"]}
    for name in panel.rows():
        assert panel.phase(name) == truth[name]["phase"] == "not-loaded"
    assert "small" in panel.page.inner_text('tr[data-model="tiny"]')
    assert "#chat" in panel.page.inner_text('tr[data-model="other"]')
    # MemAvailable before anything mounted the RAM disk (it was blank)
    assert " available of " in panel.page.inner_text("#memory-text")
    panel.shot("empty")
    assert not hk.processes("llama-server")
    assert panel.errors == []


def test_a_request_from_outside_shows_within_a_second(panel: Panel, hk: Deployment) -> None:
    answered: list[int] = []
    asked = time.time()
    caller = threading.Thread(target=lambda: answered.append(chat(hk, "big")[0]))
    caller.start()
    # it serves from its source at once; its copy to the RAM disk is made alongside, with
    # its progress and rate on the row and its bytes in the RAM disk's bar
    row = 'tr[data-model="big"]'
    panel.page.wait_for_function(f"""() => /copying to the RAM disk .+ of .+ \\(\\d+%\\), .+\\/s/
        .test(document.querySelector('{row} .detail')?.innerText || "")""", timeout=60_000)
    detail = panel.page.inner_text(f"{row} .detail")
    percent = re.search(r"\((\d+)%\)", detail)
    assert percent is not None and 0 < int(percent.group(1)) < 100, detail
    assert panel.page.query_selector(f'{row} [role="progressbar"]') is not None
    assert panel.page.query_selector("#ramdisk-bar .seg-copying") is not None
    panel.shot("staging")
    caller.join(60)
    assert answered == [200]
    # the page followed the unit: starting, then serving, each within about a second
    began, active = changed_at(hk, "big", "starting", "started")
    assert began >= asked
    # serving: the unit active (the launcher's READY=1) and the activator's running record
    # (its `since`), whichever came last
    served = max(active, {m["name"]: m for m in status_json(hk)["models"]}["big"]["since"])
    late = [panel.shown_after("big", {"staging", "loading", "serving"}, began),
            panel.shown_after("big", {"serving"}, served)]
    print(f"\nthe page showed big starting {late[0]:.2f} s and serving {late[1]:.2f} s after "
          f"systemd did; the state's answers: {panel.answers()}")
    assert max(late) < SHOWN_WITHIN, (late, panel.page.evaluate("() => window.hkPhases"))
    # the rest of the copy at full speed; once it is made, the RAM disk bar and the row
    # agree with status --json and df
    hk.container.systemctl("set-property", "--runtime", "hoshikage-model@big.service",
                           "CPUQuota=")
    hk.wait_for("big's RAM-disk copy", lambda: {m["name"]: m for m in status_json(hk)[
        "models"]}["big"]["staged_bytes"] == BIG_BYTES, 60)
    panel.page.wait_for_function(f"""() => !document.querySelector('{row} .progress')
        && document.querySelector('{row}').innerText.includes("RAM disk 1.00 GiB")""")
    bar = panel.page.query_selector("#ramdisk-bar")
    assert bar is not None
    used, size = (int(bar.get_attribute(a) or 0) for a in ("data-used-bytes", "data-size-bytes"))
    df = hk.container.exec("df", "-B1", "--output=used,size", "/mnt/hoshikage").stdout
    assert [used, size] == [int(v) for v in df.split()[-2:]], (used, size, df)
    truth = status_json(hk)["ramdisk"]
    assert (truth["used_bytes"], truth["size_bytes"]) == (used, size)
    assert panel.phase("big") == {m["name"]: m for m in status_json(hk)["models"]}[
        "big"]["phase"] == "serving"
    panel.shot("serving")
    assert panel.errors == []
    hk.container.systemctl("stop", "hoshikage-model@big.service")  # its RAM back


def test_actions_with_a_key_and_refusals(panel: Panel, hk: Deployment, browser: Any,
                                         shots: Path) -> None:
    page = panel.page
    # load from the page, with a double click: one load asked for
    loads: list[str] = []

    def seen(request: Any) -> None:
        if request.method == "POST" and request.url.endswith("/api/load"):
            loads.append(request.url)

    page.on("request", seen)
    page.dblclick('button[aria-label="load other"]')
    panel.wait_phase("other", {"serving"}, 30)
    page.remove_listener("request", seen)
    assert len(loads) == 1, loads
    assert hk.state("hoshikage-model@other.service") == "active"
    # the action's line follows the load to its end (it stayed "other: loading")
    page.wait_for_function("""() => document.getElementById("action-status").innerText
        === "other: serving" """, timeout=5_000)
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
    # a page whose own name now resolves to 127.0.0.1 (DNS rebinding): same-origin to the
    # browser, refused here by its name
    status, body = post(hk, "/panel/api/load", load, {
        **panel_headers, "Authorization": f"Bearer {ANY_KEY}",
        "Host": f"evil.example:{hk.port}", "Origin": f"http://evil.example:{hk.port}",
        "Sec-Fetch-Site": "same-origin"})
    assert status == 403 and body["error"]["code"] == "host_refused", body
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


def test_the_chat_box_streams_a_reply_and_stops_one(panel: Panel, hk: Deployment) -> None:
    page = panel.page
    page.select_option("#chat-model", "tiny")
    page.fill("#chat-input", "hello there")
    page.click("#chat-send")
    page.wait_for_selector('.msg.assistant[data-done="1"]', timeout=60_000)
    reply = page.inner_text(".msg.assistant")
    assert reply.strip() and "error" not in (page.get_attribute(
        ".msg.assistant", "class") or "")
    assert panel.errors == []
    assert page.is_hidden("#chat-stop")
    # a reply the reader stops: here, one whose model never comes up
    page.select_option("#chat-model", "slow")
    page.fill("#chat-input", "are you there")
    page.click("#chat-send")
    page.click("#chat-stop")
    stopped = '.msg.assistant[data-model="slow"][data-done="1"]'
    page.wait_for_selector(stopped, timeout=10_000)
    assert page.inner_text(stopped).strip() == "(stopped)"
    assert "error" not in (page.get_attribute(stopped, "class") or "")
    assert page.is_hidden("#chat-stop") and page.is_enabled("#chat-send")
    # the browser's own record of the request it gave up is the only one
    assert [e for e in panel.errors if "/v1/chat/completions" not in e] == [], panel.errors
    panel.errors.clear()
    hk.container.systemctl("stop", "hoshikage-model@slow.service")


def test_failed_and_loading_states_show_with_the_reason(panel: Panel, hk: Deployment,
                                                        browser: Any, shots: Path) -> None:
    status, body = chat(hk, "broken")
    assert status >= 500, body
    panel.wait_phase("broken", {"failed"}, 10)
    reason = panel.page.inner_text('tr[data-model="broken"] .detail.error')
    assert reason.strip()
    # at a phone's width, the failed badge stays one line high beside its reason's lines
    phone = Panel(browser, hk, ANY_KEY, shots, phone=True)
    try:
        phone.wait_phase("broken", {"failed"}, 10)
        heights = phone.page.evaluate("""() => Object.fromEntries([...document
            .querySelectorAll('#model-rows tr')].map(tr => [tr.dataset.model,
            tr.querySelector('.badge').getBoundingClientRect().height]))""")
        reason_height = phone.page.evaluate("""() => document.querySelector(
            'tr[data-model="broken"] .detail.error').getBoundingClientRect().height""")
        assert heights["broken"] <= heights["other"] + 3 < reason_height, (heights,
                                                                           reason_height)
    finally:
        phone.close()
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


def test_the_router_reads_only_hoshikage_s_records(hk: Deployment) -> None:
    """The router is not in the group systemd-journal: hoshikage-journal.socket's reader
    is, and it answers only a request line it checks (panel/journal.py)."""
    # an answer (401 without a key) means a router is up, whatever ran before
    assert hk.request("GET", "/v1/models")[0] == 401
    pid = hk.container.systemctl("show", "--property=MainPID", "--value",
                                 "hoshikage.service").strip()
    groups = next(line.split()[1:] for line in hk.container.exec(
        "cat", f"/proc/{pid}/status").stdout.splitlines() if line.startswith("Groups:"))
    journal_gid = hk.container.exec("getent", "group", "systemd-journal").stdout.split(":")[2]
    assert journal_gid not in groups, groups

    assert '"HOSHIKAGE_MODEL":"broken"' in ask_reader(hk, "events 5 broken\n").replace(" ", "")
    for bad in ("events 5 _SYSTEMD_UNIT=sshd.service\n", "everything 5\n", "unit 5\n",
                "events 99999\n"):
        assert ask_reader(hk, bad).strip() == "", bad


def ask_reader(hk: Deployment, line: str) -> str:
    """hoshikage-journal.socket's answer to `line`, asked as the router asks it."""
    return hk.container.exec(
        "python3", "-c", "import socket, sys; s = socket.socket(socket.AF_UNIX); "
        "s.connect('/run/hoshikage/.journal.sock'); s.sendall(sys.argv[1].encode()); "
        "s.shutdown(socket.SHUT_WR); print(s.makefile('rb').read().decode())",
        line).stdout


def test_a_reader_that_may_not_read_the_journal_says_so(hk: Deployment) -> None:
    """Without the group systemd-journal the reader finds no journal file it may open: the
    panel says why, rather than showing an empty list."""
    dropin = hk.container.root / "run/systemd/system/hoshikage-journal@.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "no-group.conf").write_text("[Service]\nSupplementaryGroups=\n")
    hk.container.systemctl("daemon-reload")
    try:
        answer = ask_reader(hk, "events 5\n")
        conn = http.client.HTTPConnection("127.0.0.1", hk.port, timeout=60)
        conn.request("GET", "/panel/api/journal?lines=5",
                     headers={"Authorization": f"Bearer {ANY_KEY}"})
        response = conn.getresponse()
        status, body = response.status, json.loads(response.read())
        conn.close()
    finally:
        (dropin / "no-group.conf").unlink()
        hk.container.systemctl("daemon-reload")
    assert "insufficient permissions" in answer, answer
    assert status == 200 and body["records"] == [], body
    assert body["problem"].startswith("hoshikage-journal@.service cannot read the journal: "), body
    assert ask_reader(hk, "events 5 broken\n").strip(), "the group back, records again"


def test_the_idle_release_comes_on_time_with_the_panel_open(panel: Panel,
                                                           hk: Deployment) -> None:
    assert chat(hk, "tiny")[0] == 200
    answered = time.monotonic()
    panel.wait_phase("tiny", {"serving"}, 5)
    waited = panel.wait_phase("tiny", {"not-loaded", "kept"}, TTL + 15)
    # released about when its TTL ran out (the idle timer fires every second)
    assert time.monotonic() - answered < TTL + 6, waited
    # ... and the page showed it stopping, then down, each within about a second
    stopped, down = changed_at(hk, "tiny", "stopping", "stopped")
    late = [panel.shown_after("tiny", {"stopping", "kept", "not-loaded"}, stopped),
            panel.shown_after("tiny", {"kept", "not-loaded"}, down)]
    print(f"\nthe page showed tiny stopping {late[0]:.2f} s and down {late[1]:.2f} s after "
          "systemd did")
    assert max(late) < SHOWN_WITHIN, (late, panel.page.evaluate("() => window.hkPhases"))
    hk.wait_for("the release record", lambda: bool(hk.events("released", "tiny")), 10)
    panel.page.wait_for_selector("#journal li .ev", timeout=10_000)
    assert "released" in panel.page.inner_text("#journal")
    # the panel's own cost meanwhile: the router's CPU time (its children's too: the
    # journal's reader) and memory over 5 s of polling
    pid = hk.container.systemctl("show", "--property=MainPID", "--value",
                                 "hoshikage.service").strip()
    assert pid not in ("", "0"), "the router exited with the panel open"

    def cpu_seconds() -> float:
        fields = hk.container.exec("cat", f"/proc/{pid}/stat").stdout.rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / 100  # utime, stime, cutime, cstime

    def everything() -> float:  # the container's cgroup: PID 1, the journal's readers, ...
        return int(hk.container.exec("cat", "/sys/fs/cgroup/cpuacct/cpuacct.usage").stdout) / 1e9

    before, before_all = cpu_seconds(), everything()
    panel.page.wait_for_timeout(5_000)
    cpu, cpu_all = cpu_seconds() - before, everything() - before_all
    rss = next(line.split()[1] for line in hk.container.exec(
        "cat", f"/proc/{pid}/status").stdout.splitlines() if line.startswith("VmRSS:"))
    print(f"\npanel open, nothing loaded, 5 s of polling: router CPU {cpu:.2f} s "
          f"(its children's included), RSS {int(rss) / 1024:.1f} MiB; the whole container "
          f"{cpu_all:.2f} s")
    assert cpu < 1.0 and cpu_all < 2.0
    assert panel.errors == []
