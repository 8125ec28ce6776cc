"""The head start's name index (router/headstart/index.py, in the router's kept manifest) and
the head start that reads it (headstart/take.take_early): it names the model resolve()
names, or nothing."""

from __future__ import annotations

import json
import socket
import textwrap
from pathlib import Path

import pytest

from hoshikage_sd import lastgood, protocol
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import AmbiguousModel, names
from hoshikage_sd.resolve import resolve
from hoshikage_sd.router.config import load_config
from hoshikage_sd.router.headstart import index as name_index
from hoshikage_sd.router.headstart import take
from hoshikage_sd.sd import bus, daemon, units

MANIFEST = """
    runtime_dir: {run}
    state_dir: {state}
    default_model: qwen3-8b
    models:
      qwen3-8b:
        path: /m/q8.gguf
        aliases: [qwen]
        tags: [tool]
      qwen3-32b:
        path: /m/q32.gguf
        tags: [big]
        health: /v1/health
      gemma-3-4b:
        path: /m/g.gguf
        aliases: [Gem]
"""
#: the rule itself, which the fixture sets aside (test_lastgood.py checks it)
RACY = lastgood.RACY
NAMES = ["qwen3-8b", "qwen", "tool", "big", "Gem", "gem", "GEMMA", "32b", "qwen3-32", "nope",
         "", None, "qwen3", "q", "3", ":latest"]


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A manifest at $HOSHIKAGE_CONFIG, the router's runtime directory at
    $RUNTIME_DIRECTORY; returns the manifest's path. The test's own writes count as settled
    however soon a parse follows them (lastgood.RACY: none is made during one)."""
    run, state = tmp_path / "run", tmp_path / "state"
    (tmp_path / "shared").mkdir()
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(MANIFEST.format(run=run, state=state)))
    monkeypatch.setenv("HOSHIKAGE_CONFIG", str(path))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "shared"))
    monkeypatch.setattr(lastgood, "RACY", 0.0)
    return path


def expected(config: object, name: str | None) -> str | None:
    try:
        model = resolve(config, name)  # type: ignore[arg-type]
    except AmbiguousModel:
        return "ambiguous"
    return model.name if model else None


def found(index: dict[str, object], name: str | None) -> str | None:
    try:
        model = name_index.lookup(index, name)
    except name_index.Ambiguous:
        return "ambiguous"
    return model["name"] if model else None


def test_the_index_resolves_as_resolve_does(setup: Path) -> None:
    config = load_config(setup)
    index = name_index.read()
    assert index is not None
    assert Path(lastgood.path()).stat().st_mode & 0o777 == 0o640
    for name in NAMES:
        want = expected(config, name)
        # several partial matches: resolve() picks by rank, the index leaves it to it
        got = found(index, name)
        assert got == want or (got == "ambiguous" and len(config.matches(name or "")) > 1), name
    tiny = name_index.lookup(index, "big")
    assert tiny == {"name": "qwen3-32b",
                    "socket": str(config.socket_path("qwen3-32b")), "health": "/v1/health",
                    "unit": "hoshikage-model@qwen3\\x2d32b.service", "launch": None,
                    "keyed": False}


def test_the_cli_names_are_in_the_index(setup: Path) -> None:
    config = load_config(setup)
    names.save(config, names.Names(aliases={"g4": "gemma-3-4b"}, tags={"tool": "qwen3-32b"}))
    assert name_index.read() is None  # names.json is new: not what the index was made of
    config = load_config(setup)
    index = name_index.read()
    assert index is not None
    for name in ("g4", "tool", "qwen"):
        assert found(index, name) == expected(config, name)
    assert found(index, "tool") == "qwen3-32b"


def test_strict_names_and_a_single_model(setup: Path) -> None:
    setup.write_text(setup.read_text() + "strict_names: true\n")
    config = load_config(setup)
    index = name_index.read()
    assert index is not None and index["strict_names"] is True
    assert expected(config, "qwen3") == found(index, "qwen3") == "ambiguous"
    text = setup.read_text().replace("default_model: qwen3-8b\n", "")
    setup.write_text(text.split("  qwen3-32b:")[0])  # qwen3-8b alone: the default
    config = load_config(setup)
    index = name_index.read()
    assert index is not None and list(config.models) == ["qwen3-8b"]
    assert found(index, None) == found(index, "") == expected(config, None) == "qwen3-8b"


def test_a_changed_manifest_or_names_file_makes_the_index_stale(
        setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(setup)
    assert name_index.read() is not None
    setup.write_text(setup.read_text())  # same text, a new write: not trusted
    assert name_index.read() is None
    load_config(setup)
    assert name_index.read() is not None
    names.save(config, names.Names())
    assert name_index.read() is None  # names.json appeared
    load_config(setup)
    assert name_index.read() is not None
    names.path(config).unlink()
    assert name_index.read() is None  # and went
    load_config(setup)
    monkeypatch.setenv("HOSHIKAGE_CONFIG", str(setup.with_name("other.yaml")))
    assert name_index.read() is None  # another manifest
    monkeypatch.setenv("HOSHIKAGE_CONFIG", str(setup))
    data = json.loads(Path(lastgood.path()).read_text())
    Path(lastgood.path()).write_text(json.dumps({**data, "version": 0}))
    assert name_index.read() is None  # another version
    Path(lastgood.path()).write_text("{not json")
    assert name_index.read() is None


def test_an_edit_while_the_manifest_is_read_leaves_no_index(
        setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_config(setup)
    assert name_index.read() is not None
    setup.write_text(setup.read_text() + "\n")  # to be read again
    monkeypatch.setattr(lastgood, "RACY", RACY)
    real = names.effective

    def edited_meanwhile(config):  # type: ignore[no-untyped-def]
        setup.write_text(setup.read_text() + "\n")
        return real(config)

    monkeypatch.setattr(names, "effective", edited_meanwhile)
    config = load_config(setup)
    assert name_index.read() is None
    assert json.loads(Path(lastgood.path()).read_text())["headstart"] is None
    assert lastgood.load_or_last_good() == config  # the last good manifest all the same


def test_a_broken_manifest_leaves_a_stale_index(setup: Path) -> None:
    load_config(setup)
    setup.write_text("models: [\n")
    with pytest.raises(HoshikageError, match=r"models\.yaml"):
        load_config(setup)
    assert name_index.read() is None


CHAT = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 16\r\n\r\n"
        b'{"model": "big"}')


def early(setup: Path, monkeypatch: pytest.MonkeyPatch, request: bytes,
          serving: bool = False) -> tuple[take.FirstRequest, list[str]]:
    """take_early on a real listening socket with `request` pending; the units it starts."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    client.sendall(request)
    fd = listener.detach()
    monkeypatch.setattr(daemon, "listen_fds", lambda: [fd])
    started: list[str] = []

    def start(unit: str, state: str | None = None, conn: object = None) -> None:
        started.append(unit)

    monkeypatch.setattr(units, "start_unit", start)
    monkeypatch.setattr(bus, "units", lambda names, conn=None: [
        bus.UnitState(names[0], "loaded", "inactive", "dead", 0)])
    monkeypatch.setattr(protocol, "probe",
                        lambda *_a, **_k: 200 if serving else None)
    first = take.take_early()
    assert first.raw_connection is not None
    assert first.raw_connection.recv(4096) == request  # left for the HTTP server
    client.close()
    for s in (first.raw_connection, *first.raw_sockets):
        s.close()
    return first, started


