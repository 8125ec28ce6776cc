"""/etc/hoshikage/models.yaml into a Config: table-driven, node by node.

Every error names the file, the line and what is wrong; a missing model file is only a warning
(the disk may be mounted later), so a typo never takes the other models down.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest.llamaargs import layered
from hoshikage_sd.manifest.model import (
    BACKENDS,
    COMMAND_FIELDS,
    NAME_RE,
    STAGE_MODES,
    Cache,
    Config,
    Model,
    Source,
    Weights,
    Worker,
    config_path,
    environment,
)
from hoshikage_sd.manifest.nodes import FieldReader, NodeReader
from hoshikage_sd.manifest.sources import Found, scan, shards_of
from hoshikage_sd.protocol import ESCAPED_NAME_MAX, valid_name

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _path(r: NodeReader, n: yaml.Node, what: str) -> Path:
    return r.abspath(n, what)


def _mmproj(r: NodeReader, n: yaml.Node, what: str) -> Path | None:
    """A projector's path, or `false`: none (not the one `sources:` found beside it)."""
    if isinstance(n, yaml.ScalarNode) and n.tag == "tag:yaml.org,2002:bool":
        if r.boolean(n, what):
            raise r.fail(n, f"{what} must be a projector's absolute path, or false for none")
        return None
    return r.abspath(n, what)


def _duration(r: NodeReader, n: yaml.Node, what: str) -> float:
    return r.duration(n, what)


def _size(r: NodeReader, n: yaml.Node, what: str) -> int:
    return r.size(n, what)


def _boolean(r: NodeReader, n: yaml.Node, what: str) -> bool:
    return r.boolean(n, what)


def _string(r: NodeReader, n: yaml.Node, what: str) -> str:
    return r.string(n, what)


def _strings(r: NodeReader, n: yaml.Node, what: str) -> tuple[str, ...]:
    return r.strings(n, what)


def _number(low: float, high: float) -> FieldReader:
    return lambda r, n, what: r.number(n, what, low, high)


def _integer(low: int, high: int) -> FieldReader:
    return lambda r, n, what: int(r.number(n, what, low, high))


def _env(r: NodeReader, n: yaml.Node, what: str) -> tuple[str, ...]:
    """An `env:` mapping of variable names to strings, kept as "KEY=VALUE" entries."""
    entries = []
    for key, (knode, vnode) in r.mapping(n, what).items():
        if not ENV_NAME_RE.match(key):
            raise r.fail(knode, f"{what}: '{key}' is not an environment variable's name")
        if not isinstance(vnode, yaml.ScalarNode):
            raise r.fail(vnode, f"{what}: {key} must be a string")
        value = str(vnode.value)  # as written: YAML 1.1 would make 0,1 a number
        if "\0" in value:
            raise r.fail(vnode, f"{what}: {key} must not contain a NUL character")
        entries.append(f"{key}={value}")
    return tuple(entries)


def _sources(r: NodeReader, n: yaml.Node, what: str) -> tuple[Source, ...]:
    """`sources:` entries: a directory, or {dir:, recursive:, args:, env:}."""
    entries = []
    for item in r.seq(n, what):
        if isinstance(item, yaml.MappingNode):
            items = r.mapping(item, f"{what} entry", tuple(SOURCE_FIELDS))
            if "dir" not in items:
                raise r.fail(item, f"{what}: an entry needs 'dir:', the directory to scan")
            entries.append(Source(**r.fields(items, SOURCE_FIELDS, f"{what}: ")))
        else:
            entries.append(Source(r.abspath(item, f"{what}: entry")))
    return tuple(entries)


def _weights(r: NodeReader, n: yaml.Node, what: str) -> Weights:
    return r.weights(n)


def _cache(r: NodeReader, n: yaml.Node, what: str) -> Cache:
    items = r.mapping(n, what, tuple(CACHE_FIELDS))
    if "dir" not in items:
        raise r.fail(n, "cache needs 'dir:', a directory on the SSD")
    return Cache(**r.fields(items, CACHE_FIELDS, "cache: "))


def _health(r: NodeReader, n: yaml.Node, what: str) -> str:
    value = r.string(n, what)
    if not value.startswith("/"):
        raise r.fail(n, f"{what} must be a path such as /health")
    return value


def _backend(r: NodeReader, n: yaml.Node, what: str) -> str:
    value = r.string(n, what)
    if value not in BACKENDS:
        raise r.fail(n, f"{what} must be one of {', '.join(BACKENDS)}")
    return value


