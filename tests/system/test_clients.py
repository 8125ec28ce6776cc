"""The official client libraries, used as their users do, against hoshikage under real
systemd: openai, anthropic and ollama (the test extra installs them)."""

from __future__ import annotations

import datetime as dt
import http.client

import anthropic
import openai
import pytest
from ollama import Client as OllamaClient
from ollama import ResponseError
from prometheus_client import parser

from testbed.deploy import Deployment
from tests.system.conftest import TinyDeployer

pytestmark = pytest.mark.system
UNIT = "hoshikage-model@tiny.service"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def hk(deploy_tiny: TinyDeployer) -> Deployment:
    return deploy_tiny({
        "tiny": 'aliases: [small]\nttl: 1h\nargs: ["-c", "2048", "--embeddings", '
                '"--pooling", "mean"]',
        "ghost": "ttl: 1h"}, files=["tiny"], router_idle_exit="1h")  # ghost: no file


def oai(hk: Deployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{hk.port}/v1", api_key="unused",
                         timeout=120)


def claude(hk: Deployment) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{hk.port}", api_key="unused",
                               timeout=120)


def olla(hk: Deployment) -> OllamaClient:
    return OllamaClient(host=f"http://127.0.0.1:{hk.port}", timeout=120)


# -- openai -------------------------------------------------------------------------------------

def test_openai_models_list_and_retrieve(hk: Deployment) -> None:
    client = oai(hk)
    assert {m.id for m in client.models.list()} == {"tiny", "ghost"}
    model = client.models.retrieve("small")  # an alias resolves
    assert model.id == "tiny" and model.object == "model"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("nope")
    assert caught.value.code == "model_not_found" and caught.value.type == "invalid_request_error"
    assert caught.value.request_id
    assert hk.state(UNIT) == "inactive"  # listing starts nothing


def test_openai_chat_stream_and_embeddings(hk: Deployment) -> None:
    client = oai(hk)
    raw = client.chat.completions.with_raw_response.create(model="small", messages=HELLO,
                                                            max_tokens=4)
    assert raw.headers["x-request-id"].startswith("req_")
    chat = raw.parse()
    assert chat.choices[0].message.content
    stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8,
                                            stream=True)
    assert stream.response.headers["x-request-id"]
    pieces = [c.choices[0].delta.content for c in stream if c.choices]
    assert len(pieces) > 1 and "".join(p or "" for p in pieces)
    embeddings = client.embeddings.create(model="tiny", input=["one", "two"])
    assert len(embeddings.data) == 2 and len(embeddings.data[0].embedding) > 0
    assert embeddings._request_id  # type: ignore[attr-defined]


def test_openai_errors_say_what_and_whether_to_retry(hk: Deployment) -> None:
    client = oai(hk)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="nope", messages=HELLO, max_tokens=4)
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"
    assert "tiny" in unknown.value.message
    # a model whose file is missing: one answer, no retries (x-should-retry: false)
    with pytest.raises(openai.InternalServerError) as missing:
        client.with_options(max_retries=2).chat.completions.create(
            model="ghost", messages=HELLO, max_tokens=4)
    assert missing.value.status_code == 503
    assert missing.value.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in missing.value.response.headers
    assert "/srv/models/ghost.gguf" in missing.value.message
    assert len(hk.events("start-failed", "ghost")) == 1  # started once, not three times
    # a path no API has: the router's 404 in OpenAI's shape, and nothing starts
    with pytest.raises(openai.NotFoundError) as typo:
        client.post("/chat/complete", body={"model": "tiny"}, cast_to=object)
    assert typo.value.code == "not_found"
    assert hk.state(UNIT) == "inactive"


# -- anthropic ----------------------------------------------------------------------------------

