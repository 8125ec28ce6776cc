"""Unit names that survive a shell (sd/units.shell_unit) and `hoshikage logs NAME`
(commands/logs.py): its journalctl command line, what NAME resolves to, its errors."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

from hoshikage_sd import cli
from hoshikage_sd.commands import logs
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Config, Model
from hoshikage_sd.sd import units
from tests.support import unavailable

#: names as people have them (Hugging Face files, Ollama tags) and the plain kind
NAMES = ["Qwen3-8B-Q4_K_M", "gemma-3-4b-it", "qwen2.5:7b", "llama-3.1-8b.Q4", "tiny", "a-"]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (apt-get install systemd)")
    return path


@pytest.mark.parametrize("name", NAMES)
def test_a_printed_unit_name_pastes_into_a_shell_as_the_unit_name(name: str) -> None:
    hint = f"journalctl -u {units.shell_unit(name)}"
    assert shlex.split(hint) == ["journalctl", "-u", units.model_unit(name)]
    # a real POSIX shell reads it the same way
    out = subprocess.run(["sh", "-c", f"printf '%s\\n' {units.shell_unit(name)}"],
                         capture_output=True, text=True, check=True).stdout
    assert out == units.model_unit(name) + "\n"


@pytest.mark.parametrize("name", NAMES)
def test_the_escaped_unit_name_is_systemd_escape_s(name: str) -> None:
    """model_unit agrees with systemd-escape, as README's `systemctl stop "$(systemd-escape
    --template=hoshikage-model@.service NAME)"` uses it."""
    escaped = subprocess.run([tool("systemd-escape"), "--template=hoshikage-model@.service",
                              name], capture_output=True, text=True, check=True).stdout
    assert escaped == units.model_unit(name) + "\n"


def test_a_name_with_a_dash_needs_the_quotes_and_a_plain_one_is_left_bare() -> None:
    unit = units.model_unit("Qwen3-8B")
    assert unit == "hoshikage-model@Qwen3\\x2d8B.service"
    assert shlex.split(unit) != [unit]  # unquoted, the shell eats the backslashes
    assert units.shell_unit("Qwen3-8B") == f"'{unit}'"
    assert units.shell_unit("tiny") == "hoshikage-model@tiny.service"


UNIT = "hoshikage-model@Qwen3\\x2d8B.service"
MATCHES = [f"_SYSTEMD_UNIT={UNIT}",
           "+", f"UNIT={UNIT}", "_PID=1",
           "+", f"COREDUMP_UNIT={UNIT}", "MESSAGE_ID=fc2e22bc6ee647b6b90729ab34a250b1", "_UID=0",
           "+", f"OBJECT_SYSTEMD_UNIT={UNIT}", "_UID=0",
           "+", "HOSHIKAGE_MODEL=Qwen3-8B"]


def test_logs_argv_is_the_unit_s_matches_or_hoshikage_s_records() -> None:
    assert logs.logs_argv("Qwen3-8B") == ["journalctl", *MATCHES]
    assert logs.logs_argv("Qwen3-8B", follow=True, lines="50", since="1 hour ago") == [
        "journalctl", "--follow", "--lines=50", "--since=1 hour ago", *MATCHES]
    assert logs.logs_argv("Qwen3-8B", lines="all") == ["journalctl", "--lines=all", *MATCHES]
    assert logs.logs_argv("Qwen3-8B", output="json") == ["journalctl", "--output=json", *MATCHES]


