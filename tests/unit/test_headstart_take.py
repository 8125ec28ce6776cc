"""take.import_beside_load: the router's imports beside a load the head start began run in a
thread at a lower priority; the router's own thread keeps its priority."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hoshikage_sd.router.headstart import take

PROBE = "hk_beside_load_probe"


@pytest.fixture
def probe(tmp_path: Path) -> Iterator[Path]:
    """A module that records, when imported, the nice of the thread importing it."""
    (tmp_path / f"{PROBE}.py").write_text(
        "import os, threading\n"
        "NICE = os.getpriority(os.PRIO_PROCESS, 0)\n"
        "THREAD = threading.current_thread().name\n")
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    sys.modules.pop(PROBE, None)
    sys.modules.pop("hk_beside_load_broken", None)


def test_imports_at_a_lower_priority_in_a_thread_of_their_own(probe: Path) -> None:
    (probe / "hk_beside_load_broken.py").write_text("raise RuntimeError('broken')\n")
    before = os.getpriority(os.PRIO_PROCESS, 0)
    first = take.FirstRequest(started="tiny")
    take.import_beside_load(first, ("hk_beside_load_broken", PROBE))
    module = sys.modules[PROBE]
    assert module.THREAD == "imports"
    assert module.NICE == take.BESIDE_LOAD_NICE
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # this thread's own is unchanged
    assert "hk_beside_load_broken" not in sys.modules  # its failure is the router's to tell
    assert first.notes == ["the router's imports ran at nice 10 beside the load of tiny"]


def test_without_a_load_nothing_is_imported_early(probe: Path) -> None:
    first = take.FirstRequest()
    take.import_beside_load(first, (PROBE,))
    assert PROBE not in sys.modules and first.notes == []
