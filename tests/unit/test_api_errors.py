"""Error bodies and headers in each API's shape, checked by the official clients themselves:
openai and anthropic parse them into their exception classes (code, type, param, request
id) and decide on retries from them; ollama-python raises ResponseError with the message."""

from __future__ import annotations

import importlib
import json
from types import ModuleType
from typing import Any

import pytest

from hoshikage_sd.router import errors as api_errors
from hoshikage_sd.router.errors import Api, ApiError
from tests.support import unavailable


def need(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        unavailable(f"{module} is not installed (pip install -e '.[test]')")


@pytest.mark.parametrize(("path", "headers", "api"), [
    ("/v1/chat/completions", None, Api.OPENAI),
    ("/v1/models/tiny", None, Api.OPENAI),
    ("/v1/messages", None, Api.ANTHROPIC),
    ("/v1/messages/count_tokens", None, Api.ANTHROPIC),
    ("/v1/messagesX", None, Api.OPENAI),
    ("/api/chat", None, Api.OLLAMA),
    ("/api/tags", {"anthropic-version": "2023-06-01"}, Api.OLLAMA),
    ("/apis", None, Api.OPENAI),
    ("/v1/models", {"anthropic-version": "2023-06-01"}, Api.ANTHROPIC),
    ("/v1/models", {"Anthropic-Version": "2023-06-01"}, Api.ANTHROPIC),
    ("/completion", {"x-api-key": "k"}, Api.OPENAI),
])
def test_api_for(path: str, headers: dict[str, str] | None, api: Api) -> None:
    assert api_errors.api_for(path, headers) is api


@pytest.mark.parametrize(("err", "openai_type", "openai_code", "anthropic_type", "retry"), [
    (api_errors.model_not_found("x", ["tiny"]), "invalid_request_error", "model_not_found",
     "not_found_error", None),
    (api_errors.no_model([]), "invalid_request_error", "model_required",
     "invalid_request_error", None),
    (api_errors.bad_json("Expecting value"), "invalid_request_error", "invalid_json",
     "invalid_request_error", None),
    (api_errors.model_ambiguous("model 'q' is ambiguous"), "invalid_request_error",
     "model_ambiguous", "invalid_request_error", "false"),
    (ApiError(401, "no key"), "invalid_request_error", "invalid_api_key",
     "authentication_error", None),
    (ApiError(413, "too big"), "invalid_request_error", "request_too_large",
     "request_too_large", None),
    (ApiError(429, "slow down"), "requests", "rate_limit_exceeded", "rate_limit_error", None),
    (ApiError(500, "bug"), "server_error", "server_error", "api_error", None),
    (ApiError(501, "no"), "server_error", "not_implemented", "api_error", "false"),
    (api_errors.not_answering("tiny", "reset"), "server_error", "model_unavailable",
     "api_error", None),
    (api_errors.start_failed("tiny", "no file", permanent=True), "server_error",
     "model_unavailable", "api_error", "false"),  # not "overloaded": it will not mend
    (api_errors.start_failed("tiny", "busy", permanent=False), "server_error",
     "model_unavailable", "overloaded_error", None),
])
def test_shapes(err: ApiError, openai_type: str, openai_code: str, anthropic_type: str,
                retry: str | None) -> None:
    rid = "req_0123"
    assert api_errors.body(Api.OPENAI, err, rid) == {"error": {
        "message": err.message, "type": openai_type, "param": err.param, "code": openai_code}}
    assert api_errors.body(Api.ANTHROPIC, err, rid) == {
        "type": "error", "error": {"type": anthropic_type, "message": err.message},
        "request_id": rid}
    assert api_errors.body(Api.OLLAMA, err, rid) == {"error": err.message}
    headers = api_errors.headers(err, rid)
    assert headers["x-request-id"] == headers["request-id"] == rid
    assert headers.get("x-should-retry") == retry


def test_retry_after_and_render() -> None:
    err = api_errors.start_failed("tiny", "waiting for memory", permanent=False,
                                  retry_after=7.4)
    status, headers, body = api_errors.render("/api/chat", err, "req_1")
    assert status == 503 and headers["Retry-After"] == "7" and "x-should-retry" not in headers
    assert body == {"error": "model 'tiny' could not be started: waiting for memory"}


def test_request_ids() -> None:
    a, b = api_errors.new_request_id(), api_errors.new_request_id()
    assert a != b and a.startswith("req_") and len(a) == 36
    assert api_errors.request_id("trace-42.a:b") == "trace-42.a:b"
    for bad in (None, "", "has space", "x" * 129, "new\nline"):
        assert api_errors.request_id(bad).startswith("req_")


def test_from_upstream() -> None:
    too_long = {"error": {"code": 400, "message": "request (12026 tokens) exceeds the "
                          "available context size (2048 tokens), try increasing it",
                          "type": "exceed_context_size_error", "n_prompt_tokens": 12026,
                          "n_ctx": 2048}}
    err = api_errors.from_upstream(400, too_long)
    assert (err.status, err.openai_code) == (400, "exceed_context_size_error")
    assert err.message.startswith("request (12026 tokens)")
    assert api_errors.from_upstream(502, "bad gateway\n").message == "bad gateway"
    assert api_errors.from_upstream(500, None).message == "llama-server answered HTTP 500"


# -- the official clients read them -------------------------------------------------------
def _mock(httpx: Any, err: ApiError, calls: list[str]) -> Any:
    def handler(request: Any) -> Any:
        calls.append(request.url.path)
        status, headers, body = api_errors.render(request.url.path, err, "req_abc",
                                                  dict(request.headers))
        return httpx.Response(status, headers=headers, content=json.dumps(body).encode(),
                              request=request)
    return httpx.Client(transport=httpx.MockTransport(handler))


def test_openai_client_reads_them() -> None:
    openai = need("openai")
    httpx2 = need("httpx2")
    calls: list[str] = []
    err = api_errors.model_not_found("gpt-x", ["tiny"])
    client = openai.OpenAI(api_key="none", base_url="http://hoshikage/v1", max_retries=2,
                           http_client=_mock(httpx2, err, calls))
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-x")
    exc = info.value
    assert (exc.code, exc.type, exc.param) == ("model_not_found", "invalid_request_error",
                                              "model")
    assert exc.request_id == "req_abc" and exc.status_code == 404
    assert calls == ["/v1/models/gpt-x"]  # a 404 is not retried


@pytest.mark.parametrize(("err", "tries"), [
    (api_errors.model_ambiguous("model 'q' is ambiguous"), 1),   # 409: retried unless told
    (ApiError(501, "not here"), 1),
    (api_errors.start_failed("tiny", "no such file", permanent=True), 1),
    (api_errors.start_failed("tiny", "busy", permanent=False, retry_after=0), 2),
])
def test_openai_client_retries_only_what_may_change(err: ApiError, tries: int) -> None:
    openai = need("openai")
    httpx2 = need("httpx2")
    calls: list[str] = []
    client = openai.OpenAI(api_key="none", base_url="http://hoshikage/v1", max_retries=1,
                           http_client=_mock(httpx2, err, calls))
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="q", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == err.status
    assert len(calls) == tries


def test_anthropic_client_reads_them() -> None:
    anthropic = need("anthropic")
    httpx2 = need("httpx2")
    calls: list[str] = []
    err = api_errors.start_failed("tiny", "no such file", permanent=True)
    client = anthropic.Anthropic(api_key="none", base_url="http://hoshikage", max_retries=2,
                                 http_client=_mock(httpx2, err, calls))
    with pytest.raises(anthropic.InternalServerError) as info:
        client.messages.create(model="tiny", max_tokens=8,
                               messages=[{"role": "user", "content": "x"}])
    exc = info.value
    assert exc.status_code == 503 and exc.request_id == "req_abc"
    assert exc.body["error"] == {"type": "api_error", "message": err.message}
    assert exc.body["type"] == "error"
    assert calls == ["/v1/messages"]  # x-should-retry: false



def test_anthropic_client_not_found() -> None:
    anthropic = need("anthropic")
    httpx2 = need("httpx2")
    calls: list[str] = []
    err = api_errors.model_not_found("claude-x", ["tiny"])
    client = anthropic.Anthropic(api_key="none", base_url="http://hoshikage", max_retries=2,
                                 http_client=_mock(httpx2, err, calls))
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="claude-x", max_tokens=8,
                               messages=[{"role": "user", "content": "x"}])
    assert info.value.body["error"] == {"type": "not_found_error", "message": err.message}
    assert calls == ["/v1/messages"]


