"""hoshikage_sd.sd: unit-name escaping (units.py), sd_notify and LISTEN_FDS (daemon.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hoshikage_sd.sd import daemon, units
from tests.support import unavailable

NAMES = ["tiny", "qwen3:8b", "a-b", "a/b", ".hidden", "ünï", "a b", "../x", "a.b.", "x_y",
         "gemma-3-4b-it.Q4_K_M", "a\\b", "-", "tab\there", "日本語"]


# -- escaping ------------------------------------------------------------------------------

def systemd_escape(text: str) -> str:
    binary = shutil.which("systemd-escape") or "/usr/bin/systemd-escape"
    if not os.path.exists(binary):
        unavailable("systemd-escape is not installed")
    return subprocess.run([binary, "--", text], check=True, capture_output=True,
                          text=True).stdout.rstrip("\n")


@pytest.mark.parametrize("name", NAMES)
def test_escape_matches_systemd_escape(name: str) -> None:
    assert units.escape(name) == systemd_escape(name)


@pytest.mark.parametrize(("name", "escaped"), [
    ("tiny", "tiny"),
    ("qwen3:8b", "qwen3:8b"),
    ("a-b", "a\\x2db"),
    ("a/b", "a-b"),
    (".hidden", "\\x2ehidden"),
    ("a.b", "a.b"),
    ("ünï", "\\xc3\\xbcn\\xc3\\xaf"),
    ("a b", "a\\x20b"),
    ("../x", "\\x2e.-x"),
])
def test_escape_known_values(name: str, escaped: str) -> None:
    assert units.escape(name) == escaped


@pytest.mark.parametrize("name", [n for n in NAMES if "/" not in n])
def test_unescape_inverts_escape(name: str) -> None:
    assert units.unescape(units.escape(name)) == name


def test_escaped_names_are_safe_unit_instance_strings() -> None:
    for name in NAMES:
        escaped = units.escape(name)
        assert "/" not in escaped and " " not in escaped
        assert not escaped.startswith(".")
        assert all(c.isascii() and (c.isalnum() or c in ":_.\\-") for c in escaped), escaped


def test_model_unit() -> None:
    assert units.model_unit("tiny") == "hoshikage-model@tiny.service"
    assert units.model_unit("qwen3:8b") == "hoshikage-model@qwen3:8b.service"
    assert units.model_unit("gemma-3") == "hoshikage-model@gemma\\x2d3.service"
    assert units.model_unit("../etc") == "hoshikage-model@\\x2e.-etc.service"


# -- sd_notify -----------------------------------------------------------------------------

@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: AF_UNIX addresses are limited to 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="hk-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def dgram_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    return sock


def test_notify_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert daemon.notify(READY=1) is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert daemon.notify(READY=1) is False


def test_notify_delivers_fields(monkeypatch: pytest.MonkeyPatch, short_dir: Path) -> None:
    path = short_dir / "notify"
    with dgram_listener(path) as listener:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert daemon.notify(READY=1, STATUS="x") is True
        assert listener.recv(4096) == b"READY=1\nSTATUS=x"
        assert daemon.notify(STATUS="staging tiny: 1.0 MiB of 2.0 MiB (50%)",
                              EXTEND_TIMEOUT_USEC=30_000_000) is True
        assert listener.recv(4096) == \
            b"STATUS=staging tiny: 1.0 MiB of 2.0 MiB (50%)\nEXTEND_TIMEOUT_USEC=30000000"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"hoshikage-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert daemon.notify(STOPPING=1) is True
        assert listener.recv(4096) == b"STOPPING=1"


def test_notify_to_a_dead_socket_is_false(monkeypatch: pytest.MonkeyPatch,
                                          short_dir: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "nobody"))
    assert daemon.notify(READY=1) is False


# -- LISTEN_FDS ----------------------------------------------------------------------------

def test_listen_fds_for_another_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "hoshikage.socket")
    assert daemon.listen_fds() == []
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        assert key not in os.environ


def test_listen_fds_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(key, raising=False)
    assert daemon.listen_fds() == []


def test_listen_fds_for_us(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our pid: fds 3.. are returned, made non-inheritable, and LISTEN_* are gone."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:  # whatever fd 3 is in this process, put it back afterwards
        saved, was_inheritable = os.dup(3), os.get_inheritable(3)
    except OSError:
        saved, was_inheritable = -1, False
    try:
        os.dup2(sock.fileno(), 3, inheritable=True)
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", "1")
        monkeypatch.setenv("LISTEN_FDNAMES", "hoshikage.socket")
        assert daemon.listen_fds() == [3]
        assert os.get_inheritable(3) is False
        assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ
        assert "LISTEN_FDNAMES" not in os.environ
    finally:
        if saved >= 0:
            os.dup2(saved, 3, inheritable=was_inheritable)
            os.close(saved)
        else:
            os.close(3)
        sock.close()
