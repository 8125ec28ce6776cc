"""POST /models/load and /models/unload (router/control.py): llama.cpp's router's shape,
authorised as the rest (keys, or loopback only without them), bad input a 4xx that starts
nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from hoshikage_sd.manifest import Model
from hoshikage_sd.router import control, routes, server
from hoshikage_sd.router.proxy import Request
from hoshikage_sd.router.routes import Route
from hoshikage_sd.sd import units
from tests.unit.test_auth import KEYS, call, headers_of
from tests.unit.test_router_api import write

JSON = {"Content-Type": "application/json"}


def asking(path: str, body: object, headers: dict[str, str] | None = None,
           peer: str = "127.0.0.1", raw: bytes | None = None) -> Request:
    data = raw if raw is not None else json.dumps(body).encode()
    req = Request("POST", path, "1.1", [(k.encode(), v.encode())
                                        for k, v in {**JSON, **(headers or {})}.items()], data)
    req.peer = peer
    return req


def test_the_routes_are_llama_cpps() -> None:
    assert routes.classify("POST", "/models/load", {}) == Route.CONTROL
    assert routes.classify("POST", "/models/unload", {}) == Route.CONTROL
    assert routes.classify("GET", "/models/load", {}) == Route.NOT_ALLOWED
    assert routes.allowed_methods("/models/unload") == "POST"
    assert routes.classify("GET", "/models", {}) == Route.MODELS


def router_with_starts(manifest: Path) -> tuple[server.Router, list[str]]:
    router = server.Router(server.load_config(manifest))
    started: list[str] = []

    async def ensure(model: Model) -> None:
        started.append(model.name)
        router.ready.add(model.name)
    router.ensure = ensure  # type: ignore[method-assign]
    return router, started


@pytest.mark.parametrize(("req", "status", "says"), [
    (asking("/models/load", {"model": "tiny"}, peer="192.0.2.7"), 403, "loopback"),
    (asking("/models/load", {"model": "tiny"}, peer="::ffff:10.0.0.1"), 403, "loopback"),
    (asking("/models/load", {"model": "tiny"}, {"Content-Type": "text/plain"}), 415,
     "application/json"),
    (asking("/models/load", None, raw=b"{model: tiny"), 400, "not valid JSON"),
    (asking("/models/load", ["tiny"]), 400, "JSON object"),
    (asking("/models/load", {"model": "tiny", "force": True}), 400, "unknown field"),
    (asking("/models/load", {"model": 3}), 400, "'model' must name"),
    (asking("/models/load", {}), 400, "'model' must name"),
    (asking("/models/unload", {"model": "nothing-like-it"}), 404, "nothing-like-it"),
])
def test_bad_input_is_a_4xx_that_starts_nothing(tmp_path: Path, req: Request, status: int,
                                                says: str) -> None:
    async def scenario() -> None:
        router, started = router_with_starts(write(tmp_path))
        got, _, body = await call(router, req)
        assert got == status and says in body["error"]["message"], body
        assert started == [] and router.starting == {}

    asyncio.run(scenario())


def test_load_starts_the_model_and_unload_stops_it(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        router, started = router_with_starts(write(tmp_path))
        status, _, body = await call(router, asking("/models/load", {"model": "small"},
                                                    peer="::1"))
        assert status == 200 and body == {"success": True, "model": "tiny",
                                          "status": "loading"}, body
        await asyncio.gather(*control._loading)
        assert started == ["tiny"]
        up: list[str] = []
        monkeypatch.setattr(units, "active_model_units", lambda *a: list(up))
        status, _, body = await call(router, asking("/models/unload", {"model": "tiny"}))
        assert (status, body["status"]) == (200, "not loaded")
        up.append("tiny")
        unloaded: list[str] = []

        async def unload(model: Model, reason: str) -> None:
            unloaded.append(reason)
        router.unload = unload  # type: ignore[method-assign]
        status, _, body = await call(router, asking("/models/unload", {"model": "tiny"}))
        assert (status, body["status"], unloaded) == (200, "unloaded", ["unloaded over HTTP"])

    asyncio.run(scenario())


def test_with_keys_a_key_may_act_on_its_models_from_anywhere(tmp_path: Path) -> None:
    keys = tmp_path / "api-keys"
    keys.write_text(KEYS + "model-secret-1\n")  # a router key that is the model's too
    manifest = write(tmp_path, f"api_keys: {keys}")
    manifest.write_text(manifest.read_text() + '    args: ["--api-key", "model-secret-1"]\n')

    async def scenario() -> None:
        router, started = router_with_starts(manifest)
        results: list[tuple[int, Any]] = []
        for key in (None, "gamma-secret-333", "beta-secret-22", "alpha-secret-1"):
            status, _, body = await call(router, asking(
                "/models/load", {"model": "tiny"}, headers_of(key), peer="192.0.2.7"))
            results.append((status, body["error"]["code"]))
        # no key, a key for other models, a router key the model's own key is not
        assert results == [(401, "invalid_api_key"), (403, "model_not_allowed"),
                           (401, "invalid_api_key"), (401, "invalid_api_key")]
        assert started == []
        status, _, body = await call(router, asking(
            "/models/load", {"model": "tiny"}, headers_of("model-secret-1"), peer="192.0.2.7"))
        assert (status, body["status"]) == (200, "loading"), body
        await asyncio.gather(*control._loading)
        assert started == ["tiny"]

    asyncio.run(scenario())


def test_the_listing_says_each_models_status_as_llama_cpps_router_does(
        tmp_path: Path) -> None:
    """What a client polls after /models/load: status.value unloaded, loading, loaded."""
    async def scenario() -> list[str]:
        router = server.Router(server.load_config(write(tmp_path)))
        seen = []
        for step in ("unloaded", "loading", "loaded"):
            if step == "loading":
                router.starting["tiny"] = asyncio.get_running_loop().create_future()  # type: ignore[assignment]
            if step == "loaded":
                router.runtime.serving = lambda name: True  # type: ignore[method-assign]
            _, _, listed = await call(router, Request("GET", "/v1/models", "1.1", []))
            [model] = listed["data"]
            assert model["loaded"] is (step == "loaded")
            seen.append(model["status"]["value"])
        return seen

    assert asyncio.run(scenario()) == ["unloaded", "loading", "loaded"]
