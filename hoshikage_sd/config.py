"""The manifest, /etc/hoshikage/models.yaml: parsed once into frozen dataclasses.

Every error names the file, the line and what is wrong; a missing model file is only a warning
(the disk may be mounted later), so a typo never takes the other models down.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hoshikage_sd.errors import HoshikageError

DEFAULT_PATH = Path("/etc/hoshikage/models.yaml")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")


@dataclass(frozen=True)
class Model:
    name: str
    path: Path
    aliases: tuple[str, ...] = ()
    ttl: float = 3600.0
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    source: Path
    ramdisk: Path = Path("/mnt/hoshikage")
    runtime_dir: Path = Path("/run/hoshikage")
    llama_server: Path = Path("/usr/bin/llama-server")
    idle_ttl: float = 3600.0
    router_idle_exit: float = 300.0
    start_timeout: float = 600.0
    default_model: str | None = None
    models: Mapping[str, Model] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def resolve(self, name: str | None) -> Model | None:
        """A request's model name: exact name, then alias; None means 'use the default'."""
        if name is None or name == "":
            if self.default_model:
                return self.models[self.default_model]
            return next(iter(self.models.values())) if len(self.models) == 1 else None
        if name in self.models:
            return self.models[name]
        for model in self.models.values():
            if name in model.aliases:
                return model
        return None

    def socket_path(self, name: str) -> Path:
        return self.runtime_dir / f"{name}.sock"

    def staged_path(self, name: str) -> Path:
        return self.ramdisk / f"{name}.gguf"


class ConfigError(HoshikageError):
    def __init__(self, path: Path, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {message}",
                         hint="run 'hoshikage check' after editing the manifest", code=2)
        self.line = line


