"""hoshikage-front (router/headstart/front.c) against the Python head start: the same decision
on the same requests and index (or a hand-over), the same ticket and admitted record as
protocol.py, the same unit names as sd/units, and malformed requests handed over, never a
crash."""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hoshikage_sd import lastgood, protocol
from hoshikage_sd.fileid import identity
from hoshikage_sd.model_unit import install
from hoshikage_sd.router import routes
from hoshikage_sd.router.headstart import index, request
from hoshikage_sd.router.headstart.take import front as front_said
from hoshikage_sd.sd import units
from tests.support import unavailable

ARGV = ["/usr/bin/llama-server", "-m", "/srv/models/tiny.gguf", "--chat-template", "a b\nc", ""]
ENV = {"PATH": "/usr/bin:/bin", "ODD": "x=y"}


@pytest.fixture(scope="module")
def front_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("front") / "hoshikage-front"
    why = install.build_native(str(path), install.FRONT_SOURCE, ("-lsystemd",))
    if why is not None:
        unavailable(f"cannot build hoshikage-front: {why}")
    return path


def headstart(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A head-start section (index.build's shape) with three models."""
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"GGUF")
    st = source.stat()
    launch = {"argv": ARGV, "env": ENV, "source": str(source), "file": [st.st_size,
              st.st_mtime_ns], "estimate": 123456, "needed": 1 << 20,
              "staged": str(tmp_path / "staged" / "tiny.gguf")}
    models = [
        {"name": "tiny", "socket": "/run/hoshikage/tiny.sock", "health": "/health",
         "unit": units.model_unit("tiny"), "launch": launch, "keyed": False},
        {"name": "Qwen3-8B", "socket": "/run/hoshikage/Qwen3-8B.sock", "health": "/health",
         "unit": units.model_unit("Qwen3-8B"), "launch": None, "keyed": False},
        {"name": "qwen3-coder", "socket": "/run/hoshikage/qwen3-coder.sock",
         "health": "/v1/models", "unit": units.model_unit("qwen3-coder"), "launch": None,
         "keyed": True},
    ]
    names = [("tiny", ("little", "ÉTÉ-model"), ("small",)),
             ("Qwen3-8B", ("q8",), ("chat", "small")),
             ("qwen3-coder", ("KODER",), ())]
    return {"default": "tiny", "strict_names": False, "api_keys": False, "max_body": 4096,
            "runtime": str(tmp_path / "run"), "names": names, "models": models,
            "routes": {p: sorted(m) for p, m in routes.MODEL_ROUTES.items()},
            "prefixes": list(routes.MODEL_PREFIXES), "named": sorted(routes.NAMED_ONLY),
            **overrides}


def keep(tmp_path: Path, section: dict[str, Any]) -> tuple[Path, dict[str, str]]:
    """front.index for `section` as lastgood writes it, in a runtime directory; the
    environment the front reads it with."""
    manifest = tmp_path / "models.yaml"
    manifest.write_text("models: {}\n")
    value = {"version": lastgood.VERSION, "source": str(manifest),
             "files": {str(manifest): identity(str(manifest)),
                       str(tmp_path / "names.json"): None},
             "headstart": json.loads(json.dumps(section))}
    runtime = tmp_path / "run"
    runtime.mkdir(exist_ok=True)
    data = lastgood.front_lines(value)
    assert data is not None
    (runtime / lastgood.FRONT).write_bytes(data)
    return runtime, {"PATH": "/usr/bin:/bin", "RUNTIME_DIRECTORY": str(runtime),
                     "HOSHIKAGE_CONFIG": str(manifest)}


def python_decision(raw: bytes, section: dict[str, Any]) -> str:
    """What take_early decides before its probe and admission: "start NAME" or "hand-over"."""
    parsed = request.parse(raw)
    if parsed is None:
        return "hand-over"
    try:
        names = request.wanted(parsed)
    except ValueError:
        return "hand-over"
    if names is None or section["api_keys"] or len(parsed[3]) > section["max_body"]:
        return "hand-over"
    model = None
    for name in names:
        try:
            model = index.lookup(section, name)
        except index.Ambiguous:
            return "hand-over"
        if model is not None:
            break
    if model is None or model["keyed"]:
        return "hand-over"
    return f"start {model['name']}"


def front_decision(front_bin: Path, raw: bytes, env: dict[str, str], *args: str) -> str:
    result = subprocess.run([str(front_bin), "--decide", *args], input=raw, env=env,
                            capture_output=True, timeout=10)
    assert result.returncode == 0, (raw, result)
    return result.stdout.decode().strip()


def post(body: bytes | str, path: str = "/v1/chat/completions", head: str = "") -> bytes:
    data = body.encode() if isinstance(body, str) else body
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head}"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


