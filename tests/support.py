"""Helpers shared by the test tiers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

#: the repository root (bind it at this same path into containers: .venv names it)
REPO_ROOT = Path(__file__).resolve().parent.parent


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
