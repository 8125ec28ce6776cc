"""What the router keeps of its last good manifest (hoshikage_sd/lastgood.py, manifest.json):
the same Config as a parse of the same files, no use as that once any of those files
changed, and the last good manifest that the programs the router starts fall back to when
an edit breaks models.yaml."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hoshikage_sd import cli, lastgood
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Cache, Config, Model, Weights, codec, names
from hoshikage_sd.manifest.parse import load
from hoshikage_sd.router.config import load_config
from tests.support import unavailable

REPO = Path(__file__).resolve().parents[2]
GOOD = textwrap.dedent("""
    models:
      tiny:
        path: /srv/models/tiny.gguf
        ttl: 5m
""")
BROKEN = "models:\n  tiny:\n    path: [\n"


@pytest.fixture
def manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A manifest that sets every kind of field away from its default, with a sources:
    directory; its files older than lastgood.RACY."""
    models, more = tmp_path / "models", tmp_path / "more"
    models.mkdir()
    more.mkdir()
    (models / "a.gguf").write_bytes(b"GGUF")
    (more / "found.gguf").write_bytes(b"GGUF")
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(f"""
        runtime_dir: {tmp_path / 'run'}
        state_dir: {tmp_path / 'state'}
        ramdisk: {tmp_path / 'ram'}
        llama_server: /opt/llama/llama-server
        idle_ttl: 20m
        default_model: a
        sources: [{more}]
        memory_budget: 12G
        max_loaded_models: 2
        safety_margin: 1.5
        strict_names: true
        cors_origins: ["http://localhost:3000"]
        max_body: 1G
        api_keys: credential:keys
        cache: {{dir: {tmp_path / 'ssd'}, max_size: 100G, expire_after: 3d, min_rank: 2}}
        rank: {{week: 4, runtime: 1.5}}
        models:
          a:
            path: {models / 'a.gguf'}
            aliases: [alpha, first]
            tags: [chat]
            ttl: 90s
            args: ["-c", "4096", "--threads-http", "4"]
            pinned: true
          gone: {{path: {models / 'gone.gguf'}}}
          cmd:
            path: {models / 'a.gguf'}
            backend: command
            command: [/usr/bin/server, --model, "{{path}}", --uds, "{{socket}}"]
            health: /ready
    """))
    monkeypatch.setenv("HOSHIKAGE_CONFIG", str(path))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "run"))
    time.sleep(lastgood.RACY * 1.5)
    return path


def keep(path: Path) -> tuple[Config, bool]:
    """(the parse, whether it was kept whole) as the router does it."""
    began = time.time()
    config = names.effective(load(path))
    return config, lastgood.save(config, began)


def test_every_field_has_a_reader() -> None:
    """A field of a type the codec does not know would fail every kept parse's read."""
    for cls in (Config, Model, Cache, Weights):
        for f in dataclasses.fields(cls):
            assert str(f.type) in codec.DECODE, f"{cls.__name__}.{f.name}: {f.type}"


def test_the_kept_parse_is_the_parse(manifest: Path) -> None:
    config, saved = keep(manifest)
    assert saved
    assert config.models["found"].path.name == "found.gguf"  # from the sources: directory
    assert config.cache is not None and config.warnings  # 'gone' does not exist
    again = lastgood.load(manifest)
    assert again == config
    assert again is not None and again.models["a"].path == config.models["a"].path


def change_manifest(path: Path) -> None:
    path.write_text(path.read_text().replace("idle_ttl: 20m", "idle_ttl: 21m"))


def add_to_sources(path: Path) -> None:
    (path.parent / "more" / "new.gguf").write_bytes(b"GGUF")


def create_missing_model(path: Path) -> None:
    (path.parent / "models" / "gone.gguf").write_bytes(b"GGUF")


def give_an_alias(path: Path) -> None:
    names_file = path.parent / "state" / "names.json"
    names_file.parent.mkdir(exist_ok=True)
    names_file.write_text(json.dumps({"version": 1, "aliases": {"beta": "a"}}))


@pytest.mark.parametrize("change", [change_manifest, add_to_sources, create_missing_model,
                                    give_an_alias])
def test_any_file_it_came_from_changed_means_parse_again(
        manifest: Path, change: Callable[[Path], None]) -> None:
    keep(manifest)
    change(manifest)
    assert lastgood.load(manifest) is None
    # and what a parse now gives is kept in its place
    time.sleep(lastgood.RACY * 1.5)
    config, saved = keep(manifest)
    assert saved and lastgood.load(manifest) == config


