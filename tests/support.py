"""Helpers shared by the test tiers."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import pytest

from testbed import REPO_ROOT

if TYPE_CHECKING:
    from testbed.container import Container

T = TypeVar("T")


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


def eventually(fetch: Callable[[], T], done: Callable[[T], object] = bool,
               timeout: float = 10.0, every: float = 0.05) -> T:
    """fetch() polled until done(value) or `timeout` seconds: the last value either way, so
    the test's own assertion says what was wrong. No fixed sleeps in tests."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value) or time.monotonic() >= deadline:
            return value
        time.sleep(every)


def listening(port: int, timeout: float = 10.0) -> bool:
    """Does something accept TCP connections on 127.0.0.1:port (within `timeout`)?"""
    def accepts() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    return eventually(accepts, timeout=timeout)


def completions(container: Container, script: str, line: str) -> list[str]:
    """What bash completion offers for `line` in `container`, through argcomplete's `script`
    (which asks hoshikage for the candidates)."""
    return container.exec("bash", "-c", f"source {script}; COMP_LINE='{line}' "
                          f"COMP_POINT={len(line)} COMP_TYPE=9; _python_argcomplete hoshikage; "
                          'echo "${COMPREPLY[@]}"').stdout.split()