CHAT = '{"model": "%s", "messages": [{"role": "user", "content": "hi \\u00e9"}], "n": -1.5e3}'

#: requests both heads start the same model for
STARTS = {
    "exact name": post(CHAT % "tiny"),
    "alias": post(CHAT % "little"),
    "non-ASCII alias": post(CHAT % "ÉTÉ-model"),
    "tag (first model's)": post(CHAT % "small"),
    "partial, one model": post(CHAT % "8b"),
    "partial, upper case": post(CHAT % "QWEN3-8"),
    "default model": post('{"messages": []}'),
    "empty name: default": post(CHAT % ""),
    "query model, empty body": post("", "/v1/completions?x=1&model=q8"),
    "named-only route with ?model=": b"GET /health?model=tiny HTTP/1.1\r\n\r\n",
    "slots prefix": post(CHAT % "tiny", "/slots/0"),
    "HTTP/1.0, no Host": b"POST /v1/embeddings HTTP/1.0\r\nContent-Length: 16\r\n\r\n"
                         b'{"model":"tiny"}',
    "pipelined bytes after the body": post(CHAT % "tiny") + b"GET / HTTP/1.1\r\n\r\n",
    "padded Content-Length": b"POST /completion HTTP/1.1\r\nContent-Length:  016 \r\n\r\n"
                             b'{"model":"tiny"}',
}

#: requests the front hands over (the Python head start decides them, as without a front)
HANDED = {
    "unknown model": post(CHAT % "nope"),
    "ambiguous partial": post(CHAT % "qwen3"),
    "keyed model": post(CHAT % "KODER"),
    "not a model route": b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    "OPTIONS": b"OPTIONS /v1/chat/completions HTTP/1.1\r\n\r\n",
    "wrong method": b"GET /v1/chat/completions HTTP/1.1\r\n\r\n",
    "health without ?model=": b"GET /health HTTP/1.1\r\n\r\n",
    "Ollama": post('{"model": "tiny"}', "/api/chat"),
    "escaped name": post('{"model": "ti\\u006ey"}'),
    "escaped key": post('{"mod\\u0065l": "tiny"}'),
    "two model keys": post('{"model": "tiny", "model": "q8"}'),
    "model not a string": post('{"model": 7}'),
    "not an object": post('["tiny"]'),
    "NaN": post('{"model": "tiny", "t": NaN}'),
    "trailing comma": post('{"model": "tiny",}'),
    "extra data": post('{"model": "tiny"} {}'),
    "BOM": post(b'\xef\xbb\xbf{"model": "tiny"}'),
    "UTF-16": post('{"model": "tiny"}'.encode("utf-16-le")),
    "invalid UTF-8": post(b'{"model": "tiny", "x": "\xff"}'),
    "raw control character": post('{"model": "tiny", "x": "a\tb"}'),
    "leading zero": post('{"model": "tiny", "n": 01}'),
    "deep nesting": post('{"model": "tiny", "x": ' + "[" * 100 + "]" * 100 + "}"),
    "huge int": post('{"model": "tiny", "n": ' + "1" * 5000 + "}"),
    "non-ASCII ?model=": post("", "/v1/completions?model=\xe9t\xe9"),
    "non-ASCII partial": post(CHAT % "été"),
    "chunked": b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"10\r\n" + b'{"model":"tiny"}' + b"\r\n0\r\n\r\n",
    "two Content-Lengths that differ": post(CHAT % "tiny", head="Content-Length: 3\r\n"),
    "two Hosts": post(CHAT % "tiny", head="Host: y\r\n"),
    "bare LF": b"POST /v1/completions HTTP/1.1\nContent-Length: 2\r\n\r\n{}",
    "obs-fold": post(CHAT % "tiny", head=" folded\r\n"),
    "space before colon": post(CHAT % "tiny", head="X-A : b\r\n"),
    "tab in target": b"POST /v1/completions\t HTTP/1.1\r\n\r\n",
    "HTTP/2.0": b"POST /v1/completions HTTP/2.0\r\nContent-Length: 2\r\n\r\n{}",
    "two spaces": b"POST  /v1/completions HTTP/1.1\r\n\r\n",
    "NUL in the head": post(CHAT % "tiny", head="X-A: \0\r\n"),
    "DEL in the head": post(CHAT % "tiny", head="X-A: \x7f\r\n"),
    "Content-Length sign": b"POST /completion HTTP/1.1\r\nContent-Length: +16\r\n\r\n"
                           b'{"model":"tiny"}',
    "body over max_body": post('{"model": "tiny", "x": "%s"}' % ("a" * 5000)),
    "body not all there": post(CHAT % "tiny")[:-3],
    "no head end": b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n",
    "empty": b"",
}


