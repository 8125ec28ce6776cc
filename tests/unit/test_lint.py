"""Static checks as tests: ruff over the code and its tests, mypy --strict over the package."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import unavailable

ROOT = Path(__file__).resolve().parents[2]


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(module) is None:
        unavailable(f"{module} is not installed in {sys.executable} (pip install '.[test]')")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=600, check=False)


def test_ruff() -> None:
    paths = [p for p in ("hoshikage_sd", "testbed", "tests", "tools", "bench")
             if (ROOT / p).exists()]
    result = run_tool("ruff", "check", "--no-cache", *paths)
    if result.returncode != 0:
        pytest.fail(f"ruff check failed:\n{result.stdout}{result.stderr}", pytrace=False)


def test_mypy() -> None:
    result = run_tool("mypy")  # files and strictness come from pyproject.toml
    if result.returncode != 0:
        pytest.fail(f"mypy failed:\n{result.stdout}{result.stderr}", pytrace=False)
    assert "Success" in result.stdout
