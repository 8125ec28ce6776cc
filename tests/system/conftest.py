"""Fixtures of the system tier: real systemd as PID 1 in systemd-nspawn containers."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from testbed.container import Container, unavailable_reason
from testbed.deploy import Deployment, deploy, manifest
from tests.containers import Binds, made_for, unique_name
from tests.support import unavailable

ContainerFactory = Callable[..., Container]
TinyDeployer = Callable[..., Deployment]


@pytest.fixture
def container_factory(request: pytest.FixtureRequest) -> Iterator[ContainerFactory]:
    """A callable ``make(hint="", binds=(), timeout=60, rootfs=None, root_dir=None) ->
    Container``.

    Each call boots a container and returns it running. ``hint`` goes into the machine name
    (default: the test's name); ``binds`` are ``(host_path, container_path, read_only)``;
    ``rootfs`` boots a full tree instead of the host's /usr; ``root_dir`` keeps the root in
    that host directory, for Container.reboot() (see Container).

    Every container it made is stopped at teardown. When the test fails, each container's
    console log and journal tail are added to the failure report. Skips when this host cannot
    run containers (not root, systemd-container missing); with CI set, fails instead.
    """
    reason = unavailable_reason()
    if reason:
        unavailable(reason)
    with made_for(request) as boot:
        def make(hint: str = "", binds: Binds = (), timeout: float = 60,
                 rootfs: str | None = None, root_dir: Path | None = None) -> Container:
            return boot(unique_name(hint or request.node.name), binds, timeout, rootfs,
                        root_dir=root_dir)

        yield make


@pytest.fixture
def deploy_tiny(container_factory: ContainerFactory, tmp_path: Path, tiny_gguf: Path,
                llama_server_bin: Path) -> TinyDeployer:
    """``deploy_tiny(models, files=None, reboots=False, **settings) -> Deployment``:
    hoshikage deployed in a container of its own (testbed.deploy), with the manifest of
    `models` (name: that model's YAML lines) and the top-level `settings`
    (testbed.deploy.manifest).

    Each model named in `files` (default: every one) has a copy of the tiny GGUF as its file,
    in tmp_path/models (bound in at /srv/models); a model left out has none. With `reboots`
    the container's root is tmp_path/root, which its reboot() keeps."""
    def make(models: dict[str, str], files: Iterable[str] | None = None,
             reboots: bool = False, **settings: str) -> Deployment:
        directory = tmp_path / "models"
        directory.mkdir(exist_ok=True)
        for name in models if files is None else files:
            shutil.copyfile(tiny_gguf, directory / f"{name}.gguf")
        make_container = (functools.partial(container_factory, root_dir=tmp_path / "root")
                          if reboots else container_factory)
        return deploy(make_container, directory,
                      manifest(llama_server_bin, models, **settings))

    return make
