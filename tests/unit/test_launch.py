"""Launch tickets: what the router hands the model unit's launcher (hoshikage_sd/launch.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hoshikage_sd import protocol
from hoshikage_sd.manifest import NAME_RE
from hoshikage_sd.model_unit import install, launch
from tests.support import LAUNCHERS, make_launcher

ARGV = ["/usr/bin/llama-server", "-m", "/mnt/hoshikage/tiny.gguf", "--host",
        "/run/hoshikage/tiny.sock", "--alias", "tiny", "--chat-template", "a b\nc", ""]
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "ODD": "x=y"}


def test_ticket_round_trip_and_taken_once(tmp_path: Path) -> None:
    protocol.write_ticket(str(tmp_path), "tiny", "/run/hoshikage/tiny.sock", "/v1/models", ENV,
                        ARGV)
    ticket = protocol.take_ticket(str(tmp_path), "tiny")
    assert ticket.socket == b"/run/hoshikage/tiny.sock"
    assert ticket.health == "/v1/models"
    assert ticket.env == {k.encode(): v.encode() for k, v in ENV.items()}
    assert ticket.argv == [a.encode() for a in ARGV]  # spaces, newlines, "" survive
    with pytest.raises(ValueError, match="no ticket"):
        protocol.take_ticket(str(tmp_path), "tiny")
    assert list((tmp_path / "launch").iterdir()) == []


def test_stale_or_foreign_ticket_is_refused(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    protocol.write_ticket(str(tmp_path), "tiny", "/s", "/health", ENV, ARGV)
    later = time.monotonic() + protocol.TICKET_TTL + 1
    monkeypatch.setattr(launch.time, "monotonic", lambda: later)
    with pytest.raises(ValueError, match="stale"):
        protocol.take_ticket(str(tmp_path), "tiny")
    monkeypatch.undo()
    (tmp_path / "launch" / "tiny").write_bytes(b"something else\0" + b"1e99\0/s\0/health\0\0"
                                               b"/bin/true")
    with pytest.raises(ValueError, match="not a launch ticket"):
        protocol.take_ticket(str(tmp_path), "tiny")


@pytest.mark.parametrize("name", ["tiny", "qwen3-8b", "a.b_c:d", "x" * 100, "", ".hidden",
                                  "../etc", "a/b", "-rf", "x" * 101, "név", "a b", "a\0b"])
def test_valid_name_is_the_manifest_rule(name: str) -> None:
    assert protocol.valid_name(name) == bool(NAME_RE.match(name))


def test_unsafe_name_never_reaches_a_path(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "victim").write_text("keep")
    assert launch.launch("../etc/victim", str(tmp_path / "run")) is None
    assert (tmp_path / "etc" / "victim").read_text() == "keep"


def test_launch_spawns_with_ticket_env_and_removes_stale_socket(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stale = tmp_path / "tiny.sock"
    stale.touch()
    protocol.write_ticket(str(tmp_path), "tiny", str(stale), "/health",
                        {"PATH": "/usr/bin:/bin", "K": "v"},
                        ["sh", "-c", f'echo "$K $0" > {out}; exit 3', "arg0"])
    started = launch.launch("tiny", str(tmp_path))  # returns when the child has exited
    assert started is not None
    pid, when, healthy = started
    assert healthy is None  # it never served: the activator takes over the wait
    _, status = os.waitpid(pid, os.WNOHANG)  # exited, and left for the activator to reap
    assert os.waitstatus_to_exitcode(status) == 3
    assert out.read_text() == "v arg0\n"
    assert not stale.exists()
    assert when <= time.monotonic()


def test_probe_reads_the_status_line(tmp_path: Path) -> None:
    import socket
    import threading

    path = str(tmp_path / "http.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    requests: list[bytes] = []

    def answer(*statuses: bytes) -> None:  # no assertion here: it could not fail the test
        for status in statuses:
            conn, _ = server.accept()
            with conn:
                requests.append(conn.recv(4096))
                conn.sendall(status)

    thread = threading.Thread(target=answer, args=(b"HTTP/1.1 503 Loading\r\n\r\n",
                                                  b"HTTP/1.1 200 OK\r\nX: y\r\n\r\n{}",
                                                  b"garbage"))
    thread.start()
    assert protocol.probe(path) == 503
    assert protocol.probe(path.encode(), "/v1/models") == 200
    assert protocol.probe(path) is None
    thread.join(5)
    server.close()
    assert not thread.is_alive() and len(requests) == 3
    assert requests[1].startswith(b"GET /v1/models HTTP/1.0\r\n")
    assert protocol.probe(str(tmp_path / "absent.sock")) is None


SPIN = "import time\nend = time.monotonic() + {busy}\nwhile time.monotonic() < end: pass\n"


def child(tmp_path: Path, busy: float, then_sleep: float = 30) -> subprocess.Popen[bytes]:
    """A process that uses one CPU for `busy` seconds, then sleeps."""
    code = SPIN.format(busy=busy) + f"time.sleep({then_sleep})\n"
    return subprocess.Popen([sys.executable, "-c", code])


def timed_wait_quiet(pid: int, limit: float) -> float:
    begin = time.monotonic()
    launch.wait_quiet(pid, begin + limit)
    return time.monotonic() - begin


class Clock:
    """A virtual clock and CPU counter for wait_quiet: the process uses one CPU until
    `busy_until` and none after, whatever else the machine runs (a real spinning child
    gets less than its CPU on a loaded machine and reads as quiet)."""

    def __init__(self, busy_until: float) -> None:
        self.now, self.busy_until = 0.0, busy_until

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def cpu_ns(self, pid: int) -> int:
        return int(min(self.now, self.busy_until) * 1e9)


@pytest.mark.parametrize(("busy", "limit", "least", "most"), [
    (0.0, 5.0, 0.0, protocol.QUIET_WINDOW),        # quiet already: one window
    (0.6, 5.0, 0.6, 0.6 + 2 * protocol.QUIET_WINDOW),  # busy, then quiet: the busy part out
    (99, 0.4, 0.4, 0.4 + protocol.QUIET_WINDOW),   # busy throughout: the limit
], ids=["quiet", "busy-then-quiet", "limit"])
def test_wait_quiet(monkeypatch: pytest.MonkeyPatch, busy: float, limit: float, least: float,
                    most: float) -> None:
    clock = Clock(busy)
    monkeypatch.setattr(time, "monotonic", clock.monotonic)
    monkeypatch.setattr(time, "sleep", clock.sleep)
    monkeypatch.setattr(launch, "cpu_ns", clock.cpu_ns)
    monkeypatch.setattr(launch, "exited", lambda pid: False)
    launch.wait_quiet(1, limit)
    assert least <= clock.now <= most


def test_cpu_ns_reads_a_real_process(tmp_path: Path) -> None:
    proc = child(tmp_path, 0.6)
    try:  # it is spinning by now: its CPU time grows
        before = launch.cpu_ns(proc.pid)
        time.sleep(0.15)
        after = launch.cpu_ns(proc.pid)
        assert before is not None and after is not None and after > before
    finally:
        proc.kill()
        proc.wait()
    assert launch.cpu_ns(proc.pid) is None


def test_wait_quiet_returns_when_the_child_exits(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SPIN.format(busy=0.3)])
    assert timed_wait_quiet(proc.pid, 5.0) <= 2.0
    assert proc.wait() == 0  # left for its parent to reap
    assert launch.cpu_ns(proc.pid) is None


HEALTHY_SERVER = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1]); s.listen(8)
end = None
while True:
    c, _ = s.accept()
    c.recv(4096)
    c.sendall(b"HTTP/1.1 200 OK\\r\\n\\r\\n")
    c.close()
    if end is None:  # the first answer: busy for a while, as llama-server is
        end = time.monotonic() + float(sys.argv[2])
        while time.monotonic() < end: pass
"""


