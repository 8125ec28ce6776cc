"""Fixtures of the system tier: real systemd as PID 1 in systemd-nspawn containers."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import pytest

from testbed.container import Container, ContainerError, unavailable_reason
from tests.support import unavailable

_CONTAINERS = pytest.StashKey[list[Container]]()
_serial = itertools.count(1)

Binds = Sequence[tuple[str, str, bool]]
ContainerFactory = Callable[..., Container]


def unique_name(hint: str = "t") -> str:
    """A machine name (valid hostname) unique in this host: hint, pid, serial number."""
    slug = re.sub(r"[^a-z0-9-]+", "-", hint.lower()).strip("-")[:24] or "t"
    return f"hk-{slug}-{os.getpid()}-{next(_serial)}"


@pytest.fixture
def container_factory(request: pytest.FixtureRequest) -> Iterator[ContainerFactory]:
    """A callable ``make(hint="", binds=(), timeout=60, rootfs=None) -> Container``.

    Each call boots a container and returns it running. ``hint`` goes into the machine name
    (default: the test's name); ``binds`` are ``(host_path, container_path, read_only)``;
    ``rootfs`` boots a full tree instead of the host's /usr (see Container).

    Every container it made is stopped at teardown. When the test fails, each container's
    console log and journal tail are added to the failure report. Skips when this host cannot
    run containers (not root, systemd-container missing); with CI set, fails instead.
    """
    reason = unavailable_reason()
    if reason:
        unavailable(reason)
    made: list[Container] = []
    request.node.stash[_CONTAINERS] = made

    def make(
        hint: str = "", binds: Binds = (), timeout: float = 60, rootfs: str | None = None
    ) -> Container:
        c = Container(unique_name(hint or request.node.name), binds, rootfs=rootfs)
        made.append(c)
        c.start(timeout)
        return c

    yield make
    errors: list[BaseException] = []
    for c in reversed(made):
        try:
            c.stop()
        except (ContainerError, OSError) as e:
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed or report.when not in ("setup", "call"):
        return
    for c in item.stash.get(_CONTAINERS, []):
        report.sections.append((f"container {c.name}: console", c.console_tail(200)))
        if c.running:
            try:
                journal = c.exec(
                    "journalctl", "-b", "--no-pager", "-n", "200", "-o", "short-precise",
                    check=False, timeout=20,
                ).stdout  # fmt: skip
            except Exception as e:  # a post-mortem must never hide the real failure
                journal = f"(journalctl failed: {e})"
            report.sections.append((f"container {c.name}: journal", journal))
