"""hoshikage_sd/proc.py: the one subprocess wrapper's errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from hoshikage_sd import proc
from hoshikage_sd.errors import HoshikageError


def test_a_missing_program_is_said_with_its_debian_package(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: nothing is installed
    with pytest.raises(HoshikageError) as err:
        proc.run(["age-keygen", "-o", "key"])
    assert err.value.message == "age-keygen is not installed or not on PATH"
    assert err.value.hint == "apt install age"
    with pytest.raises(HoshikageError) as err:
        proc.run(["no-such-program"])
    assert err.value.hint is None
