"""Static checks of the shipped unit files and tmpfiles.d entry (no PID-1 systemd needed)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed import REPO_ROOT
from tests.support import unavailable

UNITS = sorted((REPO_ROOT / "units").iterdir())


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is missing (Debian package systemd)")
    return path


def sections(unit: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(unit)
    return parser


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with the host's targets and slices, our units, and executable hoshikage (in
    /usr/bin), hoshikage-launch, hoshikage-router and hoshikage-landlock (in
    /usr/libexec/hoshikage)."""
    root = tmp_path_factory.mktemp("root")
    lib = root / "usr/lib/systemd/system"
    lib.mkdir(parents=True)
    for path in Path("/usr/lib/systemd/system").iterdir():
        if path.suffix in (".target", ".slice") and path.is_file():
            shutil.copy(path, lib)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/libexec/hoshikage").mkdir(parents=True)
    shutil.copy("/bin/true", root / "usr/bin/hoshikage")
    for helper in ("hoshikage-launch", "hoshikage-router", "hoshikage-landlock"):
        shutil.copy("/bin/true", root / "usr/libexec/hoshikage" / helper)
    shutil.copy("/bin/true", root / "usr/bin/systemctl")  # hoshikage-preload.service's
    # the RPC worker's units run systemd's proxy and /bin/sh
    (root / "bin").mkdir()
    shutil.copy("/bin/true", root / "bin/sh")
    (root / "usr/lib/systemd").mkdir(exist_ok=True)
    shutil.copy("/bin/true", root / "usr/lib/systemd/systemd-socket-proxyd")
    for unit in UNITS:
        shutil.copy(unit, lib)
    return root


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify(root: Path, unit: Path) -> None:
    lib = root / "usr/lib/systemd/system"
    # A template is verified as an instance: a copy under the instance's name.
    target = lib / unit.name.replace("@.", "@tiny.")
    if target.name != unit.name:
        shutil.copy(unit, target)
    result = subprocess.run([tool("systemd-analyze"), "verify", "--man=no",
                             "--recursive-errors=yes", f"--root={root}", str(target)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_verify_catches_a_broken_unit(root: Path, tmp_path: Path) -> None:
    broken = root / "usr/lib/systemd/system/broken.service"
    broken.write_text("[Service]\nType=oneshot\nExecStart=/usr/bin/not-there\n")
    try:
        result = subprocess.run([tool("systemd-analyze"), "verify", "--man=no",
                                 f"--root={root}", str(broken)], capture_output=True, text=True)
    finally:
        broken.unlink()
    assert result.returncode != 0, "the verify check could not fail"


def test_only_the_socket_is_installable() -> None:
    # The idle timer comes and goes with the model units (Wants= + StopWhenUnneeded=).
    installable = {u.name for u in UNITS if sections(u).has_section("Install")}
    # preload at boot is the admin's to enable (README "Preload and pin"); not by the package
    installable.discard("hoshikage-preload.service")
    assert installable == {"hoshikage.socket", "hoshikage-rpc.socket"}  # the worker's: rpc
    assert sections(REPO_ROOT / "units/hoshikage-idle.timer").get(
        "Unit", "StopWhenUnneeded") == "yes"
    assert "hoshikage-idle.timer" in sections(REPO_ROOT / "units/hoshikage-model@.service").get(
        "Unit", "Wants")


def test_socket_listens_on_loopback() -> None:
    listen = sections(REPO_ROOT / "units/hoshikage.socket").get("Socket", "ListenStream")
    assert listen == "127.0.0.1:8080"


def test_ramdisk_allows_huge_pages() -> None:
    options = sections(REPO_ROOT / "units/mnt-hoshikage.mount").get("Mount", "Options")
    assert "huge=always" in options.split(",")
    fstab = (REPO_ROOT / "fstab.example").read_text().splitlines()
    (line,) = [x for x in fstab if x.strip() and not x.startswith("#")]
    assert line.split()[3] == options  # the fstab alternative mounts the same tmpfs


def test_tmpfiles_create(tmp_path: Path) -> None:
    # The entries name the service user: sysusers.d makes it first, as the package does.
    (tmp_path / "etc").mkdir()
    subprocess.run([tool("systemd-sysusers"), f"--root={tmp_path}",
                    str(REPO_ROOT / "sysusers.d/hoshikage.conf")], capture_output=True, check=True)
    conf = REPO_ROOT / "tmpfiles.d/hoshikage.conf"
    result = subprocess.run([tool("systemd-tmpfiles"), f"--root={tmp_path}", "--create",
                             str(conf)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    assert (tmp_path / "run/hoshikage/activity").is_dir()
    user = next(line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()
                if line.startswith("hoshikage:"))
    assert (tmp_path / "run/hoshikage").stat().st_uid == int(user[2])
    assert user[6] == "/usr/sbin/nologin"
