"""hoshikage_sd.config: the manifest, its durations and its error messages."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from hoshikage_sd import manifest as config
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import Config, ConfigError, Model, parse_duration
from hoshikage_sd.resolve import resolve
from hoshikage_sd.staging import Store


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    """A model file that exists, so a manifest naming it loads without warnings."""
    path = tmp_path / "models" / "tiny.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def line_of(path: Path, needle: str) -> int:
    """1-based number of the first line of the file that contains needle."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} is not in {path}")


def load_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config.load(path)
    return info.value


def assert_error_at(path: Path, needle: str, *words: str) -> ConfigError:
    """Loading fails with a message that starts with FILE:LINE (LINE holds needle)."""
    err = load_error(path)
    line = line_of(path, needle)
    assert err.message.startswith(f"{path}:{line}: "), err.message
    assert err.line == line
    for word in words:
        assert word in err.message, err.message
    assert err.code == 2
    return err


# -- a valid manifest ----------------------------------------------------------------------

def test_valid_manifest_parses_into_dataclasses(tmp_path: Path, gguf: Path) -> None:
    path = write(tmp_path, f"""
        ramdisk: /mnt/hk
        runtime_dir: /run/hk
        llama_server: /opt/llama/bin/llama-server
        idle_ttl: 30m
        router_idle_exit: 90s
        start_timeout: 1h
        default_model: big
        models:
          tiny:
            path: {gguf}
            ttl: 5m
            aliases: [small, "tiny:latest"]
            args: [--ctx-size, 4096, --temp, "0.7", -fa]
          big:
            path: {gguf}
    """)
    cfg = config.load(path)
    assert cfg.source == path
    assert cfg.ramdisk == Path("/mnt/hk")
    assert cfg.runtime_dir == Path("/run/hk")
    assert cfg.llama_server == Path("/opt/llama/bin/llama-server")
    assert cfg.idle_ttl == 1800.0
    assert cfg.router_idle_exit == 90.0
    assert cfg.start_timeout == 3600.0
    assert cfg.default_model == "big"
    assert cfg.warnings == ()
    assert list(cfg.models) == ["tiny", "big"]
    assert cfg.models["tiny"] == Model(
        name="tiny", path=gguf, aliases=("small", "tiny:latest"), ttl=300.0,
        args=("--ctx-size", "4096", "--temp", "0.7", "-fa"))
    # no ttl of its own: the manifest's idle_ttl, not the built-in hour
    assert cfg.models["big"] == Model(name="big", path=gguf, ttl=1800.0)
    assert all(isinstance(a, str) for a in cfg.models["tiny"].args)
    assert cfg.socket_path("tiny") == Path("/run/hk/tiny.sock")
    assert Store(cfg.ramdisk).staged("tiny") == Path("/mnt/hk/tiny.gguf")


def test_idle_ttl_is_inherited_even_when_written_after_models(tmp_path: Path,
                                                             gguf: Path) -> None:
    path = write(tmp_path, f"""
        models:
          tiny:
            path: {gguf}
        idle_ttl: 2h
    """)
    assert config.load(path).models["tiny"].ttl == 7200.0


def test_defaults_without_optional_keys(tmp_path: Path, gguf: Path) -> None:
    cfg = config.load(write(tmp_path, f"""
        models:
          tiny:
            path: {gguf}
    """))
    assert cfg.ramdisk == Path("/mnt/hoshikage")
    assert cfg.runtime_dir == Path("/run/hoshikage")
    assert cfg.idle_ttl == 3600.0
    assert cfg.default_model is None
    assert cfg.models["tiny"] == Model(name="tiny", path=gguf, aliases=(), ttl=3600.0, args=())


def test_config_is_frozen(tmp_path: Path, gguf: Path) -> None:
    cfg = config.load(write(tmp_path, f"models:\n  tiny:\n    path: {gguf}\n"))
    with pytest.raises(AttributeError):
        cfg.idle_ttl = 1.0  # type: ignore[misc]


# -- resolve() -----------------------------------------------------------------------------

def two_models(default: str | None = None) -> Config:
    models = {
        "tiny": Model("tiny", Path("/m/tiny.gguf"), aliases=("small", "t")),
        "big": Model("big", Path("/m/big.gguf"), aliases=("large",)),
    }
    return Config(source=Path("/m.yaml"), models=models, default_model=default)