def test_the_front_starts_what_the_head_start_starts(front_bin: Path, tmp_path: Path) -> None:
    section = headstart(tmp_path)
    _, env = keep(tmp_path, section)
    for what, raw in STARTS.items():
        expected = python_decision(raw, section)
        assert expected.startswith("start "), what
        assert front_decision(front_bin, raw, env) == expected, what


def test_the_front_hands_over_what_it_cannot_decide(front_bin: Path, tmp_path: Path) -> None:
    section = headstart(tmp_path)
    _, env = keep(tmp_path, section)
    for what, raw in HANDED.items():
        said = front_decision(front_bin, raw, env)
        assert said.startswith("hand-over "), (what, said)
    # what the Python head start would start of these, it still does after the hand-over
    assert python_decision(HANDED["escaped name"], section) == "start tiny"


@pytest.mark.parametrize("change", ["api_keys", "max_body", "default", "manifest", "stale",
                                    "another user", "cut short", "none"])
def test_no_usable_index_hands_everything_over(front_bin: Path, tmp_path: Path,
                                               change: str) -> None:
    changes: dict[str, dict[str, Any]] = {"api_keys": {"api_keys": True},
                                          "max_body": {"max_body": 10},
                                          "default": {"default": None}}
    overrides = changes.get(change, {})
    section = headstart(tmp_path, **overrides)
    runtime, env = keep(tmp_path, section)
    front_index = runtime / lastgood.FRONT
    if change == "manifest":
        env["HOSHIKAGE_CONFIG"] = str(tmp_path / "other.yaml")
    elif change == "stale":
        (tmp_path / "names.json").write_text("{}")  # was not there when it was kept
    elif change == "another user":
        os.chown(front_index, 12345, 12345)
    elif change == "cut short":
        front_index.write_bytes(front_index.read_bytes().removesuffix(b"end\n"))
    elif change == "none":
        front_index.unlink()
    raw = STARTS["default model"]
    said = front_decision(front_bin, raw, env)
    assert said.startswith("hand-over"), said
    if change in ("api_keys", "max_body", "default"):
        assert python_decision(raw, section) == "hand-over"


def test_malformed_requests_are_handed_over_never_a_crash(front_bin: Path,
                                                          tmp_path: Path) -> None:
    """Seeded mutations of good requests: each either decided as the head start decides it,
    or handed over; the front never fails."""
    section = headstart(tmp_path)
    _, env = keep(tmp_path, section)
    rng = random.Random(22)
    seeds = list(STARTS.values()) + list(HANDED.values())
    odd = [b"\r", b"\n", b"\0", b"\x80", b"\xff", b" ", b"\t", b":", b'"', b"\\", b"{", b"}",
           b"[", b"]", b",", b"?", b"&", b"=", b"0", b"9"]
    for _ in range(300):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            at = rng.randint(0, len(raw))
            kind = rng.randrange(4)
            if kind == 0 and raw:
                raw[min(at, len(raw) - 1)] = rng.randrange(256)
            elif kind == 1:
                raw[at:at] = rng.choice(odd)
            elif kind == 2:
                del raw[at:at + rng.randint(1, 8)]
            else:
                raw = raw[:at]
        said = front_decision(front_bin, bytes(raw), env)
        assert said.startswith("hand-over ") or said == python_decision(bytes(raw), section), \
            (bytes(raw), said)


