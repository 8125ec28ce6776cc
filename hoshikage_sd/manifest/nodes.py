"""Reading YAML node by node, so every error can name its file and line: the manifest and the
simulator's scenarios share this, and the duration and size syntax."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest.model import Weights

T = TypeVar("T")
NodeMap = dict[str, tuple[yaml.Node, yaml.Node]]
#: a table-driven parser's field reader: (reader, node, what the error calls it) -> value
FieldReader = Callable[["NodeReader", yaml.Node, str], Any]
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")


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



class NodeReader:
    def __init__(self, error: Callable[[int | None, str], HoshikageError]) -> None:
        self.error = error

    def fail(self, node: yaml.Node | None, message: str) -> HoshikageError:
        return self.error(node.start_mark.line + 1 if node else None, message)

    def mapping(self, node: yaml.Node | None, what: str,
                allowed: Sequence[str] | None = None) -> NodeMap:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping of keys to values")
        out: NodeMap = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                raise self.fail(key, f"{what}: keys must be plain names")
            if key.value in out:
                raise self.fail(key, f"{what}: '{key.value}' appears twice")
            if allowed is not None and key.value not in allowed:
                raise self.fail(key, f"unknown key '{key.value}' in {what} "
                                     f"(known: {', '.join(allowed)})")
            out[key.value] = (key, value)
        return out

    def fields(self, items: Mapping[str, tuple[yaml.Node, yaml.Node]],
               table: Mapping[str, FieldReader], prefix: str = "",
               renamed: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The keys of `items` that `table` reads, read: {field name: value}."""
        renamed = renamed or {}
        return {renamed.get(key, key): table[key](self, value, f"{prefix}{key}")
                for key, (_, value) in items.items() if key in table}

    def seq(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list")
        return list(node.value)

    def value(self, node: yaml.Node) -> Any:
        try:
            return yaml.SafeLoader("").construct_object(node, deep=True)
        except yaml.YAMLError as exc:  # e.g. a !!python tag SafeLoader refuses
            problem = exc.problem if isinstance(exc, yaml.MarkedYAMLError) else exc
            raise self.fail(node, f"not a plain value: {problem}") from None

    def convert(self, node: yaml.Node, what: str, kind: Callable[[object], T]) -> T:
        """kind(value), its ValueError told as this node's error."""
        try:
            return kind(self.value(node))
        except ValueError as exc:
            raise self.fail(node, f"{what}: {exc}") from None

    def duration(self, node: yaml.Node, what: str) -> float:
        return self.convert(node, what, parse_duration)

    def size(self, node: yaml.Node, what: str) -> int:
        return self.convert(node, what, parse_size)

    def number(self, node: yaml.Node, what: str, low: float = -1e9,
               high: float = 1e9) -> float:
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not low <= value <= high:
            raise self.fail(node, f"{what} must be a number from {low:g} to {high:g}")
        return float(value)

    def boolean(self, node: yaml.Node, what: str) -> bool:
        value = self.value(node)
        if not isinstance(value, bool):
            raise self.fail(node, f"{what} must be true or false")
        return value

    def string(self, node: yaml.Node, what: str) -> str:
        value = self.value(node)
        if not isinstance(value, str) or not value:
            raise self.fail(node, f"{what} must be a non-empty string")
        return value

    def abspath(self, node: yaml.Node, what: str) -> Path:
        value = Path(self.string(node, what))
        if not value.is_absolute():
            raise self.fail(node, f"{what} must be an absolute path, not '{value}'")
        return value

    def weights(self, node: yaml.Node) -> Weights:
        """A `rank:` section: the weights of the rank formula."""
        items = self.mapping(node, "rank", tuple(Weights.__dataclass_fields__))
        return Weights(**{key: self.number(value, f"rank: {key}", -1e6, 1e6)
                          for key, (_, value) in items.items()})

    def strings(self, node: yaml.Node, what: str) -> tuple[str, ...]:
        items = self.seq(node, what)
        for item in items:
            if not isinstance(item, yaml.ScalarNode):
                raise self.fail(item, f"{what}: each entry must be a string")
        # The text as written: YAML 1.1 would turn 010 into 8 and 1:30 into 90.
        return tuple(str(item.value) for item in items)