def test_the_real_journalctl_takes_the_argv(tmp_path: Path) -> None:
    """journalctl reads the command line (an empty journal directory: no entries, exit 0);
    `-u UNIT + FIELD=V`, the obvious spelling, is refused by it, which is why the unit's
    matches are spelled out."""
    journalctl = tool("journalctl")
    argv = logs.logs_argv("Qwen3-8B", lines="5", since="1 hour ago")
    run = subprocess.run([journalctl, f"--directory={tmp_path}", "--no-pager", *argv[1:]],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    refused = subprocess.run([journalctl, f"--directory={tmp_path}", "--no-pager", "-u", UNIT,
                              "+", "HOSHIKAGE_MODEL=Qwen3-8B"],
                             capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and "between terms" in refused.stderr


class Exec(Exception):
    """Stands for the process becoming journalctl."""


@pytest.fixture
def execs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []

    def execvp(file: str, argv: list[str]) -> NoReturn:
        assert file == argv[0]
        calls.append(list(argv))
        raise Exec

    monkeypatch.setattr(logs.os, "execvp", execvp)
    return calls


def config(tmp_path: Path) -> Config:
    models = {"Qwen3-8B-Q4_K_M": Model("Qwen3-8B-Q4_K_M", tmp_path / "q.gguf", aliases=("q",),
                                       tags=("tool",)),
              "tiny": Model("tiny", tmp_path / "tiny.gguf")}
    return Config(source=tmp_path / "models.yaml", state_dir=tmp_path / "state",
                  runtime_dir=tmp_path / "run", models=models)


@pytest.mark.parametrize("given", ["Qwen3-8B-Q4_K_M", "q", "tool"])
def test_logs_resolves_the_name_as_load_does_and_becomes_journalctl(
        tmp_path: Path, execs: list[list[str]], given: str) -> None:
    with pytest.raises(Exec):
        logs.logs(config(tmp_path), given, follow=True, lines="20")
    assert execs == [logs.logs_argv("Qwen3-8B-Q4_K_M", follow=True, lines="20")]
    assert "_SYSTEMD_UNIT=hoshikage-model@Qwen3\\x2d8B\\x2dQ4_K_M.service" in execs[0]
    assert "HOSHIKAGE_MODEL=Qwen3-8B-Q4_K_M" in execs[0]


def test_an_unknown_model_dies_with_a_hint(tmp_path: Path, execs: list[list[str]]) -> None:
    with pytest.raises(HoshikageError) as err:
        logs.logs(config(tmp_path), "nope")
    assert err.value.message == "no model named 'nope'"
    assert err.value.hint and "hoshikage list" in err.value.hint
    assert execs == []


def test_no_journalctl_dies_with_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "JOURNALCTL", "hoshikage-test-no-such-journalctl")
    with pytest.raises(HoshikageError) as err:
        logs.logs(config(tmp_path), "tiny")
    assert "cannot run hoshikage-test-no-such-journalctl" in err.value.message
    assert err.value.hint and "journalctl" in err.value.hint


def test_the_command_line(tmp_path: Path) -> None:
    args = cli.parser().parse_args(["logs", "q", "-f", "-n", "50", "--since", "1 hour ago"])
    assert (args.command, args.name, args.follow, args.lines, args.since) == \
        ("logs", "q", True, "50", "1 hour ago")
    args = cli.parser().parse_args(["logs", "q", "--lines=+3"])
    assert (args.follow, args.lines, args.since, args.output) == (False, "+3", None, None)
    assert cli.parser().parse_args(["logs", "q", "-o", "verbose"]).output == "verbose"
    assert cli.parser().parse_args(["logs", "q", "-n", "all"]).lines == "all"
    for bad in ("x", "-3", "1.5", "+", ""):
        with pytest.raises(SystemExit):
            cli.parser().parse_args(["logs", "q", f"--lines={bad}"])


def test_hoshikage_logs_through_main(tmp_path: Path, execs: list[list[str]]) -> None:
    manifest = tmp_path / "models.yaml"
    (tmp_path / "q.gguf").write_bytes(b"")
    manifest.write_text(f"state_dir: {tmp_path / 'state'}\nruntime_dir: {tmp_path / 'run'}\n"
                        f"models:\n  Qwen3-8B-Q4_K_M:\n    path: {tmp_path / 'q.gguf'}\n"
                        "    aliases: [q]\n")
    with pytest.raises(Exec):
        cli.main(["--config", str(manifest), "logs", "q", "-n", "5"])
    assert execs == [logs.logs_argv("Qwen3-8B-Q4_K_M", lines="5")]
    assert cli.main(["--config", str(manifest), "logs", "nope"]) == 1


def test_a_start_refused_names_the_unit_as_it_pastes() -> None:
    unit = units.model_unit("Qwen3-8B-Q4_K_M")
    with pytest.raises(HoshikageError) as err:
        units.cannot_start(unit, "Interactive authentication required.")
    said = err.value.message.removeprefix("cannot start ")
    assert shlex.split(said)[0] == unit + ":"
    assert err.value.hint is not None and "as root" in err.value.hint  # polkit's no
    with pytest.raises(HoshikageError) as err:
        units.cannot_start(unit, "Unit hoshikage-model@x.service not found.")
    assert err.value.hint is None