def test_a_file_changed_just_before_the_parse_is_kept_only_as_the_last_good_one(
        manifest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its timestamps may not show a change made during the parse: not taken as that parse
    (nor the head start's part), but the last good manifest all the same."""
    keep(manifest)
    monkeypatch.setattr(lastgood, "RACY", 5.0)  # "just before", however slow this machine
    change_manifest(manifest)
    config, saved = keep(manifest)
    assert not saved and config.idle_ttl == 21 * 60
    value = json.loads(Path(lastgood.path()).read_bytes())
    assert value["files"] is None and value["headstart"] is None
    assert lastgood.load(manifest) is None
    manifest.write_text(BROKEN)
    assert lastgood.load_or_last_good(manifest).idle_ttl == 21 * 60


def test_another_manifest_or_version_or_garbage_is_not_used(manifest: Path) -> None:
    keep(manifest)
    assert lastgood.load(manifest.with_name("other.yaml")) is None
    path = Path(lastgood.path())
    data = json.loads(path.read_text())
    for broken in ({**data, "version": 0}, {**data, "config": {**data["config"], "ttl": 1}},
                   {**data, "config": {**data["config"], "sources": 3}}, [], "x"):
        path.write_text(json.dumps(broken))
        assert lastgood.load(manifest) is None, broken
    path.write_bytes(b"\xff{")
    assert lastgood.load(manifest) is None


def test_a_file_another_user_wrote_is_not_trusted(manifest: Path) -> None:
    """It says which program a unit runs: only this user's own (or root's) is read."""
    if os.geteuid() != 0:
        unavailable("needs root to give a file to another user")
    keep(manifest)
    os.chown(lastgood.path(), 65534, 65534)
    assert lastgood.load(manifest) is None
    manifest.write_text(BROKEN)  # nor as the last good one
    with pytest.raises(HoshikageError, match="written by another user"):
        lastgood.load_or_last_good(manifest)
    # but the user the runtime directory is for (the units' hoshikage, whose router wrote it
    # there): root's status, list and unload take the last good one of a broken manifest
    runtime = os.path.dirname(lastgood.path())
    os.chown(runtime, 65534, 65534)
    try:
        assert lastgood.load_or_last_good(manifest).models
    finally:
        os.chown(runtime, 0, 0)


def test_the_router_that_parses_logs_the_warnings_once(
        manifest: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The journal has them from the first router after a change (sources: that cannot be
    read, a missing file), not again from each router that takes the kept parse."""
    with caplog.at_level(logging.WARNING, logger="hoshikage"):
        config = load_config(manifest)
        said = [r.getMessage() for r in caplog.records]
        caplog.clear()
        load_config(manifest)
    assert config.warnings and said == list(config.warnings)
    assert any("gone.gguf does not exist" in w for w in said)
    assert caplog.records == []


def test_the_router_keeps_it_and_a_unit_helper_reads_it_without_yaml(manifest: Path) -> None:
    config = load_config(manifest)
    assert lastgood.load(manifest) == config
    # A second router start takes it (and the name index in it) as it is.
    assert load_config(manifest) == config
    code = textwrap.dedent("""
        import sys
        from hoshikage_sd import cli
        config = cli.unit_helper_config(cli.parser().parse_args(["release", "a"]), None)
        print(config.llama_server, sorted(config.models), "yaml" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.split()
    assert out == ["/opt/llama/llama-server", "['a',", "'cmd',", "'found',", "'gone']",
                   "False"]
    change_manifest(manifest)  # ... and parses once the manifest changed
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.split()
    assert out[-1] == "True"


def test_save_writes_only_what_changed_and_never_raises(
        manifest: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    config, _ = keep(manifest)
    assert Path(lastgood.path()).stat().st_mode & 0o777 == 0o640
    with monkeypatch.context() as patch:
        writes: list[object] = []
        patch.setattr("hoshikage_sd.files.write_atomic", lambda *a, **k: writes.append(a))
        assert lastgood.save(config, time.time())  # the same value: no write
        assert writes == []
    blocked = manifest.parent / "file"
    blocked.write_text("")
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(blocked / "sub"))
    with caplog.at_level(logging.WARNING):
        assert lastgood.save(config, time.time()) is False
    assert "cannot keep the last good manifest" in caplog.text


def test_refresh_rewrites_the_head_start_part_only_while_the_files_are_as_they_were(
        manifest: Path) -> None:
    config = load_config(manifest)
    lastgood.refresh(config, lambda _config: {"models": [], "mark": 1})
    assert json.loads(Path(lastgood.path()).read_bytes())["headstart"]["mark"] == 1
    assert lastgood.load(manifest) == config  # the rest as it was
    change_manifest(manifest)
    lastgood.refresh(config, lambda _config: {"models": [], "mark": 2})
    assert json.loads(Path(lastgood.path()).read_bytes())["headstart"]["mark"] == 1


# -- the last good manifest, for the programs the router starts ------------------------------

@pytest.fixture
def manifest_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "models.yaml"
    monkeypatch.setenv("HOSHIKAGE_CONFIG", str(path))
    return path


def test_a_broken_manifest_falls_back_to_the_last_good_one(
        manifest_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest_path.write_text(GOOD)
    load_config(manifest_path)
    for broken in (BROKEN, "models: {}\nbogus: 1\n", None):
        caplog.clear()
        if broken is None:
            manifest_path.unlink()
        else:
            manifest_path.write_text(broken)
        with pytest.raises(HoshikageError):
            load_config(manifest_path)  # the router keeps its own; the file stays
        config = lastgood.load_or_last_good()
        assert config.source == manifest_path and config.models["tiny"].ttl == 300
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert str(manifest_path) in warning and "last good copy" in warning
        assert warning in config.warnings


def test_a_good_manifest_wins_over_the_last_good_one(manifest_path: Path) -> None:
    manifest_path.write_text(GOOD)
    load_config(manifest_path)
    manifest_path.write_text(GOOD.replace("ttl: 5m", "ttl: 7m"))
    assert lastgood.load_or_last_good().models["tiny"].ttl == 420


@pytest.mark.parametrize(("kept", "message"), [
    (None, "last good manifest .*: there is none"),
    ({"source": "/elsewhere/models.yaml"}, r"of another manifest \(/elsewhere/models.yaml\)"),
    ({"version": 1}, "written by another version"),
    ({"config": {"ttl": 1}}, "cannot be read"),
])
def test_broken_manifest_and_nothing_usable_kept_is_the_manifests_error(
        manifest_path: Path, kept: dict[str, Any] | None, message: str) -> None:
    manifest_path.write_text(GOOD)
    load_config(manifest_path)
    if kept is None:
        Path(lastgood.path()).unlink()
    else:
        value = json.loads(Path(lastgood.path()).read_bytes())
        Path(lastgood.path()).write_text(json.dumps({**value, **kept}))
    manifest_path.write_text(BROKEN)
    with pytest.raises(HoshikageError, match=message) as err:
        lastgood.load_or_last_good()
    assert err.value.message.startswith(f"{manifest_path}:4: not valid YAML")


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Config]:
    """Each helper's main, replaced: which config it was given."""
    from hoshikage_sd import cache
    from hoshikage_sd.model_unit import activate, release
    from hoshikage_sd.watch import idle

    seen: dict[str, Config] = {}

    def fake(kind: str) -> Any:
        def main(config: Config, *_args: object) -> int:
            seen[kind] = config
            return 0
        return main
    monkeypatch.setattr(activate, "main", fake("activate"))
    monkeypatch.setattr(release, "main", fake("release"))
    monkeypatch.setattr(idle, "main", fake("idle-watch"))
    monkeypatch.setattr(cache, "sync", fake("cache-sync"))
    return seen


HELPERS = [["activate", "tiny"], ["release", "tiny"], ["idle-watch"], ["cache-sync"]]


@pytest.mark.parametrize("argv", HELPERS)
def test_unit_helpers_use_the_last_good_manifest(
        manifest_path: Path, captured: dict[str, Config], argv: list[str]) -> None:
    manifest_path.write_text(GOOD)
    load_config(manifest_path)
    manifest_path.write_text(BROKEN)
    assert cli.main(argv) == 0
    assert captured[argv[0]].models["tiny"].ttl == 300


@pytest.mark.parametrize("argv", [["idle-watch"], ["cache-sync"]])
def test_watch_and_cache_exit_cleanly_with_an_error_when_both_are_broken(
        manifest_path: Path, captured: dict[str, Config],
        capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    manifest_path.write_text(BROKEN)
    assert cli.main(["--debug", *argv]) == 0
    assert argv[0] not in captured
    (error,) = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("ERROR ")]  # log.setup's format with --debug
    assert f"{manifest_path}:4" in error and "nothing done" in error


def test_release_cleans_up_at_the_default_places_when_both_are_broken(
        manifest_path: Path, captured: dict[str, Config],
        capsys: pytest.CaptureFixture[str]) -> None:
    manifest_path.write_text(BROKEN)
    assert cli.main(["--debug", "release", "tiny"]) == 0
    assert captured["release"].ramdisk == Path("/mnt/hoshikage")
    assert "ERROR release tiny at the default places" in capsys.readouterr().err


def test_activate_fails_with_the_reason_for_the_router_when_both_are_broken(
        manifest_path: Path, captured: dict[str, Config], units_runtime: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from hoshikage_sd.runtime import Runtime

    manifest_path.write_text(BROKEN)
    assert cli.main(["activate", "tiny"]) == 2
    assert "activate" not in captured
    reason = Runtime(units_runtime).error("tiny")
    assert reason is not None and reason.startswith(f"{manifest_path}:4: not valid YAML")
    assert "not valid YAML" in capsys.readouterr().err