def test_ollama_client_reads_them() -> None:
    ollama = need("ollama")
    httpx = need("httpx")
    calls: list[str] = []
    err = api_errors.model_not_found("llama3", ["tiny"])

    def handler(request: Any) -> Any:
        calls.append(request.url.path)
        status, headers, body = api_errors.render(request.url.path, err, "req_1")
        return httpx.Response(status, headers=headers, json=body)

    client = ollama.Client(host="http://hoshikage:8080", transport=httpx.MockTransport(handler))
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="llama3", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404 and info.value.error == err.message
    with pytest.raises(ollama.ResponseError) as streamed:
        for _ in client.chat(model="llama3", messages=[{"role": "user", "content": "x"}],
                             stream=True):
            pass
    assert streamed.value.status_code == 404 and streamed.value.error == err.message


def test_a_request_llama_server_could_not_read_is_the_client_s_400() -> None:
    """llama-server answers /v1/messages without 'messages' with a 500, which anthropic's
    SDK sent three times: retold as a 400, other 500s as they are."""
    said = {"error": {"code": 500, "message": "'messages' is required", "type": "server_error"}}
    assert api_errors.from_upstream(500, said).status == 400
    crash = {"error": {"code": 500, "message": "failed to decode", "type": "server_error"}}
    assert api_errors.from_upstream(500, crash).status == 500