def test_resolve_exact_name_and_alias() -> None:
    cfg = two_models()
    assert resolve(cfg, "tiny") is cfg.models["tiny"]
    assert resolve(cfg, "big") is cfg.models["big"]
    assert resolve(cfg, "small") is cfg.models["tiny"]
    assert resolve(cfg, "t") is cfg.models["tiny"]
    assert resolve(cfg, "large") is cfg.models["big"]


def test_resolve_unknown_is_none() -> None:
    cfg = two_models(default="big")
    assert resolve(cfg, "huge") is None
    assert resolve(cfg, "tiny ") is None
    assert resolve(cfg, "bigger") is None  # partial means the request's name is part of one


def test_resolve_no_name_uses_default_model() -> None:
    cfg = two_models(default="big")
    assert resolve(cfg, None) is cfg.models["big"]
    assert resolve(cfg, "") is cfg.models["big"]


def test_resolve_no_name_without_default_is_none_when_several_models() -> None:
    cfg = two_models()
    assert resolve(cfg, None) is None
    assert resolve(cfg, "") is None


def test_resolve_sole_model_is_the_default() -> None:
    only = Model("only", Path("/m/only.gguf"))
    cfg = Config(source=Path("/m.yaml"), models={"only": only})
    assert resolve(cfg, None) is only
    assert resolve(cfg, "") is only
    assert resolve(cfg, "other") is None


def test_resolve_with_no_models() -> None:
    assert resolve(Config(source=Path("/m.yaml")), None) is None


# -- parse_duration ------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30.0),
    ("5m", 300.0),
    ("1h", 3600.0),
    ("1h30m", 5400.0),
    ("1h 30m", 5400.0),
    ("  2m  ", 120.0),
    ("500ms", 0.5),
    ("1.5h", 5400.0),
    ("2d", 172800.0),
    ("0s", 0.0),
    (0, 0.0),
    (45, 45.0),
    (2.5, 2.5),
])
def test_parse_duration_accepts(text: object, seconds: float) -> None:
    value = parse_duration(text)
    assert isinstance(value, float)
    assert value == seconds


@pytest.mark.parametrize("value", [
    "soon", "", "   ", "1h junk", "junk 1h", "1x", "h", "-5s", "-1h", "1h-30m", -1, -0.5,
    True, False, None, [1], {"h": 1},
])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_parse_duration_rejects_nan() -> None:
    with pytest.raises(ValueError):
        parse_duration(math.nan)


# -- every error names the file and the line ----------------------------------------------

def test_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, """
        models:
          tiny:
            path: /m/tiny.gguf
            aliases: [a, b
          big:
    """)
    err = load_error(path)
    # the parser notices at the next key, the line after the unclosed list
    assert err.message.startswith(f"{path}:5: not valid YAML"), err.message
    assert err.line == 5
    assert "hoshikage check" in str(err)  # the hint


