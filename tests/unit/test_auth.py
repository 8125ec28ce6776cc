"""Optional API keys (router/auth.py): the keys file, the check, and the router answering
401/403/503 in each API's shape before anything starts."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from hoshikage_sd.manifest import Config
from hoshikage_sd.manifest.parse import ConfigError, parse
from hoshikage_sd.router import auth, server
from hoshikage_sd.router.proxy import Forward, Request, Response
from tests.unit.test_router_api import answer, request, write

KEYS = """\
# who may do what
alpha-secret-1            # any model
beta-secret-22: small     # only tiny, by its alias
gamma-secret-333: other, more
"""


def headers_of(key: str | None, how: str = "bearer") -> dict[str, str]:
    if key is None:
        return {}
    return {"Authorization": f"Bearer {key}"} if how == "bearer" else {"x-api-key": key}


# -- the file ----------------------------------------------------------------------------------

def test_a_keys_file_has_keys_allow_lists_and_comments() -> None:
    keys = auth.parse(KEYS, "/etc/keys")
    assert [k.line for k in keys] == [2, 3, 4]
    assert keys[0].models is None
    assert keys[1].models == {"small"} and keys[1].allows("tiny", ("small",))
    assert not keys[1].allows("other")
    assert keys[2].models == {"other", "more"}
    assert all(k.digest == auth.digest(s) for k, s in zip(
        keys, ("alpha-secret-1", "beta-secret-22", "gamma-secret-333"), strict=True))


@pytest.mark.parametrize(("text", "problem"), [
    ("", "no keys"),
    ("# only a comment\n\n", "no keys"),
    ("ok-secret-1\nshort\n", ":2: a key must have at least"),
    ("with space-secret\n", ":1: a key must be printable"),
    ("caf\u00e9-secret-1\n", ":1: a key must be printable"),
    ("first-secret-1: tiny,\n", ":1: after ':' comes a list"),
    ("first-secret-1\nfirst-secret-1: tiny\n", ":2: this key is on an earlier line"),
])
def test_a_bad_keys_file_says_where_and_never_shows_a_key(text: str, problem: str) -> None:
    with pytest.raises(auth.KeysUnusable) as caught:
        auth.parse(text, "/etc/keys")
    assert problem in str(caught.value) and str(caught.value).startswith("/etc/keys")
    for secret in ("first-secret-1", "ok-secret-1", "short", "with space"):
        assert secret not in str(caught.value)


def test_a_credential_is_read_from_credentials_directory(tmp_path: Path) -> None:
    (tmp_path / "api-keys").write_text("cred-secret-1\n")
    keys = auth.load("credential:api-keys", {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert keys[0].digest == auth.digest("cred-secret-1")
    with pytest.raises(auth.KeysUnusable, match="LoadCredential=api-keys:"):
        auth.load("credential:api-keys", {})
    with pytest.raises(auth.KeysUnusable, match="does not exist"):
        auth.load("credential:nope", {"CREDENTIALS_DIRECTORY": str(tmp_path)})


def test_keys_come_as_bearer_or_x_api_key_and_match_exactly() -> None:
    keys = auth.parse(KEYS, "k")

    def check(headers: dict[str, str]) -> auth.Key | None:
        low = {k.lower(): v for k, v in headers.items()}
        return auth.match(keys, auth.presented(low.get))

    assert check({"Authorization": "Bearer alpha-secret-1"}) is keys[0]
    assert check({"authorization": "bearer  beta-secret-22 "}) is keys[1]
    assert check({"x-api-key": "gamma-secret-333"}) is keys[2]
    assert check({"Authorization": "Bearer unused", "x-api-key": "alpha-secret-1"}) is keys[0]
    assert check({"Authorization": "Basic alpha-secret-1"}) is None
    assert check({"Authorization": "Bearer alpha-secret-"}) is None  # a prefix is no key
    assert check({"x-api-key": "alpha-secret-11"}) is None
    assert check({}) is None


@pytest.mark.parametrize(("value", "problem"), [
    ("keys.txt", "must be an absolute path"),
    ("credential:", "needs a credential name"),
    ("credential:a/b", "needs a credential name"),
])
def test_the_manifest_names_a_file_or_a_credential(tmp_path: Path, value: str,
                                                   problem: str) -> None:
    good = parse("api_keys: credential:hk\nmodels: {}\n", tmp_path / "m.yaml")
    assert good.api_keys == "credential:hk"
    assert parse("api_keys: /etc/k\nmodels: {}\n", tmp_path / "m.yaml").api_keys == "/etc/k"
    with pytest.raises(ConfigError, match=problem):
        parse(f"api_keys: '{value}'\nmodels: {{}}\n", tmp_path / "m.yaml")


# -- the router --------------------------------------------------------------------------------

def keyed(tmp_path: Path, keys: str = KEYS) -> tuple[server.Router, Path]:
    path = tmp_path / "api-keys"
    path.write_text(keys)
    config = server.load_config(write(tmp_path, f"api_keys: {path}"))
    return server.Router(config), path


async def call(router: server.Router, req: Request) -> tuple[int, dict[str, str], Any]:
    result: Response | Forward = await router.handle(req)
    return answer(result)


def test_no_key_is_a_401_in_each_apis_shape_and_starts_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        router, _ = keyed(tmp_path)
        for key in (None, "wrong-secret-1"):
            status, headers, body = await call(router, request(
                "POST", "/v1/chat/completions", {"model": "tiny"}, headers_of(key)))
            assert status == 401 and body["error"]["code"] == "invalid_api_key", body
            assert headers["www-authenticate"] == "Bearer"
            assert headers["x-should-retry"] == "false"
            status, _, body = await call(router, request(
                "POST", "/v1/messages", {"model": "tiny"}, headers_of(key, "x-api-key")))
            assert status == 401 and body["error"]["type"] == "authentication_error", body
            status, _, body = await call(router, request(
                "POST", "/api/chat", {"model": "tiny"}, headers_of(key)))
            assert status == 401 and set(body) == {"error"}, body
        for path in ("/v1/models", "/metrics", "/api/tags", "/v1/nothing"):
            status, _, _ = await call(router, request("GET", path))
            assert status == 401, path
        assert router.starting == {} and router.ready == set()
        status, _, _ = await call(router, request("GET", "/health"))
        assert status == 200
        status, _, _ = await call(router, request("OPTIONS", "/v1/chat/completions"))
        assert status == 204
        status, _, body = await call(router, request(
            "GET", "/v1/models", headers=headers_of("alpha-secret-1")))
        assert status == 200 and [m["id"] for m in body["data"]] == ["tiny"]
        scrape = await router.handle(request(
            "GET", "/metrics", headers=headers_of("gamma-secret-333")))
        assert isinstance(scrape, Response) and scrape.status == 200

    asyncio.run(scenario())
    assert "secret" not in caplog.text


def test_a_key_may_use_only_the_models_it_lists(tmp_path: Path) -> None:
    async def scenario() -> None:
        router, _ = keyed(tmp_path)
        for key in ("alpha-secret-1", "beta-secret-22"):
            status, _, body = await call(router, request(
                "GET", "/v1/models/tiny", headers=headers_of(key)))
            assert status == 200 and body["id"] == "tiny", body
        status, _, body = await call(router, request(
            "POST", "/v1/chat/completions", {"model": "small"}, headers_of("gamma-secret-333")))
        assert status == 403 and body["error"]["code"] == "model_not_allowed", body
        status, _, body = await call(router, request(
            "POST", "/v1/messages", {"model": "tiny"},
            headers_of("gamma-secret-333", "x-api-key")))
        assert status == 403 and body["error"]["type"] == "permission_error", body
        status, _, body = await call(router, request(
            "POST", "/api/show", {"model": "tiny"}, headers_of("gamma-secret-333")))
        assert status == 403 and "may not use model 'tiny'" in body["error"], body
        assert router.starting == {} and router.ready == set()

    asyncio.run(scenario())


def test_an_unusable_keys_file_closes_everything_until_fixed_and_reloaded(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        router, path = keyed(tmp_path)
        path.write_text("oops\n")
        router.reload_now()
        for req in (request("POST", "/v1/chat/completions", {"model": "tiny"},
                            headers_of("alpha-secret-1")),
                    request("GET", "/metrics"), request("GET", "/health")):
            status, headers, body = await call(router, req)
            assert status == 503 and body["error"]["code"] == "api_keys_unusable", body
            assert f"{path}:1" in body["error"]["message"] and "oops" not in json.dumps(body)
            assert "reads it again on `hoshikage reload`" in body["error"]["message"]
            assert headers["x-should-retry"] == "false"
        path.unlink()
        router.reload_now()
        status, _, body = await call(router, request("GET", "/v1/models"))
        assert status == 503 and "does not exist" in body["error"]["message"]
        path.write_text("delta-secret-4444\n")  # a new key, the old ones gone
        router.reload_now()
        status, _, _ = await call(router, request("GET", "/v1/models",
                                                  headers=headers_of("alpha-secret-1")))
        assert status == 401
        status, _, _ = await call(router, request("GET", "/v1/models",
                                                  headers=headers_of("delta-secret-4444")))
        assert status == 200

    asyncio.run(scenario())


def test_a_manifest_broken_at_start_lets_nothing_pass(tmp_path: Path) -> None:
    async def scenario() -> None:
        router = server.Router(Config(source=tmp_path / "m.yaml"), broken="m.yaml:3: bad")
        for path in ("/metrics", "/v1/nothing", "/api/version"):
            status, _, body = await call(router, request("GET", path))
            assert status == 503 and "m.yaml:3" in json.dumps(body), path

    asyncio.run(scenario())


def test_the_listings_show_only_the_models_a_key_may_use(tmp_path: Path) -> None:
    """/v1/models, /api/tags and /api/ps list a limited key's models only; a key for every
    model (and no keys at all) sees them all."""
    keys = tmp_path / "api-keys"
    keys.write_text(KEYS)
    (tmp_path / "other.gguf").write_bytes(b"")
    manifest = write(tmp_path, f"api_keys: {keys}")
    manifest.write_text(manifest.read_text() + f"  other:\n    path: {tmp_path}/other.gguf\n")

    async def scenario() -> None:
        router = server.Router(server.load_config(manifest))
        router.runtime.serving = lambda name: True  # type: ignore[method-assign]
        seen = {}
        for key in ("alpha-secret-1", "beta-secret-22", "gamma-secret-333"):
            _, _, listed = await call(router, request("GET", "/v1/models",
                                                      headers=headers_of(key)))
            _, _, tags = await call(router, request("GET", "/api/tags",
                                                    headers=headers_of(key)))
            _, _, ps = await call(router, request("GET", "/api/ps", headers=headers_of(key)))
            seen[key] = ([m["id"] for m in listed["data"]], [m["name"] for m in tags["models"]],
                         [m["name"] for m in ps["models"]])
        assert seen["alpha-secret-1"] == (["tiny", "other"], ["tiny", "other"],
                                          ["other", "tiny"])
        assert seen["beta-secret-22"] == (["tiny"], ["tiny"], ["tiny"])
        assert seen["gamma-secret-333"] == (["other"], ["other"], ["other"])

    asyncio.run(scenario())


def test_an_unusable_credential_says_a_restart_applies_the_fix() -> None:
    """A credential is the router's copy from its start: a reload reads the same copy."""
    from hoshikage_sd.router import auth

    said = auth.unusable("short key", "credential:api-keys").message
    assert "reads it again on `systemctl restart hoshikage.service`" in said
    assert "hoshikage reload" not in said
    assert "`hoshikage reload`" in auth.unusable("short key", "/etc/hoshikage/keys").message