def test_launch_tells_router_and_systemd_then_waits_for_the_first_answer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    sock = tmp_path / "m.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    router = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    router.bind(str(tmp_path / protocol.ROUTER_SOCKET))
    router.settimeout(0)
    # The launcher tells a busy server from a quiet one by the CPU time it gets: on a machine
    # loaded enough, the busy one may get too little for a moment and look quiet. So the
    # wait is tried up to three times; a launcher that does not wait fails all three.
    waited = []
    try:
        for _ in range(3):
            protocol.write_ticket(str(tmp_path), "tiny", str(sock), "/health", {},
                                  [sys.executable, "-c", HEALTHY_SERVER, str(sock), "0.6"])
            started = launch.launch("tiny", str(tmp_path))
            assert started is not None
            pid, spawned, healthy = started
            try:
                assert healthy is not None and spawned < healthy
                assert router.recv(4096) == b"tiny"  # the router forwards on this, not READY
                assert notify.recv(4096) == b"READY=1\nSTATUS=serving tiny"
                # it answered /health, spun 0.6 s as if answering, and only then was handed
                # over
                waited.append(time.monotonic() - healthy)
            finally:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            if waited[-1] >= 0.45:
                break
        assert max(waited) >= 0.45, waited
    finally:
        notify.close()
        router.close()


