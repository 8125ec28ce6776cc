"""The Debian package as an admin meets it: apt install in a clean bookworm booted with its own
systemd, first request, least privilege, idle stop, apt remove, apt purge, and an upgrade."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hoshikage_sd.log import MESSAGE_IDS
from testbed import REPO_ROOT
from testbed.container import Container
from testbed.deploy import Deployment, free_port
from tests.package.conftest import build_deb, pids_in
from tests.support import completions, eventually
from tests.system.netns import SUBNET, Lan
from tests.unit.test_security import BOUNDS

pytestmark = pytest.mark.package
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


@pytest.fixture
def models(tmp_path: Path, tiny_gguf: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    shutil.copyfile(tiny_gguf, directory / "tiny.gguf")
    return directory


def test_install_serve_remove_purge(boot: Boot, deb: Path, models: Path,
                                    llama_server_bin: Path) -> None:
    hk = install(boot, deb, models, llama_server_bin)
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
    assert "1 model(s): tiny" in c.exec("hoshikage", "check").stdout
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
    assert "ramdisk /dev/shm" not in checked.stdout, checked
    shutil.rmtree(dropin)
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

    # apt remove: everything stops (a model loaded again first), config and state stay.
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


def test_upgrade_keeps_a_loaded_model_and_serves_again(
        boot: Boot, deb: Path, models: Path, llama_server_bin: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    next_deb = build_deb(tmp_path_factory.mktemp("deb-next"), revision="2")
    hk = install(boot, deb, models, llama_server_bin)
    c = hk.container
    (c.root / "etc/hoshikage/models.yaml").write_text(MANIFEST.replace("ttl: 3s", "ttl: 10m"))
    status, body = hk.chat("tiny")
    assert status == 200, body
    model_pid = c.systemctl("show", "-p", "MainPID", "--value", UNIT).strip()
    router_pid = c.systemctl("show", "-p", "MainPID", "--value", "hoshikage.service").strip()
    assert model_pid != "0" and router_pid != "0"

    c.exec("mkdir", "-p", "/tmp/next")
    (c.root / "tmp/next" / next_deb.name).write_bytes(next_deb.read_bytes())
    output = apt(c, "install", f"/tmp/next/{next_deb.name}")
    assert "Unpacking hoshikage (0.2.0-2) over (0.2.0-1)" in output, output
    assert c.exec("dpkg-query", "-W", "-f", "${Version}", "hoshikage").stdout == "0.2.0-2"

    # The loaded model is kept (same process); the router was restarted on the new code.
    assert hk.state(UNIT) == "active"
    assert c.systemctl("show", "-p", "MainPID", "--value", UNIT).strip() == model_pid
    assert c.systemctl("show", "-p", "MainPID", "--value",
                       "hoshikage.service").strip() != router_pid
    assert hk.state("hoshikage.socket") == "active" and listening(hk)
    status, body = hk.chat("tiny")  # no manual step
    assert status == 200, body
    assert len(hk.events("staged", "tiny")) == 1  # served by the kept model, not a reload
    assert {user for user, _ in processes(c).values()} == {"hoshikage"}


#: asks a worker what llama-server asks first (hoshikage_sd/rpc/wire.py: HELLO, the devices'
#: memory), prints the answer, and keeps the connection open until its stdin closes
ASK_WORKER = """
import json, socket, sys, time
from hoshikage_sd.rpc import wire
timeout = float(sys.argv[3])
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=timeout) as sock:
    answer = wire.ask_on(sock, time.monotonic() + timeout)
    print(json.dumps({"version": answer.version, "total": answer.total,
                      "devices": len(answer.devices)}), flush=True)
    sys.stdin.read()
