"""The unit helpers' command lines, read without argparse, read as argparse reads them."""

from __future__ import annotations

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
