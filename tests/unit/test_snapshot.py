"""The router's last good manifest (issue 14): the programs it starts fall back to it when an
edit breaks models.yaml, and exit cleanly when there is neither."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest

from hoshikage_sd import cli
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Config, snapshot

GOOD = textwrap.dedent("""
    models:
      tiny:
        path: /srv/models/tiny.gguf
        ttl: 5m
""")
BROKEN = "models:\n  tiny:\n    path: [\n"


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "run"
    directory.mkdir()
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(directory))  # as systemd sets it
    snapshot._written.clear()
    return directory


@pytest.fixture
def manifest_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "models.yaml"
    monkeypatch.setenv("HOSHIKAGE_CONFIG", str(path))
    return path


def test_save_keeps_the_text_with_its_source_and_skips_an_unchanged_one(
        runtime_dir: Path, manifest_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[Path] = []
    real = snapshot.write_atomic
    monkeypatch.setattr(snapshot, "write_atomic",
                        lambda path, data, mode=None: (writes.append(path),
                                                       real(path, data, mode)))
    assert snapshot.save(GOOD, source=manifest_path)
    copy = runtime_dir / "manifest.yaml"
    assert copy.read_text() == f"{snapshot.HEADER}{manifest_path}\n{GOOD}"
    assert copy.stat().st_mode & 0o777 == 0o640
    assert snapshot.save(GOOD, source=manifest_path)  # the same text: no write
    assert writes == [copy]
    manifest_path.write_text(GOOD + "idle_ttl: 10m\n")
    assert snapshot.save(manifest_path)  # a path: its text, its name
    assert len(writes) == 2 and "idle_ttl: 10m" in copy.read_text()


def test_save_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert snapshot.save(GOOD, blocked / "sub", tmp_path / "m.yaml") is False
    assert snapshot.save(tmp_path / "missing.yaml", tmp_path) is False
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_load_and_save_keeps_only_a_good_manifest(runtime_dir: Path,
                                                  manifest_path: Path) -> None:
    manifest_path.write_text(GOOD)
    assert list(snapshot.load_and_save().models) == ["tiny"]
    manifest_path.write_text(BROKEN)
    with pytest.raises(HoshikageError, match=r"models.yaml:4"):
        snapshot.load_and_save()
    assert (runtime_dir / "manifest.yaml").read_text().endswith(GOOD)
    manifest_path.unlink()
    with pytest.raises(HoshikageError, match="no manifest at"):
        snapshot.load_and_save()


def test_a_broken_manifest_falls_back_to_the_last_good_copy(
        runtime_dir: Path, manifest_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest_path.write_text(GOOD)
    snapshot.load_and_save()
    for broken in (BROKEN, "models: {}\nbogus: 1\n", None):
        caplog.clear()
        if broken is None:
            manifest_path.unlink()
        else:
            manifest_path.write_text(broken)
        config = snapshot.load_or_last_good()
        assert config.source == manifest_path and config.models["tiny"].ttl == 300
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert str(manifest_path) in warning and "last good copy" in warning
        assert warning in config.warnings


def test_a_good_manifest_wins_over_the_copy(runtime_dir: Path, manifest_path: Path) -> None:
    manifest_path.write_text(GOOD)
    snapshot.load_and_save()
    manifest_path.write_text(GOOD.replace("ttl: 5m", "ttl: 7m"))
    assert snapshot.load_or_last_good().models["tiny"].ttl == 420


@pytest.mark.parametrize(("copy", "message"), [
    (None, "last good copy .*: there is none"),
    (f"{snapshot.HEADER}/elsewhere/models.yaml\n{GOOD}", "is of another file"),
    ("{HEADER}{PATH}\nmodels: [\n", "does not parse either"),
])
def test_broken_manifest_and_no_usable_copy_is_the_manifests_error(
        runtime_dir: Path, manifest_path: Path, copy: str | None, message: str) -> None:
    manifest_path.write_text(BROKEN)
    if copy is not None:
        (runtime_dir / "manifest.yaml").write_text(
            copy.replace("{HEADER}", snapshot.HEADER).replace("{PATH}", str(manifest_path)))
    with pytest.raises(HoshikageError, match=message) as err:
        snapshot.load_or_last_good()
    assert err.value.message.startswith(f"{manifest_path}:4: not valid YAML")


# -- the unit helpers ------------------------------------------------------------------------

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
def test_unit_helpers_use_the_last_good_copy(
        runtime_dir: Path, manifest_path: Path, captured: dict[str, Config],
        argv: list[str]) -> None:
    manifest_path.write_text(GOOD)
    snapshot.load_and_save()
    manifest_path.write_text(BROKEN)
    assert cli.main(argv) == 0
    assert captured[argv[0]].models["tiny"].ttl == 300


@pytest.mark.parametrize("argv", [["idle-watch"], ["cache-sync"]])
def test_watch_and_cache_exit_cleanly_with_an_error_when_both_are_broken(
        runtime_dir: Path, manifest_path: Path, captured: dict[str, Config],
        capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    manifest_path.write_text(BROKEN)
    assert cli.main(["--debug", *argv]) == 0
    assert argv[0] not in captured
    (error,) = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("ERROR ")]  # log.setup's format with --debug
    assert f"{manifest_path}:4" in error and "nothing done" in error


def test_release_cleans_up_at_the_default_places_when_both_are_broken(
        runtime_dir: Path, manifest_path: Path, captured: dict[str, Config],
        capsys: pytest.CaptureFixture[str]) -> None:
    manifest_path.write_text(BROKEN)
    assert cli.main(["--debug", "release", "tiny"]) == 0
    assert captured["release"].ramdisk == Path("/mnt/hoshikage")
    assert "ERROR release tiny at the default places" in capsys.readouterr().err


def test_activate_fails_with_the_reason_for_the_router_when_both_are_broken(
        runtime_dir: Path, manifest_path: Path, captured: dict[str, Config],
        capsys: pytest.CaptureFixture[str]) -> None:
    from hoshikage_sd.runtime import Runtime

    manifest_path.write_text(BROKEN)
    assert cli.main(["activate", "tiny"]) == 2
    assert "activate" not in captured
    reason = Runtime(runtime_dir).error("tiny")
    assert reason is not None and reason.startswith(f"{manifest_path}:4: not valid YAML")
    assert "not valid YAML" in capsys.readouterr().err
