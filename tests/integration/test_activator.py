"""The activator with a real llama-server under a real NOTIFY_SOCKET."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hoshikage_sd import manifest, protocol
from hoshikage_sd.manifest import Files, names
from hoshikage_sd.staging import Store, file_digest
from tests.support import LAUNCHERS, eventually, make_launcher

from .conftest import NotifyListener, Setup, popen_logged, stderr_of, stop, write_manifest

pytestmark = pytest.mark.integration


def start_activator(setup: Setup, listener: NotifyListener) -> subprocess.Popen[bytes]:
    return popen_logged(setup.hoshikage("activate", "tiny"),
                        setup.env(NOTIFY_SOCKET=str(listener.path)),
                        setup.root / "activator.stderr")


def test_ready_only_after_health_200(setup: Setup, notify_socket: NotifyListener) -> None:
    before = setup.source.stat()
    activator = start_activator(setup, notify_socket)
    try:
        ready = notify_socket.wait_for("READY")
        # The instant READY=1 arrives, llama-server must already answer 200 (not 503 loading).
        assert protocol.probe(str(setup.sock())) == 200
        assert ready["READY"] == "1"
        assert any("EXTEND_TIMEOUT_USEC" in m for m in notify_socket.messages)
        # Nothing was staged: it serves from the source, and its RAM-disk copy is made
        # alongside, for the next start.
        running = json.loads((setup.runtime / "running" / "tiny.json").read_text())
        assert running["staged"] == str(setup.source)
        llama_pid = running["pid"]
        store = Store(setup.ramdisk)
        assert eventually(lambda: store.has_copy("tiny"))
        assert file_digest(setup.ramdisk / "tiny.gguf") == file_digest(setup.source)
        # the copy's progress was the unit's status meanwhile; it serves, and says so again
        statuses = [m["STATUS"] for m in notify_socket.drain() if "STATUS" in m]
        assert statuses[-1].startswith("serving tiny on "), statuses
        os.kill(llama_pid, 0)
    finally:
        code = stop(activator)
    assert code == 0, stderr_of(activator)
    with pytest.raises(ProcessLookupError):
        os.kill(llama_pid, 0)  # SIGTERM was forwarded to llama-server
    after = setup.source.stat()
    assert (after.st_mtime_ns, after.st_size, after.st_mode) == \
        (before.st_mtime_ns, before.st_size, before.st_mode)


def test_corrupted_staged_copy_is_restaged(setup: Setup, notify_socket: NotifyListener) -> None:
    activator = start_activator(setup, notify_socket)
    notify_socket.wait_for("READY")
    assert eventually(lambda: Store(setup.ramdisk).has_copy("tiny"))  # made alongside
    assert stop(activator) == 0
    staged = setup.ramdisk / "tiny.gguf"
    with open(staged, "r+b") as f:  # same size, same recorded source: only the bytes differ
        f.write(b"XXXX")
    assert_restaged(setup, start_activator(setup, notify_socket), notify_socket, staged)


def assert_restaged(setup: Setup, process: subprocess.Popen[bytes], listener: NotifyListener,
                    staged: Path) -> None:
    """The process serves after finding its staged copy bad and copying it again."""
    try:
        listener.wait_for("READY")
        assert protocol.probe(str(setup.sock())) == 200
    finally:
        stop(process)
    stderr = stderr_of(process)
    assert "does not match" in stderr and "copying it again" in stderr, stderr
    assert file_digest(staged) == file_digest(setup.source)


def test_missing_source_fails_with_reason(setup: Setup, notify_socket: NotifyListener) -> None:
    setup.source.chmod(0o644)
    setup.source.unlink()
    activator = start_activator(setup, notify_socket)
    code = activator.wait(30)
    stderr = stderr_of(activator)
    assert code != 0
    assert str(setup.source) in stderr and "does not exist" in stderr, stderr
    reason = json.loads((setup.runtime / "error" / "tiny.json").read_text())["reason"]
    assert str(setup.source) in reason
    assert not (setup.ramdisk / "tiny.gguf").exists()
    assert any(m.get("STATUS", "").startswith("failed:") for m in notify_socket.drain())


def test_server_built_for_another_cpu_is_named(setup: Setup,
                                                notify_socket: NotifyListener) -> None:
    # A real process killed by SIGILL, as a llama-server built for AVX-512 dies on an AVX2 CPU.
    crashing = setup.root / "llama-server-sigill"
    crashing.write_text("#!/bin/sh\nkill -ILL $$\n")
    crashing.chmod(0o755)
    write_manifest(setup.root, crashing, setup.source)
    activator = start_activator(setup, notify_socket)
    assert activator.wait(30) != 0
    stderr = stderr_of(activator)
    assert "died of SIGILL" in stderr and "CPU instructions this machine lacks" in stderr, stderr
    assert str(crashing) in stderr  # the hint names the binary to replace
    statuses = [m.get("STATUS", "") for m in notify_socket.drain()]
    assert any(s.startswith("failed:") and "SIGILL" in s for s in statuses), statuses


def write_command_manifest(setup: Setup, command: str, extra: str = "") -> None:
    """tiny served by the `command` backend (a YAML flow list), plus `extra` model keys."""
    setup.config.write_text(f"""\