def _command(r: NodeReader, n: yaml.Node, what: str) -> tuple[str, ...]:
    command = r.strings(n, what)
    for arg, anode in zip(command, n.value, strict=True):
        try:
            arg.format_map(dict.fromkeys(COMMAND_FIELDS, ""))
        except (KeyError, ValueError, IndexError) as exc:
            raise r.fail(anode, f"{what}: '{arg}' has an unknown placeholder ({exc}); known: "
                         + ", ".join("{" + f + "}" for f in COMMAND_FIELDS)) from None
    return command


def _stage(r: NodeReader, n: yaml.Node, what: str) -> str:
    value = r.string(n, what)
    if value not in STAGE_MODES:
        raise r.fail(n, f"{what} must be one of {', '.join(STAGE_MODES)}")
    return value


def _api_keys(r: NodeReader, n: yaml.Node, what: str) -> str:
    value = r.string(n, what)
    if value.startswith("credential:"):
        name = value.removeprefix("credential:")
        if not name or "/" in name or name in (".", ".."):
            raise r.fail(n, f"{what}: 'credential:NAME' needs a credential name (as in "
                            "LoadCredential=NAME:/path), without '/'")
        return value
    return str(r.abspath(n, what))


def _worker(r: NodeReader, name: str, n: yaml.Node) -> Worker:
    """A `workers:` entry: "HOST:PORT" (or HOST, port 50052), or {address:, memory:,
    devices:}."""
    what = f"worker '{name}'"
    memory = devices = None
    if isinstance(n, yaml.MappingNode):
        items = r.mapping(n, what, ("address", "memory", "devices"))
        if "address" not in items:
            raise r.fail(n, f"{what} needs 'address:', HOST:PORT of its hoshikage-rpc.socket")
        if "memory" in items:
            memory = r.size(items["memory"][1], f"{what}: memory")
        if "devices" in items:
            devices = _worker_devices(r, items["devices"][1], f"{what}: devices")
        n = items["address"][1]
    address = r.string(n, f"{what}: address")
    host, colon, port = address.rpartition(":") if ":" in address else (address, "", "")
    if not colon:
        return Worker(name, host, memory=memory, devices=devices)
    if not host or ":" in host or "[" in host or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise r.fail(n, f"{what}: '{address}' is not HOST:PORT with an IPv4 address or a "
                        "name (llama.cpp's --rpc takes no IPv6 literal)")
    return Worker(name, host, int(port), memory, devices)


def _worker_devices(r: NodeReader, n: yaml.Node, what: str) -> tuple[int, ...]:
    """A worker's `devices:`: indices in its ggml-rpc-server's device list, each once. Not
    names: llama.cpp's RPC protocol tells the head how many devices a worker has and their
    memory, never their names (the head's llama-server calls them RPC0, RPC1, ...)."""
    items = r.seq(n, what)
    if not items:
        raise r.fail(n, f"{what} names no device (leave it out for every one)")
    out = []
    for item in items:
        value = r.value(item)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise r.fail(item, f"{what}: each entry is a device's index in the worker's list "
                               "(0 for the first its ggml-rpc-server lists under 'Devices:'), "
                               f"not {item.value!r}")
        out.append(value)
    if len(set(out)) != len(out):
        raise r.fail(n, f"{what} names a device twice")
    return tuple(out)


def _workers(r: NodeReader, n: yaml.Node, what: str) -> dict[str, Worker]:
    workers = {}
    for name, (knode, vnode) in r.mapping(n, what).items():
        if not NAME_RE.match(name):
            raise r.fail(knode, f"{what}: '{name}' is not a valid name")
        workers[name] = _worker(r, name, vnode)
    return workers


#: key -> reader, for the keys that are read the same way wherever they are
CACHE_FIELDS: dict[str, FieldReader] = {
    "dir": _path, "max_size": _size, "min_free": _size, "expire_after": _duration,
    "min_rank": _number(-1e9, 1e9),
}
TOP_FIELDS: dict[str, FieldReader] = {
    "ramdisk": _path, "runtime_dir": _path, "llama_server": _path, "state_dir": _path,
    "idle_ttl": _duration, "router_idle_exit": _duration, "start_timeout": _duration,
    "admission_wait": _duration, "min_reload_seconds": _duration,
    "memory_budget": _size, "evict_floor": _size,
    "safety_margin": _number(1, 10), "pressure_warn": _number(0.001, 1),
    "pressure_critical": _number(0.001, 1), "max_loaded_models": _integer(1, 1000),
    "strict_names": _boolean, "sources": _sources,
    "args": _strings, "env": _env, "stage": _stage, "cache": _cache, "rank": _weights,
    "cors_origins": _strings, "allowed_hosts": _strings, "max_connections": _integer(1, 10**6),
    "client_header_timeout": _duration, "client_idle_timeout": _duration,
    "max_body": _size, "large_body": _size, "body_memory": _size,
    "stop_grace": _duration, "api_keys": _api_keys, "allow_plaintext_swap": _boolean,
    "workers": _workers,
}
#: top-level keys read by hand: they depend on each other
TOP_SPECIAL = ("default_model", "models")
#: the field of Config each key fills, where the names differ
TOP_RENAMED = {"rank": "weights"}
MODEL_FIELDS: dict[str, FieldReader] = {
    "ttl": _duration, "args": _strings, "pinned": _boolean, "preload": _boolean,
    "health": _health,
    "backend": _backend, "command": _command, "env": _env, "mmproj": _mmproj,
    "stage": _stage, "rpc": _strings,
}
SOURCE_FIELDS: dict[str, FieldReader] = {
    "dir": _path, "recursive": _boolean, "args": _strings, "env": _env, "stage": _stage,
}
MODEL_SPECIAL = ("path", "aliases", "tags")


