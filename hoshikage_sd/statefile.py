"""Reading hoshikage's own state files defensively: a file of the wrong shape is reported
(a warning naming the file and what is wrong) and read as what can be saved of it, never a
crash. The router, the units and the CLI all read these files, and a reader that died on one
would take the port, a model start or a command down with it."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
import types
import typing
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger("hoshikage")

#: (path, what was wrong) already reported by this process, by the file's identity: a reader
#: that runs per request must not write a warning per request for the same bad file.
_reported: dict[tuple[str, str], tuple[int, int, int] | None] = {}


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def report(path: Path, message: str, level: int = logging.WARNING) -> None:
    """Log `message` (it names the file) once per version of the file `path` (per
    process)."""
    key = (str(path), message)
    identity = _identity(path)
    if key in _reported and _reported[key] == identity:
        return
    _reported[key] = identity
    logger.log(level, "%s", message)


def read_json(path: Path) -> tuple[Any, str | None]:
    """(data, None), or (None, what is wrong); (None, None) when the file is not there."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, str(exc.strerror or exc)
    try:
        return json.loads(raw.decode()), None
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text: {exc.reason}"
    except ValueError as exc:
        return None, f"not valid JSON: {exc}"


def kind_of(value: object) -> str:
    """A JSON value's kind as a person reads it in a message."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value)


def _fits(value: object, hint: object) -> bool:
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return is_number(value)
    if hint in (str, bool):
        return isinstance(value, hint)
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (list, dict):
        return isinstance(value, origin)
    if origin in (typing.Union, types.UnionType):  # X | None
        return any(_fits(value, a) for a in typing.get_args(hint))
    raise TypeError(f"statefile.record cannot check {hint}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluates the annotations: ~25 us a time


@functools.cache
def _fields(cls: type) -> tuple[Field[Any], ...]:
    return fields(cls)


def record(cls: type[T], data: object) -> tuple[T | None, str | None]:
    """A dataclass of plain fields (int, float, str, bool, list, dict, X | None) from a JSON
    object: (instance, None), or (None, what is wrong). One writer writes each record, of the
    same version: a key it does not know means the record is not what it seems."""
    if not isinstance(data, dict):
        return None, f"expected an object, found {kind_of(data)}"
    hints = _hints(cls)  # type: ignore[arg-type]  # a class is hashable
    unknown = sorted(set(data) - set(hints))
    if unknown:
        return None, f"unknown key '{unknown[0]}'"
    values = {}
    for f in _fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                return None, f"'{f.name}' is missing"
            continue
        value = data[f.name]
        if not _fits(value, hints[f.name]):
            return None, f"'{f.name}' is {kind_of(value)} ({value!r:.40})"
        values[f.name] = float(value) if hints[f.name] is float else value
    return cls(**values), None


def keep_aside(path: Path, content: str | bytes) -> Path:
    """Write `content` next to `path` as PATH.bad-TIMESTAMP (never over an earlier one), for
    an operator to look at: what a writer is about to drop from `path`."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    raw = content.encode() if isinstance(content, str) else content
    for n in range(1000):
        aside = path.with_name(f"{path.name}.bad-{stamp}" + (f".{n}" if n else ""))
        try:
            fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        return aside
    raise FileExistsError(f"{path}.bad-{stamp}: too many")
