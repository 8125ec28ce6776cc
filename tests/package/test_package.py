"""The Debian package as an admin meets it: apt install in a clean bookworm booted with its own
systemd, first request, least privilege, idle stop, apt remove and apt purge (the upgrade and an
RPC worker: test_upgrade.py, test_rpc_worker.py)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from hoshikage_sd.log import MESSAGE_IDS
from tests.package.conftest import (
    ADMIN_FILES,
    LLAMA_DIR,
    MANIFEST,
    UNIT,
    Boot,
    apt,
    install,
    listening,
    processes,
)
from tests.support import completions, eventually
from tests.unit.test_security import BOUNDS

pytestmark = pytest.mark.package


def test_install_serve_remove_purge(boot: Boot, deb: Path, tiny_models: Path,
                                    llama_server_bin: Path) -> None:
    hk = install(boot, deb, tiny_models, llama_server_bin)
    c = hk.container
    files = c.exec("dpkg", "-L", "hoshikage").stdout.split()

    # Installed: the socket enabled and listening, nothing behind it, the user made.
    assert c.systemctl("is-enabled", "hoshikage.socket").strip() == "enabled"
    assert hk.state("hoshikage.socket") == "active" and listening(hk)
    # an RPC worker's units are shipped, but nothing of a worker runs until the admin's
    # `hoshikage rpc-worker setup` (README "Several machines")
    for unit in ("hoshikage-rpc.socket", "hoshikage-rpc.service",
                 "hoshikage-rpc-server.service"):
        assert f"/lib/systemd/system/{unit}" in files, unit
    assert c.systemctl("is-enabled", "hoshikage-rpc.socket", check=False).strip() == "disabled"
    assert hk.state("hoshikage-rpc.socket") == "inactive"
    # the manifest edit set off hoshikage-reload.path: its oneshot `hoshikage reload` (no
    # router to tell) may still be on its way out; nothing else may run
    assert eventually(lambda: processes(c), lambda found: found == {}) == {}
    passwd = c.exec("getent", "passwd", "hoshikage").stdout.split(":")
    assert passwd[6].strip() == "/usr/sbin/nologin" and int(passwd[2]) < 1000
    group = c.exec("getent", "group", "hoshikage").stdout
    # The units' helpers in /usr/libexec/hoshikage (the launcher runs the hoshikage beside
    # it, a link to /usr/bin's); only the command people type is on PATH.
    helpers = {f"/usr/libexec/hoshikage/hoshikage-{name}" for name in ("launch", "router")}
    assert helpers <= set(files) and [f for f in files if f.startswith("/usr/bin/")] == [
        "/usr/bin/hoshikage"], files
    assert c.exec("readlink", "-f", "/usr/libexec/hoshikage/hoshikage").stdout.strip() \
        == "/usr/bin/hoshikage"
    # hoshikage(1), written from the CLI's parser at build time, and bash completion (the
    # Recommends brought python3-argcomplete): the script asks hoshikage for candidates.
    assert "/usr/share/man/man1/hoshikage.1.gz" in files
    page = c.exec("sh", "-c", "zcat /usr/share/man/man1/hoshikage.1.gz").stdout
    assert ".SH COMMANDS" in page and '.SS "hoshikage status' in page, page[:2000]
    completion = "/usr/share/bash-completion/completions/hoshikage"
    assert completion in files
    # the journal catalog: systemd's trigger indexed it, so `journalctl -x` explains a record
    assert "/usr/lib/systemd/catalog/hoshikage.catalog" in files
    ready = MESSAGE_IDS["ready"]
    entry = c.exec("journalctl", "--list-catalog", ready).stdout
    assert "is ready" in entry and "hoshikage" in entry, entry

    assert completions(c, completion, "hoshikage sta") == ["status"]
    assert completions(c, completion, "hoshikage load ti") == ["tiny"]  # the manifest's names
    checked = c.exec("hoshikage", "check").stdout
    assert "1 model(s): tiny" in checked
    # the packaged hoshikage-landlock confines the router on this kernel (router/checks.py)
    assert "confinement" not in checked and "hoshikage-landlock" not in checked, checked
    # check runs as root but answers for the service user: a model it cannot read is named.
    c.exec("install", "-d", "-m", "0700", "/var/private-models")
    c.exec("cp", "/srv/models/tiny.gguf", "/var/private-models/hidden.gguf")
    manifest = c.root / "etc/hoshikage/models.yaml"
    manifest.write_text(MANIFEST + "  hidden:\n    path: /var/private-models/hidden.gguf\n")
    checked = c.exec("hoshikage", "check", check=False)
    warning = checked.stdout
    assert "model hidden: hoshikage may not enter /var/private-models" in warning, warning
    assert checked.returncode == 1, checked
    # A ramdisk: of its own: the model unit does not wait for its mount until a drop-in says
    # so (README "Configure"), and check says that.
    manifest.write_text(MANIFEST + "ramdisk: /dev/shm/hoshikage\n")
    checked = c.exec("hoshikage", "check", check=False)
    assert "ramdisk /dev/shm/hoshikage: hoshikage-model@.service does not wait for its " \
           "mount" in checked.stdout and checked.returncode == 1, checked
    dropin = c.root / "etc/systemd/system/hoshikage-model@.service.d"
    dropin.mkdir()
    (dropin / "ramdisk.conf").write_text("[Unit]\nRequiresMountsFor=/dev/shm/hoshikage\n")
    c.systemctl("daemon-reload")
    checked = c.exec("hoshikage", "check", check=False)
    # ... and the idle watch, which deletes kept copies there, may not write to it yet
    assert "ramdisk /dev/shm/hoshikage: hoshikage-model" not in checked.stdout, checked
    assert "ramdisk /dev/shm/hoshikage: hoshikage-idle.service may not write to it" \
        in checked.stdout, checked
    idle = c.root / "etc/systemd/system/hoshikage-idle.service.d"
    idle.mkdir()
    (idle / "ramdisk.conf").write_text("[Service]\nReadWritePaths=-/dev/shm/hoshikage\n")
    c.systemctl("daemon-reload")
    checked = c.exec("hoshikage", "check", check=False)
    assert "ramdisk /dev/shm" not in checked.stdout, checked
    shutil.rmtree(dropin)
    shutil.rmtree(idle)
    c.systemctl("daemon-reload")
    manifest.write_text(MANIFEST)
    # systemd-analyze security on the installed units, rated by the container's systemd.
    for name, bound in BOUNDS.items():
        out = c.exec("systemd-analyze", "security", "--no-pager",
                     name.replace("@.", "@tiny."), check=False).stdout
        score = float(re.findall(r"Overall exposure level for \S+: (\d+\.\d+)", out)[0])
        assert score <= bound, f"{name}: {score}\n{out}"

    # The first request starts everything, as the service user only.
    status, body = hk.chat("tiny")
    assert status == 200, body
    running = processes(c)
    commands = " | ".join(cmd for _, cmd in running.values())
    assert "/usr/libexec/hoshikage/hoshikage-router" in commands, running
    assert "llama-server" in commands, running
    assert "path=/usr/libexec/hoshikage/hoshikage-launch " in c.systemctl(
        "show", "-p", "ExecStart", UNIT)
    assert {user for user, _ in running.values()} == {"hoshikage"}, running
    for path in ("/mnt/hoshikage", "/run/hoshikage", "/var/lib/hoshikage"):
        owner = c.exec("stat", "-c", "%U:%G", path).stdout.strip()
        assert owner == "hoshikage:hoshikage", (path, owner)
    # polkit lets it start and stop its model units, and nothing else.
    as_user = ("setpriv", "--reuid=hoshikage", "--regid=hoshikage", "--init-groups",
               "systemctl", "--no-ask-password")
    refused = c.exec(*as_user, "stop", "hoshikage.socket", check=False)
    assert refused.returncode != 0 and "authentication required" in refused.stderr.lower()
    assert hk.state("hoshikage.socket") == "active"

    # An encrypted model, set up with README's commands ("Encrypted models"): the key sealed
    # by the container's systemd-creds, the model encrypted, served from the RAM disk only.
    setup = c.exec("hoshikage", "keys", "setup").stdout
    assert "sealed by systemd-creds" in setup, setup
    c.exec("install", "-d", "/srv/encrypted")
    c.exec("hoshikage", "encrypt", "/srv/models/tiny.gguf", "/srv/encrypted/tiny.gguf.age")
    manifest.write_text(MANIFEST + "  secret:\n    path: /srv/encrypted/tiny.gguf.age\n"
                                   "    ttl: 3s\n")

    def listed() -> bool:  # the edit reaches the router through hoshikage-reload.path
        return any(m["id"] == "secret" for m in hk.request("GET", "/v1/models")[1]["data"])

    hk.wait_for("the router to list the encrypted model", listed)
    status, body = hk.chat("secret")
    assert status == 200, body
    assert c.exec("cmp", "/srv/models/tiny.gguf", "/mnt/hoshikage/secret.gguf",
                  check=False).returncode == 0
    hk.wait_for("the encrypted model's idle release",
                lambda: not (c.root / "mnt/hoshikage/secret.gguf").exists()
                and bool(hk.events("released", "secret")), timeout=60)
    manifest.write_text(MANIFEST)

    # Idle: the model stops, its release is journaled, the router exits.
    hk.wait_for("the idle stop", lambda: hk.state(UNIT) == "inactive", timeout=60)
    hk.wait_for("the released record", lambda: bool(hk.events("released", "tiny")))
    (released,) = hk.events("released", "tiny")
    assert released["HOSHIKAGE_REASON"] == "idle"
    assert int(released["_UID"]) == int(passwd[2])  # ExecStopPost ran as the user too
    hk.wait_for("no hoshikage process", lambda: processes(c) == {})

    # apt remove: everything stops (a model loaded again first, pinned so that its 3 s TTL
    # cannot stop it before prerm does), config and state stay.
    c.exec("hoshikage", "pin", "tiny")
    status, body = hk.chat("tiny")
    assert status == 200, body
    c.systemctl("enable", "hoshikage-preload.service")  # the admin's choice: purge forgets it
    apt(c, "remove", "hoshikage")
    assert processes(c) == {}

    def stopped(unit: str) -> int:  # when PID 1 finished the unit's last stop job
        return int(c.journal("_PID=1", f"UNIT={unit}", "JOB_TYPE=stop")[-1]
                   ["__MONOTONIC_TIMESTAMP"])

    # prerm closed the socket (the router with it) before it stopped the model: no
    # connection could start a router, and so a model, meanwhile.
    assert stopped("hoshikage.socket") < stopped(UNIT)
    assert not listening(hk)
    assert c.exec("findmnt", "/mnt/hoshikage", check=False).returncode != 0
    loaded = c.systemctl("list-units", "--all", "--plain", "--no-legend", "hoshikage*",
                         "mnt-hoshikage.mount")
    assert "active" not in loaded.replace("inactive", ""), loaded
    assert (c.root / "etc/hoshikage/models.yaml").exists()
    assert (c.root / "var/lib/hoshikage").is_dir()

    # apt purge: nothing of it is left (the admin's own drop-ins removed first) but the
    # system user and group, which Debian keeps (debian/hoshikage.postrm says why).
    for path in ADMIN_FILES:
        admin = c.root / path.lstrip("/")
        shutil.rmtree(admin) if admin.is_dir() else admin.unlink()
    apt(c, "purge", "hoshikage")
    assert c.exec("getent", "passwd", "hoshikage").stdout.split(":") == passwd
    assert c.exec("getent", "group", "hoshikage").stdout == group
    left = [f for f in files if (c.root / f.lstrip("/")).is_file()]
    assert left == []
    leftovers = c.exec("find", "/", "-xdev", "(", "-path", "/debs", "-o", "-path", "/srv",
                       "-o", "-path", LLAMA_DIR, "-o", "-path", "/proc", "-o", "-path", "/sys",
                       ")", "-prune", "-o", "-name", "*hoshikage*", "-print").stdout.split()
    assert leftovers == []
    assert "hoshikage" not in c.systemctl("list-unit-files", "--no-legend")