def parse_duration(value: object) -> float:
    """'1h', '30s', '1h30m', '500ms' or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration, not a boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{value} is not a duration (a finite number of seconds >= 0)")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        pos, total = 0, 0.0
        for match in _DURATION_RE.finditer(text):
            if text[pos : match.start()].strip():
                break
            total += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        else:
            if pos and not text[pos:].strip():
                return total
    raise ValueError(f"{value!r} is not a duration (use e.g. 30s, 5m, 1h, 1h30m)")


def config_path() -> Path:
    return Path(os.environ.get("HOSHIKAGE_CONFIG") or DEFAULT_PATH)


def load(path: Path | None = None) -> Config:
    path = path or config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise HoshikageError(f"no manifest at {path}",
                             hint="create it (see README) or set HOSHIKAGE_CONFIG") from None
    except OSError as exc:
        raise HoshikageError(f"cannot read {path}: {exc.strerror}") from None
    return parse(text, path)


def parse(text: str, path: Path) -> Config:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError(path, line, f"not valid YAML: {exc.problem}") from None
    return _Parser(path).config(node)


class _Parser:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.warnings: list[str] = []

    def fail(self, node: yaml.Node | None, message: str) -> ConfigError:
        return ConfigError(self.path, node.start_mark.line + 1 if node else None, message)

    def mapping(self, node: yaml.Node | None, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping of keys to values")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                raise self.fail(key, f"{what}: keys must be plain names")
            if key.value in out:
                raise self.fail(key, f"{what}: '{key.value}' appears twice")
            out[key.value] = (key, value)
        return out

    def scalar(self, node: yaml.Node) -> Any:
        return yaml.SafeLoader(b"").construct_object(node, deep=True)

    def check_keys(self, items: Mapping[str, tuple[yaml.Node, yaml.Node]],
                   allowed: tuple[str, ...], what: str) -> None:
        for key, (knode, _) in items.items():
            if key not in allowed:
                raise self.fail(knode, f"unknown key '{key}' in {what} "
                                       f"(known: {', '.join(allowed)})")

    def string(self, node: yaml.Node, what: str) -> str:
        value = self.scalar(node)
        if not isinstance(value, str) or not value:
            raise self.fail(node, f"{what} must be a non-empty string")
        return value

    def abspath(self, node: yaml.Node, what: str) -> Path:
        value = Path(self.string(node, what))
        if not value.is_absolute():
            raise self.fail(node, f"{what} must be an absolute path, not '{value}'")
        return value

    def duration(self, node: yaml.Node, what: str) -> float:
        try:
            return parse_duration(self.scalar(node))
        except ValueError as exc:
            raise self.fail(node, f"{what}: {exc}") from None

    def strings(self, node: yaml.Node, what: str) -> tuple[str, ...]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list")
        for item in node.value:
            if not isinstance(item, yaml.ScalarNode):
                raise self.fail(item, f"{what}: each entry must be a string")
        # The text as written: YAML 1.1 would turn 010 into 8 and 1:30 into 90.
        return tuple(str(item.value) for item in node.value)

    def name(self, node: yaml.Node, what: str) -> str:
        value = str(node.value) if isinstance(node, yaml.ScalarNode) else ""
        if not NAME_RE.match(value):
            raise self.fail(node, f"{what} '{value}' is not a valid name "
                                  "(letters, digits, '.', '_', ':', '-'; at most 100)")
        return value

    def config(self, node: yaml.Node | None) -> Config:
        top = self.mapping(node, "the manifest")
        self.check_keys(top, ("ramdisk", "runtime_dir", "llama_server", "idle_ttl",
                              "router_idle_exit", "start_timeout", "default_model", "models"),
                        "the manifest")
        kw: dict[str, Any] = {}
        for key in ("ramdisk", "runtime_dir", "llama_server"):
            if key in top:
                kw[key] = self.abspath(top[key][1], key)
        for key in ("idle_ttl", "router_idle_exit", "start_timeout"):
            if key in top:
                kw[key] = self.duration(top[key][1], key)
        if "models" not in top:
            raise self.fail(node, "the manifest has no 'models:' section")
        idle_ttl = kw.get("idle_ttl", Config.idle_ttl)
        models: dict[str, Model] = {}
        owner: dict[str, str] = {}
        for name, (knode, vnode) in self.mapping(top["models"][1], "models").items():
            model, alias_nodes = self.model(self.name(knode, "model name"), vnode, idle_ttl)
            if name in owner:
                raise self.fail(knode, f"model name '{name}' is already an alias of "
                                       f"'{owner[name]}'")
            for alias, anode in zip(model.aliases, alias_nodes, strict=True):
                if alias in models or alias in owner or alias == name:
                    raise self.fail(anode, f"alias '{alias}' of '{name}' is already taken "
                                           f"by '{owner.get(alias, alias)}'")
                owner[alias] = name
            models[name] = model
        if "default_model" in top:
            default = self.string(top["default_model"][1], "default_model")
            if default not in models:
                raise self.fail(top["default_model"][1],
                                f"default_model '{default}' is not one of the models")
            kw["default_model"] = default
        return Config(source=self.path, models=models, warnings=tuple(self.warnings), **kw)

    def model(self, name: str, node: yaml.Node,
              idle_ttl: float) -> tuple[Model, list[yaml.Node]]:
        items = self.mapping(node, f"model '{name}'")
        self.check_keys(items, ("path", "aliases", "ttl", "args"), f"model '{name}'")
        if "path" not in items:
            raise self.fail(node, f"model '{name}' has no 'path:'")
        path = self.abspath(items["path"][1], f"model '{name}': path")
        if not path.is_file():
            self.warnings.append(f"{self.path}:{items['path'][1].start_mark.line + 1}: "
                                 f"model '{name}': {path} does not exist (yet)")
        alias_nodes = (self._seq(items["aliases"][1], f"model '{name}': aliases")
                       if "aliases" in items else [])
        aliases = tuple(self.name(a, f"model '{name}': alias") for a in alias_nodes)
        ttl = self.duration(items["ttl"][1], f"model '{name}': ttl") if "ttl" in items \
            else idle_ttl
        args = self.strings(items["args"][1], f"model '{name}': args") if "args" in items else ()
        return Model(name=name, path=path, aliases=aliases, ttl=ttl, args=args), alias_nodes

    def _seq(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list")
        return list(node.value)
