"""Fixtures of the unit tier."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def units_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$RUNTIME_DIRECTORY (systemd sets it for the units) is the test's own: what the router
    and the CLI keep there (the last good manifest, manifest.json) never lands in the host's
    /run/hoshikage."""
    path = tmp_path / "units-runtime"
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(path))
    return path


@pytest.fixture(autouse=True)
def fresh_age_identity() -> None:
    """encryption.py reads a process's age identity once (a unit's credential does not change
    while it runs): each test brings its own."""
    from hoshikage_sd import encryption

    encryption._keys.cache_clear()
