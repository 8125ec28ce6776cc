"""llama.cpp RPC workers: the manifest's workers:/rpc:, llama-server's --rpc, the wire
requests hoshikage asks a ggml-rpc-server, and admission's per-worker split."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hoshikage_sd.manifest import Files, Worker
from hoshikage_sd.manifest.codec import decode, encode
from hoshikage_sd.manifest.model import Config
from hoshikage_sd.manifest.parse import ConfigError, parse
from hoshikage_sd.rpc import wire, workers

MANIFEST = """\
workers:
  box2: 192.0.2.2:50052
  box3: {address: box3.lan, memory: 4G}
models:
  tiny:
    path: /srv/models/tiny.gguf
    rpc: [box2, box3]
  alone:
    path: /srv/models/alone.gguf
"""


def config(text: str = MANIFEST) -> Config:
    return parse(text, Path("/etc/hoshikage/models.yaml"))


def test_workers_and_rpc_parse() -> None:
    c = config()
    assert c.workers == {"box2": Worker("box2", "192.0.2.2", 50052),
                         "box3": Worker("box3", "box3.lan", 50052, 4 << 30)}
    assert c.models["tiny"].rpc == ("box2", "box3")
    assert c.models["alone"].rpc == ()


def test_server_argv_names_the_workers_in_order() -> None:
    c = config()
    tiny = c.models["tiny"]
    argv = c.server_argv(tiny, Files.of(tiny))
    i = argv.index("--rpc")
    assert argv[i + 1] == "192.0.2.2:50052,box3.lan:50052"
    alone = c.models["alone"]
    assert "--rpc" not in c.server_argv(alone, Files.of(alone))


def test_the_kept_manifest_keeps_workers() -> None:
    c = config()
    assert decode(Config, encode(c)) == c


@pytest.mark.parametrize(("text", "problem"), [
    (MANIFEST.replace("rpc: [box2, box3]", "rpc: [box9]"), "'box9' is not one of the workers"),
    (MANIFEST.replace("rpc: [box2, box3]", "rpc: [box2, box2]"), "names a worker twice"),
    (MANIFEST.replace("192.0.2.2:50052", "192.0.2.2:0"), "is not HOST:PORT"),
    (MANIFEST.replace("192.0.2.2:50052", "'[::1]:50052'"), "no IPv6 literal"),
    (MANIFEST.replace("{address: box3.lan, memory: 4G}", "{memory: 4G}"), "needs 'address:'"),
    (MANIFEST + "    rpc: [box2]\n    backend: command\n    command: [/bin/x]\n",
     "'rpc:' is for llama-server"),
    (MANIFEST.replace("memory: 4G}", "devices: []}"), "names no device"),
    (MANIFEST.replace("memory: 4G}", "devices: [0, 0]}"), "names a device twice"),
    (MANIFEST.replace("memory: 4G}", "devices: [-1]}"), "not '-1'"),
    (MANIFEST.replace("memory: 4G}", "devices: [Vulkan0]}"), "not 'Vulkan0'"),
    (MANIFEST.replace("memory: 4G}", "devices: 0}"), "must be a list"),
])
def test_bad_workers_are_named_with_their_line(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(text)
    assert problem in err.value.message and err.value.line


def test_tensor_split() -> None:
    assert workers.tensor_split(["-ngl", "99", "-ts", "3,1"]) == [3.0, 1.0]
    assert workers.tensor_split(["--tensor-split=1/1"]) == [1.0, 1.0]
    assert workers.tensor_split(["-c", "512"]) is None


def test_shares_follow_free_memory_and_the_memory_cap() -> None:
    box2, box3 = Worker("box2", "a", 1), Worker("box3", "b", 1, memory=1 << 30)
    split = workers.shares(6 << 30, 1.0, [box2, box3], [16 << 30, 8 << 30])
    assert [s.need for s in split] == [4 << 30, 2 << 30]  # 2:1, as llama.cpp splits
    assert [s.free for s in split] == [16 << 30, 1 << 30]  # box3 may use 1 GiB only
    problem = workers.short("tiny", 6 << 30, 1.0, split)
    assert problem is not None and problem.startswith("worker 'box3' (b:1) has 1.0")
    even = workers.shares(6 << 30, 1.2, [box2, box3], [16 << 30, 8 << 30], [1, 1])
    assert [s.need for s in even] == [math_ceil(3.6 * (1 << 30))] * 2


def math_ceil(x: float) -> int:
    import math

    return math.ceil(x)


def test_a_worker_busy_with_another_model_of_this_head() -> None:
    c = config(MANIFEST + "  other:\n    path: /srv/o.gguf\n    rpc: [box3]\n")
    message = workers.busy_with(c, c.models["tiny"], ["alone", "other"])
    assert message is not None and message.startswith("worker 'box3' (box3.lan:50052) serves "
                                                      "'other'")
    assert workers.busy_with(c, c.models["tiny"], ["alone"]) is None


# ---- the wire: a fake ggml-rpc-server of protocol 4 -------------------------------------

def recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


#: connections the fake servers took, by port
ACCEPTED: dict[int, int] = {}


def fake_server(listener: socket.socket, version: bytes, silent: bool) -> None:
    """Clients one after another, as ggml-rpc-server serves them, until the listener closes."""
    port = listener.getsockname()[1]
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        ACCEPTED[port] = ACCEPTED.get(port, 0) + 1
        serve(conn, version, silent)


def serve(conn: socket.socket, version: bytes, silent: bool) -> None:
    with conn:
        try:
            while True:
                command, size = struct.unpack("<BQ", recv_exactly(conn, 9))
                payload = recv_exactly(conn, size)
                if silent:
                    continue
                if command == wire.HELLO:
                    assert payload == bytes(wire.CAPS_SIZE)
                    answer = version + b"\0" + bytes(wire.CAPS_SIZE)
                elif command == wire.DEVICE_COUNT:
                    answer = struct.pack("<I", 2)
                else:
                    assert command == wire.GET_DEVICE_MEMORY
                    (device,) = struct.unpack("<I", payload)
                    answer = struct.pack("<QQ", (device + 1) << 30, 8 << 30)
                conn.sendall(struct.pack("<Q", len(answer)) + answer)
        except EOFError:
            pass


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[int]:
    version, silent = getattr(request, "param", (bytes([4, 0, 3]), False))
    listener = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=fake_server, args=(listener, version, silent),
                              daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.close()


def test_requests_as_ggml_rpc_cpp_frames_them() -> None:
    assert wire.hello() == bytes([14]) + struct.pack("<Q", 24) + bytes(24)
    assert wire.memory_request(1) == bytes([11]) + struct.pack("<Q", 4) + b"\1\0\0\0"
    assert wire.parse_memory(struct.pack("<QQ", 1, 2)) == wire.Device(1, 2)
    with pytest.raises(wire.WireError):
        wire.parse_hello(bytes(4))  # protocol 3's answer: no capabilities


def test_ask_a_worker(server: int) -> None:
    answer = wire.ask("127.0.0.1", server, 2.0)
    assert answer.version == (4, 0, 3)
    assert answer.devices == (wire.Device(1 << 30, 8 << 30), wire.Device(2 << 30, 8 << 30))
    assert answer.free == 3 << 30


@pytest.mark.parametrize("server", [(bytes([3, 6, 0]), False)], indirect=True)
def test_another_protocol_is_named(server: int) -> None:
    with pytest.raises(workers.WorkerUnavailable, match=r"speaks protocol 3\.6\.0, not 4\.x"):
        workers.ask(Worker("box2", "127.0.0.1", server))


@pytest.mark.parametrize("server", [(bytes([4, 0, 3]), True)], indirect=True)
def test_a_busy_worker_is_a_refusal_not_a_hang(server: int) -> None:
    with pytest.raises(workers.WorkerUnavailable, match="may serve another llama-server"):
        workers.ask(Worker("box2", "127.0.0.1", server), answer_timeout=0.3)


def test_a_worker_that_is_down() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(workers.WorkerUnavailable) as err:
        workers.ask(Worker("box2", "127.0.0.1", port))
    assert err.value.message == (f"worker 'box2' (127.0.0.1:{port}) is unavailable: refused "
                                 "the connection (is hoshikage-rpc.socket enabled and "
                                 "listening there?)")


def test_admit_asks_each_worker_and_remembers_the_split(server: int, tmp_path: Path) -> None:
    text = (f"runtime_dir: {tmp_path}\nworkers:\n  box2: 127.0.0.1:{server}\n"
            "models:\n  tiny:\n    path: /srv/tiny.gguf\n    rpc: [box2]\n")
    c = config(text)
    split = workers.admit(c, c.models["tiny"], 1 << 30)
    assert [(s.worker, s.free, s.version) for s in split] == [("box2", 3 << 30, "4.0.3")]
    assert workers.status(c, ["tiny"])[0]["held_bytes"] == {"tiny": 1 << 30}


def test_one_admission_asks_each_worker_once(server: int, tmp_path: Path) -> None:
    """The model unit's admission asks for the head's share of the split (needs.split_share),
    then admit asks for the fit: one connection to the worker for both."""
    from hoshikage_sd.admit import act

    text = (f"runtime_dir: {tmp_path}\nworkers:\n  box2: 127.0.0.1:{server}\n"
            "models:\n  tiny:\n    path: /srv/tiny.gguf\n    rpc: [box2]\n")
    c = config(text)
    with act.asking_workers_once(c.models["tiny"]):
        first = workers.ask(c.workers["box2"])
        (share,) = workers.admit(c, c.models["tiny"], 1 << 30)
    assert (share.free, ACCEPTED[server]) == (first.free, 1)
    workers.admit(c, c.models["tiny"], 1 << 30)  # the next admission asks anew
    assert ACCEPTED[server] == 2


@pytest.mark.parametrize("server", [(bytes([4, 0, 3]), True)], indirect=True)
def test_one_admission_waits_for_a_silent_worker_once(server: int) -> None:
    worker = Worker("box2", "127.0.0.1", server)
    with workers.asked_once():
        for _ in range(2):
            with pytest.raises(workers.WorkerUnavailable, match="may serve another llama-server"):
                workers.ask(worker, answer_timeout=0.3)
    assert ACCEPTED[server] == 1


def test_admit_counts_the_selected_devices_and_their_number(server: int,
                                                            tmp_path: Path) -> None:
    """devices: [1] is the worker's second device (2 GiB free of the fake's 1 + 2); the
    record keeps how many devices it has, which the --device names are numbered by."""
    text = (f"runtime_dir: {tmp_path}\nworkers:\n  box2: {{address: '127.0.0.1:{server}', "
            "devices: [1]}\nmodels:\n  tiny:\n    path: /srv/tiny.gguf\n    rpc: [box2]\n")
    c = config(text)
    (share,) = workers.admit(c, c.models["tiny"], 1 << 30)
    assert (share.free, share.devices) == (2 << 30, 2)
    assert workers.remembered(c.runtime_dir, "tiny") == [share]


def test_admit_names_a_device_the_worker_does_not_have(server: int, tmp_path: Path) -> None:
    text = (f"runtime_dir: {tmp_path}\nworkers:\n  box2: {{address: '127.0.0.1:{server}', "
            "devices: [0, 2]}\nmodels:\n  tiny:\n    path: /srv/tiny.gguf\n    rpc: [box2]\n")
    c = config(text)
    with pytest.raises(workers.WorkerUnavailable,
                       match=r"worker 'box2' \(127\.0\.0\.1:\d+\) has 2 devices \(0, 1\): "
                             r"its devices: names 2"):
        workers.admit(c, c.models["tiny"], 1 << 30)


def test_admit_refuses_when_the_share_is_too_big(server: int, tmp_path: Path) -> None:
    text = (f"runtime_dir: {tmp_path}\nworkers:\n  box2: 127.0.0.1:{server}\n"
            "models:\n  tiny:\n    path: /srv/tiny.gguf\n    rpc: [box2]\n")
    c = config(text)
    with pytest.raises(workers.WorkerUnavailable, match=r"worker .box2. .* has 3\.0 GiB free "
                                                        r"for .tiny., which needs 3\.6 GiB"):
        workers.admit(c, c.models["tiny"], 3 << 30)


# ---- the drop-ins of rpc-worker setup / head-setup ---------------------------------------

def test_worker_socket_dropin() -> None:
    from hoshikage_sd.rpc import setup

    listen = setup.listen_address("10.0.0.2:50052")
    text = setup.socket_dropin(listen, setup.allowed(["10.0.0.1", "10.0.1.0/24"]))
    assert "[Socket]\nListenStream=\nListenStream=10.0.0.2:50052\n" in text
    assert text.endswith("IPAddressAllow=10.0.0.1/32\nIPAddressAllow=10.0.1.0/24\n")
    assert setup.listen_address("[fd00::2]:50052") == "[fd00::2]:50052"


@pytest.mark.parametrize("bad", ["box2:50052", "10.0.0.2", "10.0.0.2:0"])
def test_worker_listen_must_be_an_address_and_port(bad: str) -> None:
    from hoshikage_sd.errors import HoshikageError
    from hoshikage_sd.rpc import setup

    with pytest.raises(HoshikageError):
        setup.listen_address(bad)


def test_nobody_allowed_is_an_error() -> None:
    from hoshikage_sd.errors import HoshikageError
    from hoshikage_sd.rpc import setup

    with pytest.raises(HoshikageError, match="--allow"):
        setup.allowed([])


def test_head_dropin_allows_the_workers_only() -> None:
    from hoshikage_sd.rpc import setup

    text = setup.head_dropin({"box3": ["10.0.0.3"], "box2": ["10.0.0.2", "fd00::2"]})
    assert text.splitlines()[2:] == [
        "[Service]", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "# box2", "IPAddressAllow=10.0.0.2", "IPAddressAllow=fd00::2",
        "# box3", "IPAddressAllow=10.0.0.3"]


# ---- hoshikage check on a head ----------------------------------------------------------

def check_config(tmp_path: Path, port: int) -> Config:
    return config(f"runtime_dir: {tmp_path}\nworkers:\n  box2: 127.0.0.1:{port}\n"
                  "models:\n  tiny:\n    path: /srv/tiny.gguf\n    rpc: [box2]\n")


def test_check_names_a_worker_the_units_may_not_reach(server: int, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from hoshikage_sd.rpc import check, setup

    monkeypatch.setattr(setup, "UNIT_DIR", tmp_path)
    monkeypatch.setattr(check, "in_use", set)
    c = check_config(tmp_path, server)
    (problem,) = check.problems(c)
    assert "llama-server cannot reach the workers box2" in problem
    (tmp_path / setup.HEAD_DROPIN).parent.mkdir(parents=True)
    (tmp_path / setup.HEAD_DROPIN).write_text(setup.head_dropin({"box2": ["127.0.0.1"]}))
    assert check.problems(c) == []


def test_check_names_a_worker_that_does_not_answer(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from hoshikage_sd.rpc import check, setup

    monkeypatch.setattr(setup, "UNIT_DIR", tmp_path)
    monkeypatch.setattr(check, "in_use", set)
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    (tmp_path / setup.HEAD_DROPIN).parent.mkdir(parents=True)
    (tmp_path / setup.HEAD_DROPIN).write_text(setup.head_dropin({"box2": ["127.0.0.1"]}))
    (problem,) = check.problems(check_config(tmp_path, port))
    assert problem.startswith(f"worker 'box2' (127.0.0.1:{port}) is unavailable: refused")


def test_setup_warns_of_a_server_its_unit_cannot_see() -> None:
    """DynamicUser= gives hoshikage-rpc-server.service a /tmp and /var/tmp of its own: a
    server there was accepted, and the unit could not find it."""
    from hoshikage_sd.rpc import setup

    assert setup.server_problem("/bin/true") is None
    hidden = setup.server_problem("/var/tmp/llama/ggml-rpc-server")
    assert hidden is not None and "is in /var/tmp, which hoshikage-rpc-server.service does " \
        "not see" in hidden
    assert "is not an executable file here" in str(setup.server_problem("/nonexistent/x"))
