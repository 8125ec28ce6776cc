"""The manifest, /etc/hoshikage/models.yaml: parsed once into frozen dataclasses.

Every error names the file, the line and what is wrong; a missing model file is only a warning
(the disk may be mounted later), so a typo never takes the other models down.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.rank import Weights
from hoshikage_sd.yamlnodes import NodeReader

DEFAULT_PATH = Path("/etc/hoshikage/models.yaml")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")


BACKENDS = ("llama-server", "command")
# Placeholders a `command:` backend's argv may use.
COMMAND_FIELDS = ("name", "path", "socket")


@dataclass(frozen=True)
class Model:
    name: str
    path: Path
    aliases: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    ttl: float = 3600.0
    args: tuple[str, ...] = ()
    pinned: bool = False
    backend: str = "llama-server"
    command: tuple[str, ...] = ()  # argv template of the `command` backend
    health: str = "/health"

    @property
    def server_args(self) -> tuple[str, ...]:
        """The extra arguments llama-server really gets. Its prompt cache (--cache-ram,
        8 GiB by default) grows per request outside any estimate, so it is off unless the
        manifest asks for it; admission then counts what was asked."""
        if self.backend != "llama-server" or any(
                a.split("=")[0] in ("-cram", "--cache-ram") for a in self.args):
            return self.args
        return (*self.args, "--cache-ram", "0")


@dataclass(frozen=True)
class Cache:
    """The SSD cache tier: where copies of slow-tier models go, and its limits."""

    dir: Path
    max_size: int | None = None
    min_free: int = 0
    expire_after: float = 7 * 86400.0
    min_rank: float = 1.0


class AmbiguousModel(HoshikageError):
    def __init__(self, name: str, candidates: list[str]) -> None:
        super().__init__(f"model '{name}' is ambiguous: it matches {', '.join(candidates)}",
                         hint="name one of them exactly", code=2)
        self.candidates = candidates


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
    sources: tuple[Path, ...] = ()
    state_dir: Path = Path("/var/lib/hoshikage")
    strict_names: bool = False
    memory_budget: int | None = None
    safety_margin: float = 1.2
    max_loaded_models: int | None = None
    evict_floor: int = 0
    admission_wait: float = 60.0
    pressure_warn: float = 0.7
    pressure_critical: float = 0.9
    min_reload_seconds: float = 30.0
    cache: Cache | None = None
    weights: Weights = field(default_factory=Weights)
    models: Mapping[str, Model] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def resolve(self, name: str | None,
                rank: Callable[[str], float] | None = None) -> Model | None:
        """A request's model name: exact name, alias, tag, then a unique partial match.

        Several partial matches: the highest-ranked wins, or AmbiguousModel in strict mode.
        None (or "") means the default model: default_model, or the only model there is.
        """
        if name is None or name == "":
            if self.default_model:
                return self.models[self.default_model]
            return next(iter(self.models.values())) if len(self.models) == 1 else None
        if name in self.models:
            return self.models[name]
        for field_name in ("aliases", "tags"):
            for model in self.models.values():
                if name in getattr(model, field_name):
                    return model
        needle = name.lower()
        candidates = [m for m in self.models.values()
                      if any(needle in n.lower() for n in (m.name, *m.aliases))]
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            return None
        if self.strict_names:
            raise AmbiguousModel(name, sorted(m.name for m in candidates))
        by = rank or _no_rank
        return max(candidates, key=lambda m: (by(m.name), m.name))

    def socket_path(self, name: str) -> Path:
        return self.runtime_dir / f"{name}.sock"

    def staged_path(self, name: str) -> Path:
        return self.ramdisk / f"{name}.gguf"

    def server_argv(self, model: Model, staged: Path) -> list[str]:
        """The command line that serves `model` from its staged copy on its unix socket."""
        socket = str(self.socket_path(model.name))
        if model.backend == "command":
            fields = {"name": model.name, "path": str(staged), "socket": socket}
            return [arg.format_map(fields) for arg in model.command] + list(model.args)
        return [str(self.llama_server), "-m", str(staged), "--host", socket,
                "--alias", model.name, *model.server_args]


def _no_rank(_name: str) -> float:
    return 0.0


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


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)


def parse_size(value: object) -> int:
    """'20G', '512M', '1.5GiB', '4096' (bytes); binary multiples either way."""
    if isinstance(value, bool):
        raise ValueError("a size, not a boolean")
    if isinstance(value, int) and value >= 0:
        return value
    match = _SIZE_RE.match(str(value)) if isinstance(value, str | float) else None
    if not match:
        raise ValueError(f"{value!r} is not a size (use e.g. 512M, 20G, 1.5GiB)")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * 1024**power)


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


TOP_KEYS = ("ramdisk", "runtime_dir", "llama_server", "state_dir", "idle_ttl",
            "router_idle_exit", "start_timeout", "admission_wait", "default_model", "sources",
            "strict_names", "memory_budget", "safety_margin", "max_loaded_models",
            "evict_floor", "pressure_warn", "pressure_critical", "min_reload_seconds", "cache",
            "rank", "models")
CACHE_KEYS = ("dir", "max_size", "min_free", "expire_after", "min_rank")
MODEL_KEYS = ("path", "aliases", "tags", "ttl", "args", "pinned", "backend", "command",
              "health")


def model_name_for(path: Path) -> str | None:
    """The model name a scanned file gets: its stem, with characters we refuse made '-'."""
    name = re.sub(r"[^A-Za-z0-9._:-]+", "-", path.stem).strip("-._:")[:100]
    return name if NAME_RE.match(name) else None


def scan_sources(sources: tuple[Path, ...]) -> dict[str, Path]:
    """*.gguf files in the source directories, earlier directories first."""
    found: dict[str, Path] = {}
    for directory in sources:
        try:
            entries = sorted(directory.glob("*.gguf"))
        except OSError:
            continue
        for path in entries:
            name = model_name_for(path)
            if name and name not in found and path.is_file():
                found[name] = path
    return found


class _Parser(NodeReader):
    def __init__(self, path: Path) -> None:
        super().__init__(lambda line, message: ConfigError(path, line, message))
        self.path = path
        self.warnings: list[str] = []

    def duration(self, node: yaml.Node, what: str) -> float:
        return self.convert(node, what, parse_duration)

    def size(self, node: yaml.Node, what: str) -> int:
        return self.convert(node, what, parse_size)

    def name(self, node: yaml.Node, what: str) -> str:
        value = str(node.value) if isinstance(node, yaml.ScalarNode) else ""
        if not NAME_RE.match(value):
            raise self.fail(node, f"{what} '{value}' is not a valid name "
                                  "(letters, digits, '.', '_', ':', '-'; at most 100)")
        return value

    def cache(self, node: yaml.Node) -> Cache:
        items = self.mapping(node, "cache", CACHE_KEYS)
        if "dir" not in items:
            raise self.fail(node, "cache needs 'dir:', a directory on the SSD")
        kw: dict[str, Any] = {"dir": self.abspath(items["dir"][1], "cache: dir")}
        for key in ("max_size", "min_free"):
            if key in items:
                kw[key] = self.size(items[key][1], f"cache: {key}")
        if "expire_after" in items:
            kw["expire_after"] = self.duration(items["expire_after"][1], "cache: expire_after")
        if "min_rank" in items:
            kw["min_rank"] = self.number(items["min_rank"][1], "cache: min_rank", -1e9, 1e9)
        return Cache(**kw)

    def config(self, node: yaml.Node | None) -> Config:
        top = self.mapping(node, "the manifest", TOP_KEYS)
        kw: dict[str, Any] = {}
        for key in ("ramdisk", "runtime_dir", "llama_server", "state_dir"):
            if key in top:
                kw[key] = self.abspath(top[key][1], key)
        if "cache" in top:
            kw["cache"] = self.cache(top["cache"][1])
        if "rank" in top:
            kw["weights"] = self.weights(top["rank"][1])
        for key in ("idle_ttl", "router_idle_exit", "start_timeout", "admission_wait",
                    "min_reload_seconds"):
            if key in top:
                kw[key] = self.duration(top[key][1], key)
        for key in ("memory_budget", "evict_floor"):
            if key in top:
                kw[key] = self.size(top[key][1], key)
        if "safety_margin" in top:
            kw["safety_margin"] = self.number(top["safety_margin"][1], "safety_margin", 1, 10)
        for key in ("pressure_warn", "pressure_critical"):
            if key in top:
                kw[key] = self.number(top[key][1], key, 0.001, 1)
        if "max_loaded_models" in top:
            kw["max_loaded_models"] = int(self.number(top["max_loaded_models"][1],
                                                      "max_loaded_models", 1, 1000))
        if "strict_names" in top:
            kw["strict_names"] = self.boolean(top["strict_names"][1], "strict_names")
        if "sources" in top:
            kw["sources"] = tuple(self.abspath(n, "sources: entry")
                                  for n in self.seq(top["sources"][1], "sources"))
        if "models" not in top and "sources" not in top:
            raise self.fail(node, "the manifest has neither 'models:' nor 'sources:'")
        idle_ttl = kw.get("idle_ttl", Config.idle_ttl)
        found = scan_sources(kw.get("sources", ()))
        models: dict[str, Model] = {}
        owner: dict[str, str] = {}
        tag_owner: dict[str, str] = {}
        explicit = self.mapping(top["models"][1], "models") if "models" in top else {}
        for name, (knode, vnode) in explicit.items():
            model, alias_nodes, tag_nodes = self.model(self.name(knode, "model name"), knode,
                                                       vnode, idle_ttl, found)
            if name in owner:
                raise self.fail(knode, f"model name '{name}' is already an alias of "
                                       f"'{owner[name]}'")
            for alias, anode in zip(model.aliases, alias_nodes, strict=True):
                if alias in models or alias in owner or alias == name:
                    raise self.fail(anode, f"alias '{alias}' of '{name}' is already taken "
                                           f"by '{owner.get(alias, alias)}'")
                owner[alias] = name
            for tag, tnode in zip(model.tags, tag_nodes, strict=True):
                if tag in tag_owner:
                    raise self.fail(tnode, f"tag '{tag}' names one model at a time; it is "
                                           f"already on '{tag_owner[tag]}'")
                tag_owner[tag] = name
            models[name] = model
        for name, path in found.items():  # scanned files; explicit entries win
            if name not in models and name not in owner:
                models[name] = Model(name=name, path=path, ttl=idle_ttl)
        if "default_model" in top:
            default = self.string(top["default_model"][1], "default_model")
            if default not in models:
                raise self.fail(top["default_model"][1],
                                f"default_model '{default}' is not one of the models")
            kw["default_model"] = default
        if kw.get("pressure_warn", 0.7) > kw.get("pressure_critical", 0.9):
            raise self.fail(top.get("pressure_warn", (None, node))[1],
                            "pressure_warn must not be above pressure_critical")
        return Config(source=self.path, models=models, warnings=tuple(self.warnings), **kw)

    def model(self, name: str, key: yaml.Node, node: yaml.Node, idle_ttl: float,
              found: Mapping[str, Path]) -> tuple[Model, list[yaml.Node], list[yaml.Node]]:
        items = self.mapping(node, f"model '{name}'", MODEL_KEYS)
        if "path" in items:
            path = self.abspath(items["path"][1], f"model '{name}': path")
            if not path.is_file():
                self.warnings.append(f"{self.path}:{items['path'][1].start_mark.line + 1}: "
                                     f"model '{name}': {path} does not exist (yet)")
        elif name in found:
            path = found[name]
        else:
            raise self.fail(key, f"model '{name}' has no 'path:' and no {name}.gguf is in "
                                  "the sources: directories")
        alias_nodes = (self.seq(items["aliases"][1], f"model '{name}': aliases")
                       if "aliases" in items else [])
        tag_nodes = self.seq(items["tags"][1], f"model '{name}': tags") if "tags" in items \
            else []
        kw: dict[str, Any] = {
            "aliases": tuple(self.name(a, f"model '{name}': alias") for a in alias_nodes),
            "tags": tuple(self.name(t, f"model '{name}': tag") for t in tag_nodes),
            "ttl": self.duration(items["ttl"][1], f"model '{name}': ttl") if "ttl" in items
            else idle_ttl,
        }
        if "args" in items:
            kw["args"] = self.strings(items["args"][1], f"model '{name}': args")
        if "pinned" in items:
            kw["pinned"] = self.boolean(items["pinned"][1], f"model '{name}': pinned")
        if "health" in items:
            kw["health"] = self.string(items["health"][1], f"model '{name}': health")
            if not kw["health"].startswith("/"):
                raise self.fail(items["health"][1], f"model '{name}': health must be a path "
                                                    "such as /health")
        if "backend" in items:
            kw["backend"] = self.string(items["backend"][1], f"model '{name}': backend")
            if kw["backend"] not in BACKENDS:
                raise self.fail(items["backend"][1], f"model '{name}': backend must be one of "
                                                     f"{', '.join(BACKENDS)}")
        if kw.get("backend") == "command":
            if "command" not in items:
                raise self.fail(key, f"model '{name}': backend 'command' needs 'command:', "
                                      "an argv list such as [/usr/bin/server, --model, "
                                      "'{path}', --uds, '{socket}']")
            kw["command"] = self.strings(items["command"][1], f"model '{name}': command")
            for arg, anode in zip(kw["command"], items["command"][1].value, strict=True):
                try:
                    arg.format_map({f: "" for f in COMMAND_FIELDS})
                except (KeyError, ValueError, IndexError) as exc:
                    raise self.fail(anode, f"model '{name}': command: '{arg}' has an unknown "
                                           f"placeholder ({exc}); known: "
                                           + ", ".join("{" + f + "}" for f in COMMAND_FIELDS)
                                    ) from None
        elif "command" in items:
            raise self.fail(items["command"][0], f"model '{name}': 'command:' needs "
                                                 "'backend: command'")
        return Model(name=name, path=path, **kw), alias_nodes, tag_nodes