def imports(argv: list[str]) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    result = subprocess.run(["/usr/bin/python3", "-I", "-S", "-X", "importtime", *argv],
                            capture_output=True, text=True)
    return result, {line.split("|")[-1].strip() for line in result.stderr.splitlines()
                    if line.startswith("import time:") and "|" in line} - {"imported package"}


def test_launcher_imports_only_what_the_interpreter_has_built_in(tmp_path: Path) -> None:
    """Run as the unit runs the installers' stub (-I -S): no module from site-packages or
    the stdlib beyond the interpreter's own start-up set, but the launcher and the protocol
    module (whose bytecode is cached), which is what keeps it at a few ms cold."""
    stub = tmp_path / "bin" / "hoshikage-launch"
    stub.parent.mkdir()
    install.write_stub(str(stub), str(Path(launch.__file__).parents[2]))
    assert os.access(stub, os.X_OK)
    assert stub.read_text().startswith("#!/usr/bin/python3 -IS\n")
    result, imported = imports([str(stub)])
    assert result.returncode == 2 and "usage: hoshikage-launch NAME" in result.stderr
    ours = {"hoshikage_sd", "hoshikage_sd.model_unit", "hoshikage_sd.model_unit.launch",
            "hoshikage_sd.protocol"}
    assert ours <= imported
    imported -= ours
    _, allowed = imports(["-c", "import _signal, _socket, os, sys, time"])
    assert imported and imported <= allowed, imported - allowed


# -- both forms: launch.py and launch.c keep one contract --------------------------------------

