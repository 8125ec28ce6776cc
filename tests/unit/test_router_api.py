"""The router's decisions without a network: which routes start a model, its activity
records, manifest reloads (on a timer, on `hoshikage reload`, broken at start), error shapes
and CORS."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from hoshikage_sd import protocol
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.router import routes, server
from hoshikage_sd.router.headstart import request as waking
from hoshikage_sd.router.proxy import Forward, Request, Response
from hoshikage_sd.router.routes import Route
from hoshikage_sd.runtime import Activity, Running, boot_clock

MANIFEST = """\
ramdisk: {tmp}/rd
runtime_dir: {tmp}/run
state_dir: {tmp}/state
llama_server: /bin/true
router_idle_exit: 1h
{extra}
models:
  tiny:
    path: {tmp}/tiny.gguf
    aliases: [small]
    ttl: 1h
"""


def write(tmp: Path, extra: str = "") -> Path:
    path = tmp / "models.yaml"
    path.write_text(MANIFEST.format(tmp=tmp, extra=extra))
    return path


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro())


def request(method: str, target: str, body: object = None,
            headers: dict[str, str] | None = None) -> Request:
    data = json.dumps(body).encode() if body is not None else b""
    return Request(method, target, "1.1",
                   [(k.encode(), v.encode()) for k, v in (headers or {}).items()], data)


def answer(result: Response | Forward) -> tuple[int, dict[str, str], Any]:
    assert isinstance(result, Response), result
    headers = {k.lower(): v for k, v in result.headers}
    return result.status, headers, json.loads(result.body) if result.body else None


# -- routes ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path", "query", "route"), [
    ("POST", "/v1/chat/completions", {}, Route.FORWARD),
    ("POST", "/v1/messages", {}, Route.FORWARD),
    ("POST", "/v1/messages/count_tokens", {}, Route.FORWARD),
    ("POST", "/completion", {}, Route.FORWARD),
    ("POST", "/tokenize", {}, Route.FORWARD),
    ("POST", "/v1/rerank", {}, Route.FORWARD),
    ("POST", "/apply-template", {}, Route.FORWARD),
    ("POST", "/slots/0", {}, Route.FORWARD),
    ("GET", "/props", {}, Route.FORWARD),
    ("GET", "/v1/chat/completions", {}, Route.NOT_ALLOWED),
    ("GET", "/health", {}, Route.HEALTH),
    ("GET", "/health", {"model": "a"}, Route.FORWARD),
    ("GET", "/metrics", {}, Route.METRICS),
    ("GET", "/metrics", {"model": "a"}, Route.FORWARD),
    ("GET", "/v1/models", {}, Route.MODELS),
    ("GET", "/v1/models/tiny", {}, Route.MODEL),
    ("POST", "/v1/models", {}, Route.NOT_ALLOWED),
    ("OPTIONS", "/v1/chat/completions", {}, Route.OPTIONS),
    ("POST", "/v1/chat/completion", {}, Route.NOT_FOUND),  # a typo starts nothing
    ("POST", "/generate", {}, Route.NOT_FOUND),
    ("GET", "/api/tags", {}, Route.OLLAMA_TAGS),
    ("GET", "/api/ps", {}, Route.OLLAMA_PS),
    ("GET", "/api/version", {}, Route.OLLAMA_VERSION),
    ("POST", "/api/show", {}, Route.OLLAMA_SHOW),
    ("POST", "/api/chat", {}, Route.OLLAMA_INFER),
    ("POST", "/api/embeddings", {}, Route.OLLAMA_INFER),
    ("POST", "/api/pull", {}, Route.OLLAMA_UNMANAGED),
    ("HEAD", "/api/blobs/sha256:00", {}, Route.OLLAMA_UNMANAGED),
    ("GET", "/api/chat", {}, Route.NOT_ALLOWED),
    ("POST", "/api/nothing", {}, Route.NOT_FOUND),
    ("GET", "/health", {}, Route.HEALTH),
    ("HEAD", "/", {}, Route.HEALTH),
    ("DELETE", "/health", {}, Route.NOT_ALLOWED),  # not a health check that says ok
    ("TRACE", "/", {}, Route.NOT_ALLOWED),
])
def test_only_model_routes_are_forwarded(method: str, path: str, query: dict[str, str],
                                         route: str) -> None:
    assert routes.classify(method, path, query) == route


@pytest.mark.parametrize(("body", "model"), [
    ({"model": "tiny", "messages": []}, "tiny"),
    ({"model": "tiny", "keep_alive": "5m"}, "tiny"),
    ({"model": "tiny", "keep_alive": -1}, "tiny"),
    ({"model": "tiny", "keep_alive": 0}, None),
    ({"model": "tiny", "keep_alive": "0s"}, None),
    ({"model": "tiny", "keep_alive": "0"}, None),
    ({"prompt": "x"}, None),
])
def test_first_request_starts_ollama_models_unless_they_unload(body: object,
                                                               model: str | None) -> None:
    assert waking.ollama_model("/api/generate", json.dumps(body).encode()) == model
    assert waking.ollama_model("/api/tags", json.dumps(body).encode()) is None


# -- the router, without a network ---------------------------------------------------------

@pytest.fixture
def config(tmp_path: Path) -> Config:
    return server.load_config(write(tmp_path))


def test_errors_are_in_each_apis_shape_and_start_nothing(config: Config) -> None:
    async def scenario() -> None:
        router = server.Router(config)
        status, headers, body = answer(await router.handle(
            request("POST", "/v1/chat/completions", {"model": "nope"},
                    {"x-request-id": "abc-1"})))
        assert status == 404 and headers["x-request-id"] == "abc-1"
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
        status, headers, body = answer(await router.handle(
            request("POST", "/v1/messages", {"model": "nope"})))
        assert status == 404 and body["type"] == "error"
        assert body["error"]["type"] == "not_found_error"
        assert body["request_id"] == headers["request-id"] == headers["x-request-id"]
        status, _, body = answer(await router.handle(request("POST", "/api/chat",
                                                             {"model": "nope"})))
        assert status == 404 and set(body) == {"error"}
        status, headers, body = answer(await router.handle(request("POST", "/api/pull",
                                                                   {"model": "x"})))
        assert status == 501 and "does not manage" in body["error"]
        assert headers["x-should-retry"] == "false" and "retry-after" not in headers
        status, _, body = answer(await router.handle(request("POST", "/v1/chat/complet",
                                                             {"model": "tiny"})))
        assert status == 404 and body["error"]["code"] == "not_found"
        status, headers, _ = answer(await router.handle(request("GET", "/v1/embeddings")))
        assert status == 405 and headers["allow"] == "POST"
        status, _, body = answer(await router.handle(request("GET", "/v1/models/small")))
        assert status == 200 and body["id"] == "tiny" and body["object"] == "model"
        assert router.starting == {} and router.ready == set()
        assert not (config.runtime_dir / "activity").exists()

    run(scenario)


def test_a_model_that_is_not_a_string_is_a_400_not_the_default(tmp_path: Path) -> None:
    """With a default model, a "model" of another type (a client's mistake) must not mean
    it, as a missing or null one does; and ?model= is taken as a URL encodes it."""
    config = server.load_config(write(tmp_path, "default_model: tiny"))

    async def scenario() -> None:
        router = server.Router(config)
        for bad in (123, ["tiny"], {"name": "tiny"}, True):
            for path in ("/v1/chat/completions", "/v1/messages"):
                status, _, body = answer(await router.handle(
                    request("POST", path, {"model": bad, "messages": []})))
                assert status == 400, (path, bad, body)
                assert "Invalid type for 'model': expected a string" in body["error"]["message"]
        assert router.starting == {}

    run(scenario)
    assert waking.model_name_of(b'{"model": null}', {"model": "tiny"}) == "tiny"
    with pytest.raises(ValueError, match="got an integer"):
        waking.model_name_of(b'{"model": 3}', {})


def test_a_page_on_another_site_starts_nothing_without_cors(tmp_path: Path) -> None:
    """A text/plain POST from another site needs no preflight: it would start a model and
    make it work for a page that cannot even read the answer. JSON (preflighted), a client
    with no Origin, the router's own origin and an allowed one pass."""
    config = server.load_config(write(tmp_path, 'cors_origins: ["http://app.example"]'))
    body = {"model": "tiny", "messages": []}

    async def scenario() -> None:
        router = server.Router(config)
        for path in ("/v1/chat/completions", "/v1/messages", "/api/chat"):
            status, _, reply = answer(await router.handle(request(
                "POST", path, body, {"Origin": "https://evil.example",
                                     "Content-Type": "text/plain;charset=UTF-8"})))
            assert status == 415, (path, reply)
        assert router.starting == {}
        for headers in ({"Origin": "https://evil.example", "Content-Type": "application/json"},
                        {"Content-Type": "text/plain"},
                        {"Origin": "http://app.example", "Content-Type": "text/plain"},
                        {"Origin": "http://127.0.0.1:8080", "Host": "127.0.0.1:8080",
                         "Content-Type": "text/plain"}):
            assert not router.answers.cross_site_simple(request("POST", "/v1/chat/completions",
                                                        body, headers)), headers

    run(scenario)


def test_cors_is_off_unless_the_manifest_allows_an_origin(tmp_path: Path) -> None:
    async def scenario() -> None:
        preflight = request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization"})
        router = server.Router(server.load_config(write(tmp_path)))
        status, headers, _ = answer(await router.handle(preflight))
        assert status == 204 and "access-control-allow-origin" not in headers
        router = server.Router(server.load_config(write(
            tmp_path, "cors_origins: [http://app.example]")))
        status, headers, _ = answer(await router.handle(preflight))
        assert status == 204
        assert headers["access-control-allow-origin"] == "http://app.example"
        assert headers["access-control-allow-headers"] == "content-type, authorization"
        assert "POST" in headers["access-control-allow-methods"]
        status, headers, _ = answer(await router.handle(request(
            "GET", "/v1/models", headers={"Origin": "http://elsewhere.example"})))
        assert status == 200 and "access-control-allow-origin" not in headers

    run(scenario)


def test_a_broken_manifest_at_start_gets_503s_with_the_reason_until_fixed(
        tmp_path: Path) -> None:
    path = write(tmp_path)
    good = path.read_text()
    path.write_text(good.replace("    ttl: 1h", "    ttl: soon"))

    async def scenario() -> None:
        with pytest.raises(HoshikageError) as caught:
            server.load_config(path)
        reason = caught.value.message
        router = server.Router(Config(source=path), broken=reason)
        for req in (request("POST", "/v1/chat/completions", {"model": "tiny"}),
                    request("GET", "/v1/models"), request("POST", "/api/chat",
                                                          {"model": "tiny"})):
            status, headers, body = answer(await router.handle(req))
            assert status == 503, body
            assert "models.yaml:11" in json.dumps(body) and "soon" in json.dumps(body)
            assert headers["x-should-retry"] == "false"
        path.write_text(good)
        router.reload_now()
        status, _, body = answer(await router.handle(request("GET", "/v1/models")))
        assert status == 200 and [m["id"] for m in body["data"]] == ["tiny"]

    run(scenario)


def test_reload_datagram_rereads_now_and_a_broken_edit_keeps_the_last_good(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, units_runtime: Path) -> None:
    path = write(tmp_path)

    async def scenario() -> None:
        router = server.Router(server.load_config(path))
        router.announcements.open()
        try:
            path.write_text(path.read_text().replace("aliases: [small]", "aliases: [wee]"))
            router.changes.checked = time.monotonic()  # the once-a-second check would not look yet
            assert protocol.send_datagram(protocol.router_socket(
                str(router.config.runtime_dir)).encode(), protocol.RELOAD)
            for _ in range(100):
                await asyncio.sleep(0.01)
                if router.config.models["tiny"].aliases == ("wee",):
                    break
            assert router.config.models["tiny"].aliases == ("wee",)
            names = tmp_path / "state" / "names.json"
            names.parent.mkdir(parents=True, exist_ok=True)
            names.write_text('{"aliases": "abc", "tags": {"fast": "tiny"}}')
            router.reload_now()  # a bad names file: reported, what is usable of it applies
            assert router.config.models["tiny"].tags == ("fast",) and router.broken is None
            good = path.read_text()
            path.write_text(good.replace("ttl: 1h", "ttl: soon"))
            with caplog.at_level(logging.ERROR, "hoshikage.router"):
                router.reload_now()
            assert router.config.models["tiny"].aliases == ("wee",)  # the last good one
            assert router.broken is None
            assert any("models.yaml:11" in r.getMessage() and "soon" in r.getMessage()
                       for r in caplog.records if r.levelno == logging.ERROR)
            kept = units_runtime / "manifest.json"  # for the units
            assert "wee" in json.loads(kept.read_bytes())["config"]["models"]["tiny"]["aliases"]
        finally:
            router.announcements.close()

    run(scenario)


def test_one_activity_record_per_request_and_busy_seen_at_once(
        config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[Activity] = []

    async def scenario() -> None:
        router = server.Router(config)
        runtime = router.runtime
        write = router.lifecycle.activity.write

        def counted(name: str, in_flight: int, last_end: float) -> None:
            writes.append(Activity(in_flight, last_end))
            write(name, in_flight, last_end)

        monkeypatch.setattr(router.lifecycle.activity, "write", counted)
        runtime.set_running("tiny", Running(os.getpid(), "/x", time.time() - 60))
        tiny = config.models["tiny"]
        for _ in range(3):
            router.lifecycle.request_began(tiny)
            # what the idle watch and admission ask, from another process: busy now
            assert runtime.busy("tiny") and runtime.idle_seconds("tiny", time.time()) is None
            router.lifecycle.request_ended("tiny")
            assert not runtime.busy("tiny")
        assert [a.in_flight for a in writes] == [0, 0, 0]  # one record each, at its end
        record = runtime.activity("tiny")
        assert record == Activity(0, writes[-1].last_end, os.getpid(), record.last_end_boot)
        # the same moment on the boot clock, which no step of the wall clock moves
        assert record.last_end_boot == pytest.approx(
            boot_clock() - (time.time() - record.last_end), abs=0.5)
        idle = runtime.idle_seconds("tiny", time.time())
        assert idle is not None and idle < 5
        writes.clear()
        # overlapping requests: one record when the last one ends
        router.lifecycle.request_began(tiny)
        router.lifecycle.request_began(tiny)
        router.lifecycle.request_ended("tiny")
        assert runtime.busy("tiny")
        router.lifecycle.request_ended("tiny")
        assert [a.in_flight for a in writes] == [0] and not runtime.busy("tiny")
        router.close()
        router = server.Router(config)  # a router whose lock cannot be had says so in the record
        monkeypatch.setattr(router.lifecycle.activity, "write", counted)
        monkeypatch.setattr(router.lifecycle.busy, "hold", lambda _name: False)
        writes.clear()
        router.lifecycle.request_began(tiny)
        assert [a.in_flight for a in writes] == [1]
        assert runtime.idle_seconds("tiny", time.time()) is None  # in_flight, router alive

    run(scenario)


def test_llama_server_gets_its_http_threads_and_the_pool_one_less(tmp_path: Path) -> None:
    model = Model("m", tmp_path / "m.gguf")
    assert model.server_args[-2:] == ("--threads-http", "8") and model.upstream_pool == 7
    given = Model("m", tmp_path / "m.gguf", args=("--threads-http", "3"))
    assert given.server_args.count("--threads-http") == 1 and given.upstream_pool == 2
    many = Model("m", tmp_path / "m.gguf", args=("-np", "16"))
    assert many.http_threads == 18 and many.upstream_pool == 17
    command = Model("m", tmp_path / "m.gguf", backend="command", command=("x",))
    assert "--threads-http" not in command.server_args and command.upstream_pool == 4


def test_a_scrape_is_not_activity_and_counts_are_in_it(config: Config) -> None:
    async def scenario() -> None:
        router = server.Router(config)
        answer(await router.handle(request("POST", "/v1/chat/completions", {"model": "x"})))
        router.lifecycle.last_activity = 0.0
        result = await router.handle(request("GET", "/metrics"))
        assert isinstance(result, Response) and result.status == 200
        assert router.lifecycle.last_activity == 0.0  # the router's idle exit is not put off
        text = result.body.decode()
        assert ('hoshikage_requests_total{model="",route="/v1/chat/completions",'
                'status="404"} 1') in text
        assert router.starting == {}

    run(scenario)


def test_a_request_caught_by_stops_in_a_row_is_tried_three_times(
        config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each time its upstream is found gone (the unit stopped: idle, evicted, unloaded), the
    request starts the model again, twice at most, then gets the 502 (one stop after the
    first retry gave a 502: unloads in a row)."""
    from hoshikage_sd.router.call import Call
    from hoshikage_sd.router.proxy import Forward

    async def scenario() -> None:
        router = server.Router(config)
        starts: list[str] = []

        async def started(request: Request, model: Model, emit: object = None) -> None:
            starts.append(model.name)

        monkeypatch.setattr(router, "started", started)
        tiny = config.models["tiny"]
        req = request("POST", "/v1/chat/completions", {"model": "tiny"})
        result = await router.exchange(req, tiny, Call(router, req, tiny))
        hops = 0
        while isinstance(result, Forward):
            assert result.unreachable is not None
            result = await result.unreachable(ConnectionResetError("gone"))
            hops += 1
        assert (hops, len(starts), result.status) == (3, 3, 502), (hops, starts, result)
        router.close()

    run(scenario)
