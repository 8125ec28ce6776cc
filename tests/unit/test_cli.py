"""The unit helpers' command lines, read without argparse, read as argparse reads them."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hoshikage_sd import cli


@pytest.mark.parametrize("argv", [["release", "a"], ["release", "qwen2.5:7b"], ["idle-watch"],
                                  ["cache-sync"]])
def test_a_helper_command_line_reads_as_argparse_reads_it(argv: list[str]) -> None:
    assert vars(cli.helper_args(argv)) == vars(cli.parser().parse_args(argv))


@pytest.mark.parametrize("argv", [[], ["release"], ["release", "a", "b"], ["--debug", "release",
                                  "a"], ["release", "--help"], ["activate", "a"], ["status"],
                                  ["idle-watch", "x"]])
def test_anything_else_is_argparse_s(argv: list[str]) -> None:
    assert cli.helper_args(argv) is None


# -- the commands people type (issue 23) -------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["--config", "/x.yaml", "--debug", "status"],
    ["status", "--config", "/x.yaml", "--debug"],
    ["--debug", "status", "--config=/x.yaml"],
    ["--config", "/other.yaml", "status", "--debug", "--config", "/x.yaml"],  # the last wins
])
def test_global_options_anywhere_on_the_line(argv: list[str]) -> None:
    args = cli.parser().parse_args(argv)
    assert (args.command, args.config, args.debug) == ("status", "/x.yaml", True)


def test_global_options_default_when_not_given() -> None:
    args = cli.parser().parse_args(["load", "tiny"])
    assert (args.config, args.debug, args.name) == (None, False, "tiny")
    assert cli.parser().parse_args(["--config", "/a.yaml", "load", "tiny"]).config == "/a.yaml"


@pytest.mark.parametrize("argv", [["status", "--json"], ["list", "--json"], ["ps", "--json"],
                                  ["check", "--json"], ["simulate", "--json"]])
def test_every_read_command_has_json(argv: list[str]) -> None:
    assert cli.parser().parse_args(argv).json is True


def test_logs_json_is_journalctl_s_json() -> None:
    from hoshikage_sd.commands.logs import logs_argv

    args = cli.parser().parse_args(["logs", "tiny", "--json", "-n", "5"])
    assert args.output == "json"
    assert "--output=json" in logs_argv("tiny", args.follow, args.lines, args.since,
                                        args.output)


def write_manifest(tmp_path: Path, llama_server: str, missing: bool = False) -> Path:
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF" + bytes(60))
    path = tmp_path / "models.yaml"
    path.write_text(f"""\
ramdisk: {tmp_path}/rd
runtime_dir: {tmp_path}/run
state_dir: {tmp_path}/state
llama_server: {llama_server}
models:
  tiny:
    path: {tmp_path}/tiny.gguf
""" + (f"  gone:\n    path: {tmp_path}/gone.gguf\n" if missing else ""))
    return path


@pytest.fixture
def no_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    """check's looks at systemd and the service user, none here."""
    from hoshikage_sd.commands import access, check, environment

    monkeypatch.setattr(access, "service_user", lambda name="hoshikage": None)
    monkeypatch.setattr(environment, "unit_environment", lambda: {})
    monkeypatch.setattr(check, "device_report", lambda config, seen=None: [])


@pytest.mark.parametrize(("server", "missing", "code"), [
    ("/bin/true", False, 0), ("/nonexistent/llama-server", False, 1), ("/bin/true", True, 1)])
def test_check_exits_non_zero_on_any_problem(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_systemd: None,
        server: str, missing: bool, code: int) -> None:
    import make_gguf  # tools/, on the path by tests/conftest.py

    path = write_manifest(tmp_path, server, missing)

    make_gguf.write_model(tmp_path / "tiny.gguf")  # check reads its header
    assert cli.main(["check", "--config", str(path)]) == code
    out = capsys.readouterr()
    assert ("warning:" in out.out) == bool(code)
    assert cli.main(["check", "--json", "--config", str(path)]) == code
    facts = json.loads(capsys.readouterr().out)
    assert facts["ok"] is (code == 0) and facts["models"][0] == "tiny"
    assert bool(facts["warnings"]) == bool(code)
    if server.startswith("/nonexistent"):
        assert "is not an executable file" in facts["warnings"][0]


