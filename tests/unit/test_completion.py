"""Bash completion: the CLI answers argcomplete's requests (cli.complete), and nothing else
it runs imports argcomplete (the router and the unit helpers start often)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from testbed import REPO_ROOT


def run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("_ARC", "COMP_"))}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, text=True,
                          capture_output=True, env={**clean, **env}, timeout=60)


def test_a_normal_start_does_not_import_argcomplete() -> None:
    result = run("import sys\nfrom hoshikage_sd import cli\n"
                 "try:\n    cli.main(['simulate', '--list'])\nexcept SystemExit:\n    pass\n"
                 "print('argcomplete' in sys.modules)", {})
    assert result.stdout.strip().splitlines()[-1] == "False", result.stdout + result.stderr


def test_completion_lists_the_commands() -> None:
    pytest.importorskip("argcomplete")
    # as the completion script asks: the line so far, the cursor, candidates on fd 8
    code = ("import os\nos.dup2(1, 8)\nfrom hoshikage_sd import cli\n"
            "cli.main()")
    result = run(code, {"_ARGCOMPLETE": "1", "COMP_LINE": "hoshikage lo", "COMP_POINT": "12",
                        "_ARGCOMPLETE_IFS": " "})
    assert sorted(result.stdout.split()) == ["load", "logs"], result.stdout + result.stderr
