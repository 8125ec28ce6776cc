"""The pure logic of the router, the release step and the runtime state files."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hoshikage_sd import protocol
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.model_unit.release import reason_for
from hoshikage_sd.router.headstart import request as waking
from hoshikage_sd.router.headstart.request import NotAName, model_name_of
from hoshikage_sd.router.server import Announcements
from hoshikage_sd.runtime import Activity, Running, Runtime, estimate_key, write_atomic

# -- router.model_name_of ------------------------------------------------------------------


def test_model_from_json_body() -> None:
    body = json.dumps({"model": "gemma", "messages": [{"role": "user", "content": "hi"}]})
    assert model_name_of(body.encode(), {}) == "gemma"


def test_json_body_wins_over_query() -> None:
    assert model_name_of(b'{"model": "gemma"}', {"model": "qwen"}) == "gemma"


def test_query_fallback_when_body_names_no_model() -> None:
    assert model_name_of(b'{"prompt": "hi"}', {"model": "qwen"}) == "qwen"
    assert model_name_of(b'{"model": null}', {"model": "qwen"}) == "qwen"


def test_no_model_anywhere() -> None:
    assert model_name_of(b'{"prompt": "hi"}', {}) is None


@pytest.mark.parametrize("body", [b'{"model": 5}', b'{"model": ["a"]}', b'{"model": true}'])
def test_a_model_of_another_type_is_the_client_s_mistake(body: bytes) -> None:
    """Not the query's model, nor the default: a 400 (router/server.forward)."""
    with pytest.raises(NotAName):
        model_name_of(body, {"model": "qwen"})


@pytest.mark.parametrize("body", [b"", b"   ", b"\n\t \r\n"])
def test_empty_body(body: bytes) -> None:
    assert model_name_of(body, {}) is None
    assert model_name_of(body, {"model": "tiny"}) == "tiny"


@pytest.mark.parametrize("body", [b'["gemma"]', b'"gemma"', b"42", b"null", b"true"])
def test_json_that_is_not_an_object(body: bytes) -> None:
    assert model_name_of(body, {}) is None
    assert model_name_of(body, {"model": "tiny"}) == "tiny"


@pytest.mark.parametrize("body", [b"{", b'{"model": "gemma"', b"model=gemma", b"\xff\xfe{",
                                  b'{"model": "gemma"} trailing'])
def test_malformed_json_raises_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        model_name_of(body, {"model": "tiny"})


def test_unicode_model_name() -> None:
    assert model_name_of('{"model": "日本語"}'.encode(), {}) == "日本語"


# -- router.Announcements ------------------------------------------------------------------


def test_a_unit_announcing_its_model_wakes_the_start_waiting_for_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        (tmp_path / protocol.ROUTER_SOCKET).write_text("a router before this one's")
        announcements = Announcements(tmp_path)
        announcements.open()
        assert announcements.listening
        socket_file = tmp_path / protocol.ROUTER_SOCKET
        assert stat.S_ISSOCK(socket_file.stat().st_mode)
        assert stat.S_IMODE(socket_file.stat().st_mode) == 0o600
        tiny, other = announcements.expect("tiny"), announcements.expect("other")
        assert protocol.tell_router(str(tmp_path), "nobody-waits")  # ignored
        assert protocol.tell_router(str(tmp_path), "tiny")
        await asyncio.wait_for(tiny.wait(), 2)
        assert not other.is_set()
        assert not announcements.expect("tiny").is_set()  # the next start waits afresh
        announcements.close()
        assert not socket_file.exists()
        assert not protocol.tell_router(str(tmp_path), "tiny")  # nobody listens: no error

    asyncio.run(scenario())


def test_without_a_runtime_directory_the_router_probes_instead(tmp_path: Path) -> None:
    async def scenario() -> None:
        (tmp_path / "file").write_text("")
        announcements = Announcements(tmp_path / "file" / "run")
        announcements.open()
        assert not announcements.listening
        announcements.close()

    asyncio.run(scenario())


