"""Launch tickets: what the router hands the model unit's launcher (hoshikage_sd/launch.py)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from hoshikage_sd import launch
from hoshikage_sd.config import NAME_RE

ARGV = ["/usr/bin/llama-server", "-m", "/mnt/hoshikage/tiny.gguf", "--host",
        "/run/hoshikage/tiny.sock", "--alias", "tiny", "--chat-template", "a b\nc", ""]
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "ODD": "x=y"}


def test_ticket_round_trip_and_taken_once(tmp_path: Path) -> None:
    launch.write_ticket(str(tmp_path), "tiny", "/run/hoshikage/tiny.sock", ENV, ARGV)
    socket, env, argv = launch.take_ticket(str(tmp_path), "tiny")
    assert socket == b"/run/hoshikage/tiny.sock"
    assert env == {k.encode(): v.encode() for k, v in ENV.items()}
    assert argv == [a.encode() for a in ARGV]  # spaces, newlines, an empty argument survive
    with pytest.raises(ValueError, match="no ticket"):
        launch.take_ticket(str(tmp_path), "tiny")
    assert list((tmp_path / "launch").iterdir()) == []


def test_stale_or_foreign_ticket_is_refused(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    launch.write_ticket(str(tmp_path), "tiny", "/s", ENV, ARGV)
    later = time.monotonic() + launch.TICKET_TTL + 1
    monkeypatch.setattr(launch.time, "monotonic", lambda: later)
    with pytest.raises(ValueError, match="stale"):
        launch.take_ticket(str(tmp_path), "tiny")
    monkeypatch.undo()
    (tmp_path / "launch" / "tiny").write_bytes(b"something else\0" + b"1e99\0/s\0\0/bin/true")
    with pytest.raises(ValueError, match="not a launch ticket"):
        launch.take_ticket(str(tmp_path), "tiny")


@pytest.mark.parametrize("name", ["tiny", "qwen3-8b", "a.b_c:d", "x" * 100, "", ".hidden",
                                  "../etc", "a/b", "-rf", "x" * 101, "név", "a b", "a\0b"])
def test_valid_name_is_the_manifest_rule(name: str) -> None:
    assert launch.valid_name(name) == bool(NAME_RE.match(name))


def test_unsafe_name_never_reaches_a_path(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "victim").write_text("keep")
    assert launch.launch("../etc/victim", str(tmp_path / "run")) is None
    assert (tmp_path / "etc" / "victim").read_text() == "keep"


def test_launch_spawns_with_ticket_env_and_removes_stale_socket(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stale = tmp_path / "tiny.sock"
    stale.touch()
    launch.write_ticket(str(tmp_path), "tiny", str(stale), {"PATH": "/usr/bin:/bin", "K": "v"},
                        ["sh", "-c", f'echo "$K $0" > {out}', "arg0"])
    started = launch.launch("tiny", str(tmp_path))
    assert started is not None
    pid, when = started
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert out.read_text() == "v arg0\n"
    assert not stale.exists()
    assert when <= time.monotonic()


def test_launcher_imports_only_what_the_interpreter_has_built_in() -> None:
    """Run as the unit runs it (-I -S): no module from site-packages or the stdlib beyond
    the interpreter's own start-up set, which is what keeps it at a few ms cold."""
    with open(launch.__file__) as f:
        assert f.readline().strip() == "#!/usr/bin/python3 -IS"
    result = subprocess.run(["/usr/bin/python3", "-I", "-S", "-X", "importtime",
                             launch.__file__], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: hoshikage-launch NAME" in result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:") and "|" in line} - {"imported package"}
    baseline = subprocess.run(["/usr/bin/python3", "-I", "-S", "-X", "importtime", "-c",
                               "import os, sys, time"], capture_output=True, text=True)
    allowed = {line.split("|")[-1].strip() for line in baseline.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    assert imported and imported <= allowed, imported - allowed
