"""A model's own llama-server key (router/model_keys.py): read from its args, key file or
environment, and checked by the router before the model starts (401, nothing started)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from hoshikage_sd.manifest import Model
from hoshikage_sd.router import model_keys, server
from hoshikage_sd.router.headstart import index as name_index
from hoshikage_sd.router.proxy import Forward, Outcome
from tests.unit.test_auth import call, headers_of
from tests.unit.test_router_api import request, write


def model(args: tuple[str, ...] = (), env: tuple[str, ...] = ()) -> Model:
    return Model("m", Path("/nonexistent.gguf"), args=args, env=env)


def test_the_keys_come_from_args_a_key_file_or_the_environment(tmp_path: Path) -> None:
    assert model_keys.keys_of(model(("-c", "512")), {}) == ()
    assert not model(("-c", "512")).own_key
    assert model_keys.keys_of(model(("--api-key", "one-secret,two-secret")), {}) == (
        "one-secret", "two-secret")
    assert model_keys.keys_of(model(("--api-key=one-secret",)), {}) == ("one-secret",)
    keys = tmp_path / "keys"
    keys.write_text("file-secret-1\n\nfile-secret-2\n")
    with_file = model(("--api-key-file", str(keys)))
    assert with_file.own_key
    assert model_keys.keys_of(with_file, {}) == ("file-secret-1", "file-secret-2")
    assert model_keys.keys_of(model(env=("LLAMA_API_KEY=env-secret",)), {}) == ("env-secret",)
    # the unit's environment (/etc/default/hoshikage), which the router shares
    assert model_keys.keys_of(model(), {"LLAMA_API_KEY": "unit-secret"}) == ("unit-secret",)
    # an argument wins over the variable, as in llama-server
    assert model_keys.keys_of(model(("--api-key", "arg-secret"), ("LLAMA_API_KEY=x",)),
                              {}) == ("arg-secret",)
    missing = model(("--api-key-file", str(tmp_path / "none")))
    with pytest.raises(model_keys.KeyFileUnusable, match="cannot read its --api-key-file"):
        model_keys.keys_of(missing, {})
    assert "refuses every request for it" in model_keys.problems(missing)[0]
    assert "shorter than" in model_keys.problems(model(("--api-key", "short")))[0]


def test_a_model_with_its_own_key_starts_only_for_requests_that_carry_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    manifest = write(tmp_path)
    manifest.write_text(manifest.read_text() + '    args: ["--api-key", "model-secret-1"]\n')

    async def scenario() -> None:
        config = server.load_config(manifest)
        # the head start does not start it: the index says it is keyed
        assert [m["keyed"] for m in name_index.build(config)["models"]] == [True]
        router = server.Router(config)
        for path, body in (("/v1/chat/completions", {"model": "tiny"}),
                           ("/api/generate", {"model": "tiny", "prompt": "x"}),
                           ("/v1/messages", {"model": "tiny"})):
            for key in (None, "wrong-secret-1"):
                status, headers, answer = await call(router, request(
                    "POST", path, body, headers_of(key)))
                assert status == 401, (path, answer)
                assert headers["www-authenticate"] == "Bearer"
                assert "model 'tiny'" in str(answer)
        assert router.starting == {} and router.ready == set()

        started: list[str] = []

        async def ensure(m: Model) -> None:
            started.append(m.name)
        router.ensure = ensure  # type: ignore[method-assign]
        for how in ("bearer", "x-api-key"):
            result = await router.handle(request("POST", "/v1/chat/completions",
                                                 {"model": "tiny"},
                                                 headers_of("model-secret-1", how)))
            assert isinstance(result, Forward)
            assert result.done is not None
            result.done(Outcome())
        assert started == ["tiny", "tiny"]
        # llama-server's health check needs no key once the model serves (it starts nothing)
        router.ready.add("tiny")
        forwarded = await router.handle(request("GET", "/health?model=tiny"))
        assert isinstance(forwarded, Forward) and forwarded.done is not None
        forwarded.done(Outcome())
        router.ready.discard("tiny")
        status, _, _ = await call(router, request("GET", "/health?model=tiny"))
        assert status == 401  # it would start the model
        # an unload (keep_alive 0) starts nothing: no key needed for it
        status, _, _ = await call(router, request(
            "POST", "/api/generate", {"model": "tiny", "prompt": "", "keep_alive": 0}))
        assert status == 200

    asyncio.run(scenario())
    assert "model-secret" not in caplog.text


def test_the_panels_load_asks_for_the_models_own_key_too(tmp_path: Path) -> None:
    manifest = write(tmp_path)
    manifest.write_text(manifest.read_text() + '    args: ["--api-key", "model-secret-1"]\n')

    async def scenario() -> None:
        router = server.Router(server.load_config(manifest))
        req = request("POST", "/panel/api/load", {"model": "tiny"},
                      {"Content-Type": "application/json", "X-Hoshikage-Panel": "1"})
        req.peer = "127.0.0.1"
        status, _, body = await call(router, req)
        assert status == 401 and "model 'tiny'" in body["error"]["message"], body
        assert router.starting == {}

    asyncio.run(scenario())
