"""Containers for the system and package tiers: made per test, stopped at its teardown,
their console and journal added to the report of a test that failed."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from testbed.container import Container, ContainerError

_CONTAINERS = pytest.StashKey[list[Container]]()
_REPORT_LINES = pytest.StashKey[int]()
_serial = itertools.count(1)

Binds = Sequence[tuple[str, str, bool]]


def unique_name(hint: str = "t") -> str:
    """A machine name (valid hostname) unique in this host: hint, pid, serial number."""
    slug = re.sub(r"[^a-z0-9-]+", "-", hint.lower()).strip("-")[:24] or "t"
    return f"hk-{slug}-{os.getpid()}-{next(_serial)}"


@contextlib.contextmanager
def made_for(request: pytest.FixtureRequest,
             report_lines: int = 200) -> Iterator[Callable[..., Container]]:
    """``boot(name, binds, timeout, rootfs=None, network=None, ip_firewall=False,
    root_dir=None)`` (as Container takes them) for one test; every container it booted is
    stopped when the block ends (the first error of those stops raised). Should the test
    fail, its report gets `report_lines` of each one's console and journal (post_mortem)."""
    made: list[Container] = []
    request.node.stash[_CONTAINERS] = made
    request.node.stash[_REPORT_LINES] = report_lines

    def boot(name: str, binds: Binds, timeout: float, rootfs: str | None = None,
             network: str | None = None, ip_firewall: bool = False,
             root_dir: Path | None = None) -> Container:
        c = Container(name, binds, rootfs=rootfs, root_dir=root_dir, network=network,
                      ip_firewall=ip_firewall)
        made.append(c)
        c.start(timeout)
        return c

    yield boot
    errors: list[BaseException] = []
    for c in reversed(made):
        try:
            c.stop()
        except (ContainerError, OSError) as e:
            errors.append(e)
    if errors:
        raise errors[0]


def post_mortem(item: pytest.Item, report: pytest.TestReport) -> None:
    """A failed test's report gets each of its containers' console and journal tail (the
    root conftest's pytest_runtest_makereport calls it for every test)."""
    if not report.failed or report.when not in ("setup", "call"):
        return
    lines = item.stash.get(_REPORT_LINES, 200)
    for c in item.stash.get(_CONTAINERS, []):
        report.sections.append((f"container {c.name}: console", c.console_tail(lines)))
        if c.running:
            try:
                journal = c.exec("journalctl", "-b", "--no-pager", "-n", str(lines), "-o",
                                 "short-precise", check=False, timeout=20).stdout
            except Exception as e:  # a post-mortem must never hide the real failure
                journal = f"(journalctl failed: {e})"
            report.sections.append((f"container {c.name}: journal", journal))
