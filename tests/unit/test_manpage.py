"""hoshikage(1) as tools/manpage.py writes it from the CLI's parser (the package build runs it)."""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from hoshikage_sd import __version__
from hoshikage_sd.cli import parser
from tests.support import unavailable

manpage: ModuleType = importlib.import_module("manpage")  # tools/manpage.py (tests/conftest.py)


def sample() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tool", description="does things")
    ap.add_argument("--debug", action="store_true", help="verbose")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="verbose")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("show", parents=[common], help="show a thing, 100% of it")
    p.add_argument("name", help=".dot first, back\\slash, 星影 and ≥ (default %(default)s)",
                   nargs="?", default="x")
    p.add_argument("-n", "--lines", metavar="N", help="the last N lines")
    p.add_argument("--secret", help=argparse.SUPPRESS)
    p = sub.add_parser("keys", help="the keys")
    inner = p.add_subparsers(dest="action")
    inner.add_parser("setup", help="make one").add_argument("--force", action="store_true")
    sub.add_parser("helper", help="(unit helper) run by a unit")
    return ap


def test_escape_keeps_troff_from_reading_the_text() -> None:
    assert manpage.escape(".TH x\n'quote") == "\\&.TH x\n\\&'quote"
    assert manpage.escape("a\\b") == "a\\eb"
    assert manpage.escape("星 ≥") == "\\[u661F] \\[u2265]"
    assert manpage.option("--lines N") == "\\-\\-lines N"


def test_a_page_of_every_command_and_argument() -> None:
    page = manpage.page(sample(), "1.2", "2026-01-02")
    lines = page.splitlines()
    assert lines[0] == '.TH TOOL 1 "2026-01-02" "tool 1.2" "hoshikage manual"'
    assert "tool \\- does things" in lines
    # each command under its usage, less -h and the tool's own options (listed once)
    assert '.SS "tool show [\\-n N] [name]"' in lines
    assert '.SS "tool keys setup [\\-\\-force]"' in lines  # nested subcommands too
    assert "\\fB\\-\\-force\\fR" not in lines  # no help: the usage says all there is
    assert lines.count("\\fB\\-\\-debug\\fR") == 1
    assert "Show a thing, 100% of it." in lines
    assert "\\fB\\-n N, \\-\\-lines N\\fR" in lines
    assert "\\&.dot first, back\\eslash, \\[u661F]\\[u5F71] and \\[u2265] (default x)" in lines
    assert "secret" not in page
    # unit helpers apart, after the commands people type
    assert page.index(".SH COMMANDS") < page.index(".SH UNIT HELPERS") \
        < page.index('.SS "tool helper"') < page.index(".SH FILES")
    assert "Run by a unit." in lines


def test_the_date_is_the_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764588600")
    assert manpage.build_date() == "2025-12-01"


def test_hoshikage_page_lists_every_command_and_man_reads_it_cleanly(tmp_path: Path) -> None:
    page = manpage.page(parser(), __version__, "2026-01-02")
    for action in parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name in action.choices:
                assert f'.SS "hoshikage {name.replace("-", chr(92) + "-")}' in page, name
    assert "\\fB\\-\\-version\\fR" in page and "\\fBNO_COLOR\\fR" in page
    man = shutil.which("man")
    if man is None:
        unavailable("man is missing (Debian package man-db)")
    path = tmp_path / "hoshikage.1"
    path.write_text(page)
    # what lintian runs on a package's manual pages: any message is a warning
    result = subprocess.run([man, "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(path)],
                            capture_output=True, text=True,
                            env={**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"})
    assert result.returncode == 0 and not result.stderr, result.stderr
