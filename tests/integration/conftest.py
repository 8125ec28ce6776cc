"""Integration tier: a real llama-server and a generated GGUF, without systemd as PID 1."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.support import listening

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Setup:
    root: Path
    config: Path
    ramdisk: Path
    runtime: Path
    source: Path
    llama_server: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LISTEN_", "NOTIFY_SOCKET", "JOURNAL_STREAM"))}
        env["HOSHIKAGE_CONFIG"] = str(self.config)
        env.update(extra)
        return env

    def hoshikage(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "hoshikage_sd", *args]

    def sock(self, name: str = "tiny") -> Path:
        return self.runtime / f"{name}.sock"


def write_manifest(root: Path, llama_server: Path, source: Path,
                   router_idle_exit: str = "1h") -> Path:
    config = root / "models.yaml"
    config.write_text(f"""\
ramdisk: {root / 'rd'}
runtime_dir: {root / 'run'}
state_dir: {root / 'state'}
llama_server: {llama_server}
router_idle_exit: {router_idle_exit}
models:
  tiny:
    path: {source}
    aliases: [small]
    args: ["-c", "4096", "-np", "2"]
""")
    return config


@pytest.fixture
def setup(tmp_path: Path, tiny_gguf: Path, llama_server_bin: Path) -> Setup:
    (tmp_path / "rd").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "src").mkdir()
    source = tmp_path / "src" / "tiny.gguf"
    shutil.copyfile(tiny_gguf, source)
    source.chmod(0o444)
    config = write_manifest(tmp_path, llama_server_bin, source)
    return Setup(tmp_path, config, tmp_path / "rd", tmp_path / "run", source, llama_server_bin)


class NotifyListener:
    """A real NOTIFY_SOCKET: the datagrams an activator sends, as dicts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536).decode()
            except TimeoutError:
                break
            message = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            self.messages.append(message)
            if key in message:
                return message
        raise AssertionError(f"no {key} within {timeout} s; got {self.messages}")

    def drain(self) -> list[dict[str, str]]:
        """Every message sent so far, including those nobody waited for."""
        with contextlib.suppress(AssertionError):
            self.wait_for("\0never", timeout=0.2)
        return self.messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


_STDERR: dict[int, Path] = {}


def popen_logged(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Popen with stderr to a file, not a pipe: llama-server inherits it, and a pipe nobody
    reads until the end fills up (64 KiB) and blocks whoever writes next."""
    log = log.with_name(f"{log.name}.{len(_STDERR)}")  # one file per process
    with open(log, "wb") as f:
        process = subprocess.Popen(argv, env=env, stderr=f)
    _STDERR[process.pid] = log
    return process


def stderr_of(process: subprocess.Popen[bytes]) -> str:
    return _STDERR[process.pid].read_text(errors="replace")


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def socket_activated_router(setup: Setup, port: int) -> subprocess.Popen[bytes]:
    """The router as hoshikage.service runs it: hoshikage-router (python -IS, site after the
    head start), next to the venv's hoshikage (tools/bootstrap.sh writes it)."""
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.fail("systemd-socket-activate is missing (Debian package systemd)")
    entry = Path(sys.executable).with_name("hoshikage-router")
    assert entry.exists(), f"{entry} is missing: run tools/bootstrap.sh"
    return subprocess.Popen([tool, "-l", f"127.0.0.1:{port}",
                             "-E", f"HOSHIKAGE_CONFIG={setup.config}",
                             # its last good manifest goes here, as under systemd
                             "-E", f"RUNTIME_DIRECTORY={setup.runtime}",
                             str(entry)], stderr=subprocess.PIPE)


class Served(NamedTuple):
    """A model served (its activator) behind the router under systemd-socket-activate."""

    setup: Setup
    port: int
    #: the router's (systemd-socket-activate execs it: the same process)
    pid: int


@pytest.fixture
def served(setup: Setup, notify_socket: NotifyListener) -> Iterator[Served]:
    activator = subprocess.Popen(setup.hoshikage("activate", "tiny"),
                                 env=setup.env(NOTIFY_SOCKET=str(notify_socket.path)))
    notify_socket.wait_for("READY")
    port = free_port()
    router = socket_activated_router(setup, port)
    assert listening(port)  # systemd-socket-activate binds before the first connection
    try:
        yield Served(setup, port, router.pid)
    finally:
        stop(router)
        stop(activator)
