"""Issue 3's manifest: sources, tags, pinned, backends, memory settings, name resolution."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from hoshikage_sd.manifest import AmbiguousModel, ConfigError, parse_size
from hoshikage_sd.manifest.parse import parse
from hoshikage_sd.resolve import resolve
from hoshikage_sd.stats import StatsFile


def cfg(text: str, path: Path = Path("/etc/hoshikage/models.yaml")):  # type: ignore[no-untyped-def]
    return parse(textwrap.dedent(text), path)


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, Path]:
    ssd, hdd = tmp_path / "ssd", tmp_path / "hdd"
    ssd.mkdir()
    hdd.mkdir()
    for name in ("qwen3-8b-Q4_K_M.gguf", "gemma 3 (4b).gguf"):
        (ssd / name).write_bytes(b"GGUF")
    for name in ("qwen3-8b-Q4_K_M.gguf", "llama-70b.gguf", "notes.txt"):
        (hdd / name).write_bytes(b"GGUF")
    return ssd, hdd


def test_sources_are_scanned_in_priority_order(sources: tuple[Path, Path]) -> None:
    ssd, hdd = sources
    c = cfg(f"sources: [{ssd}, {hdd}]\n")
    assert sorted(c.models) == ["gemma-3-4b", "llama-70b", "qwen3-8b-Q4_K_M"]
    assert c.models["qwen3-8b-Q4_K_M"].path == ssd / "qwen3-8b-Q4_K_M.gguf"  # first wins
    assert c.models["llama-70b"].path == hdd / "llama-70b.gguf"


def test_explicit_entry_without_path_names_a_scanned_file(sources: tuple[Path, Path]) -> None:
    ssd, hdd = sources
    c = cfg(f"""
        sources: [{ssd}, {hdd}]
        models:
          llama-70b:
            aliases: [big]
            pinned: true
          mine:
            path: {hdd / 'llama-70b.gguf'}
    """)
    assert c.models["llama-70b"].aliases == ("big",) and c.models["llama-70b"].pinned
    assert resolve(c, "big") is c.models["llama-70b"]
    with pytest.raises(ConfigError, match=r"models.yaml:4: model 'ghost' has no 'path:'"):
        cfg(f"""
            sources: [{ssd}]
            models:
              ghost:
                ttl: 5m
        """)


def two() -> str:
    return """
        models:
          qwen3-8b:
            path: /m/q8.gguf
            aliases: [qwen]
            tags: [tool]
          qwen3-32b:
            path: /m/q32.gguf
          gemma:
            path: /m/g.gguf
            aliases: [gem]
    """


def test_resolution_order_name_alias_tag_partial() -> None:
    c = cfg(two())
    assert resolve(c, "qwen3-32b").name == "qwen3-32b"  # type: ignore[union-attr]
    assert resolve(c, "qwen").name == "qwen3-8b"  # type: ignore[union-attr]  # alias, not partial
    assert resolve(c, "tool").name == "qwen3-8b"  # type: ignore[union-attr]
    assert resolve(c, "GEM").name == "gemma"  # type: ignore[union-attr]  # unique partial
    assert resolve(c, "32").name == "qwen3-32b"  # type: ignore[union-attr]
    assert resolve(c, "llama") is None
    assert resolve(c, "-") is None and resolve(c, ".") is None  # in names, naming none


def test_several_partial_matches_highest_rank_from_the_stats_file_or_409(
        tmp_path: Path) -> None:
    c = dataclasses.replace(cfg(two()), state_dir=tmp_path)
    stats = StatsFile(tmp_path)
    assert resolve(c, "qwen3").name == "qwen3-8b"  # type: ignore[union-attr]  # no stats: name
    stats.record_load("qwen3-32b")
    assert resolve(c, "qwen3").name == "qwen3-32b"  # type: ignore[union-attr]
    for _ in range(2):
        stats.record_load("qwen3-8b")
    assert resolve(c, "qwen3").name == "qwen3-8b"  # type: ignore[union-attr]
    strict = cfg("strict_names: true\n" + textwrap.dedent(two()))
    with pytest.raises(AmbiguousModel) as exc:
        resolve(strict, "qwen3")
    assert exc.value.candidates == ["qwen3-32b", "qwen3-8b"]


def test_a_tag_names_one_model_at_a_time() -> None:
    with pytest.raises(ConfigError, match=r":8: tag 'tool' names one model at a time; it is "
                                          r"already on 'a'"):
        cfg("""
            models:
              a:
                path: /m/a.gguf
                tags: [tool]
              b:
                path: /m/b.gguf
                tags: [tool]
        """)


def test_command_backend() -> None:
    c = cfg("""
        models:
          vl:
            path: /m/vl.gguf
            backend: command
            command: [/usr/bin/server, --model, "{path}", --uds, "{socket}"]
            health: /v1/models
    """)
    m = c.models["vl"]
    assert (m.backend, m.health) == ("command", "/v1/models")
    assert m.command[2] == "{path}"
    with pytest.raises(ConfigError, match=r":6: model 'vl': command: '\{port\}' has an unknown"):
        cfg("""
            models:
              vl:
                path: /m/vl.gguf
                backend: command
                command: [/usr/bin/server, "{port}"]
        """)
    with pytest.raises(ConfigError, match="backend 'command' needs 'command:'"):
        cfg("models:\n  vl:\n    path: /m/vl.gguf\n    backend: command\n")
    with pytest.raises(ConfigError, match=r":4: model 'vl': backend must be one of"):
        cfg("models:\n  vl:\n    path: /m/vl.gguf\n    backend: vllm\n")


def test_memory_settings() -> None:
    c = cfg("""
        memory_budget: 20G
        safety_margin: 1.5
        max_loaded_models: 3
        evict_floor: 512M
        admission_wait: 2m
        pressure_warn: 0.6
        pressure_critical: 0.8
        models: {}
    """)
    assert c.memory_budget == 20 << 30 and c.evict_floor == 512 << 20
    assert (c.safety_margin, c.max_loaded_models, c.admission_wait) == (1.5, 3, 120.0)
    assert (c.pressure_warn, c.pressure_critical) == (0.6, 0.8)
    with pytest.raises(ConfigError, match=r":2: safety_margin must be a number from 1 to 10"):
        cfg("\nsafety_margin: 0.5\nmodels: {}\n")
    with pytest.raises(ConfigError, match=r":1: memory_budget: 'lots' is not a size"):
        cfg("memory_budget: lots\nmodels: {}\n")
    with pytest.raises(ConfigError, match="pressure_warn must not be above"):
        cfg("pressure_warn: 0.95\nmodels: {}\n")


@pytest.mark.parametrize(("text", "size"), [("4096", 4096), ("512M", 512 << 20),
                                            ("20G", 20 << 30), ("1.5GiB", 3 << 29),
                                            ("2T", 2 << 40), ("64k", 64 << 10)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "G", "-1G", "1X", "lots", True])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_the_cli_and_the_router_resolve_a_name_alike(tmp_path: Path) -> None:
    """`hoshikage load qwen` and a request for "qwen" start the same model: the one the
    usage statistics rank highest (before, the CLI took the last by name)."""
    from hoshikage_sd.commands import manual

    c = dataclasses.replace(cfg("""
        models:
          qwen-a: {path: /m/a.gguf}
          qwen-b: {path: /m/b.gguf}
    """), state_dir=tmp_path)
    StatsFile(tmp_path).record_load("qwen-a")
    assert manual.find(c, "qwen").name == "qwen-a"
    assert resolve(c, "qwen").name == "qwen-a"  # type: ignore[union-attr]


def test_a_name_must_fit_its_unit_name_once_escaped() -> None:
    """hoshikage-model@NAME.service is at most 255 characters, and each '-' escapes to
    \\x2d: a name of 100 characters with many dashes would make no unit."""
    from hoshikage_sd import protocol
    from hoshikage_sd.manifest.sources import model_name_for
    from hoshikage_sd.sd.units import model_unit

    dashed = "Q-" * 50
    assert not protocol.valid_name(dashed) and len(model_unit(dashed)) > 255
    fits = "Q-" * 43 + "Q"
    assert protocol.valid_name(fits) and len(model_unit(fits)) <= 255
    with pytest.raises(ConfigError, match="at most 231 with each '-' counted 4 times"):
        parse(f"models:\n  {dashed}: {{path: /srv/m.gguf}}\n", Path("/etc/m.yaml"))
    found = model_name_for(Path(f"/srv/{dashed}.gguf"))
    assert found is not None and protocol.valid_name(found) and dashed.startswith(found)


def test_a_long_name_s_socket_fits_a_unix_address() -> None:
    """/run/hoshikage/NAME.sock must fit sun_path (108 bytes with its NUL): a longer one
    is a hash of the name, which no name can be (names begin with a letter or a digit)."""
    config = parse("models:\n  a: {path: /srv/a.gguf}\n", Path("/etc/m.yaml"))
    assert config.socket_path("Qwen3-8B-Q4_K_M") == config.runtime_dir / "Qwen3-8B-Q4_K_M.sock"
    longs = ["B" * 88, "B" * 99 + "C", "B" * 99 + "D"]
    paths = [config.socket_path(n) for n in longs]
    assert all(len(bytes(p)) < 108 and p.name.startswith("_") for p in paths)
    assert len(set(paths)) == 3 and paths == [config.socket_path(n) for n in longs]
    assert config.socket_path("B" * 87) == config.runtime_dir / f"{'B' * 87}.sock"