# -- release.reason_for ----------------------------------------------------------------------

def test_reason_manual_stop() -> None:
    assert reason_for(None, None, None, None) == "manual stop"
    assert reason_for(None, "success", "exited", "0") == "manual stop"
    assert reason_for(None, "", None, None) == "manual stop"


def test_reason_idle_marker() -> None:
    assert reason_for("idle", None, None, None) == "idle"
    assert reason_for("idle", "success", "killed", "TERM") == "idle"


def test_reason_failure_with_exit_code_and_status() -> None:
    assert reason_for(None, "exit-code", "exited", "1") == "failure: exit-code (exited=1)"
    assert reason_for(None, "signal", "killed", "KILL") == "failure: signal (killed=KILL)"


def test_reason_failure_without_exit_details() -> None:
    assert reason_for(None, "timeout", None, None) == "failure: timeout"
    assert reason_for(None, "resources", "", "") == "failure: resources"


def test_reason_failure_wins_over_idle_marker() -> None:
    assert reason_for("idle", "oom-kill", "killed", "KILL") == "failure: oom-kill (killed=KILL)"


# -- state.Runtime ---------------------------------------------------------------------------

def test_activity_round_trip(tmp_path: Path) -> None:
    rt = Runtime(tmp_path / "run")
    assert rt.activity("tiny") is None
    activity = Activity(in_flight=2, last_end=1700000000.25, router_pid=4242)
    rt.set_activity("tiny", activity)
    assert rt.activity("tiny") == activity
    assert (tmp_path / "run" / "activity" / "tiny.json").is_file()
    assert rt.activity("other") is None
    rt.set_activity("tiny", Activity(0, 1700000001.5))
    assert rt.activity("tiny") == Activity(0, 1700000001.5, 0)


def test_running_round_trip(tmp_path: Path) -> None:
    rt = Runtime(tmp_path)
    running = Running(pid=123, staged="/mnt/hoshikage/tiny.gguf", started=1700000000.5)
    rt.set_running("qwen3:8b", running)
    assert rt.running("qwen3:8b") == running
    assert rt.running("tiny") is None


def test_error_and_stop_reason_round_trip(tmp_path: Path) -> None:
    rt = Runtime(tmp_path)
    assert rt.error("tiny") is None
    assert rt.stop_reason("tiny") is None
    rt.set_error("tiny", "model 'tiny' needs 4.0 GiB but only 1.0 GiB is free")
    rt.set_stop_reason("tiny", "idle")
    assert rt.error("tiny") == "model 'tiny' needs 4.0 GiB but only 1.0 GiB is free"
    assert rt.stop_reason("tiny") == "idle"


def test_clear(tmp_path: Path) -> None:
    rt = Runtime(tmp_path)
    rt.set_stop_reason("tiny", "idle")
    rt.set_stop_reason("big", "idle")
    rt.clear("stop", "tiny")
    assert rt.stop_reason("tiny") is None
    assert rt.stop_reason("big") == "idle"
    rt.clear("stop", "tiny")  # idempotent
    rt.clear("running", "never-written")


@pytest.mark.parametrize("text", ["", "{", "not json", "[1, 2]", '"idle"', "null",
                                  '{"in_flight": 1}', '{"in_flight": 1, "last_end": 2, "x": 3}'])
def test_corrupt_state_reads_as_none(tmp_path: Path, text: str) -> None:
    rt = Runtime(tmp_path)
    for kind in ("activity", "running"):
        (tmp_path / kind).mkdir(exist_ok=True)
        (tmp_path / kind / "tiny.json").write_text(text)
    assert rt.activity("tiny") is None
    assert rt.running("tiny") is None


def test_corrupt_error_file_reads_as_none(tmp_path: Path) -> None:
    rt = Runtime(tmp_path)
    (tmp_path / "error").mkdir()
    (tmp_path / "error" / "tiny.json").write_bytes(b"\xff\x00garbage")
    assert rt.error("tiny") is None