ramdisk: {setup.ramdisk}
runtime_dir: {setup.runtime}
state_dir: {setup.root / 'state'}
models:
  tiny:
    path: {setup.source}
    backend: command
    command: {command}
    {extra}
""")


HANGS_ON_FIRST_SIGTERM = """\
import http.server, os, signal, socketserver, sys, time
terms = []
def on_term(signum, frame):  # like llama-server with a request in flight: the first hangs
    terms.append(time.monotonic())
    if len(terms) > 1:
        os._exit(1)  # llama-server: "Received second interrupt, terminating immediately"
signal.signal(signal.SIGTERM, on_term)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
    def address_string(self):
        return "unix"
class Server(socketserver.UnixStreamServer):
    def get_request(self):
        request, _ = super().get_request()
        return request, ("unix", 0)
Server(sys.argv[1], Health).serve_forever()
"""


def test_stop_forces_a_server_that_hangs_on_sigterm(setup: Setup,
                                                    notify_socket: NotifyListener) -> None:
    script = setup.root / "hangs.py"
    script.write_text(HANGS_ON_FIRST_SIGTERM)
    write_command_manifest(setup, f'[{sys.executable}, {script}, "{{socket}}"]')
    activator = start_activator(setup, notify_socket)
    notify_socket.wait_for("READY")
    server = json.loads((setup.runtime / "running" / "tiny.json").read_text())["pid"]
    started = time.monotonic()
    activator.send_signal(signal.SIGTERM)
    assert activator.wait(protocol.STOP_GRACE + 10) == 0, stderr_of(activator)
    assert protocol.STOP_GRACE <= time.monotonic() - started < protocol.STOP_GRACE + 5
    with pytest.raises(ProcessLookupError):
        os.kill(server, 0)
    assert "did not stop within" in stderr_of(activator)


def test_release_cleans_after_failed_start(setup: Setup) -> None:
    (setup.ramdisk / "tiny.gguf").write_bytes(b"x" * 8192)
    (setup.ramdisk / ".tiny.gguf.tmp-4242").write_bytes(b"y" * 4096)
    setup.sock().touch()
    env = setup.env(SERVICE_RESULT="exit-code", EXIT_CODE="exited", EXIT_STATUS="1")
    for _ in range(2):  # idempotent
        result = subprocess.run(setup.hoshikage("release", "tiny"), env=env,
                                capture_output=True, text=True, check=True)
    assert sorted(p.name for p in setup.ramdisk.iterdir() if not p.name.endswith(".lock")) == []
    assert not setup.sock().exists()
    assert "failure: exit-code (exited=1)" in result.stderr


def test_activate_rejects_unsafe_instance_name(setup: Setup) -> None:
    result = subprocess.run(setup.hoshikage("activate", "../../etc/passwd"), env=setup.env(),
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "not a valid model name" in result.stderr
    assert not any(Path(setup.runtime).rglob("*passwd*"))


def test_sigterm_during_load_exits_cleanly(setup: Setup, notify_socket: NotifyListener) -> None:
    activator = start_activator(setup, notify_socket)
    notify_socket.wait_for("STATUS")
    activator.send_signal(signal.SIGTERM)
    assert activator.wait(30) == 0


def test_command_backend_runs_any_server_on_the_socket(setup: Setup,
                                                       notify_socket: NotifyListener) -> None:
    # llama-server itself, started through the generic argv template and health path.
    write_command_manifest(
        setup, f'[{setup.llama_server}, -m, "{{path}}", --host, "{{socket}}", -c, "512"]',
        "health: /v1/models")
    activator = start_activator(setup, notify_socket)
    try:
        notify_socket.wait_for("READY")
        assert protocol.probe(str(setup.sock()), "/v1/models") == 200
        running = json.loads((setup.runtime / "running" / "tiny.json").read_text())
        cmdline = Path(f"/proc/{running['pid']}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:5] == [b"-m", str(setup.source).encode(), b"--host",  # first start
                                str(setup.sock()).encode()]
        assert b"--cache-ram" not in cmdline  # only llama-server backends get our defaults
    finally:
        assert stop(activator) == 0


@pytest.fixture(params=LAUNCHERS)
def launcher_bin(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """hoshikage-launch in both forms the installers make, next to the venv's hoshikage."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hoshikage").symlink_to(Path(sys.executable).with_name("hoshikage"))
    return make_launcher(request.param, bin_dir / "hoshikage-launch")


