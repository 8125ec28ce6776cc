"""Bash completion: the CLI answers argcomplete's requests (cli.complete), and nothing else
it runs imports argcomplete (the router and the unit helpers start often)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def test_model_arguments_complete_the_manifests_names(tmp_path: Path) -> None:
    pytest.importorskip("argcomplete")
    manifest = tmp_path / "models.yaml"
    manifest.write_text(f"""\
state_dir: {tmp_path}/state
models:
  tiny:
    path: {tmp_path}/tiny.gguf
    aliases: [tea]
  small:
    path: {tmp_path}/small.gguf
""")
    code = "import os\nos.dup2(1, 8)\nfrom hoshikage_sd import cli\ncli.main()"

    def candidates(line: str, env: dict[str, str]) -> list[str]:
        result = run(code, {"_ARGCOMPLETE": "1", "COMP_LINE": line,
                            "COMP_POINT": str(len(line)), "_ARGCOMPLETE_IFS": " ", **env})
        return sorted(w for w in result.stdout.split() if not w.startswith("-"))  # options too

    assert candidates("hoshikage load t", {"HOSHIKAGE_CONFIG": str(manifest)}) \
        == ["tea", "tiny"]
    assert candidates(f"hoshikage logs --config {manifest} ", {}) == ["small", "tea", "tiny"]
    for line in ("hoshikage pin t", "hoshikage unpin t", "hoshikage alias add t"):
        assert candidates(line, {"HOSHIKAGE_CONFIG": str(manifest)}) == ["tea", "tiny"], line
    # no manifest to read: no candidates, and no error on the line being typed
    assert candidates("hoshikage unload ", {"HOSHIKAGE_CONFIG": str(tmp_path / "no")}) == []
