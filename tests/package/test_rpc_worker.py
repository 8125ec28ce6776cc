"""An RPC worker set up from the installed Debian package, as README's "Several machines"
says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed import REPO_ROOT
from testbed.container import Container
from tests.package.conftest import LLAMA_DIR, Boot, apt
from tests.support import eventually
from tests.system.netns import SUBNET, Lan

pytestmark = pytest.mark.package


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
