"""The manifest as the router last parsed it, kept as JSON for the programs that start often.

Every router start, activator, release and idle watch reads the manifest: PyYAML's import and
the node-by-node parser would sit on the cold path of the first request (the router's READY=1)
and beside the next model's load in a swap (the evicted unit's release); what that costs is in
docs/performance.md ("Kept optimisations"). The router parses the manifest anyway; it keeps the
result here ($RUNTIME_DIRECTORY/manifest.json) with the identity of every file that result
depends on: the manifest, names.json, each sources: directory and each model's file (a warning
says whether it exists). A reader that finds each of them as it was gets the same Config
without YAML; any difference, or anything odd about the file, and it parses as before.

A file changed during the parse may show a time just before it began (the kernel stamps
files from its coarse clock, up to a tick behind: 1-10 ms), so nothing is kept when any of
them changed less than RACY seconds before the parse began (as git treats a racily clean
index). An edit reaches the router's reload later than that (hoshikage-reload.path, then
`hoshikage reload`), so its parse is kept as a rule. The file is trusted
only from this user or root: it decides which program a unit runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hoshikage_sd.fileid import identity
from hoshikage_sd.files import write_atomic
from hoshikage_sd.manifest.model import (
    Cache,
    Config,
    Model,
    Source,
    Weights,
    Worker,
    model_files,
)

VERSION = 1
NAME = "manifest.json"
#: seconds: a file changed this close to the parse's start may have changed during it
RACY = 0.02

def inputs(config: Config) -> list[str]:
    """The files a parse of config.source (names.json over it) looked at."""
    return [str(config.source), str(config.state_dir / "names.json"),
            *(str(d) for d in config.scanned),
            *(str(p) for m in config.models.values() for p in model_files(m))]


# ---- the codec: Config <-> JSON, by each field's annotation -----------------------------

def _tuple_of(item: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: tuple(item(v) for v in value)


def _optional(item: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else item(value)


def _same(value: Any) -> Any:
    return value


#: how a field of each annotation is read back from JSON; an annotation not here is a
#: field the codec does not know (tests/unit/test_compiled_manifest.py checks every field)
DECODE: dict[str, Callable[[Any], Any]] = {
    "str": str, "bool": bool, "int": int, "float": float,
    "str | None": _optional(str), "int | None": _optional(int),
    "Path": Path, "Path | None": _optional(Path), "tuple[str, ...]": _tuple_of(str),
    "tuple[Path, ...]": _tuple_of(Path), "tuple[int, ...] | None": _optional(_tuple_of(int)),
    "Weights": lambda v: decode(Weights, v), "Cache | None": _optional(lambda v: decode(Cache, v)),
    "tuple[Source, ...]": _tuple_of(lambda v: decode(Source, v)),
    "Mapping[str, Model]": lambda v: {k: decode(Model, m) for k, m in v.items()},
    "Mapping[str, Worker]": lambda v: {k: decode(Worker, w) for k, w in v.items()},
}


def encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"cannot keep a {type(value).__name__} in {NAME}")


def decode(cls: type[Any], data: dict[str, Any]) -> Any:
    """An instance of the dataclass `cls` from encode()'s output; KeyError or TypeError when
    the data does not fit it exactly (another version wrote it)."""
    fields = dataclasses.fields(cls)
    if set(data) != {f.name for f in fields}:
        raise KeyError(f"{cls.__name__}'s fields differ")
    return cls(**{f.name: DECODE[str(f.type)](data[f.name]) for f in fields})


# ---- the file -------------------------------------------------------------------------

def path(runtime_dir: Path) -> Path:
    return runtime_dir / NAME


def save(config: Config, runtime_dir: Path, began: float) -> bool:
    """Keep `config`, parsed (names.json over it) in a parse that began at `began` (wall
    clock), when none of its inputs changed within RACY seconds of that. Never raises: a
    reader without it parses. True when the file holds this config."""
    files = {p: identity(p) for p in inputs(config)}
    limit = int((began - RACY) * 1e9)
    if any(i is not None and i[4] >= limit for i in files.values()):
        remove(runtime_dir)
        return False
    data = json.dumps({"version": VERSION, "files": files, "config": encode(config)},
                      separators=(",", ":")).encode()
    try:
        write_atomic(path(runtime_dir), data, mode=0o640)
    except OSError:
        return False
    return True


def remove(runtime_dir: Path) -> None:
    with contextlib.suppress(OSError):
        path(runtime_dir).unlink()


def load(source: Path, runtime_dir: Path) -> Config | None:
    """The kept Config of `source` (names.json over it), when every file it was made from is
    as it was; else None (the caller parses)."""
    try:
        with open(path(runtime_dir), "rb") as f:
            if os.fstat(f.fileno()).st_uid not in (os.geteuid(), 0):
                return None
            kept = json.loads(f.read())
        if kept["version"] != VERSION or kept["config"]["source"] != str(source):
            return None
        config: Config = decode(Config, kept["config"])
        files = kept["files"]
        if set(files) != set(inputs(config)):
            return None
        if all(identity(p) == known for p, known in files.items()):
            return config
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    return None