def test_the_head_start_starts_the_indexed_model_before_the_manifest_is_read(
        setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_config(setup)
    first, started = early(setup, monkeypatch, CHAT)
    assert started == ["hoshikage-model@qwen3\\x2d32b.service"]
    assert first.started == "qwen3-32b" and first.decided
    # take() does not start it again
    assert take.take(load_config(setup), first) is first
    assert started == ["hoshikage-model@qwen3\\x2d32b.service"]


def test_no_early_head_start_without_a_current_index_or_for_an_ambiguous_name(
        setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, started = early(setup, monkeypatch, CHAT)  # no index yet
    assert started == [] and not first.decided and first.request is not None
    assert "no current name index" in first.notes[0]
    load_config(setup)
    first, started = early(setup, monkeypatch, CHAT.replace(b'"big"', b'"wen"'))
    assert started == [] and not first.decided  # qwen3-8b and qwen3-32b: resolve()'s call
    first, started = early(setup, monkeypatch, CHAT, serving=True)
    assert started == [] and first.decided  # it serves already
    first, started = early(setup, monkeypatch, b"GET /v1/models HTTP/1.1\r\n\r\n")
    assert started == [] and first.decided  # starts nothing


def test_no_head_start_for_a_body_the_router_refuses_as_too_large(
        setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A body over max_body gets the router's 413: the head start starts nothing for it."""
    setup.write_text(setup.read_text() + "max_body: 10\n")
    load_config(setup)
    first, started = early(setup, monkeypatch, CHAT)  # a 16-byte body
    assert started == [] and first.decided
    setup.write_text(setup.read_text().replace("max_body: 10\n", "max_body: 16\n"))
    load_config(setup)
    first, started = early(setup, monkeypatch, CHAT)
    assert started == ["hoshikage-model@qwen3\\x2d32b.service"]
