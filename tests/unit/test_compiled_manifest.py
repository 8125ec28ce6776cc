"""The router's kept parse (manifest/compiled.py): the same Config as a parse of the same
files, and no use at all once any of those files changed."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hoshikage_sd.manifest import Cache, Config, Model, Weights, compiled, names
from hoshikage_sd.manifest.parse import load
from hoshikage_sd.router.config import load_config
from hoshikage_sd.router.headstart import index as name_index
from tests.support import unavailable

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A manifest that sets every kind of field away from its default, with a sources:
    directory; its files older than compiled.RACY."""
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
    name_index._written.clear()
    time.sleep(compiled.RACY * 1.5)
    return path


def kept(path: Path) -> tuple[Config, bool]:
    """(the parse, whether it was kept) as the router does it."""
    began = time.time()
    config = names.effective(load(path))
    return config, compiled.save(config, run_dir(path), began)


def run_dir(path: Path) -> Path:
    return path.parent / "run"


def test_every_field_has_a_reader() -> None:
    """A field of a type the codec does not know would fail every kept parse's read."""
    for cls in (Config, Model, Cache, Weights):
        for f in dataclasses.fields(cls):
            assert str(f.type) in compiled.DECODE, f"{cls.__name__}.{f.name}: {f.type}"


def test_the_kept_parse_is_the_parse(manifest: Path) -> None:
    config, saved = kept(manifest)
    assert saved
    assert config.models["found"].path.name == "found.gguf"  # from the sources: directory
    assert config.cache is not None and config.warnings  # 'gone' does not exist
    again = compiled.load(manifest, run_dir(manifest))
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
    kept(manifest)
    change(manifest)
    assert compiled.load(manifest, run_dir(manifest)) is None
    # and what a parse now gives is kept in its place
    time.sleep(compiled.RACY * 1.5)
    config, saved = kept(manifest)
    assert saved and compiled.load(manifest, run_dir(manifest)) == config


def test_a_file_changed_just_before_the_parse_is_not_kept(
        manifest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its timestamps may not show a change made during the parse: not kept, and an older
    kept parse is removed."""
    kept(manifest)
    monkeypatch.setattr(compiled, "RACY", 5.0)  # "just before", however slow this machine
    change_manifest(manifest)
    _, saved = kept(manifest)
    assert not saved
    assert not compiled.path(run_dir(manifest)).exists()


def test_another_manifest_or_version_or_garbage_is_not_used(manifest: Path) -> None:
    kept(manifest)
    assert compiled.load(manifest.with_name("other.yaml"), run_dir(manifest)) is None
    path = compiled.path(run_dir(manifest))
    data = json.loads(path.read_text())
    for broken in ({**data, "version": 0}, {**data, "config": {**data["config"], "ttl": 1}},
                   {**data, "config": {**data["config"], "sources": 3}}, [], "x"):
        path.write_text(json.dumps(broken))
        assert compiled.load(manifest, run_dir(manifest)) is None, broken
    path.write_bytes(b"\xff{")
    assert compiled.load(manifest, run_dir(manifest)) is None


def test_a_file_another_user_wrote_is_not_trusted(manifest: Path) -> None:
    """It says which program a unit runs: only this user's own (or root's) is read."""
    if os.geteuid() != 0:
        unavailable("needs root to give a file to another user")
    kept(manifest)
    os.chown(compiled.path(run_dir(manifest)), 65534, 65534)
    assert compiled.load(manifest, run_dir(manifest)) is None


def test_the_router_keeps_it_and_a_unit_helper_reads_it_without_yaml(manifest: Path) -> None:
    config = load_config(manifest)
    assert compiled.load(manifest, run_dir(manifest)) == config
    # A second router start takes it (and the name index) as they are.
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