def test_invalid_yaml_tab_indent_line(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  tiny:\n\tpath: /m/tiny.gguf\n")
    err = load_error(path)
    assert err.message.startswith(f"{path}:3: not valid YAML"), err.message


def test_unknown_top_level_key(tmp_path: Path, gguf: Path) -> None:
    path = write(tmp_path, f"""
        idle_ttl: 1h
        idel_ttl: 2h
        models:
          tiny:
            path: {gguf}
    """)
    assert_error_at(path, "idel_ttl", "unknown key 'idel_ttl'", "idle_ttl")


def test_unknown_model_key(tmp_path: Path, gguf: Path) -> None:
    path = write(tmp_path, f"""
        models:
          tiny:
            path: {gguf}
            alias: [small]
    """)
    assert_error_at(path, "alias:", "unknown key 'alias'", "model 'tiny'")


def test_relative_model_path(tmp_path: Path) -> None:
    path = write(tmp_path, """
        models:
          tiny:
            path: models/tiny.gguf
    """)
    assert_error_at(path, "models/tiny.gguf", "absolute path", "models/tiny.gguf")


def test_relative_ramdisk(tmp_path: Path, gguf: Path) -> None:
    path = write(tmp_path, f"""
        ramdisk: mnt/hoshikage
        models:
          tiny:
            path: {gguf}
    """)
    assert_error_at(path, "ramdisk:", "ramdisk", "absolute path")


def test_model_without_path(tmp_path: Path) -> None:
    path = write(tmp_path, """
        models:
          tiny:
            ttl: 5m
    """)
    assert_error_at(path, "  tiny:", "model 'tiny'", "no 'path:'")


@pytest.mark.parametrize("ttl", ["soon", "-5m", "true", "1h junk", "[1h]"])
def test_bad_model_ttl(tmp_path: Path, gguf: Path, ttl: str) -> None:
    path = write(tmp_path, f"""
        models:
          tiny:
            path: {gguf}
            ttl: {ttl}
    """)
    assert_error_at(path, "ttl:", "model 'tiny': ttl")


def test_bad_idle_ttl(tmp_path: Path, gguf: Path) -> None:
    path = write(tmp_path, f"""
        models:
          tiny:
            path: {gguf}
        idle_ttl: forever
    """)
    assert_error_at(path, "idle_ttl:", "idle_ttl", "'forever' is not a duration")


def test_duplicate_alias_between_models(tmp_path: Path, gguf: Path) -> None:
    path = write(tmp_path, f"""
        models:
          tiny:
            path: {gguf}
            aliases: [small]
          big:
            path: {gguf}
            aliases: [large, small]
    """)
    assert_error_at(path, "[large, small]", "alias 'small'", "'big'", "'tiny'")


def test_alias_equal_to_an_earlier_model_name(tmp_path: Path, gguf: Path) -> None:
    path = write(tmp_path, f"""
        models:
          tiny:
            path: {gguf}
          big:
            path: {gguf}
            aliases: [tiny]
    """)
    assert_error_at(path, "aliases: [tiny]", "alias 'tiny'", "already taken")


def test_model_name_equal_to_an_earlier_alias(tmp_path: Path, gguf: Path) -> None:
    path = write(tmp_path, f"""
        models:
          tiny:
            path: {gguf}
            aliases: [small]
          small:
            path: {gguf}
    """)
    assert_error_at(path, "  small:", "model name 'small'", "alias of 'tiny'")


def test_alias_equal_to_own_name(tmp_path: Path, gguf: Path) -> None:
    path = write(tmp_path, f"""
        models:
          tiny:
            path: {gguf}
            aliases: [tiny]
    """)
    assert_error_at(path, "aliases:", "alias 'tiny'")


def test_same_model_twice(tmp_path: Path, gguf: Path) -> None:
    path = write(tmp_path, f"""
        models:
          tiny:
            path: {gguf}
          big:
            path: {gguf}
          tiny:
            path: {gguf}
    """)
    err = load_error(path)
    assert err.message.startswith(f"{path}:6: "), err.message
    assert "'tiny' appears twice" in err.message


@pytest.mark.parametrize("name", ["../etc", "a b", "-x", ".hidden", "a/b", "x" * 101, "ünï"])
def test_invalid_model_name(tmp_path: Path, gguf: Path, name: str) -> None:
    path = write(tmp_path, f"""
        models:
          tiny:
            path: {gguf}
          "{name}":
            path: {gguf}
    """)
    assert_error_at(path, f'"{name}":', "not a valid name")


def test_invalid_alias_name(tmp_path: Path, gguf: Path) -> None:
    path = write(tmp_path, f"""
        models:
          tiny:
            path: {gguf}
            aliases:
              - ok
              - "../../etc/passwd"
    """)
    assert_error_at(path, "passwd", "alias '../../etc/passwd'", "not a valid name")


def test_longest_valid_name(tmp_path: Path, gguf: Path) -> None:
    name = "a" + "b" * 99
    cfg = config.load(write(tmp_path, f"models:\n  {name}:\n    path: {gguf}\n"))
    assert list(cfg.models) == [name]


def test_default_model_not_a_model(tmp_path: Path, gguf: Path) -> None:
    path = write(tmp_path, f"""
        models:
          tiny:
            path: {gguf}
            aliases: [small]
        default_model: small
    """)
    assert_error_at(path, "default_model:", "default_model 'small'", "not one of the models")


@pytest.mark.parametrize("args", ["--ctx-size 4096", "{a: 1}", "[--ctx-size, [4096]]",
                                  "[--x, {a: 1}]"])
def test_args_must_be_a_list_of_strings(tmp_path: Path, gguf: Path, args: str) -> None:
    path = write(tmp_path, f"""
        models:
          tiny:
            path: {gguf}
            args: {args}
    """)
    assert_error_at(path, "args:", "model 'tiny': args")


def test_aliases_must_be_a_list(tmp_path: Path, gguf: Path) -> None:
    path = write(tmp_path, f"""
        models:
          tiny:
            path: {gguf}
            aliases: small
    """)
    assert_error_at(path, "aliases:", "aliases must be a list")


def test_no_models_section(tmp_path: Path) -> None:
    path = write(tmp_path, """
        # nothing here yet
        idle_ttl: 1h
    """)
    err = load_error(path)
    assert err.message.startswith(f"{path}:2: "), err.message
    assert "neither 'models:' nor 'sources:'" in err.message


def test_manifest_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, """
        - tiny
        - big
    """)
    err = load_error(path)
    assert err.message.startswith(f"{path}:1: "), err.message
    assert "must be a mapping" in err.message


