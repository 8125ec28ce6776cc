"""Names given from the CLI, laid over the manifest (hoshikage_sd.manifest.names)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Config, names
from hoshikage_sd.manifest.parse import parse
from hoshikage_sd.resolve import resolve


@pytest.fixture
def config(tmp_path: Path) -> Config:
    text = textwrap.dedent(f"""
        state_dir: {tmp_path / 'state'}
        models:
          qwen:
            path: /m/q.gguf
            aliases: [q]
            tags: [tool]
          gemma:
            path: /m/g.gguf
    """)
    (tmp_path / "models.yaml").write_text(text)
    return parse(text, tmp_path / "models.yaml")


def test_add_alias_and_move_a_tag(config: Config) -> None:
    assert names.add_alias(config, "gemma", "g") == "alias 'g' → gemma"
    assert names.set_tag(config, "tool", "gemma") == "tag 'tool' → gemma"
    effective = names.effective(config)
    assert resolve(effective, "g").name == "gemma"  # type: ignore[union-attr]
    assert resolve(effective, "tool").name == "gemma"  # type: ignore[union-attr]
    assert effective.models["qwen"].tags == ()  # the tag moved: one model at a time
    assert effective.models["qwen"].aliases == ("q",)
    data = json.loads(names.path(config).read_text())
    assert data["version"] == 1 and data["tags"] == {"tool": "gemma"}
    assert not list(names.path(config).parent.glob(".*tmp*"))  # written atomically


def test_remove_manifest_alias_and_cli_alias(config: Config) -> None:
    names.add_alias(config, "gemma", "g")
    names.remove_alias(names.effective(config), "g")
    names.remove_alias(names.effective(config), "q")
    effective = names.effective(config)
    assert effective.models["gemma"].aliases == ()
    assert effective.models["qwen"].aliases == ()
    names.add_alias(effective, "qwen", "q")  # giving it back undoes the removal
    assert names.effective(config).models["qwen"].aliases == ("q",)
    assert not skipped(config)
    # already its alias (the manifest's): nothing written, nothing for check to warn of
    assert names.add_alias(names.effective(config), "qwen", "q").endswith("(already)")
    assert not skipped(config)
    # a manifest alias taken away, then given to another model
    names.remove_alias(names.effective(config), "q")
    names.add_alias(names.effective(config), "gemma", "q")
    effective = names.effective(config)
    assert (effective.models["gemma"].aliases, effective.models["qwen"].aliases) == (("q",), ())
    assert not skipped(config)


def skipped(config: Config) -> list[str]:
    """names.json's entries that do not apply (check warns of each)."""
    return [w for w in names.effective(config).warnings if "names.json" in w]


@pytest.mark.parametrize(("model", "alias", "message"), [
    ("nope", "x", "no model named 'nope'"),
    ("gemma", "q", "'q' is already an alias \\('q'\\) of 'qwen'"),
    ("gemma", "qwen", "'qwen' is already the name of model 'qwen'"),
    ("gemma", "QWEN", "'QWEN' is already the name of model 'qwen'"),  # partial, any case
    ("gemma", "tool", "'tool' is already the tag 'tool' \\(on 'qwen'\\)"),
    ("gemma", "gemma", "'gemma' is already its name"),
    ("gemma", "../x", "is not a valid alias"),
])
def test_bad_aliases_are_refused(config: Config, model: str, alias: str, message: str) -> None:
    with pytest.raises(HoshikageError, match=message):
        names.add_alias(config, model, alias)
    assert not names.path(config).exists()  # nothing written


@pytest.mark.parametrize(("tag", "message"), [
    ("qwen", "'qwen' is already the name of model 'qwen'"),
    ("Q", "'Q' is already an alias \\('q'\\) of 'qwen'"),
])
def test_a_tag_that_would_never_apply_is_refused(config: Config, tag: str, message: str) -> None:
    """A name or an alias comes before a tag in a request's resolution."""
    with pytest.raises(HoshikageError, match=message):
        names.set_tag(config, tag, "gemma")
    assert not names.path(config).exists()


def test_pin_takes_a_name_as_requests_do(config: Config) -> None:
    """A part of one name (as `load` and requests take it); a part of several, refused."""
    assert names.set_pinned(config, "gem", True) == "gemma pinned"
    assert names.set_pinned(config, "tool", False) == "qwen unpinned"  # a tag
    assert names.effective(config).models["gemma"].pinned
    with pytest.raises(HoshikageError, match=r"no model named 'a\\nb'\n"):
        names.set_pinned(config, "a\nb", True)  # a name pasted with a newline: shown as one
    with pytest.raises(HoshikageError, match="'e' is a part of several names: qwen, gemma"):
        names.set_pinned(config, "e", True)


def test_clash_after_manifest_edit_is_a_warning(config: Config, tmp_path: Path) -> None:
    names.add_alias(config, "gemma", "g")
    edited = parse(textwrap.dedent(f"""
        state_dir: {tmp_path / 'state'}
        models:
          qwen:
            path: /m/q.gguf
            aliases: [g]
          gemma:
            path: /m/g.gguf
    """), tmp_path / "models.yaml")
    effective = names.effective(edited)
    assert resolve(effective, "g").name == "qwen"  # type: ignore[union-attr]  # manifest wins
    assert any("alias 'g' for 'gemma' skipped: name taken" in w for w in effective.warnings)


def test_corrupt_names_file_is_a_warning_not_a_crash(config: Config) -> None:
    names.path(config).parent.mkdir(parents=True)
    names.path(config).write_text("{not json")
    effective = names.effective(config)
    assert effective.models.keys() == config.models.keys()
    assert any("cannot read" in w for w in effective.warnings)