def launcher(setup: Setup, listener: NotifyListener,
             path: Path) -> subprocess.Popen[bytes]:
    """hoshikage-launch as the model unit runs it: RUNTIME_DIRECTORY from RuntimeDirectory=."""
    return popen_logged([str(path), "tiny"],
                        setup.env(NOTIFY_SOCKET=str(listener.path),
                                  RUNTIME_DIRECTORY=str(setup.runtime)),
                        setup.root / "launcher.stderr")


def stage_with_ticket(setup: Setup, ticket: bool) -> Path:
    """Stage tiny; with `ticket`, leave the launch ticket the router would."""
    config = names.effective(manifest.load(setup.config))
    model = config.models["tiny"]
    staged = Store(config.ramdisk).stage("tiny", model.path).path
    if ticket:
        protocol.write_ticket(str(config.runtime_dir), "tiny", str(setup.sock()), model.health,
                              {"PATH": os.environ["PATH"]},
                              config.server_argv(model, Files((staged,))))
    return staged


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize("ticket", [True, False], ids=["ticket", "no-ticket"])
def test_launcher(setup: Setup, notify_socket: NotifyListener, ticket: bool,
                  launcher_bin: Path) -> None:
    """With the router's ticket, llama-server is started by the launcher itself and adopted
    by the activator it becomes; without one, the activator does everything. Either way
    READY=1 only once /health is 200, from the same PID."""
    stage_with_ticket(setup, ticket)
    setup.runtime.mkdir(parents=True, exist_ok=True)
    router = NotifyListener(setup.runtime / protocol.ROUTER_SOCKET)  # the router's, by its side
    process = launcher(setup, notify_socket, launcher_bin)
    running = setup.runtime / "running" / "tiny.json"
    try:
        notify_socket.wait_for("READY")
        assert protocol.probe(str(setup.sock())) == 200
        # With a ticket, READY=1 is the launcher's; the activator takes over (and records
        # the running model) once llama-server is quiet.
        deadline = time.monotonic() + protocol.HANDOVER_LIMIT + 10
        while not running.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        llama_pid = json.loads(running.read_text())["pid"]
        assert parent_of(llama_pid) == process.pid  # the unit's main process supervises it
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert (b"--adopt" in cmdline) == ticket, cmdline
        assert (str(llama_pid).encode() in cmdline) == ticket
        assert not (setup.runtime / "launch" / "tiny").exists()
        # the router heard "tiny serves" once: from the launcher or else from the activator
        router.sock.settimeout(0.5)
        assert router.sock.recv(256) == b"tiny"
        with pytest.raises(TimeoutError):
            router.sock.recv(256)
    finally:
        router.close()
        code = stop(process)
    assert code == 0, stderr_of(process)
    with pytest.raises(ProcessLookupError):
        os.kill(llama_pid, 0)


def test_launcher_ticket_for_a_corrupt_copy_restages(setup: Setup,
                                                     notify_socket: NotifyListener,
                                                     launcher_bin: Path) -> None:
    staged = stage_with_ticket(setup, ticket=True)
    with open(staged, "r+b") as f:
        f.write(b"XXXX")
    assert_restaged(setup, launcher(setup, notify_socket, launcher_bin), notify_socket, staged)