def test_check_json_lists_each_gpu_with_its_numbers(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_systemd: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import make_gguf  # tools/, on the path by tests/conftest.py

    from hoshikage_sd.commands import check
    from hoshikage_sd.devices import parse_list_devices

    listed = parse_list_devices("Available devices:\n  Vulkan0: llvmpipe (LLVM 15.0.6, 256 "
                                "bits) (2048 MiB, 2000 MiB free)\n")

    def device_report(config: object, seen: dict[str, object] | None = None) -> list[str]:
        assert seen is not None
        seen["tiny"] = listed
        return ["device Vulkan0: llvmpipe"]

    monkeypatch.setattr(check, "device_report", device_report)
    path = write_manifest(tmp_path, "/bin/true")
    make_gguf.write_model(tmp_path / "tiny.gguf")
    assert cli.main(["check", "--json", "--config", str(path)]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["gpus"] == [{"name": "Vulkan0", "description": "llvmpipe (LLVM 15.0.6, 256 bits)",
                              "total_bytes": 2048 << 20, "free_bytes": 2000 << 20,
                              "models": ["tiny"]}]


def test_check_json_of_a_manifest_that_does_not_parse(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models: [\n")
    code = cli.main(["check", "--json", "--config", str(path)])
    facts = json.loads(capsys.readouterr().out)
    assert facts["ok"] is False and facts["errors"] and facts["config"] == str(path)
    assert code != 0 and cli.main(["check", "--config", str(path)]) == code
    assert "hoshikage:" in capsys.readouterr().err


# -- status and ps ---------------------------------------------------------------------------

SHOW = """\
Id=hoshikage.socket
ActiveState=active
MainPID=0
Listen=127.0.0.1:8080 (Stream)
Listen=[::1]:8080 (Stream)
Listen=/run/x.sock (Datagram)

Id=hoshikage.service
ActiveState=active
MainPID=812
"""


def test_router_state_from_systemctl_show(monkeypatch: pytest.MonkeyPatch) -> None:
    from hoshikage_sd.commands import facts, status

    units = facts.parse_show(SHOW)
    assert units["hoshikage.service"]["MainPID"] == "812"
    assert facts.listen_addresses(units["hoshikage.socket"]["Listen"]) == [
        "127.0.0.1:8080", "[::1]:8080"]
    monkeypatch.setattr(facts.units, "systemctl", lambda *a, **k: SHOW)
    assert facts.router_state() == {"state": "active", "running": True, "pid": 812,
                                     "socket_state": "active",
                                     "listen": ["127.0.0.1:8080", "[::1]:8080"]}
    line = status.router_line(facts.router_state(), False)
    assert line == "router: running (pid 812), listening on 127.0.0.1:8080, [::1]:8080"
    idle = {"state": "inactive", "running": False, "pid": None, "socket_state": "active",
            "listen": ["127.0.0.1:8080"]}
    assert "not running (the socket starts it" in status.router_line(idle, False)
    # the socket stopped: nothing listens, and the line does not say it does
    assert status.router_line({**idle, "socket_state": "inactive"}, False) == (
        "router: inactive, hoshikage.socket is inactive (nothing listens on 127.0.0.1:8080)")


def test_status_and_ps_show_llama_server_s_pid_and_colour_on_a_terminal_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from hoshikage_sd import fmt, manifest
    from hoshikage_sd.commands import facts, ps, status
    from hoshikage_sd.runtime import Activity, Running, Runtime

    config = manifest.load(write_manifest(tmp_path, "/bin/true"))
    runtime = Runtime(config.runtime_dir)
    runtime.set_running("tiny", Running(os.getpid(), "/rd/tiny.gguf", time.time() - 300))
    runtime.set_activity("tiny", Activity(0, time.time() - 60, 0))
    monkeypatch.setattr(facts.units, "active_model_units",
                        lambda states=("active",): [] if states == ("failed",) else ["tiny"])
    monkeypatch.setattr(facts, "unit_props", lambda unit: {
        "ActiveState": "active", "MainPID": "4242", "MemoryCurrent": str(5 << 20),
        "StatusText": "serving tiny"})
    monkeypatch.setattr(facts.units, "systemctl", lambda *a, **k: SHOW)
    assert status.status(config) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("tiny "))
    assert f" serving  {os.getpid()} " in row and "4242" not in row
    assert "router: running (pid 812), listening on 127.0.0.1:8080" in out
    assert f"RAM disk {tmp_path}/rd: not mounted" in out
    assert "runs the settings it started with" not in out  # no digest: an older writer's
    (tmp_path / "rd").mkdir()  # a directory is not a mount (after a reboot, say)
    status.status(config)
    assert "not mounted" in capsys.readouterr().out
    # started with other settings than the manifest's now (its args changed since, say)
    for settings, said in (("0123456789abcdef", True), (config.models["tiny"].settings, False)):
        runtime.set_running("tiny", Running(os.getpid(), "/rd/tiny.gguf", time.time() - 300,
                                            settings=settings))
        status.status(config)
        assert ("tiny runs the settings it started with: the manifest has changed them since "
                "(its next start applies them: hoshikage unload tiny)" in
                capsys.readouterr().out) is said
    assert "\033[" not in out

    assert ps.ps(config, as_json=True) == 0
    (row_json,) = json.loads(capsys.readouterr().out)
    assert row_json["pid"] == os.getpid() and row_json["state"] == "serving"
    assert row_json["since"] == pytest.approx(time.time() - 300, abs=5)
    assert row_json["in_flight"] is None and row_json["busy"] is False
    ps.ps(config)
    (header, line) = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["MODEL", "STATE", "PID"]
    assert line.split()[:4] == ["tiny", "serving", str(os.getpid()), "5.0"]
    assert "5 min" in line and "60 s ago" in line and line.endswith(" 0")
    # started by its launcher, not adopted by its activator yet (its first answer streams):
    # serving already, on the launcher's record
    from hoshikage_sd import protocol

    runtime.clear("running", "tiny")
    protocol.write_launched(str(config.runtime_dir), "tiny", os.getpid(), 1.0,
                            time.monotonic() - 2)
    ps.ps(config, as_json=True)
    (row_json,) = json.loads(capsys.readouterr().out)
    assert row_json["pid"] == os.getpid() and row_json["state"] == "serving"
    assert row_json["since"] == pytest.approx(time.time() - 2, abs=1)
    # a request's keep_alive is the TTL the idle watch keeps, so it is what is left
    runtime.set_ttl("tiny", 3600.0)
    ps.ps(config, as_json=True)
    (row_json,) = json.loads(capsys.readouterr().out)
    assert row_json["ttl_left_seconds"] == pytest.approx(3600 - 2, abs=1)  # served 2 s ago
    runtime.set_ttl("tiny", float("inf"))
    ps.ps(config, as_json=True)
    assert json.loads(capsys.readouterr().out)[0]["ttl_left_seconds"] is None

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert fmt.use_colour(Tty()) and not fmt.use_colour(io.StringIO())
    assert fmt.state("serving", True) == "\033[32mserving\033[0m"
    monkeypatch.setenv("NO_COLOR", "1")
    assert not fmt.use_colour(Tty())
    assert fmt.state("serving", False) == "serving"


def test_ps_reads_the_routers_in_flight_count() -> None:
    from hoshikage_sd.commands import ps

    text = ('# HELP x\nhoshikage_in_flight_requests{model="tiny"} 2\n'
            'hoshikage_in_flight_requests{model="a\\"b"} 1\nhoshikage_other{model="c"} 5\n')
    assert ps.in_flight_counts(text) == {"tiny": 2, 'a"b': 1}


# -- load's progress -------------------------------------------------------------------------

def test_load_progress_on_a_terminal_is_one_redrawn_line_with_a_bar() -> None:
    import io

    from hoshikage_sd.commands.progress import Display, Step

    out = io.StringIO()
    display = Display("tiny", out, tty=True)
    display.show(Step("waiting", detail="waiting for room: 2 GiB needed"), now=0.0)
    display.show(Step("staging", 0, 4 << 30), now=1.0)
    display.show(Step("staging", 1 << 30, 4 << 30), now=2.0)
    display.show(Step("loading"), now=3.0)
    display.finish("tiny loaded in 3.0 s")
    text = out.getvalue()
    assert "\n" not in text.rstrip("\n")[:-len("tiny loaded in 3.0 s")]  # all \r redraws
    assert "[######..................] staging tiny: 1.0 GiB of 4.0 GiB (25%), 1.0 GiB/s" \
        in text
    assert "\rloading tiny (llama-server)" in text and text.endswith("tiny loaded in 3.0 s\n")


def test_load_progress_elsewhere_is_plain_lines() -> None:
    import io

    from hoshikage_sd.commands.progress import Display, Step

    out = io.StringIO()
    display = Display("tiny", out, tty=False)
    for i in range(9):  # 0.25 s apart: a staging line a second, not each look
        display.show(Step("staging", i << 28, 2 << 30), now=i / 4)
    display.show(Step("loading"), now=3.0)
    display.show(Step("loading"), now=3.2)
    display.finish("tiny loaded in 3.2 s")
    lines = out.getvalue().splitlines()
    assert lines == ["staging tiny: 0 B of 2.0 GiB (0%)",
                     "staging tiny: 1.0 GiB of 2.0 GiB (50%), 1.0 GiB/s",
                     "staging tiny: 2.0 GiB of 2.0 GiB (100%), 1.0 GiB/s",
                     "loading tiny (llama-server)", "tiny loaded in 3.2 s"]
    assert "\r" not in out.getvalue() and "\033[" not in out.getvalue()


def test_the_rate_looks_back_two_seconds() -> None:
    from hoshikage_sd.commands.progress import Rate

    rate = Rate()
    assert rate.add(0.0, 0) is None
    assert rate.add(1.0, 100) == 100
    rate.add(2.0, 200)
    assert rate.add(5.0, 500) == pytest.approx(100.0)
    assert rate.add(6.0, 10) is None  # a new copy starts over


def test_the_copy_s_size_from_the_unit_s_status() -> None:
    from hoshikage_sd.commands import manual

    assert manual.status_total("decrypting m: 1.0 GiB of 4.0 GiB (25%)") == 4 << 30
    assert manual.status_total("staging m from /srv/m.gguf") is None


def fake_unit(monkeypatch: pytest.MonkeyPatch, states: list[tuple[str, bool]],
              on_look: Callable[[int], None] = lambda n: None,
              shown: dict[str, str] | None = None) -> None:
    """systemd as `load` sees it: the unit's states in turn (the first before the start),
    `on_look(n)` before the n-th look."""
    from hoshikage_sd.commands import manual

    looks = iter(range(len(states)))

    def unit_state(unit: str) -> tuple[str, bool]:
        n = next(looks)
        on_look(n)
        return states[n]

    monkeypatch.setattr(manual.units, "unit_state", unit_state)
    monkeypatch.setattr(manual.units, "start_unit", lambda unit, state=None: None)
    monkeypatch.setattr(manual.units, "show", lambda unit, *props: shown or {})
    monkeypatch.setattr(manual, "POLL", 0.0)


def test_load_shows_the_copy_then_loading_then_llama_server_s_pid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from hoshikage_sd import manifest
    from hoshikage_sd.commands import manual
    from hoshikage_sd.runtime import Running, Runtime

    config = manifest.load(write_manifest(tmp_path, "/bin/true"))
    ramdisk = tmp_path / "rd"
    ramdisk.mkdir()

    def on_look(n: int) -> None:
        temporary = ramdisk / ".tiny.gguf.tmp-1-0"
        if n == 1:
            temporary.write_bytes(bytes(40))
        elif n == 2:
            temporary.rename(ramdisk / "tiny.gguf")
        elif n == 3:
            Runtime(config.runtime_dir).set_running(
                "tiny", Running(4321, str(ramdisk / "tiny.gguf"), time.time()))

    fake_unit(monkeypatch, [("inactive", False), ("activating", True), ("activating", True),
                            ("active", False)], on_look)
    assert manual.load(config, "tiny") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "staging tiny: 40 B of 64 B (62%)"
    assert lines[1] == "loading tiny (llama-server)"
    assert re.fullmatch(r"tiny loaded in [0-9.]+ s, llama-server pid 4321", lines[2]), lines


def test_a_failed_load_exits_1_with_this_start_s_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from hoshikage_sd import manifest
    from hoshikage_sd.runtime import Runtime

    path = write_manifest(tmp_path, "/bin/true")
    runtime = Runtime(manifest.load(path).runtime_dir)
    runtime.set_error("tiny", "an older start's reason")
    os.utime(runtime.error_path("tiny"), (1.0, 1.0))

    def on_look(n: int) -> None:
        if n == 2:
            runtime.set_error("tiny", "cannot read /srv/tiny.gguf")

    fake_unit(monkeypatch, [("failed", False), ("activating", True), ("failed", False)],
              on_look)
    assert cli.main(["load", "tiny", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "tiny did not start: cannot read /srv/tiny.gguf" in err
    assert "hint: hoshikage logs tiny" in err
    # a failure before the activator ran: the older record is not this start's reason
    # (here, systemd could not make its CacheDirectory=: its own exit status)
    fake_unit(monkeypatch, [("inactive", False), ("failed", False)],
              shown={"StatusText": "", "Result": "exit-code", "ExecMainCode": "1",
                     "ExecMainStatus": "239"})
    os.utime(runtime.error_path("tiny"), (1.0, 1.0))
    assert cli.main(["load", "tiny", "--config", str(path)]) == 1
    assert ("tiny did not start: systemd could not set up its process: status "
            "239/CACHE_DIRECTORY (journalctl -u hoshikage-model@tiny.service)"
            ) in capsys.readouterr().err


def test_a_unit_s_failure_in_words() -> None:
    from hoshikage_sd.sd.failure import words

    assert words("exit-code", "1", "203") == \
        "systemd could not set up its process: status 203/EXEC"
    assert words("exit-code", "1", "1") == "its process exited with status 1"
    assert words("exit-code", "1", "234") == "its process exited with status 234"
    assert words("signal", "2", "9") == "its process was killed by a signal (SIGKILL)"
    assert words("core-dump", "3", "11") == "its process crashed (core dumped) (SIGSEGV)"
    assert words("oom-kill", "", "") == "the kernel's out-of-memory killer stopped it"
    assert words("", "", "") == "its unit failed (unknown)"


def test_status_shows_a_copy_being_made_with_its_progress() -> None:
    from hoshikage_sd.commands import status

    making = {"copying_bytes": 1 << 30, "source_bytes": 4 << 30, "staged_bytes": None}
    assert status.copy_text(making) == "1.0 GiB of 4.0 GiB (25%) staging"
    assert status.copy_text({**making, "source_bytes": None}) == "1.0 GiB staging"
    assert status.copy_text({"copying_bytes": None, "source_bytes": 4 << 30,
                             "staged_bytes": 4 << 30}) == "4.0 GiB"


def test_status_says_a_pinned_model_has_no_idle_stop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from hoshikage_sd import manifest
    from hoshikage_sd.commands import facts, status
    from hoshikage_sd.runtime import Running, Runtime

    path = write_manifest(tmp_path, "/bin/true")
    path.write_text(path.read_text() + "    pinned: true\n")
    config = manifest.load(path)
    Runtime(config.runtime_dir).set_running("tiny", Running(os.getpid(), "/x", time.time()))
    monkeypatch.setattr(facts.units, "active_model_units",
                        lambda states=("active",): [] if states == ("failed",) else ["tiny"])
    monkeypatch.setattr(facts, "unit_props", lambda unit: {"ActiveState": "active"})
    monkeypatch.setattr(facts, "router_state", lambda: {
        "state": None, "running": False, "pid": None, "socket_state": None, "listen": []})
    status.status(config)
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("tiny "))
    assert row.endswith(" pinned"), row


def test_pin_and_unpin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`hoshikage pin NAME` / `unpin NAME`: kept in names.json over the manifest's pinned:, as
    the panel's pin is; the effective manifest (what the idle watch and admission read) says
    so; an unknown model is an error."""
    from hoshikage_sd import manifest
    from hoshikage_sd.manifest import names

    path = write_manifest(tmp_path, "/bin/true")
    assert cli.main(["pin", "tiny", "--config", str(path)]) == 0
    assert "tiny pinned" in capsys.readouterr().out
    assert names.effective(manifest.load(path)).models["tiny"].pinned
    assert cli.main(["unpin", "tiny", "--config", str(path)]) == 0
    assert not names.effective(manifest.load(path)).models["tiny"].pinned
    assert cli.main(["pin", "nope", "--config", str(path)]) == 1
    assert "no model named 'nope'" in capsys.readouterr().err


def test_a_user_without_the_right_gets_a_sentence_not_a_traceback() -> None:
    """`hoshikage pin` (alias, tag, unload...) as a user who may not write the state
    directory: what it could not write, and the way out."""
    import shutil
    import subprocess
    import sys
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root to run the CLI as another user")
    root = Path(tempfile.mkdtemp(prefix="hoshikage-cli-"))
    try:
        root.chmod(0o755)
        (root / "state").mkdir()
        manifest = root / "models.yaml"
        manifest.write_text(f"state_dir: {root}/state\nruntime_dir: {root}/run\n"
                            f"models:\n  tiny: {{path: {root}/tiny.gguf}}\n")
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             "-m", "hoshikage_sd", "--config", str(manifest), "pin", "tiny"],
            capture_output=True, text=True, cwd=Path(__file__).parents[2])
    finally:
        shutil.rmtree(root)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"hoshikage: pin: {root}/state/names.json: Permission denied" in result.stderr
    assert "Permission denied" in result.stderr and "run it as root" in result.stderr


def test_list_without_systemd_lists_the_models_states_unknown(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine being prepared (a chroot, a container without systemd): `list` still shows
    the models, and says why their states are missing."""
    from hoshikage_sd.commands import status
    from hoshikage_sd.errors import HoshikageError

    def no_bus() -> list[str]:
        raise HoshikageError("cannot ask systemd which models are loaded: Failed to connect "
                             "to bus")

    monkeypatch.setattr(status, "loaded_units", no_bus)
    path = write_manifest(tmp_path, "/bin/true")
    assert cli.main(["list", "--config", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[1].startswith("tiny ")
    assert "warning: no states: cannot ask systemd" in out.err


def test_a_broken_manifest_shows_what_the_router_serves(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An edit that breaks the manifest: the router keeps its last good one, and list,
    status, ps and unload look at that (with a warning), rather than refuse to."""
    import time

    from hoshikage_sd import lastgood, manifest
    from hoshikage_sd.commands import status
    from hoshikage_sd.errors import HoshikageError

    def no_bus() -> list[str]:
        raise HoshikageError("no systemd here")

    monkeypatch.setattr(status, "loaded_units", no_bus)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "run"))
    path = write_manifest(tmp_path, "/bin/true")
    began = time.time() - 1
    old = time.time() - 10
    os.utime(path, (old, old))
    lastgood.save(manifest.load(path), began)  # the router's, at its start
    path.write_text(path.read_text() + "  broken: [\n")
    assert cli.main(["list", "--config", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[1].startswith("tiny ")
    assert "using the router's last good copy of it" in out.err


def test_unload_names_a_unit_whose_model_left_the_manifest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Taken out of the manifest while loaded: `unload` stops it by its unit's name, not a
    model of the manifest a part of whose name it is (tiny is a part of tiny2)."""
    from hoshikage_sd import manifest
    from hoshikage_sd.commands import manual

    path = write_manifest(tmp_path, "/bin/true")
    path.write_text(path.read_text().replace("  tiny:\n", "  tiny2:\n"))
    stopped: list[str] = []
    monkeypatch.setattr(manual.units, "active_model_units", lambda *a: ["tiny", "tiny2"])
    monkeypatch.setattr(manual.units, "systemctl", lambda *a, **k: stopped.append(a[-1]))
    config = manifest.load(path)
    assert manual.unload(config, "tiny") == 0
    assert stopped == ["hoshikage-model@tiny.service"]
    assert manual.unload(config, "tiny2") == 0 and stopped[-1] == "hoshikage-model@tiny2.service"
    assert capsys.readouterr().out == "tiny unloaded\ntiny2 unloaded\n"


def test_list_says_each_state_in_status_s_words(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """not-loaded, kept, loaded (it said '-' and 'staged', and '- cached' in its table)."""
    from hoshikage_sd.commands import status
    from hoshikage_sd.staging import Store
    from tests.unit.conftest import one_model

    config = one_model(tmp_path)
    up: list[str] = []
    monkeypatch.setattr(status, "loaded_units", lambda: up)

    def state() -> str:
        status.list_models(config, as_json=True)
        return str(json.loads(capsys.readouterr().out)[0]["state"])

    assert state() == "not-loaded"
    Store(config.ramdisk).stage("m", config.models["m"].path)
    assert state() == "kept"
    up.append("m")
    assert state() == "loaded"


def test_a_model_s_settings_digest_follows_what_llama_server_gets() -> None:
    """The same environment in another order is the same settings (it read as changed);
    a changed value, argument or file is not."""
    from pathlib import Path as P

    from hoshikage_sd.manifest import Model

    base = Model("m", P("/m.gguf"), env=("A=1", "B=2"), args=("-c", "256"))
    assert Model("m", P("/m.gguf"), env=("B=2", "A=1"), args=("-c", "256")).settings == \
        base.settings
    assert Model("m", P("/m.gguf"), env=("A=1", "B=3"), args=("-c", "256")).settings != \
        base.settings
    assert Model("m", P("/m.gguf"), env=("A=1", "B=2"), args=("-c", "512")).settings != \
        base.settings
    assert Model("m", P("/n.gguf"), env=("A=1", "B=2"), args=("-c", "256")).settings != \
        base.settings
    assert Model("m", P("/m.gguf"), env=("A=1", "B=2"), args=("-c", "256"),
                 ttl=5).settings == base.settings  # a TTL is not what it started with
