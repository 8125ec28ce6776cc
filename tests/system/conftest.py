"""Fixtures of the system tier: real systemd as PID 1 in systemd-nspawn containers."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from testbed.container import Container, unavailable_reason
from tests.containers import Binds, made_for, post_mortem, unique_name
from tests.support import unavailable

ContainerFactory = Callable[..., Container]


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
    with made_for(request) as boot:
        def make(hint: str = "", binds: Binds = (), timeout: float = 60,
                 rootfs: str | None = None) -> Container:
            return boot(unique_name(hint or request.node.name), binds, timeout, rootfs)

        yield make


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    post_mortem(item, outcome.get_result())
