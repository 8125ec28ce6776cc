"""Helpers shared by the test tiers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

from testbed import REPO_ROOT


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose real parts are missing; under CI (CI set) fail instead.

    In CI every tier must actually run: a missing tool there is a broken set-up, not a
    reason to go green.
    """
    __tracebackhide__ = True
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


#: the two forms of hoshikage-launch the installers make (model_unit/launch.c, launch.py)
LAUNCHERS = ("compiled", "stub")


def make_launcher(kind: str, path: Path) -> Path:
    """hoshikage-launch at `path` in the given form; it runs the `hoshikage` beside it."""
    from hoshikage_sd.model_unit import install

    if kind == "compiled":
        why = install.build_native(str(path))
        if why is not None:
            unavailable(f"cannot build the compiled launcher: {why}")
    else:
        install.write_stub(str(path), str(REPO_ROOT))
    return path
