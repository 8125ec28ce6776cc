"""router/hosts.py: a request that reached a loopback address by a name that is not this
machine's (a DNS rebinding) is refused, by the router and by its head start."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from hoshikage_sd.router import hosts
from hoshikage_sd.router.headstart import request as headstart
from hoshikage_sd.router.proxy import Request, Response
from tests.unit.test_panel import router_for, units_runtime  # noqa: F401 (its fixture)


@pytest.mark.parametrize(("host", "local", "ok"), [
    ("localhost:8080", "127.0.0.1", True),
    ("LOCALHOST.", "127.0.0.1", True),
    ("app.localhost:8080", "127.0.0.1", True),
    ("127.0.0.1:8080", "127.0.0.1", True),
    ("[::1]:8080", "::1", True),
    ("10.1.2.3", "127.0.0.1", True),  # an address names no one else's site
    (None, "127.0.0.1", True),  # HTTP/1.0 without Host
    (f"{socket.gethostname()}:8080", "127.0.1.1", True),  # Debian's /etc/hosts name
    ("evil.example:8080", "127.0.0.1", False),
    ("evil.example", "::ffff:127.0.0.1", False),
    ("evil.example", "::1", False),
    ("127.0.0.1.evil.example", "127.0.0.1", False),
    ("evil.example", "192.168.1.5", True),  # the socket opened to the network: not asked
    ("evil.example", "", True),  # a unix socket
])
def test_allowed(host: str | None, local: str, ok: bool) -> None:
    assert hosts.allowed(host, local) is ok
    if host and hosts.name_of(host) == "evil.example":
        assert hosts.allowed(host, local, ["EVIL.example"])  # allowed_hosts: names it


def ask(router: object, host: str, local: str, path: str = "/panel/api/state") -> int:
    request = Request("GET", path, "1.1", [(b"Host", host.encode())], b"",
                      peer="127.0.0.1", local=local)
    result = asyncio.run(router.handle(request))  # type: ignore[attr-defined]
    assert isinstance(result, Response), result
    if result.status == 403:
        assert json.loads(result.body)["error"]["code"] == "host_refused"
    return result.status


def test_the_router_refuses_a_rebinding_name_on_every_route(tmp_path: Path) -> None:
    router = router_for(tmp_path)
    for path in ("/panel/api/state", "/v1/models", "/health", "/metrics"):
        assert ask(router, "evil.example:8080", "127.0.0.1", path) == 403, path
        assert ask(router, "localhost:8080", "127.0.0.1", path) == 200, path
    assert ask(router, "evil.example:8080", "10.0.0.2") == 200
    (tmp_path / "named").mkdir()
    named = router_for(tmp_path / "named", "allowed_hosts: [llm.example]")
    assert ask(named, "llm.example", "127.0.0.1") == 200
    assert ask(named, "evil.example", "127.0.0.1") == 403


def test_no_head_start_for_a_rebinding_name() -> None:
    chat = (b'POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Length: 16\r\n\r\n'
            b'{"model": "m"}  ')
    assert headstart.parse(chat % b"localhost:8080", "127.0.0.1") is not None
    assert headstart.parse(chat % b"evil.example:8080", "127.0.0.1") is None
    assert headstart.parse(chat % b"evil.example:8080", "10.0.0.2") is not None


def test_allowed_hosts_are_read_as_the_request_s_name_is(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """An entry with a trailing dot, a port or capitals matches (it never did)."""
    for entry in ("Upper.Example.", "upper.example:443", "UPPER.EXAMPLE"):
        assert hosts.allowed("upper.example", "127.0.0.1", [entry]), entry
        assert hosts.allowed("Upper.Example.:8080", "127.0.0.1", [entry]), entry


def test_the_names_etc_hosts_gives_a_loopback_address_are_this_machine_s(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian's installer writes `127.0.1.1 box.example.com box`: the FQDN was refused."""
    import builtins
    import io

    text = "127.0.0.1 localhost\n127.0.1.1 box.example.com box # the installer's\n" \
           "10.0.0.5 evil.example\n::1 ip6-localhost\n"
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: io.StringIO(text)
                        if path == "/etc/hosts" else real_open(path, *a, **k))
    monkeypatch.setattr(hosts, "_machine", None)
    assert hosts.allowed("box.example.com:8080", "127.0.1.1")
    assert hosts.allowed("BOX", "127.0.0.1")
    assert not hosts.allowed("evil.example", "127.0.0.1")  # not a loopback line
    monkeypatch.setattr(hosts, "_machine", None)