def test_anthropic_messages_and_stream(hk: Deployment) -> None:
    client = claude(hk)
    message = client.messages.create(model="tiny", max_tokens=8, messages=HELLO)
    assert message.content and message.content[0].type == "text"
    assert message._request_id  # the request-id header
    with client.messages.stream(model="small", max_tokens=8, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        assert stream.response.headers["request-id"]
    assert text


def test_anthropic_errors_in_anthropics_shape(hk: Deployment) -> None:
    client = claude(hk)
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="nope", max_tokens=8, messages=HELLO)
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error", body
    assert body["error"]["type"] == "not_found_error" and "nope" in body["error"]["message"]
    assert caught.value.request_id == body["request_id"]
    with pytest.raises(anthropic.InternalServerError) as missing:
        client.messages.create(model="ghost", max_tokens=8, messages=HELLO)
    assert missing.value.status_code == 503
    assert missing.value.response.headers["x-should-retry"] == "false"


# -- ollama -------------------------------------------------------------------------------------

def test_ollama_list_show_ps(hk: Deployment) -> None:
    client = olla(hk)
    assert {m.model for m in client.list().models} == {"tiny", "ghost"}
    shown = client.show("tiny")
    assert shown.details is not None and shown.details.family == "llama"
    assert shown.modelinfo and "general.architecture" in shown.modelinfo
    assert client.ps().models == []
    with pytest.raises(ResponseError) as caught:
        client.show("nope")
    assert caught.value.status_code == 404
    with pytest.raises(ResponseError) as pull:
        client.pull("tiny")
    assert pull.value.status_code == 501 and "does not manage" in pull.value.error
    assert hk.state(UNIT) == "inactive"


def test_ollama_chat_generate_embed(hk: Deployment) -> None:
    client = olla(hk)
    chat = client.chat(model="tiny", messages=HELLO, options={"num_predict": 4})
    assert chat.done and isinstance(chat.message.content, str)
    assert chat.eval_count is not None and chat.eval_count <= 4
    parts = list(client.chat(model="tiny", messages=HELLO, stream=True,
                             options={"num_predict": 8}))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts)
    generated = client.generate(model="tiny", prompt="once upon", options={"num_predict": 4})
    assert generated.done and generated.response
    streamed = list(client.generate(model="small", prompt="once upon", stream=True,
                                    options={"num_predict": 8}))
    assert streamed[-1].done and "".join(p.response for p in streamed)
    embedded = client.embed(model="tiny", input=["one", "two"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) > 0
    legacy = client.embeddings(model="tiny", prompt="one")
    assert len(legacy.embedding) > 0
    (loaded,) = client.ps().models
    assert loaded.model == "tiny" and loaded.expires_at is not None
    assert loaded.expires_at > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=50)  # ttl 1h