def test_unit_names_are_escaped_as_sd_units_escapes_them(front_bin: Path) -> None:
    names = ["tiny", "Qwen3-8B", "a.b_c:d", ".hidden", "a/b", "név", "a b", "-rf", "x\\y"]
    out = subprocess.run([str(front_bin), "--escape", *names], capture_output=True,
                         check=True).stdout.decode("utf-8", "surrogateescape").splitlines()
    assert out == [units.escape(n) for n in names]


def test_the_ticket_and_admitted_record_are_protocols(front_bin: Path, tmp_path: Path) -> None:
    section = headstart(tmp_path)
    runtime, env = keep(tmp_path, section)
    assert front_decision(front_bin, STARTS["exact name"], env, "--ticket") == "start tiny"
    theirs = tmp_path / "python"
    protocol.write_admitted(str(theirs), "tiny", 123456)
    protocol.write_ticket(str(theirs), "tiny", "/run/hoshikage/tiny.sock", "/health", ENV, ARGV)
    for relative, mode in (("admitted/tiny.json", 0o644), ("launch/tiny", 0o600)):
        mine, python = runtime / relative, theirs / relative
        assert stat.S_IMODE(mine.stat().st_mode) == stat.S_IMODE(python.stat().st_mode) == mode
        a, b = mine.read_bytes().split(b"\0"), python.read_bytes().split(b"\0")
        if relative.startswith("launch"):
            assert abs(float(a[1]) - float(b[1])) < 5  # the expiry: now + TICKET_TTL
            a[1] = b[1]
        assert a == b, relative
    ticket = protocol.take_ticket(str(runtime), "tiny")
    assert ticket.argv == [a.encode() for a in ARGV]
    assert [p.name for p in runtime.iterdir() if p.name.startswith(".")] == []


def test_the_router_gets_the_connection_with_its_request_unread(front_bin: Path,
                                                                tmp_path: Path) -> None:
    """The whole front as hoshikage.service runs it: the listening socket from systemd, the
    request peeked at, no bus (so the start fails: no ticket left, the request handed
    over), then exec of the router with the socket, the connection and the request's bytes
    still in it."""
    section = headstart(tmp_path)
    runtime, env = keep(tmp_path, section)
    router = tmp_path / "router"
    out = tmp_path / "router.out"
    router.write_text(f"""#!{sys.executable}
import os, socket, json
said = os.environ["HOSHIKAGE_FRONT"]
items = dict(i.partition("=")[::2] for i in said.split())
conn = socket.socket(fileno=int(items["conn"]))
conn.settimeout(5)
data = b""
while len(data) < {len(STARTS["exact name"])}:
    data += conn.recv(65536)
listener = socket.socket(fileno=3)
open({str(out)!r}, "w").write(json.dumps({{"said": said, "data": data.decode(),
    "fds": os.environ["LISTEN_FDS"], "listening": listener.getsockopt(socket.SOL_SOCKET,
    socket.SO_ACCEPTCONN)}}))
conn.sendall(b"ok")
""")
    router.chmod(0o755)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    client.sendall(STARTS["exact name"])
    env |= {"LISTEN_FDS": "1", "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus"}
    fd = listener.fileno()
    as_systemd = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.close(int(sys.argv[1])); "
                  "os.environ['LISTEN_PID'] = str(os.getpid()); "
                  "os.execv(sys.argv[2], sys.argv[2:])")
    proc = subprocess.Popen(  # the socket as fd 3, LISTEN_PID the front's own (an exec)
        [sys.executable, "-c", as_systemd, str(fd), str(front_bin), str(router)], env=env,
        pass_fds=(fd,))
    assert proc.wait(timeout=10) == 0
    client.settimeout(5)
    assert client.recv(2) == b"ok"
    seen = json.loads(out.read_text())
    assert seen["data"].encode() == STARTS["exact name"]  # nothing read away
    assert seen["fds"] == "1" and seen["listening"] == 1
    said = front_said(seen["said"])
    assert said is not None and said["handed"] == "bus-error" and "began" in said
    assert not (runtime / "launch" / "tiny").exists()
    assert not (runtime / "admitted" / "tiny.json").exists()
    assert int(said["began"]) <= time.monotonic() * 1e6