@pytest.fixture(params=LAUNCHERS)
def launcher_form(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    """(hoshikage-launch in one form, the file where the `hoshikage` beside it writes the
    arguments it was run with, one per line)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    args = tmp_path / "activate.args"
    fake = bin_dir / "hoshikage"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {args}\n")
    fake.chmod(0o755)
    return make_launcher(request.param, bin_dir / "hoshikage-launch"), args


def run_launcher(launcher: Path, args: Path, name: str, runtime: Path) -> list[str]:
    result = subprocess.run([str(launcher), name], capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/bin:/bin", "RUNTIME_DIRECTORY": f"{runtime}:x"})
    assert result.returncode == 0, result.stderr
    return args.read_text().splitlines()


def test_without_a_usable_ticket_both_launchers_become_the_activator(
        launcher_form: tuple[Path, Path], tmp_path: Path) -> None:
    launcher, args = launcher_form
    runtime = tmp_path / "run"
    (runtime / "launch").mkdir(parents=True)
    ticket = runtime / "launch" / "tiny"
    assert run_launcher(launcher, args, "tiny", runtime) == ["activate", "tiny"]  # none
    expired = str(time.monotonic() - 1).encode()
    for data in (b"hoshikage-launch-1\0" + expired + b"\0/s\0/health\0\0/bin/true",  # stale
                 b"something else\0" + b"1e99\0/s\0/health\0\0/bin/true",  # foreign
                 b"hoshikage-launch-1\0" + b"1e99\0/s\0/health\0PATH=/bin\0"):  # no argv
        ticket.write_bytes(data)
        assert run_launcher(launcher, args, "tiny", runtime) == ["activate", "tiny"], data
        assert not ticket.exists()  # taken, even when refused
    (tmp_path / "victim").write_text("keep")
    assert run_launcher(launcher, args, "../victim", runtime) == ["activate", "../victim"]
    assert (tmp_path / "victim").read_text() == "keep"


def test_both_launchers_spawn_the_ticket_and_hand_its_pid_over(
        launcher_form: tuple[Path, Path], tmp_path: Path) -> None:
    launcher, args = launcher_form
    runtime = tmp_path / "run"
    out = tmp_path / "out"
    stale = tmp_path / "tiny.sock"
    stale.touch()
    before = time.monotonic()
    protocol.write_ticket(str(runtime), "tiny", str(stale), "/health",
                        {"PATH": "/usr/bin:/bin", "K": "v=w"},
                        ["sh", "-c", f'printf "%s|" "$K" "$0" "$@" > {out}', "arg0", "a b\nc",
                         ""])
    argv = run_launcher(launcher, args, "tiny", runtime)
    assert argv[:3] == ["activate", "tiny", "--adopt"]
    assert argv[4] == "--spawned" and before <= float(argv[5]) <= time.monotonic()
    assert len(argv) == 6  # it never served: no --healthy, the activator takes over the wait
    assert out.read_text() == "v=w|arg0|a b\nc||"  # env and argv as the router wrote them
    assert not stale.exists()
    assert not (runtime / "launch" / "tiny").exists()


def test_both_launchers_pass_the_units_gpu_environment_where_the_ticket_does_not_set_it(
        launcher_form: tuple[Path, Path], tmp_path: Path) -> None:
    """A drop-in's CUDA_VISIBLE_DEVICES, GGML_VK_VISIBLE_DEVICES, LD_LIBRARY_PATH reach
    llama-server; the manifest's env (in the ticket) wins; nothing else of the unit's does."""
    launcher, args = launcher_form
    runtime = tmp_path / "run"
    out = tmp_path / "env.out"
    protocol.write_ticket(str(runtime), "tiny", str(tmp_path / "tiny.sock"), "/health",
                          {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "1"},
                          ["sh", "-c", f"env > {out}"])
    unit_env = {"PATH": "/usr/bin:/bin", "RUNTIME_DIRECTORY": str(runtime),
                "CUDA_VISIBLE_DEVICES": "0", "GGML_VK_VISIBLE_DEVICES": "0",
                "LD_LIBRARY_PATH": "/opt/rocm/lib", "LLAMA_ARG_N_GPU_LAYERS": "99",
                "SECRET_TOKEN": "no", "LD_PRELOAD": "/no.so", "CUDA": "no"}
    subprocess.run([str(launcher), "tiny"], capture_output=True, timeout=30, env=unit_env,
                   check=True)
    deadline = time.monotonic() + 10
    while not (out.exists() and out.read_text().endswith("\n")):
        assert time.monotonic() < deadline, "the server was not started"
        time.sleep(0.01)
    seen = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert seen["CUDA_VISIBLE_DEVICES"] == "1"
    assert seen["GGML_VK_VISIBLE_DEVICES"] == "0"
    assert seen["LD_LIBRARY_PATH"] == "/opt/rocm/lib"
    assert seen["LLAMA_ARG_N_GPU_LAYERS"] == "99"
    assert not {"SECRET_TOKEN", "LD_PRELOAD", "CUDA", "RUNTIME_DIRECTORY"} & set(seen)
    assert args.read_text().splitlines()[:3] == ["activate", "tiny", "--adopt"]


def test_launch_c_passes_the_same_environment_as_protocol() -> None:
    source = (Path(protocol.__file__).parent / "model_unit" / "launch.c").read_text()

    def c_list(name: str) -> tuple[str, ...]:
        body = re.search(rf"{name}\[\] = \{{(.*?)\}};", source, re.S)
        assert body, name
        return tuple(re.findall(r'"([^"]*)"', body.group(1)))

    assert c_list("PASSED_ENV_PREFIXES") == protocol.PASSED_ENV_PREFIXES
    assert c_list("PASSED_ENV_NAMES") == protocol.PASSED_ENV_NAMES


def launch_healthy(launcher: Path, tmp_path: Path) -> Path:
    """Run `launcher` on a ticket for a server that answers /health 200 at once; the runtime
    directory. Not run_launcher: the server lives on with the output pipes, which it would
    wait for."""
    runtime = tmp_path / "run"
    sock = tmp_path / "tiny.sock"
    protocol.write_ticket(str(runtime), "tiny", str(sock), "/health", {"PATH": "/usr/bin:/bin"},
                          [sys.executable, "-c", HEALTHY_SERVER, str(sock), "0"])
    with (tmp_path / "launcher.err").open("wb") as err:
        code = subprocess.run([str(launcher), "tiny"], stdout=subprocess.DEVNULL, stderr=err,
                              timeout=30, env={"PATH": "/usr/bin:/bin",
                                               "RUNTIME_DIRECTORY": str(runtime)}).returncode
    assert code == 0, (tmp_path / "launcher.err").read_text()
    return runtime


def test_both_launchers_leave_a_record_of_what_they_started_once_it_serves(
        launcher_form: tuple[Path, Path], tmp_path: Path) -> None:
    """protocol.LAUNCHED_DIR: the activator that adopts llama-server removes it; a release
    that finds it (stopped before the hand-over) does the load's bookkeeping."""
    launcher, args = launcher_form
    runtime = launch_healthy(launcher, tmp_path)
    argv = args.read_text().splitlines()
    try:
        assert argv[2] == "--adopt" and argv[6] == "--healthy", argv
        record = protocol.read_launched(str(runtime), "tiny")
        assert record is not None
        pid, spawned, healthy = record
        assert pid == int(argv[3])
        assert spawned == pytest.approx(float(argv[5]), abs=1e-6)
        assert healthy == pytest.approx(float(argv[7]), abs=1e-6) and healthy > spawned
        assert os.listdir(runtime / protocol.LAUNCHED_DIR) == ["tiny"]  # no temporary left
    finally:
        os.kill(int(argv[3]), signal.SIGKILL)


def test_both_launchers_hand_a_stop_over_to_the_activator_pending_not_lost(
        launcher_form: tuple[Path, Path], tmp_path: Path) -> None:
    """Between the hand-over and the activator's handlers a SIGTERM would end the process by
    default and leave llama-server serving through its unit's stop: the activator starts
    with SIGTERM and SIGINT blocked (it unblocks them, model_unit/activate.py run), and the
    server the launcher started has them unblocked."""
    launcher, args = launcher_form
    masks = tmp_path / "masks"
    (launcher.parent / "hoshikage").write_text(  # not sh: dash unblocks them as it starts
        f"#!{sys.executable}\nimport sys\n"
        f"open({str(masks)!r}, 'w').write(open('/proc/self/status').read())\n"
        f"open({str(args)!r}, 'w').write(''.join(a + '\\n' for a in sys.argv[1:]))\n")
    launch_healthy(launcher, tmp_path)
    server = int(args.read_text().splitlines()[3])
    try:
        blocked = int(next(line.split()[1] for line in masks.read_text().splitlines()
                           if line.startswith("SigBlk")), 16)
        assert blocked & (1 << (signal.SIGTERM - 1)) and blocked & (1 << (signal.SIGINT - 1))
        status = Path(f"/proc/{server}/status").read_text()
        server_blocked = int(next(line.split()[1] for line in status.splitlines()
                                  if line.startswith("SigBlk")), 16)
        assert not server_blocked & (1 << (signal.SIGTERM - 1))
    finally:
        os.kill(server, signal.SIGKILL)


HANGS_ON_FIRST_SIGTERM = """\
import os, signal, sys, time
terms = []
def on_term(signum, frame):  # llama-server with a request in flight: the first one hangs
    terms.append(1)
    if len(terms) > 1:
        os._exit(1)
signal.signal(signal.SIGTERM, on_term)
open(sys.argv[1], "w").write(str(os.getpid()))
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("hangs", [False, True], ids=["stops", "hangs-on-first-sigterm"])
def test_both_launchers_pass_a_stop_on_while_the_server_loads(
        launcher_form: tuple[Path, Path], tmp_path: Path, hangs: bool) -> None:
    launcher, args = launcher_form
    runtime = tmp_path / "run"
    pid_file = tmp_path / "server.pid"
    # a "server" that never answers /health, as llama-server while it loads
    server_argv = ([sys.executable, "-c", HANGS_ON_FIRST_SIGTERM, str(pid_file)] if hangs
                   else ["sh", "-c", f'echo $$ > {pid_file}; exec sleep 60'])
    protocol.write_ticket(str(runtime), "tiny", str(tmp_path / "tiny.sock"), "/health",
                        {"PATH": "/usr/bin:/bin"}, server_argv)
    process = subprocess.Popen([str(launcher), "tiny"], stderr=subprocess.PIPE,
                               env={"PATH": "/usr/bin:/bin", "RUNTIME_DIRECTORY": str(runtime)})
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline, "the server was not started"
        time.sleep(0.01)
    server = int(pid_file.read_text())
    time.sleep(0.1)  # let the launcher probe a few times
    process.send_signal(signal.SIGTERM)
    stopping = time.monotonic()
    code = process.wait(protocol.STOP_GRACE + 10)
    assert code == 0, process.stderr.read() if process.stderr else ""
    # one that hangs gets a second SIGTERM after STOP_GRACE
    assert (time.monotonic() - stopping >= protocol.STOP_GRACE) == hangs
    with pytest.raises(ProcessLookupError):
        os.kill(server, 0)  # stopped and reaped by the launcher
    assert not args.exists()  # and it did not go on to the activator


def test_the_router_entry_starts_python_without_site_and_finds_its_imports(
        tmp_path: Path) -> None:
    entry = tmp_path / "hoshikage-router"
    install.install_router(str(entry))
    text = entry.read_text()
    assert text.startswith(f"#!{sys.executable} -IS\n") and os.access(entry, os.X_OK)
    # what the stub puts first on the path is enough for the head start's imports
    paths = text.split("sys.path[:0] = ")[1].split("\n")[0]
    # ... and it keeps to its budget: none of the modules whose imports cost it ~15 ms
    check = subprocess.run(
        [sys.executable, "-IS", "-c", f"import sys; sys.path[:0] = {paths}; "
         "import hoshikage_sd.router.headstart.take, hoshikage_sd.sd.bus; "
         "assert sys.flags.no_site; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    # json is out too (with re and enum, ~6 ms: lightjson.py, docs/performance.md)
    heavy = {"typing", "socket", "jeepney", "logging", "pathlib", "dataclasses", "yaml",
             "json", "re", "enum"}
    assert not heavy & set(check.stdout.split()), heavy & set(check.stdout.split())
    # installed under a staging root (tools/install's DESTDIR): the paths as they will be
    install.install_router(str(entry), root=os.path.dirname(sys.executable))
    assert entry.read_text().startswith(f"#!/{os.path.basename(sys.executable)} -IS\n")
