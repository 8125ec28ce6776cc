"""Fixtures of the package tier: the .deb built by tools/build-deb, a cached clean bookworm
root (rootfs.py), and that root booted with its own systemd in systemd-nspawn."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed import REPO_ROOT
from testbed.container import Container, unavailable_reason
from testbed.deploy import Deployment, free_port
from tests.containers import Binds, made_for, unique_name
from tests.package import rootfs
from tests.support import unavailable


def build_deb(out: Path, revision: str | None = None) -> Path:
    """tools/build-deb into `out`: the hoshikage .deb (lintian has passed)."""
    argv = [str(REPO_ROOT / "tools/build-deb"), "--out", str(out)]
    argv += ["--revision", revision] if revision else []
    result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    (deb,) = [p for p in out.glob("hoshikage_*.deb")]
    return deb


@pytest.fixture(scope="session")
def deb(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hoshikage_VERSION-1_ARCH.deb, built from this checkout: once per run, also when the
    tier's files run side by side on pytest-xdist workers (they share the run's temporary
    root; the first to come builds, the others wait for it)."""
    for tool in ("dpkg-buildpackage", "dh", "lintian"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is missing: run tools/bootstrap.sh")
    if not hasattr(request.config, "workerinput"):  # one process: its own directory
        return build_deb(tmp_path_factory.mktemp("deb"))
    shared = tmp_path_factory.getbasetemp().parent / "deb"
    shared.mkdir(exist_ok=True)
    with open(shared / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = sorted(shared.glob("hoshikage_*.deb"))
        return built[0] if built else build_deb(shared)


@pytest.fixture(scope="session")
def bookworm() -> Path:
    """The cached debootstrap'ed bookworm root (made on first use, ~70-120 s)."""
    reason = unavailable_reason()
    if reason:
        unavailable(reason)
    if shutil.which("debootstrap") is None:
        unavailable("debootstrap is missing: run tools/bootstrap.sh")
    try:
        return rootfs.make()
    except RuntimeError as e:
        unavailable(f"cannot make the bookworm root: {e}")


@pytest.fixture
def boot(request: pytest.FixtureRequest, bookworm: Path) -> Iterator[Callable[..., Container]]:
    """``boot(binds, network=None, ip_firewall=False)``: the bookworm root booted under its
    own systemd (a tmpfs overlay keeps the cache pristine), on the host's network or in a
    network namespace (tests/system/netns.py); stopped at teardown, its journal in the
    report of a failure."""
    with made_for(request, report_lines=300) as boot:
        def make(binds: Binds = (), network: str | None = None,
                 ip_firewall: bool = False) -> Container:
            return boot(unique_name(request.node.name), binds, 120, rootfs=str(bookworm),
                        network=network, ip_firewall=ip_firewall)

        yield make


def pids_in(c: Container) -> list[int]:
    """Every process in the container's PID namespace (host PIDs), from /proc."""
    assert c.pid1 is not None
    ns = os.readlink(f"/proc/{c.pid1}/ns/pid")
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns/pid") == ns:
                    pids.append(int(entry.name))
    return pids


Boot = Callable[..., Container]
UNIT = "hoshikage-model@tiny.service"
LLAMA_DIR = "/opt/llama"  # the wheel's llama-server and its libraries, bound in read-only
#: files the test adds as the admin would (a port drop-in, a faster idle timer); they are
#: the admin's, so a purge keeps them, and the test removes them before it
ADMIN_FILES = ("/etc/systemd/system/hoshikage.socket.d",
               "/etc/systemd/system/hoshikage-idle.timer.d",
               # `hoshikage keys setup`'s: a purge keeps the key (models encrypted to it
               # would be lost with it) and the drop-ins that give it to the units
               "/etc/systemd/system/hoshikage.service.d",
               "/etc/systemd/system/hoshikage-model@.service.d",
               "/etc/hoshikage/age-identity.cred", "/etc/hoshikage/age-recipients")
MANIFEST = f"""# written by the package test
llama_server: {LLAMA_DIR}/llama-server
router_idle_exit: 2s
models:
  tiny:
    path: /srv/models/tiny.gguf
    ttl: 3s
"""


def apt(c: Container, *args: str) -> str:
    result = c.exec("apt-get", "-y", "-q", "-o", "Dpkg::Use-Pty=0", *args, timeout=600,
                    env={"DEBIAN_FRONTEND": "noninteractive"})
    return result.stdout + result.stderr


def install(boot: Boot, deb: Path, models: Path, llama: Path) -> Deployment:
    """Boot the clean root, apt install the .deb in it, point the manifest at the tiny model."""
    c = boot(binds=[(str(deb.parent), "/debs", True), (str(models), "/srv/models", True),
                    (str(llama.parent), LLAMA_DIR, True)])
    assert c.exec("dpkg-query", "-W", "hoshikage", check=False).returncode != 0
    output = apt(c, "install", f"/debs/{deb.name}")
    assert "Setting up hoshikage" in output, output
    # The shipped example is a conffile, and check says what is missing in it.
    conffiles = (c.root / "var/lib/dpkg/info/hoshikage.conffiles").read_text()
    assert conffiles.split() == ["/etc/hoshikage/models.yaml"]
    checked = c.exec("hoshikage", "check", check=False)  # exit 1: a problem found
    example = checked.stdout
    assert "llama_server /usr/bin/llama-server is not an executable file" in example, example
    assert checked.returncode == 1, checked
    # The admin's steps from the README: edit the manifest; here also a free port (the
    # container shares the host's network) and an idle watch every second.
    (c.root / "etc/hoshikage/models.yaml").write_text(MANIFEST)
    port = free_port()
    dropin = c.root / ADMIN_FILES[0].lstrip("/")
    dropin.mkdir(parents=True)
    (dropin / "port.conf").write_text(f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
    dropin = c.root / ADMIN_FILES[1].lstrip("/")
    dropin.mkdir(parents=True)
    (dropin / "fast.conf").write_text("[Timer]\nOnActiveSec=\nOnActiveSec=1s\n"
                                      "OnUnitActiveSec=1s\nAccuracySec=100ms\n")
    c.systemctl("daemon-reload")
    c.systemctl("restart", "hoshikage.socket")
    return Deployment(c, port, models)


def processes(c: Container) -> dict[int, tuple[str, str]]:
    """hoshikage's and llama-server's processes: pid -> (user, command line), from /proc."""
    users = {line.split(":")[2]: line.split(":")[0]
             for line in (c.root / "etc/passwd").read_text().splitlines()}
    found = {}
    for pid in pids_in(c):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue  # gone meanwhile
        if "hoshikage" in cmdline or "llama-server" in cmdline:
            uid = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)", status, re.MULTILINE)
            assert uid and len(set(uid.groups())) == 1, status  # real = effective = saved
            found[pid] = (users.get(uid.group(1), uid.group(1)), cmdline.strip())
    return found


def listening(hk: Deployment) -> bool:
    return f":{hk.port}" in hk.container.exec("ss", "-Hltn").stdout