def test_model_entry_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, """
        models:
          tiny: /m/tiny.gguf
    """)
    assert_error_at(path, "tiny: /m/tiny.gguf", "model 'tiny'", "mapping")


def test_numeric_looking_names_are_kept_as_written(tmp_path: Path, gguf: Path) -> None:
    cfg = config.load(write(tmp_path, f"""
        models:
          1.10:
            path: {gguf}
            aliases: [3.10, 010]
    """))
    model = cfg.models["1.10"]
    assert model.name == "1.10"
    assert model.aliases == ("3.10", "010")
    assert resolve(cfg, "3.10") is model


def test_numeric_args_are_kept_as_written(tmp_path: Path, gguf: Path) -> None:
    cfg = config.load(write(tmp_path, f"""
        models:
          tiny:
            path: {gguf}
            args: [--ctx-size, 010, --x, 1:30, --temp, 0.70]
    """))
    assert cfg.models["tiny"].args == ("--ctx-size", "010", "--x", "1:30", "--temp", "0.70")


# -- warnings, load(), config_path() -------------------------------------------------------

def test_missing_model_file_is_a_warning(tmp_path: Path, gguf: Path) -> None:
    missing = tmp_path / "not-mounted" / "big.gguf"
    path = write(tmp_path, f"""
        models:
          tiny:
            path: {gguf}
          big:
            path: {missing}
    """)
    cfg = config.load(path)
    assert set(cfg.models) == {"tiny", "big"}
    assert cfg.models["big"].path == missing
    assert len(cfg.warnings) == 1
    warning = cfg.warnings[0]
    assert warning.startswith(f"{path}:{line_of(path, str(missing))}: "), warning
    assert "model 'big'" in warning
    assert str(missing) in warning


def test_a_directory_is_not_a_model_file(tmp_path: Path) -> None:
    path = write(tmp_path, f"""
        models:
          tiny:
            path: {tmp_path}
    """)
    assert len(config.load(path).warnings) == 1


def test_load_missing_manifest(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(HoshikageError) as info:
        config.load(missing)
    err = info.value
    assert str(missing) in err.message
    assert err.hint is not None and "HOSHIKAGE_CONFIG" in err.hint
    assert "HOSHIKAGE_CONFIG" in str(err)
    assert err.code != 0


def test_load_unreadable_manifest_is_an_operator_error(tmp_path: Path) -> None:
    with pytest.raises(HoshikageError) as info:
        config.load(tmp_path)  # a directory: IsADirectoryError, not a traceback
    assert str(tmp_path) in info.value.message


def test_config_path_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOSHIKAGE_CONFIG", str(tmp_path / "m.yaml"))
    assert config.config_path() == tmp_path / "m.yaml"
    monkeypatch.setenv("HOSHIKAGE_CONFIG", "")
    assert config.config_path() == Path("/etc/hoshikage/models.yaml")
    monkeypatch.delenv("HOSHIKAGE_CONFIG")
    assert config.config_path() == Path("/etc/hoshikage/models.yaml")


def test_load_without_argument_reads_hoshikage_config(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path, gguf: Path) -> None:
    path = write(tmp_path, f"models:\n  fromenv:\n    path: {gguf}\n")
    monkeypatch.setenv("HOSHIKAGE_CONFIG", str(path))
    cfg = config.load()
    assert cfg.source == path
    assert list(cfg.models) == ["fromenv"]
