"""Least privilege, checked on the unit files as shipped (no PID-1 systemd needed).

`systemd-analyze security --offline=yes` rates a unit file by itself; the package tier
(tests/package) rates the installed units again under the container's systemd.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed import REPO_ROOT
from tests.support import unavailable
from tests.unit.test_unit_files import sections

#: the bounds of issue 12: nothing that parses requests or model files runs exposed
BOUNDS = {
    "hoshikage.service": 3.0,
    "hoshikage-idle.service": 3.0,
    "hoshikage-cache.service": 3.0,
    "hoshikage-keep@.service": 3.0,
    "hoshikage-model@.service": 4.5,
    "hoshikage-reload.service": 3.0,
    "hoshikage-preload.service": 3.0,
    "hoshikage-journal@.service": 2.0,    # the one in the group systemd-journal
    "hoshikage-rpc.service": 2.0,         # a worker's (rpc): the proxy and the server
    "hoshikage-rpc-server.service": 2.0,
}
#: the worker's units run as a user of their own, made and gone with them: they keep nothing
DYNAMIC_USER = ("hoshikage-rpc.service", "hoshikage-rpc-server.service")
SERVICES = sorted(p.name for p in (REPO_ROOT / "units").glob("*.service"))
EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+\.\d+)")


def exposure(unit: Path, tmp_path: Path) -> float:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        unavailable("systemd-analyze is missing (Debian package systemd)")
    if "@." in unit.name:  # a template is rated as an instance
        unit = Path(shutil.copy(unit, tmp_path / unit.name.replace("@.", "@tiny.")))
    result = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True)
    match = EXPOSURE.search(result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def test_every_service_has_a_bound() -> None:
    assert sorted(BOUNDS) == SERVICES


@pytest.mark.parametrize("name", SERVICES)
def test_exposure_within_bound(name: str, tmp_path: Path) -> None:
    score = exposure(REPO_ROOT / "units" / name, tmp_path)
    assert score <= BOUNDS[name], f"{name}: systemd-analyze security rates it {score}"


def test_the_rating_can_fail(tmp_path: Path) -> None:
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/usr/bin/hoshikage router\n")
    assert exposure(bare, tmp_path) > 4.5


@pytest.mark.parametrize("name", SERVICES)
def test_runs_as_the_service_user_without_capabilities(name: str) -> None:
    service = sections(REPO_ROOT / "units" / name)
    if name in DYNAMIC_USER:
        assert service.get("Service", "DynamicUser") == "yes"
    else:
        assert service.get("Service", "User") == "hoshikage"
        assert service.get("Service", "Group") == "hoshikage"
    assert service.get("Service", "CapabilityBoundingSet") == ""
    assert service.get("Service", "NoNewPrivileges") == "yes"


def test_the_user_owns_what_it_writes() -> None:
    sysusers = (REPO_ROOT / "sysusers.d/hoshikage.conf").read_text().splitlines()
    assert [x.split()[:2] for x in sysusers if x and not x.startswith("#")] == [["u", "hoshikage"]]
    options = sections(REPO_ROOT / "units/mnt-hoshikage.mount").get("Mount", "Options")
    assert {"uid=hoshikage", "gid=hoshikage", "mode=0750"} <= set(options.split(","))
    tmpfiles = (REPO_ROOT / "tmpfiles.d/hoshikage.conf").read_text().splitlines()
    for line in (x for x in tmpfiles if x and not x.startswith("#")):
        assert line.split()[3:5] == ["hoshikage", "hoshikage"], line