"""
#: the unified cgroup hierarchy, which systemd's IPAddressAllow= (the allow list) needs
CGROUP2 = any(Path(p, "cgroup.controllers").exists()
              for p in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"))


def worker_processes(c: Container) -> dict[str, str]:
    """The worker's running units' main processes: unit -> the process's user."""
    out = {}
    for unit in ("hoshikage-rpc.service", "hoshikage-rpc-server.service"):
        pid = c.systemctl("show", "-p", "MainPID", "--value", unit).strip()
        if pid != "0":
            out[unit] = c.exec("ps", "-o", "user=", "-p", pid, check=False).stdout.strip()
    return out


def test_a_worker_set_up_as_the_readme_says(boot: Boot, deb: Path,
                                           llama_server_bin: Path) -> None:
    """README "Several machines", on a worker installed from the package: `rpc-worker setup`
    enables the socket; a head's first connection starts the server, which answers
    llama.cpp's HELLO and device-memory requests; an address not allowed is dropped; the
    worker idles back to no process. The worker boots in a network namespace with
    SUBNET.2; the head (SUBNET.1) and a stranger (.3) are namespaces of their own, without a
    container: what a head says to a worker is llama.cpp's protocol (wire.py speaks it as
    llama-server does; the system tier has a real head split a model over two workers)."""
    with Lan() as lan:
        head, network, stranger = lan.machine(1), lan.machine(2), lan.machine(3)
        c = boot(binds=[(str(deb.parent), "/debs", True),
                        (str(llama_server_bin.parent), LLAMA_DIR, True)],
                 network=network, ip_firewall=CGROUP2)
        # a worker's machine has no route to a mirror here: what the bookworm root holds
        # (the Recommends, completion, age and uvloop, a worker does without)
        output = apt(c, "install", "--no-install-recommends", f"/debs/{deb.name}")
        assert "Setting up hoshikage" in output, output
        listen = f"{SUBNET}.2:50052"
        setup = c.exec("hoshikage", "rpc-worker", "setup", "--listen", listen, "--allow",
                       f"{SUBNET}.1", "--server", f"{LLAMA_DIR}/ggml-rpc-server",
                       "--idle", "2s")
        assert f"hoshikage-rpc.socket listens on {listen} for {SUBNET}.1/32" in setup.stdout
        assert c.systemctl("is-enabled", "hoshikage-rpc.socket").strip() == "enabled"
        assert c.systemctl("is-active", "hoshikage-rpc.socket").strip() == "active"
        assert worker_processes(c) == {}  # listening; nothing behind it

        def ask_from(net: str, timeout: float) -> subprocess.Popen[str]:
            return subprocess.Popen(["nsenter", f"--net={net}", sys.executable, "-c",
                                     ASK_WORKER, f"{SUBNET}.2", "50052", str(timeout)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True,
                                    env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})

        if CGROUP2:  # the allow list: a stranger's packets are dropped, nothing starts
            knock = ask_from(stranger, 2)
            _, err = knock.communicate(timeout=30)
            assert "TimeoutError" in err, err
            assert worker_processes(c) == {}
        asking = ask_from(head, 20)
        try:
            line = asking.stdout.readline()  # type: ignore[union-attr]
            assert line, asking.stderr.read()  # type: ignore[union-attr]
            answer = json.loads(line)
            assert answer["version"][0] == 4 and answer["devices"] >= 1, answer
            assert answer["total"] > 0, answer
            # the proxy and the server, each as a user made for the run (DynamicUser=)
            users = worker_processes(c)
            assert set(users) == {"hoshikage-rpc.service", "hoshikage-rpc-server.service"}
            assert not {"root", "hoshikage"} & set(users.values()), users
        finally:
            asking.stdin.close()  # type: ignore[union-attr]
            asking.wait(timeout=30)
        # the proxy exits 2 s after its last connection, and the server with it
        assert eventually(lambda: worker_processes(c), lambda found: found == {},
                          timeout=30) == {}
        assert c.exec("pgrep", "-f", "ggml-rpc-server", check=False).stdout == ""
        assert c.systemctl("is-active", "hoshikage-rpc.socket").strip() == "active"