def test_front_lines_refuse_what_a_line_cannot_hold(tmp_path: Path) -> None:
    section = headstart(tmp_path)
    section["names"][1] = ("Qwen3-8B", ("line\nend",), ())
    value = {"version": lastgood.VERSION, "source": "/m.yaml", "files": {"/m.yaml": None},
             "headstart": section}
    assert lastgood.front_lines(value) is None
    assert lastgood.front_lines({**value, "headstart": None}) is None


def test_the_head_start_takes_what_the_front_did(monkeypatch: pytest.MonkeyPatch) -> None:
    """take.py's side: the connection the front took, and its start (the head start is done)
    or its hand-over (the head start peeks at the request as it would have)."""
    from hoshikage_sd.router.headstart import take
    from hoshikage_sd.sd import daemon

    monkeypatch.setattr(daemon, "listen_fds", list)
    ours, client = socket.socketpair()
    fd = ours.detach()
    monkeypatch.setenv("HOSHIKAGE_FRONT", f"began=1000000 conn={fd} read=1000100 bus=1000200 "
                       "listed=1000300 ticket=1000400 done=1000500 started=tiny estimate=5 "
                       "available=9")
    first = take.take_early()
    assert "HOSHIKAGE_FRONT" not in os.environ
    assert first.decided and first.started == "tiny" and first.admitted == (5, 9)
    assert first.began == 1.0 and "in hoshikage-front" in first.notes[0]
    assert first.raw_connection is not None and first.raw_connection.fileno() == fd
    assert not os.get_inheritable(fd)
    first.raw_connection.close()

    ours, client2 = socket.socketpair()
    client2.sendall(STARTS["exact name"])
    fd = ours.detach()
    monkeypatch.setenv("HOSHIKAGE_FRONT", f"began=1000000 conn={fd} handed=unknown-name")
    first = take.FirstRequest()
    first.accept()
    assert not first.decided and first.started is None
    assert first.request == request.parse(STARTS["exact name"])
    assert first.notes == ["hoshikage-front handed the request over: unknown-name"]
    assert first.raw_connection is not None
    first.raw_connection.close()
    client.close()
    client2.close()


def test_lastgood_writes_front_index_with_manifest_json(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """One writer from one value: front.index follows manifest.json, and goes when the
    value has no head-start part."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    monkeypatch.setattr(lastgood, "_on_disk", {})
    manifest = tmp_path / "models.yaml"
    manifest.write_text("models: {}\n")
    value = {"version": lastgood.VERSION, "source": str(manifest),
             "files": {str(manifest): identity(str(manifest))},
             "headstart": json.loads(json.dumps(headstart(tmp_path)))}
    assert lastgood._write(value)
    assert (tmp_path / lastgood.FRONT).read_bytes() == lastgood.front_lines(value)
    assert lastgood._write({**value, "headstart": None})
    assert not (tmp_path / lastgood.FRONT).exists()
    assert json.loads((tmp_path / lastgood.NAME).read_text())["headstart"] is None


def test_without_a_compiler_the_front_is_a_stub_that_runs_the_router(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-cc")
    path = tmp_path / "hoshikage-front"
    assert "shell stub" in install.install_front(str(path))
    out = subprocess.run([str(path), "/bin/echo", "the router", "ran"], capture_output=True,
                         text=True, check=True).stdout
    assert out == "the router ran\n"
