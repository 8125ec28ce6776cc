"""A clean Debian bookworm root for the package tier, made once with debootstrap and cached.

The root has what a minimal bookworm machine has, plus systemd to boot it with in
systemd-nspawn and libgomp1 for the llama-server the tests bind in (the package does not
depend on it: llama-server is the admin's). Its apt lists are fetched from the mirror when it
is made, and the .debs of hoshikage's dependencies are downloaded into its apt cache then
(download only, nothing installed), so each test's `apt install ./hoshikage_*.deb` resolves
them from the mirror's index without fetching 40 MB again. Tests boot it with
--volatile=overlay: the cached tree is never changed.

Cache: /var/cache/hoshikage-test/bookworm-HASH, HASH over the suite, the mirror and both
package lists; a changed list makes a new root (delete old ones by hand). About 70-120 s to
make; `python -m tests.package.rootfs` makes it ahead of the tests.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from testbed import REPO_ROOT

SUITE = "bookworm"
CACHE = Path(os.environ.get("HOSHIKAGE_TEST_CACHE", "/var/cache/hoshikage-test"))
#: installed by debootstrap: to boot it, to look at it, and llama-server's one outside library
INCLUDE = ("systemd", "systemd-sysv", "dbus", "iproute2", "procps", "libgomp1")
HOST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive"}


def mirror() -> str:
    """The Debian mirror the host's apt uses (deb.debian.org when none is found)."""
    for path in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if path.exists():
            match = re.search(r"^URIs:\s*(\S+)|^deb\s+(\S+)\s+\S*bookworm\s", path.read_text(),
                              re.MULTILINE)
            if match:
                return match.group(1) or match.group(2)
    return "http://deb.debian.org/debian"


def depends() -> list[str]:
    """What apt installs with the package: its Depends and Recommends from
    packaging/debian/control (the Debian packages only)."""
    control = (REPO_ROOT / "packaging/debian/control").read_text()
    names: list[str] = []
    for key in ("Depends", "Recommends"):
        field = re.search(rf"^{key}:(.*?)^\S", control, re.MULTILINE | re.DOTALL)
        assert field or key != "Depends", "packaging/debian/control has no Depends:"
        if field:
            names += [re.split(r"[\s(]", x.strip())[0] for x in field.group(1).split(",")]
    return sorted(n for n in names if n and not n.startswith("${"))


def key() -> str:
    text = "\n".join([SUITE, mirror(), *INCLUDE, "--", *depends()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def path() -> Path:
    return CACHE / f"{SUITE}-{key()}"


def run(*argv: str) -> None:
    result = subprocess.run(argv, env=HOST_ENV, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n"
                           f"{(result.stdout + result.stderr)[-4000:]}")


def make() -> Path:
    """The cached root, made now if it is not there yet."""
    final = path()
    if (final / "usr/lib/systemd/systemd").exists():
        return final
    if shutil.which("debootstrap", path=HOST_ENV["PATH"]) is None:
        raise RuntimeError("debootstrap is missing (apt-get install debootstrap)")
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=CACHE))
    work.chmod(0o755)  # it becomes /: mkdtemp's 0700 would lock every other user out
    try:
        # A private mount namespace: debootstrap mounts /proc and /sys inside the target.
        run("unshare", "--mount", "--propagation", "private", "--", "debootstrap",
            "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE, str(work), mirror())
        run("unshare", "--mount", "--propagation", "private", "--", "chroot", str(work),
            "apt-get", "install", "-y", "-q", "--download-only", *depends())
        # A booted container sets its own machine id; an empty file tells systemd so.
        (work / "etc/machine-id").write_text("")
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final


if __name__ == "__main__":
    print(make())
    sys.exit(0)
