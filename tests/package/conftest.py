"""Fixtures of the package tier: the .deb built by tools/build-deb, a cached clean bookworm
root (rootfs.py), and that root booted with its own systemd in systemd-nspawn."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed import REPO_ROOT
from testbed.container import Container, unavailable_reason
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
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hoshikage_VERSION-1_ARCH.deb, built from this checkout."""
    for tool in ("dpkg-buildpackage", "dh", "lintian"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is missing: run tools/bootstrap.sh")
    return build_deb(tmp_path_factory.mktemp("deb"))


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
