"""The web panel's logic without a browser: the state value (one model of state with
`status --json`), its checks against cross-site use and bad input, the journal's records, and
the router's /panel answers (which start nothing and keep nothing alive)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hoshikage_sd.commands import facts
from hoshikage_sd.manifest import names
from hoshikage_sd.panel import guard, journal
from hoshikage_sd.router import routes, server
from hoshikage_sd.router.proxy import Request, Response
from hoshikage_sd.sd import units

MANIFEST = """\
ramdisk: {tmp}/rd
runtime_dir: {tmp}/run
state_dir: {tmp}/state
llama_server: /bin/true
router_idle_exit: 1h
min_reload_seconds: 0
{extra}
models:
  tiny:
    path: {tmp}/tiny.gguf
    aliases: [small]
    ttl: 1h
  other:
    path: {tmp}/other.gguf
"""
PANEL = {"Content-Type": "application/json", "X-Hoshikage-Panel": "1"}
ANY_KEY = "sk-panel-test-any-0123456789"
TINY_KEY = "sk-panel-test-tiny-0123456789"


@pytest.fixture(autouse=True)
def units_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "units-runtime"))
    # no systemd here: nothing is up, and a start would be a bug
    monkeypatch.setattr(units, "active_model_units", lambda *a: [])

    def no_start(*args: object) -> None:
        raise AssertionError("the panel started a unit")

    monkeypatch.setattr(units, "start_unit", no_start)


def router_for(tmp: Path, extra: str = "") -> server.Router:
    (tmp / "tiny.gguf").write_bytes(b"GGUF" + bytes(60))
    path = tmp / "models.yaml"
    path.write_text(MANIFEST.format(tmp=tmp, extra=extra))
    return server.Router(server.load_config(path))


def request(method: str, target: str, body: object = None, headers: dict[str, str] | None = None,
            peer: str = "127.0.0.1") -> Request:
    data = json.dumps(body).encode() if body is not None else b""
    head = {"Host": "127.0.0.1:8080", **(headers or {})}
    return Request(method, target, "1.1", [(k.encode(), v.encode()) for k, v in head.items()],
                   data, peer=peer)


def answer(router: server.Router, req: Request) -> tuple[int, dict[str, str], Any]:
    result = asyncio.run(router.handle(req))
    assert isinstance(result, Response), result
    headers = {k.lower(): v for k, v in result.headers}
    is_json = headers.get("content-type", "").startswith("application/json")
    return result.status, headers, json.loads(result.body) if is_json else result.body


# -- pure checks ---------------------------------------------------------------------------

def header_of(headers: dict[str, str]) -> Any:
    low = {k.lower(): v for k, v in headers.items()}
    return lambda name: low.get(name.lower())


@pytest.mark.parametrize(("headers", "status"), [
    ({**PANEL, "Host": "h:1"}, None),
    ({**PANEL, "Host": "h:1", "Origin": "http://h:1", "Sec-Fetch-Site": "same-origin"}, None),
    ({**PANEL, "Host": "h:1", "Content-Type": "application/json; charset=utf-8"}, None),
    ({"X-Hoshikage-Panel": "1", "Host": "h:1"}, 415),
    ({"X-Hoshikage-Panel": "1", "Content-Type": "text/plain", "Host": "h:1"}, 415),
    ({"Content-Type": "application/json", "Host": "h:1"}, 403),
    ({**PANEL, "Host": "h:1", "Sec-Fetch-Site": "cross-site"}, 403),
    ({**PANEL, "Host": "h:1", "Sec-Fetch-Site": "same-site"}, 403),
    ({**PANEL, "Host": "h:1", "Origin": "http://evil.example"}, 403),
    ({**PANEL, "Host": "h:1", "Origin": "null"}, 403),
    ({**PANEL, "Origin": "http://h:1"}, 403),  # no Host to compare with
])
def test_actions_from_another_site_are_refused(headers: dict[str, str],
                                               status: int | None) -> None:
    refusal = guard.cross_site(header_of(headers))
    assert (refusal.status if refusal else None) == status


@pytest.mark.parametrize(("peer", "ok"), [
    ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.2", False), ("::ffff:10.0.0.2", False), ("fe80::1%eth0", False), ("", False),
])
def test_loopback(peer: str, ok: bool) -> None:
    assert guard.loopback(peer) is ok


@pytest.mark.parametrize(("kind", "body", "expected"), [
    ("load", b'{"model": "tiny"}', guard.Action("load", "tiny")),
    ("pin", b'{"model": "tiny", "pinned": false}', guard.Action("pin", "tiny", False)),
    ("load", b"", 400), ("load", b"{", 400), ("load", b"[1]", 400), ("load", b"{}", 400),
    ("load", b'{"model": 3}', 400), ("load", b'{"model": "../etc"}', 400),
    ("load", b'{"model": "tiny", "x": 1}', 400), ("unload", b'{"model": "a", "pinned": true}', 400),
    ("pin", b'{"model": "tiny"}', 400), ("pin", b'{"model": "tiny", "pinned": "yes"}', 400),
    ("start", b'{"model": "tiny"}', 404),
])
def test_action_bodies(kind: str, body: bytes, expected: object) -> None:
    got = guard.action(kind, body)
    assert (got.status if isinstance(got, guard.Refusal) else got) == expected


def test_journal_lines() -> None:
    assert guard.lines(None) == 50 and guard.lines("7") == 7
    for bad in ("0", "-1", "x", "501", "٣"):
        assert isinstance(guard.lines(bad), guard.Refusal)


@pytest.mark.parametrize(("state", "serving", "copying", "staged", "error", "phase"), [
    ("inactive", False, False, False, None, "not-loaded"),
    ("inactive", False, False, True, None, "kept"),
    ("inactive", False, False, False, "no room", "failed"),
    ("failed", False, False, False, None, "failed"),
    ("activating", False, True, False, None, "staging"),
    ("activating", False, False, False, None, "loading"),
    ("active", False, False, False, None, "loading"),
    ("active", True, True, False, None, "serving"),
    ("deactivating", False, False, True, None, "stopping"),
])
def test_phase(state: str, serving: bool, copying: bool, staged: bool, error: str | None,
               phase: str) -> None:
    assert facts.phase_of(state, serving, copying, staged, error) == phase
    assert phase in facts.PHASES


def test_journal_records_are_parsed_bytes_and_all() -> None:
    lines = [
        json.dumps({"__REALTIME_TIMESTAMP": "1700000000500000", "MESSAGE": "tiny released",
                    "HOSHIKAGE_EVENT": "released", "HOSHIKAGE_MODEL": "tiny", "PRIORITY": "6",
                    "_SYSTEMD_UNIT": "hoshikage-model@tiny.service"}),
        json.dumps({"__REALTIME_TIMESTAMP": "1700000000000000", "MESSAGE": [104, 105, 255],
                    "PRIORITY": "4"}),
        "not json", json.dumps([1, 2]),
    ]
    (first, second), problem = journal.parse("\n".join(lines))
    assert problem is None
    assert first == journal.Record(1700000000.5, "tiny released", "released", "tiny", 6,
                                   "hoshikage-model@tiny.service")
    assert second.message == "hi\ufffd" and second.event is None and second.priority == 4
    argv = journal.events_argv("tiny", 20)
    assert "--lines=20" in argv and "HOSHIKAGE_MODEL=tiny" in argv
    assert sum(a.startswith("MESSAGE_ID=") for a in argv) >= 10
    assert "HOSHIKAGE_MODEL=tiny" in journal.unit_argv("tiny", 5)


def test_the_reader_s_problem_line_is_the_problem_not_a_record() -> None:
    said = {journal.PROBLEM: "hoshikage-journal@.service cannot read the journal: No "
                             "journal files were opened due to insufficient permissions."}
    records, problem = journal.parse(json.dumps(said) + "\n")
    assert records == [] and problem == said[journal.PROBLEM]


def test_the_journal_reader_takes_only_a_request_line() -> None:
    """hoshikage-journal@.service's check (it is in the group systemd-journal, the router
    is not): what the router sends becomes one of this module's command lines, anything
    else none."""
    line = journal.request_line("events", "tiny", 20).decode()
    assert line == "events 20 tiny\n" and journal.argv_for(line) == journal.events_argv("tiny", 20)
    assert journal.argv_for("events 40") == journal.events_argv(None, 40)
    assert journal.argv_for("unit 100 tiny") == journal.unit_argv("tiny", 100)
    for bad in ("", "events", "unit 5", "events 0", "events 1001", "events -1", "events 5 a b",
                "events 5 _SYSTEMD_UNIT=sshd.service", "events 5 ../x", "all 5 tiny",
                "events ５ tiny", "events 5 -tiny"):
        assert journal.argv_for(bad) is None, bad


@contextlib.contextmanager
def journal_reader(tmp_path: Path, answer: bytes) -> Iterator[list[bytes]]:
    """hoshikage-journal.socket's reader, once: the request lines it was asked, `answer`
    its answer."""
    import socket
    import threading

    asked: list[bytes] = []
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / journal.SOCKET))
        listener.listen(1)

        def reader() -> None:
            conn, _ = listener.accept()
            with conn:
                asked.append(conn.makefile("rb").readline())
                conn.sendall(answer)

        thread = threading.Thread(target=reader)
        thread.start()
        yield asked
        thread.join(5)


def test_the_router_reads_the_records_from_the_reader_s_socket(tmp_path: Path) -> None:
    record = {"__REALTIME_TIMESTAMP": "1700000000000000", "MESSAGE": "tiny released",
              "HOSHIKAGE_EVENT": "released", "HOSHIKAGE_MODEL": "tiny"}
    with journal_reader(tmp_path, json.dumps(record).encode() + b"\n") as asked:
        found, problem = journal.read(tmp_path, "unit", "tiny", 7)
    assert asked == [b"unit 7 tiny\n"] and problem is None
    assert [(r.event, r.model) for r in found] == [("released", "tiny")]
    found, problem = journal.read(tmp_path, "events", None, 7)  # nobody listens now
    assert found == [] and problem is not None and "hoshikage-journal.socket" in problem


def test_a_failed_load_is_told_with_llama_server_s_own_error_lines(tmp_path: Path) -> None:
    """The unit's lines since the start, through the journal's reader: llama-server's
    errors, newest last; not an earlier start's, not hoshikage's own records."""
    unit = "hoshikage-model@tiny.service"

    def line(at: float, message: str, event: str | None = None) -> bytes:
        entry = {"__REALTIME_TIMESTAMP": str(int(at * 1e6)), "MESSAGE": message,
                 "_SYSTEMD_UNIT": unit, **({"HOSHIKAGE_EVENT": event} if event else {})}
        return json.dumps(entry).encode() + b"\n"

    newest_first = [line(1010, "tiny failed to start: llama-server exited", "start-failed"),
                    line(1009, "error: invalid argument: --no-such-flag"),
                    line(1008, "build: 1 (571d0d5)"),
                    line(1007, "main: error while handling argument"),
                    line(900, "error: an earlier start's")]
    with journal_reader(tmp_path, b"".join(newest_first)):
        said = journal.errors_said(tmp_path, "tiny", since=1000)
    assert said == "main: error while handling argument; error: invalid argument: --no-such-flag"


# -- the state value ---------------------------------------------------------------------------

def test_the_state_is_status_json_with_the_panels_facts(tmp_path: Path) -> None:
    router = router_for(tmp_path)
    data = facts.gather(router.config, set(), {"tiny": 2})
    assert [m["name"] for m in data["models"]] == ["tiny", "other"]
    tiny, other = data["models"]
    assert tiny["phase"] == "not-loaded" and tiny["aliases"] == ["small"]
    assert tiny["in_flight"] == 2 and other["in_flight"] == 0
    assert tiny["source_bytes"] == 64 and other["source_bytes"] is None
    assert other["estimate_bytes"] is None and not tiny["pinned"]
    assert set(data) >= {"ramdisk", "memory", "devices", "loaded", "counters"}


def test_a_copy_being_made_is_staging_with_its_bytes(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    router = router_for(tmp_path)
    ramdisk = router.config.ramdisk
    ramdisk.mkdir()
    (ramdisk / ".tiny.gguf.tmp-123-0").write_bytes(bytes(40))
    monkeypatch.setattr(facts, "unit_props", lambda unit: {
        "ActiveState": "activating", "MainPID": "77", "MemoryCurrent": "4096"})
    tiny = facts.gather(router.config, {"tiny"})["models"][0]
    assert (tiny["phase"], tiny["copying_bytes"], tiny["pid"]) == ("staging", 40, 77)
    assert tiny["memory_bytes"] == 4096 and tiny["llama_server_pid"] is None


def test_a_unit_failed_without_a_record_is_failed(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Its activator killed (a cgroup memory limit, say) before it could say why: systemd
    has the unit failed, and so do status and the panel (they said not-loaded)."""
    from hoshikage_sd.sd import units

    router = router_for(tmp_path)
    monkeypatch.setattr(units, "active_model_units",
                        lambda states=units.UP_STATES: ["tiny"] if states == ("failed",) else [])
    monkeypatch.setattr(units, "show", lambda unit, *props: {
        "Result": "signal", "ExecMainCode": "2", "ExecMainStatus": "9"})
    tiny, other = facts.gather(router.config, set())["models"]
    assert (tiny["phase"], other["phase"]) == ("failed", "not-loaded")
    assert tiny["error"] == ("its process was killed by a signal (SIGKILL) "
                             "(journalctl -u hoshikage-model@tiny.service)")