def test_ollama_keep_alive_zero_unloads(hk: Deployment) -> None:
    client = olla(hk)
    client.generate(model="tiny", prompt="hi", options={"num_predict": 2})
    assert [m.model for m in client.ps().models] == ["tiny"]
    unloaded = client.generate(model="tiny", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert client.ps().models == []  # gone by the time the answer came
    hk.wait_for("the unit to stop", lambda: hk.state(UNIT) == "inactive")
    (released,) = hk.events("released", "tiny")
    assert released["HOSHIKAGE_REASON"] == "keep_alive 0"
    # keep_alive 0 on a real request: answered, then unloaded
    answer = client.chat(model="tiny", messages=HELLO, options={"num_predict": 2},
                         keep_alive=0)
    assert answer.done
    hk.wait_for("ps() to be empty", lambda: client.ps().models == [], timeout=5)
    hk.wait_for("the unit to stop", lambda: hk.state(UNIT) == "inactive")


def test_ollama_keep_alive_duration_and_forever(hk: Deployment) -> None:
    client = olla(hk)
    client.generate(model="tiny", prompt="hi", options={"num_predict": 2}, keep_alive=-1)
    (forever,) = client.ps().models
    assert forever.expires_at is not None and forever.expires_at.year >= 2200
    client.generate(model="tiny", prompt="hi", options={"num_predict": 2}, keep_alive="2s")
    (short,) = client.ps().models
    assert short.expires_at is not None
    assert short.expires_at < dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    # the idle watch (every second here) honours it: the manifest's TTL is an hour
    hk.wait_for("the 2 s keep_alive to stop the model", lambda: hk.state(UNIT) == "inactive")
    (idle,) = hk.events("idle-stop", "tiny")
    assert float(idle["HOSHIKAGE_TTL_SECONDS"]) == 2.0


# -- metrics ------------------------------------------------------------------------------------

def scrape(hk: Deployment) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics, parsed by prometheus_client (which raises on a malformed exposition)."""
    conn = http.client.HTTPConnection("127.0.0.1", hk.port, timeout=30)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    assert response.status == 200 and response.getheader("Content-Type", "").startswith(
        "text/plain; version=0.0.4"), text[:200]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_and_a_scrape_keeps_nothing_alive(
        deploy_tiny: TinyDeployer) -> None:
    hk = deploy_tiny({"tiny": "ttl: 2s"}, router_idle_exit="2s")
    scrape(hk)
    assert hk.state(UNIT) == "inactive"  # a scrape starts no model
    oai(hk).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        oai(hk).chat.completions.create(model="nope", messages=HELLO, max_tokens=2)
    samples = scrape(hk)
    chat = (("model", "tiny"), ("route", "/v1/chat/completions"), ("status", "200"))
    assert samples[("hoshikage_requests_total", chat)] == 1
    ttfb = (("model", "tiny"), ("route", "/v1/chat/completions"))
    assert samples[("hoshikage_time_to_first_byte_seconds_count", ttfb)] == 1
    unknown = (("model", ""), ("route", "/v1/chat/completions"), ("status", "404"))
    assert samples[("hoshikage_requests_total", unknown)] == 1
    # scraped five times a second, the model still idles out and the router still exits
    hk.wait_for("the router's idle exit while scraped",
                lambda: bool(scrape(hk)) and bool(hk.events("router-exit")), timeout=60)
    assert hk.events("idle-stop", "tiny")
    # the router's counts outlive it
    assert scrape(hk)[("hoshikage_requests_total", chat)] == 1


def test_ollama_keep_alive_zero_lets_another_clients_stream_finish(hk: Deployment) -> None:
    """One client streams; another asks for keep_alive 0 meanwhile: the stream ends whole
    (it was cut mid-reply), and the model goes once it has (as Ollama does)."""
    import threading

    client = olla(hk)
    parts: list[object] = []
    first = threading.Event()

    def stream() -> None:
        for part in client.generate(model="tiny", prompt="once upon a time", stream=True,
                                    options={"num_predict": 400}):
            parts.append(part)
            first.set()

    streaming = threading.Thread(target=stream)
    streaming.start()
    assert first.wait(60)
    unloaded = olla(hk).generate(model="tiny", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    streaming.join(120)
    assert parts and parts[-1].done and parts[-1].done_reason == "length", parts[-1]
    hk.wait_for("the unit to stop", lambda: hk.state(UNIT) == "inactive")
    (released,) = hk.events("released", "tiny")
    assert released["HOSHIKAGE_REASON"] == "keep_alive 0"


def test_ollama_keep_alive_zero_on_a_real_request_beside_another(hk: Deployment) -> None:
    """keep_alive 0 on a request answered while another client's still streams: the model
    goes once that one is answered (it was never unloaded)."""
    import threading

    client = olla(hk)
    first = threading.Event()
    ended: list[bool] = []

    def stream() -> None:
        for part in client.generate(model="tiny", prompt="once upon a time", stream=True,
                                    options={"num_predict": 400}):
            first.set()
            if part.done:
                ended.append(True)

    streaming = threading.Thread(target=stream)
    streaming.start()
    assert first.wait(60)
    answer = olla(hk).generate(model="tiny", prompt="hi", keep_alive=0,
                               options={"num_predict": 1})
    assert answer.done
    streaming.join(120)
    assert ended == [True]
    hk.wait_for("the unit to stop", lambda: hk.state(UNIT) == "inactive", timeout=15)
