"""Preload at boot (router/preload.py) and limits a reload applies: the router's side."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hoshikage_sd.manifest import Model
from hoshikage_sd.router import preload, proxy, server
from tests.unit.test_router_api import write


def manifest(tmp_path: Path, extra: str = "") -> Path:
    path = write(tmp_path, extra)
    path.write_text(path.read_text() + "    preload: true\n"
                    f"  other:\n    path: {tmp_path}/o.gguf\n"
                    f"  third:\n    path: {tmp_path}/t.gguf\n    preload: true\n")
    (tmp_path / "run").mkdir(exist_ok=True)
    return path


def test_the_boots_first_router_starts_the_preload_models_once(tmp_path: Path) -> None:
    config = server.load_config(manifest(tmp_path))
    assert [m.name for m in config.models.values() if m.preload] == ["tiny", "third"]

    async def scenario() -> list[list[str]]:
        started: list[str] = []
        done = []
        for _ in range(2):  # the second router (after an idle exit) preloads nothing
            router = server.Router(config)

            async def ensure(model: Model) -> None:
                started.append(model.name)
                if model.name == "third":
                    raise server.StartFailed("no room for third")
            router.ensure = ensure  # type: ignore[method-assign]
            done.append(await preload.at_boot(router))
        assert started == ["tiny", "third"]
        return done

    assert asyncio.run(scenario()) == [["tiny"], []]
    assert (tmp_path / "run" / preload.MARKER).exists()


def test_a_broken_manifest_leaves_the_preload_to_the_next_router(tmp_path: Path) -> None:
    config = server.load_config(manifest(tmp_path))
    router = server.Router(config, broken="m.yaml:1: bad")
    assert asyncio.run(preload.at_boot(router)) == []
    assert not (tmp_path / "run" / preload.MARKER).exists()


def test_a_reload_gives_the_front_the_new_limits(tmp_path: Path) -> None:
    path = write(tmp_path, "max_connections: 100\nbody_memory: 64M")
    router = server.Router(server.load_config(path))

    async def scenario() -> None:
        router.front = proxy.Proxy(router.handle, server.limits(router.config))
        assert router.front.limits.max_connections == 100
        path.write_text(path.read_text().replace("max_connections: 100",
                                                 "max_connections: 7"))
        router.reload_now()
        assert router.front.limits.max_connections == 7
        assert router.front.limits.body_memory == 64 << 20

    asyncio.run(scenario())