def test_a_stopped_model_s_last_request_is_from_the_usage_file(tmp_path: Path) -> None:
    """Its activity record went with its stop; the usage file keeps when it was used (status
    said LAST REQUEST never)."""
    from hoshikage_sd.stats import StatsFile

    router = router_for(tmp_path)
    usage = StatsFile(router.config.state_dir)
    usage.record_load("tiny")
    ended = time.time() + 5
    usage.record_stop("tiny", ended)
    tiny, other = facts.gather(router.config, set())["models"]
    assert tiny["last_request_end"] == pytest.approx(ended)
    assert other["last_request_end"] is None


def test_a_pin_lies_over_the_manifest(tmp_path: Path) -> None:
    router = router_for(tmp_path)
    config = router.config
    names.set_pinned(config, "small", True)  # by alias
    assert names.effective(config).models["tiny"].pinned
    names.set_pinned(config, "tiny", False)
    assert not names.effective(config).models["tiny"].pinned
    data, problems = names.parse({"pinned": {"tiny": "yes"}})
    assert data.pinned == {} and problems


# -- the router's answers ---------------------------------------------------------------------

def test_routes() -> None:
    for path in ("/panel", "/panel/", "/panel/api/state", "/panel/x"):
        assert routes.classify("GET", path, {}) == routes.Route.PANEL
    assert routes.classify("GET", "/panelx", {}) == routes.Route.NOT_FOUND