def test_write_atomic_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "dir" / "state.json"  # parents created on demand
    write_atomic(target, '{"a": 1}')
    write_atomic(target, '{"a": 2}')
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_runtime_writes_leave_no_temp_files(tmp_path: Path) -> None:
    rt = Runtime(tmp_path)
    for i in range(3):
        rt.set_activity("tiny", Activity(i, float(i), 1))
        rt.set_running("tiny", Running(i, "/x", float(i)))
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["activity/tiny.json", "running/tiny.json"]


def test_write_atomic_replaces_not_rewrites(tmp_path: Path) -> None:
    """A reader holding the old file keeps seeing a whole old version."""
    target = tmp_path / "state.json"
    write_atomic(target, "old")
    with open(target) as reader:
        write_atomic(target, "new")
        assert reader.read() == "old"
    assert target.read_text() == "new"


# -- first_request: the request that woke the router, peeked at before the router loads -----

CHAT = (b"POST /v1/chat/completions?x=1&model=q HTTP/1.1\r\nHost: h\r\n"
        b"Content-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"model\": \"tiny\"}")


def test_first_request_parse_takes_only_whole_requests() -> None:
    assert waking.parse(CHAT) == ("POST", "/v1/chat/completions", {"x": "1", "model": "q"},
                                         b'{"model": "tiny"}')
    assert waking.parse(CHAT[:40]) is None  # head not complete
    assert waking.parse(CHAT[:-1]) is None  # body not complete
    chunked = b"POST /completion HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    assert waking.parse(chunked) is None
    assert waking.parse(b"GET /v1/models HTTP/1.1\r\n\r\n") == ("GET", "/v1/models",
                                                                         {}, b"")
    assert waking.parse(b"nonsense\r\n\r\n") is None
    assert waking.parse(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n") is None


@pytest.mark.parametrize(("method", "path", "query", "expected"), [
    ("POST", "/v1/chat/completions", {}, True), ("GET", "/props", {"model": "a"}, True),
    ("GET", "/v1/models", {}, False), ("GET", "/health", {}, False),
    ("GET", "/health", {"model": "a"}, True), ("GET", "/hoshikage/health", {}, False)])
def test_first_request_forwards_what_the_router_forwards(method: str, path: str,
                                                         query: dict[str, str],
                                                         expected: bool) -> None:
    assert waking.forwarded(method, path, query) is expected


def test_first_request_peek_waits_for_the_body_and_leaves_it_unread() -> None:
    import socket
    import threading

    ours, client = socket.socketpair()
    with ours, client:
        client.sendall(CHAT[:60])
        threading.Timer(0.01, lambda: client.sendall(CHAT[60:])).start()
        request = waking.peek(ours, wait=1.0)
        assert request is not None and request[3] == b'{"model": "tiny"}'
        assert ours.recv(4096) == CHAT  # still there for the real HTTP server
        client.sendall(CHAT[:60])
        started = time.monotonic()
        assert waking.peek(ours, wait=0.05) is None  # the rest never comes
        assert time.monotonic() - started < 0.5


def test_router_does_not_start_again_what_first_request_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from hoshikage_sd.manifest import Config, Model
    from hoshikage_sd.router import lifecycle
    from hoshikage_sd.router import server as router_module

    config = Config(source=tmp_path / "models.yaml", runtime_dir=tmp_path / "run")
    router = router_module.Router(config, started="tiny")
    assert not router.lifecycle.early_start("other")  # another model does not use up tiny's
    assert router.lifecycle.early_start("tiny")  # tiny's request: its unit is on its way
    assert not router.lifecycle.early_start("tiny")  # a later start is a start
    late = router_module.Router(config, started="tiny")
    late.lifecycle._created -= lifecycle.EARLY_START_VALID  # its request never came
    assert not late.lifecycle.early_start("tiny")

    # Served before the router looked (the launcher is quick): that uses it up too, so a
    # start after a stop within EARLY_START_VALID is a real start (it was not: a 503)
    quick = router_module.Router(config, started="tiny")

    async def serving(_model: Model) -> bool:
        return True

    monkeypatch.setattr(quick.lifecycle, "serving", serving)
    asyncio.run(quick.lifecycle._start(Model("tiny", tmp_path / "tiny.gguf")))
    assert quick.lifecycle.started_early is None and "tiny" in quick.ready
    quick.close()


def test_a_start_waits_for_its_unit_to_go_down_before_it_leaves_a_ticket(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit still stopping (evicted a moment ago) removes the ticket and the admission
    record at its release: the start's ticket must come after that."""
    from hoshikage_sd.manifest import Config, Model
    from hoshikage_sd.router import lifecycle
    from hoshikage_sd.router import server as router_module

    calls: list[str] = []
    monkeypatch.setattr(lifecycle.units, "wait_down",
                        lambda unit, waiting=None: calls.append(f"down {unit}") or "inactive")
    monkeypatch.setattr(lifecycle.units, "start_unit",
                        lambda unit, state=None: calls.append(f"start {unit} {state}"))
    config = Config(source=tmp_path / "models.yaml", runtime_dir=tmp_path / "run")
    router = router_module.Router(config)

    def prepare(model: Model, start: Callable[[], None]) -> list[str]:
        calls.append("ticket")
        start()
        return ["b"]

    monkeypatch.setattr(router.lifecycle, "prepare", prepare)
    assert router.lifecycle.begin(Model("a", tmp_path / "a.gguf"), "u@a") == ["b"]
    assert calls == ["down u@a", "ticket", "start u@a inactive"]
    # the activator's way (no ticket): begin starts the unit itself
    calls.clear()
    monkeypatch.setattr(router.lifecycle, "prepare", lambda model, start: calls.append("no ticket"))
    assert router.lifecycle.begin(Model("a", tmp_path / "a.gguf"), "u@a") == []
    assert calls == ["down u@a", "no ticket", "start u@a inactive"]
    # a start that fails is the start's failure, tried once, not a reason for the slow way

    def refuse(unit: str, state: str | None = None) -> None:
        calls.append(f"refused {unit}")
        raise HoshikageError("cannot start u@a: access denied")

    calls.clear()
    monkeypatch.setattr(lifecycle.units, "start_unit", refuse)
    monkeypatch.setattr(router.lifecycle, "prepare", prepare)
    with pytest.raises(router_module.StartFailed, match="access denied"):
        router.lifecycle.begin(Model("a", tmp_path / "a.gguf"), "u@a")
    assert calls == ["down u@a", "ticket", "refused u@a"]


def test_a_swap_by_count_starts_the_new_unit_before_it_stops_the_old(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop queued first kept PID 1 and polkit busy while the start waited."""
    from hoshikage_sd.admit import gather, needs
    from hoshikage_sd.manifest import Config, Model
    from hoshikage_sd.router import server as router_module

    models = {n: Model(n, tmp_path / f"{n}.gguf") for n in "ab"}
    for model in models.values():
        model.path.write_bytes(b"GGUF")
    config = Config(source=tmp_path / "models.yaml", runtime_dir=tmp_path / "run",
                    ramdisk=tmp_path / "ram", state_dir=tmp_path / "state",
                    max_loaded_models=1, models=models)
    runtime = Runtime(config.runtime_dir)
    runtime.set_running("b", Running(os.getpid(), "", time.time() - 60))
    runtime.set_activity("b", Activity(0, time.time() - 30, os.getpid()))
    calls: list[str] = []
    monkeypatch.setattr(gather.units, "active_model_units", lambda **_: ["b"])
    monkeypatch.setattr(gather.units, "stop_unit",
                        lambda unit: calls.append(f"stop {unit}"))
    router = router_module.Router(config)
    monkeypatch.setattr(needs, "deviceless", lambda model: False)  # a GPU machine
    # its first start: the unit lists the devices and judges (the slow way)
    assert router.lifecycle.prepare(models["a"], lambda: calls.append("start a")) is None
    assert calls == []
    key = estimate_key(models["a"], models["a"].path.stat())
    runtime.set_devices("a", [key, "its unit's listing"], {}, {})  # on no device
    assert router.lifecycle.prepare(models["a"], lambda: calls.append("start a")) == ["b"]
    assert calls == ["start a", "stop hoshikage-model@b.service"]
    assert os.path.exists(protocol.ticket_path(str(config.runtime_dir), "a"))


def test_a_model_that_answered_before_its_activator_adopted_it_is_idle_not_starting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher's model serves before the activator writes its running record: its
    activity record (a request ended) makes it a resident that may be evicted."""
    from hoshikage_sd.admit import gather
    from hoshikage_sd.manifest import Config, Model
    from hoshikage_sd.runtime import Activity, Runtime

    config = Config(source=tmp_path / "models.yaml", runtime_dir=tmp_path / "run",
                    models={"b": Model("b", tmp_path / "b.gguf")})
    runtime = Runtime(config.runtime_dir)
    runtime.set_admitted("b", 1000)
    monkeypatch.setattr(gather.units, "active_model_units", lambda **_: ["b"])
    (starting,) = gather.residents(config, runtime)
    assert starting.starting and starting.idle is None  # admitted, nothing answered yet
    runtime.set_activity("b", Activity(0, time.time() - 5, os.getpid()))
    (served,) = gather.residents(config, runtime)
    assert not served.starting and served.idle is not None and served.idle >= 5
    assert runtime.idle_seconds("b", time.time()) is not None


def test_a_request_for_a_model_whose_unit_still_stops_says_it_is_wanted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop may be making a copy to keep (release.copy_to_keep): the request waiting
    for it marks the model wanted, so that copy is given up; the mark goes once it is down."""
    from hoshikage_sd.manifest import Config, Model
    from hoshikage_sd.router import lifecycle
    from hoshikage_sd.router import server as router_module

    config = Config(source=tmp_path / "models.yaml", runtime_dir=tmp_path / "run")
    router = router_module.Router(config)
    seen: list[bool] = []

    def wait_down(unit: str, waiting: Callable[[], None] | None = None) -> str:
        assert waiting is not None
        waiting()  # still deactivating
        seen.append(router.runtime.wanted("a"))
        return "inactive"

    monkeypatch.setattr(lifecycle.units, "wait_down", wait_down)
    monkeypatch.setattr(lifecycle.units, "start_unit", lambda unit, state=None: None)
    monkeypatch.setattr(router.lifecycle, "prepare", lambda model, start: start())
    router.lifecycle.begin(Model("a", tmp_path / "a.gguf"), "u@a")
    assert seen == [True] and not router.runtime.wanted("a")


def test_the_name_index_is_refreshed_after_a_started_models_first_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the index asks systemd for the model unit's environment: not while the
    request that started the model waits for its first answer."""
    from hoshikage_sd.manifest import Config
    from hoshikage_sd.metrics import Metrics
    from hoshikage_sd.router import lifecycle

    refreshed: list[float] = []
    monkeypatch.setattr(lifecycle, "refresh_index", lambda _config: refreshed.append(
        time.monotonic()))
    config = Config(source=tmp_path / "models.yaml")
    life = lifecycle.Lifecycle(lambda: config, Runtime(tmp_path), Announcements(tmp_path),
                               Metrics(tmp_path))

    async def scenario() -> float:
        refresh = asyncio.create_task(life.refresh_index_after("tiny"))
        life.in_flight["tiny"] = 1  # the request that started it, in flight
        await asyncio.sleep(0.3)
        assert not refreshed
        answered = time.monotonic()
        life.request_ended("tiny")  # its last request in flight
        await asyncio.wait_for(refresh, 5)
        assert not life.answered
        return answered

    answered = asyncio.run(scenario())
    assert len(refreshed) == 1 and refreshed[0] >= answered
