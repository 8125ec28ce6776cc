"""Config <-> JSON, by each field's annotation: how the router keeps its last good manifest
(hoshikage_sd/lastgood.py, manifest.json) for the programs that start often, without YAML."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hoshikage_sd.manifest.model import Cache, Model, Source, Weights, Worker


def _tuple_of(item: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: tuple(item(v) for v in value)


def _optional(item: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else item(value)


def _same(value: Any) -> Any:
    return value


#: how a field of each annotation is read back from JSON; an annotation not here is a
#: field the codec does not know (tests/unit/test_lastgood.py checks every field)
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
    raise TypeError(f"cannot keep a {type(value).__name__} as JSON")


def decode(cls: type[Any], data: dict[str, Any]) -> Any:
    """An instance of the dataclass `cls` from encode()'s output; KeyError or TypeError when
    the data does not fit it exactly (another version wrote it)."""
    fields = dataclasses.fields(cls)
    if set(data) != {f.name for f in fields}:
        raise KeyError(f"{cls.__name__}'s fields differ")
    return cls(**{f.name: DECODE[str(f.type)](data[f.name]) for f in fields})