def test_the_page_and_its_state_start_nothing_and_keep_nothing_alive(tmp_path: Path) -> None:
    router = router_for(tmp_path)
    router.lifecycle.last_activity = 0.0
    code, headers, body = answer(router, request("GET", "/panel/"))
    assert code == 200 and headers["content-type"].startswith("text/html")
    assert "星影パネル" in body.decode() and "script-src 'self'" in headers[
        "content-security-policy"]
    for name in ("panel.css", "panel.js", "icon.svg"):
        assert answer(router, request("GET", f"/panel/{name}"))[0] == 200
    assert answer(router, request("GET", "/panel"))[:2][0] == 308
    for bad in ("/panel/../README.md", "/panel/index.html", "/panel/static/panel.js"):
        assert answer(router, request("GET", bad))[0] == 404
    code, _, data = answer(router, request("GET", "/panel/api/state"))
    assert code == 200 and data["panel"]["may_act"] and not data["panel"]["keys"]
    assert [m["name"] for m in data["models"]] == ["tiny", "other"]
    code, _, data = answer(router, request("GET", "/panel/api/state", peer="10.1.1.1"))
    assert code == 200 and not data["panel"]["may_act"]
    assert answer(router, request("GET", "/panel/api/nope"))[0] == 404
    assert answer(router, request("DELETE", "/panel/api/state"))[0] == 405
    assert answer(router, request("GET", "/panel/api/load"))[0] == 405
    assert answer(router, request("GET", "/panel/api/logs"))[0] == 400
    assert answer(router, request("GET", "/panel/api/journal?model=nope"))[0] == 404
    assert answer(router, request("GET", "/panel/api/journal?model=a%2F..%2Fb"))[0] == 400
    assert answer(router, request("GET", "/panel/api/journal?lines=9999"))[0] == 400
    # no activity, no count: an open panel must not keep the router (or a model) up
    assert router.lifecycle.last_activity == 0.0
    assert router.starting == {} and router.ready == set()
    assert "hoshikage_requests_total{" not in router.metrics.render().decode()


