"""Optional API keys under real systemd: the keys come as a systemd credential
(LoadCredential= in a drop-in, as README says), the router checks them before anything
starts, and the official clients send them as their users do."""

from __future__ import annotations

import http.client
import json

import anthropic
import openai
import pytest

from testbed.deploy import Deployment
from tests.system.conftest import TinyDeployer

pytestmark = pytest.mark.system
UNIT = "hoshikage-model@tiny.service"
HELLO = [{"role": "user", "content": "hello"}]
ANY_MODEL = "sk-hoshikage-test-any-0123456789"
OTHER_ONLY = "sk-hoshikage-test-other-9876543210"


@pytest.fixture
def hk(deploy_tiny: TinyDeployer) -> Deployment:
    deployment = deploy_tiny({"tiny": 'ttl: 1h\nargs: ["-c", "2048"]',
                              "other": 'ttl: 1h\nargs: ["-c", "2048"]'},
                             router_idle_exit="1h", api_keys="credential:api-keys")
    root = deployment.container.root
    keys = root / "etc/hoshikage/api-keys"
    keys.write_text(f"# test keys\n{ANY_MODEL}\n{OTHER_ONLY}: other\n")
    keys.chmod(0o600)  # root's only: systemd reads it for the service (LoadCredential=)
    dropin = root / "etc/systemd/system/hoshikage.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "api-keys.conf").write_text(
        "[Service]\nLoadCredential=api-keys:/etc/hoshikage/api-keys\n")
    deployment.container.systemctl("daemon-reload")
    return deployment


def raw(hk: Deployment, path: str, body: object, headers: dict[str, str]) -> tuple[int, object]:
    conn = http.client.HTTPConnection("127.0.0.1", hk.port, timeout=60)
    conn.request("POST", path, body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", **headers})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data


def test_api_keys_from_a_credential_are_checked_before_anything_starts(
        hk: Deployment) -> None:
    chat = {"model": "tiny", "max_tokens": 4, "messages": HELLO}
    status, body = raw(hk, "/v1/chat/completions", chat, {})
    assert status == 401, body
    status, body = raw(hk, "/api/chat", chat, {"Authorization": "Bearer not-a-key-at-all"})
    assert status == 401 and set(body) == {"error"}, body  # type: ignore[arg-type]
    assert hk.state(UNIT) == "inactive" and not hk.processes("llama-server")
    assert hk.state("hoshikage.service") == "active"  # it answered: it read the credential

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{hk.port}/v1", api_key="unused",
                           timeout=120, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    assert denied.value.code == "invalid_api_key"
    assert hk.state(UNIT) == "inactive"

    reply = client.with_options(api_key=ANY_MODEL).chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=4)
    assert reply.choices[0].message.content is not None
    assert hk.state(UNIT) == "active"

    # the allow-list: OTHER_ONLY may use "other" only (403, and "other" starts for it)
    with pytest.raises(openai.PermissionDeniedError) as forbidden:
        client.with_options(api_key=OTHER_ONLY).chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=4)
    assert forbidden.value.code == "model_not_allowed"
    claude = anthropic.Anthropic(base_url=f"http://127.0.0.1:{hk.port}", api_key=OTHER_ONLY,
                                 timeout=120, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError):
        claude.messages.create(model="tiny", max_tokens=4, messages=HELLO)
    assert hk.state("hoshikage-model@other.service") == "inactive"
    message = claude.messages.create(model="other", max_tokens=4, messages=HELLO)
    assert message.content

    # health needs no key; no key is in any log line
    conn = http.client.HTTPConnection("127.0.0.1", hk.port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    journal = json.dumps(hk.container.journal())
    assert ANY_MODEL not in journal and OTHER_ONLY not in journal