class ConfigError(HoshikageError):
    def __init__(self, path: Path, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {message}",
                         hint="run 'hoshikage check' after editing the manifest", code=2)
        self.path = path
        self.line = line
        self.problem = message


def load(path: Path | None = None) -> Config:
    path = path or config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise HoshikageError(f"no manifest at {path}",
                             hint="create it (see README) or set HOSHIKAGE_CONFIG") from None
    except OSError as exc:
        raise HoshikageError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, None, f"not UTF-8 text: {exc.reason}") from None
    return parse(text, path)


def parse(text: str, path: Path) -> Config:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError(path, line, f"not valid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:  # e.g. a control character the reader refuses
        raise ConfigError(path, None, f"not valid YAML: {exc}") from None
    return _Parser(path).config(node)


class _Parser(NodeReader):
    def __init__(self, path: Path) -> None:
        super().__init__(lambda line, message: ConfigError(path, line, message))
        self.path = path
        self.warnings: list[str] = []
        #: the top level's args and env, as a source every model has
        self.defaults = Source(Path("/"))
        #: the `workers:` that models' `rpc:` may name
        self.workers: Mapping[str, Worker] = {}

    def name(self, node: yaml.Node, what: str) -> str:
        value = str(node.value) if isinstance(node, yaml.ScalarNode) else ""
        if not valid_name(value):
            raise self.fail(node, f"{what} '{value}' is not a valid name "
                                  "(letters, digits, '.', '_', ':', '-'; at most 100, and at "
                                  f"most {ESCAPED_NAME_MAX} with each '-' counted 4 times, as "
                                  "in its unit's name)")
        return value

    def config(self, node: yaml.Node | None) -> Config:
        top = self.mapping(node, "the manifest", (*TOP_FIELDS, *TOP_SPECIAL))
        kw = self.fields(top, TOP_FIELDS, renamed=TOP_RENAMED)
        if "models" not in top and "sources" not in top:
            raise self.fail(node, "the manifest has neither 'models:' nor 'sources:'")
        if kw.get("pressure_warn", 0.7) > kw.get("pressure_critical", 0.9):
            raise self.fail(top.get("pressure_warn", (None, node))[1],
                            "pressure_warn must not be above pressure_critical")
        found = scan(kw.get("sources", ()))
        self.warnings += found.warnings
        kw["scanned"] = tuple(found.scanned)
        self.workers = kw.get("workers", {})
        self.defaults = Source(Path("/"), args=kw.get("args", ()), env=kw.get("env", ()),
                               stage=kw.get("stage", "auto"))
        models = self.models(top, kw.get("idle_ttl", Config.idle_ttl), found.found)
        if "default_model" in top:
            default = self.string(top["default_model"][1], "default_model")
            if default not in models:
                raise self.fail(top["default_model"][1],
                                f"default_model '{default}' is not one of the models")
            kw["default_model"] = default
        return Config(source=self.path, models=models, warnings=tuple(self.warnings), **kw)

    def models(self, top: Mapping[str, tuple[yaml.Node, yaml.Node]], idle_ttl: float,
               found: Mapping[str, Found]) -> dict[str, Model]:
        """The `models:` entries, then the files scanned from `sources:` (explicit entries
        win); no name, alias or tag names two models."""
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
        for name, f in found.items():
            if name in owner:
                self.warnings.append(f"sources: {f.path} is named '{name}', an alias of "
                                     f"'{owner[name]}': left out (another alias, or a "
                                     "models: entry with its own path:)")
            elif name not in models:
                models[name] = Model(name=name, path=f.path, ttl=idle_ttl, shards=f.shards,
                                     mmproj=f.mmproj, **self.inherited(f.source, {}))
        return models

    def inherited(self, source: Source | None, own: Mapping[str, Any]) -> dict[str, Any]:
        """A model's args and env: the top level's, its source's, its own, in that order
        (llama-server takes an option's last value; a variable's last setting wins)."""
        layers = [self.defaults, *([source] if source else [])]
        args = layered([*(layer.args for layer in layers), tuple(own.get("args", ()))])
        env = {k: v for layer in layers for k, v in environment(layer.env).items()}
        env.update(environment(own.get("env", ())))
        stage = own.get("stage") or next(
            (layer.stage for layer in reversed(layers) if layer.stage), "auto")
        return {"args": args, "env": tuple(f"{k}={v}" for k, v in env.items()),
                "stage": stage}

    def model(self, name: str, key: yaml.Node, node: yaml.Node, idle_ttl: float,
              found: Mapping[str, Found]) -> tuple[Model, list[yaml.Node], list[yaml.Node]]:
        what = f"model '{name}'"
        items = self.mapping(node, what, (*MODEL_SPECIAL, *MODEL_FIELDS))
        source: Source | None = None
        shards: tuple[Path, ...] = ()
        mmproj = None
        if "path" in items:
            path = self.abspath(items["path"][1], f"{what}: path")
            problem = self.missing(path)
            if problem is None:
                shards, problem = shards_of(path)
            if problem:
                self.warnings.append(f"{self.path}:{items['path'][1].start_mark.line + 1}: "
                                     f"{what}: {problem}")
        elif name in found:
            path, source = found[name].path, found[name].source
            shards, mmproj = found[name].shards, found[name].mmproj
        else:
            raise self.fail(key, f"{what} has no 'path:', and the sources: found no model "
                                  f"of that name (a {name}.gguf, or a Hugging Face repository's "
                                  "file named so)")
        alias_nodes = self.seq(items["aliases"][1], f"{what}: aliases") \
            if "aliases" in items else []
        tag_nodes = self.seq(items["tags"][1], f"{what}: tags") if "tags" in items else []
        kw: dict[str, Any] = {"ttl": idle_ttl, "shards": shards, "mmproj": mmproj,
                              **self.fields(items, MODEL_FIELDS, f"{what}: ")}
        kw.update(self.inherited(source, kw))
        if "mmproj" in items and kw["mmproj"] and (problem := self.missing(kw["mmproj"])):
            self.warnings.append(f"{self.path}:{items['mmproj'][1].start_mark.line + 1}: "
                                 f"{what}: mmproj {problem}")
        kw["aliases"] = tuple(self.name(a, f"{what}: alias") for a in alias_nodes)
        kw["tags"] = tuple(self.name(t, f"{what}: tag") for t in tag_nodes)
        if kw.get("backend") == "command" and "command" not in kw:
            raise self.fail(key, f"{what}: backend 'command' needs 'command:', an argv list "
                                 "such as [/usr/bin/server, --model, '{path}', --uds, "
                                 "'{socket}']")
        if "command" in kw and kw.get("backend") != "command":
            raise self.fail(items["command"][0], f"{what}: 'command:' needs "
                                                 "'backend: command'")
        if kw["mmproj"] and kw.get("backend") == "command":
            raise self.fail(items["mmproj"][0], f"{what}: 'mmproj:' is for llama-server "
                                                "(its --mmproj); a command backend names "
                                                "its files in 'command:'")
        if "rpc" in items:
            self.check_rpc(what, items["rpc"], kw)
        return Model(name=name, path=path, **kw), alias_nodes, tag_nodes

    def check_rpc(self, what: str, nodes: tuple[yaml.Node, yaml.Node],
                  kw: Mapping[str, Any]) -> None:
        """`rpc:` names workers of `workers:`, each once, for a llama-server model."""
        if kw.get("backend", "llama-server") != "llama-server":
            raise self.fail(nodes[0], f"{what}: 'rpc:' is for llama-server (its --rpc)")
        for worker, wnode in zip(kw["rpc"], nodes[1].value, strict=True):
            if worker not in self.workers:
                known = ", ".join(self.workers) or "none"
                raise self.fail(wnode, f"{what}: rpc: '{worker}' is not one of the "
                                       f"workers: ({known})")
        if len(set(kw["rpc"])) != len(kw["rpc"]):
            raise self.fail(nodes[1], f"{what}: rpc: names a worker twice")

    @staticmethod
    def missing(path: Path) -> str | None:
        """What is wrong with a file the manifest names, if anything (a warning: the disk
        may be mounted later)."""
        try:
            if path.is_dir():
                return f"{path} is a directory, not a file"
            return None if path.is_file() else f"{path} does not exist (yet)"
        except OSError as exc:  # a directory this user may not search: say so, go on
            return f"{path} cannot be looked at: {exc.strerror}"