def test_actions_are_refused_cross_site_from_afar_and_for_bad_input(tmp_path: Path) -> None:
    router = router_for(tmp_path)
    load = {"model": "tiny"}
    cases = [
        (request("POST", "/panel/api/load", load, {"Content-Type": "application/json"}), 403),
        (request("POST", "/panel/api/load", load, {**PANEL, "Origin": "http://evil.example"}),
         403),
        (request("POST", "/panel/api/load", load, {**PANEL, "Sec-Fetch-Site": "cross-site"}),
         403),
        (request("POST", "/panel/api/load", load, PANEL, peer="192.168.1.9"), 403),
        (request("POST", "/panel/api/load", {"model": "nope"}, PANEL), 404),
        (request("POST", "/panel/api/load", {"model": "a b"}, PANEL), 400),
        (request("POST", "/panel/api/restart", load, PANEL), 404),
        (request("POST", "/panel/api/pin", load, PANEL), 400),
    ]
    for req, code in cases:
        got, _, body = answer(router, req)
        assert got == code, (req.target, req.headers, body)
        assert body["error"]["message"]
    assert router.starting == {} and router.ready == set()
    got, _, body = answer(router, request("POST", "/panel/api/unload", load, PANEL))
    assert got == 200 and body == {"model": "tiny", "unloaded": False}
    got, _, body = answer(router, request(
        "POST", "/panel/api/pin", {"model": "tiny", "pinned": True},
        {**PANEL, "Origin": "http://127.0.0.1:8080", "Sec-Fetch-Site": "same-origin"}))
    assert got == 200 and router.config.models["tiny"].pinned


def test_with_keys_a_key_sees_and_acts_on_its_models_only(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"{ANY_KEY}\n{TINY_KEY}: small\n")
    router = router_for(tmp_path, f"api_keys: {keys}")
    assert answer(router, request("GET", "/panel/"))[0] == 200  # the page asks for the key
    assert answer(router, request("GET", "/panel/api/state"))[0] == 401
    code, _, data = answer(router, request("GET", "/panel/api/state",
                                           headers={"Authorization": f"Bearer {TINY_KEY}"}))
    assert code == 200 and [m["name"] for m in data["models"]] == ["tiny"]
    assert "counters" not in data and data["panel"]["keys"]
    code, _, data = answer(router, request("GET", "/panel/api/state", peer="10.0.0.1",
                                           headers={"x-api-key": ANY_KEY}))
    assert code == 200 and len(data["models"]) == 2 and data["panel"]["may_act"]
    assert answer(router, request("GET", "/panel/api/journal?model=other",
                                  headers={"Authorization": f"Bearer {TINY_KEY}"}))[0] == 404
    pin = {"model": "other", "pinned": True}
    assert answer(router, request("POST", "/panel/api/pin", pin, PANEL))[0] == 401
    assert answer(router, request("POST", "/panel/api/pin", pin,
                                  {**PANEL, "Authorization": f"Bearer {TINY_KEY}"}))[0] == 403
    assert answer(router, request("POST", "/panel/api/pin", pin,
                                  {**PANEL, "Authorization": f"Bearer {ANY_KEY}"},
                                  peer="10.0.0.1"))[0] == 200
    assert router.config.models["other"].pinned


def test_the_page_ships_in_the_package() -> None:
    """Every file the router serves is package data (pyproject), so the wheel and the
    Debian package (pybuild) carry it."""
    import tomllib

    from hoshikage_sd.panel import serve

    root = Path(serve.__file__).parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())
    assert data["tool"]["setuptools"]["package-data"]["hoshikage_sd.panel"] == ["static/*"]
    shipped = {p.name for p in serve.STATIC_DIR.iterdir()}
    assert {name for name, _ in serve.STATIC.values()} == shipped
    for name in shipped:  # nothing fetched from elsewhere
        text = (serve.STATIC_DIR / name).read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text and "@import" not in text and "@font-face" not in text
