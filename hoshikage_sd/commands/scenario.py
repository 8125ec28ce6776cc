"""A `hoshikage simulate` scenario: its YAML file read into a `Scenario`, every error naming
the file and the line (docs/simulate.md has the format in full).

    description: old heavy use vs new frequent use   # one line, shown by --list
    cache: {max_size: 20G, min_free: 0, expire_after: 7d, min_rank: 1}  # as the manifest's
    disk_free: 100G        # free bytes on the cache's disk at t=0 (default: no limit)
    rank: {week: 10}       # weights, as the manifest's rank: (default: the built-in ones)
    models:
      old-heavy:
        size: 12G                              # bytes of the model file
        runtime: 2h                            # each use: load to last request (default 1m)
        uses: [{at: -90d, every: 1d, count: 40}]    # 40 uses, one a day from -90d
        cached: true                           # a verified copy is in the cache at t=0
      new-frequent: {size: 12G, uses: [-2d, -1d, {at: -1h, runtime: 30m}]}
      pinned-one: {size: 5G, pinned: true, cached: true}
      on-ssd: {size: 4G, fast: true}           # its source already is on the cache's disk
    steps: [0s, 1d, 7d]    # when the policy runs (default [0s]); strictly increasing
    expect:                # optional: the exact decisions of some steps
      0s: {copy: [new-frequent], expire: [old-heavy], keep: [pinned-one]}

Offsets are signed durations: "-60d" is 60 days before t=0, "1d12h" a day and a half after.
A use counts once a step's time reaches it; one whose runtime has not ended by then is still
running, so its model is loaded (busy) at that step. The idle tail before a TTL stop is not
modelled: runtime is what the stats file records, load to last request. A use with
`crashed: true` ends after its runtime without a stop record, as after a power cut. A model's
uses may not overlap: one model runs once at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from itertools import pairwise
from pathlib import Path

import yaml

from hoshikage_sd import fmt
from hoshikage_sd.errors import HoshikageError
from hoshikage_sd.manifest import (
    NAME_RE,
    CachePolicy,
    Weights,
    parse_duration,
    parse_size,
)
from hoshikage_sd.manifest.model import DAY
from hoshikage_sd.manifest.nodes import NodeReader
from hoshikage_sd.manifest.parse import CACHE_FIELDS
from hoshikage_sd.policy.cacheplan import Action

# disk_free when a scenario gives none: never the limit, and still an int for CacheState.
UNLIMITED = 1 << 60
#: the largest model size or disk a scenario may give: well below UNLIMITED, which stands
#: for a disk without a limit
MAX_SIZE = 1 << 50
DEFAULT_RUNTIME = 60.0
ACTIONS = tuple(a.value for a in Action)
TOP_KEYS = ("description", "cache", "disk_free", "rank", "models", "steps", "expect")
MODEL_KEYS = ("size", "uses", "runtime", "cached", "pinned", "fast")
USE_KEYS = ("at", "runtime", "every", "count", "crashed")
MAX_REPEAT = 10_000


class ScenarioError(HoshikageError):
    def __init__(self, source: str, line: int | None, message: str,
                 hint: str = "the scenario format is in docs/simulate.md") -> None:
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {message}", hint=hint, code=2)
        self.line = line


@dataclass(frozen=True)
class SimUse:
    at: float        # seconds from t=0
    runtime: float
    crashed: bool = False  # no stop was recorded when it ended


@dataclass(frozen=True)
class SimModel:
    name: str
    size: int
    uses: tuple[SimUse, ...] = ()
    cached: bool = False
    pinned: bool = False
    fast: bool = False


@dataclass(frozen=True)
class Step:
    label: str       # as written in the scenario
    at: float        # seconds from t=0


@dataclass(frozen=True)
class Scenario:
    name: str
    source: str
    description: str
    policy: CachePolicy
    weights: Weights
    disk_free: int
    models: tuple[SimModel, ...]
    steps: tuple[Step, ...]
    # step offset -> action -> the models expected to get it
    expect: Mapping[float, Mapping[str, frozenset[str]]]


# -- loading ----------------------------------------------------------------------------------
def scenario_dir() -> Traversable:
    return resources.files("hoshikage_sd.commands").joinpath("scenarios")


def builtin_names() -> list[str]:
    return sorted(entry.name.removesuffix(".yaml") for entry in scenario_dir().iterdir()
                  if entry.name.endswith(".yaml"))


def builtins() -> dict[str, str]:
    """Built-in scenario names and their descriptions."""
    return {name: load(name).description for name in builtin_names()}


def load(spec: str) -> Scenario:
    """A built-in scenario by name, or a scenario file by path."""
    path = Path(spec)
    is_path = os.sep in spec or path.suffix in (".yaml", ".yml")
    if not is_path and spec in builtin_names():
        entry = scenario_dir().joinpath(f"{spec}.yaml")
        return parse(entry.read_text(encoding="utf-8"), f"built-in scenario {spec}", spec)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(spec, None, "no such file" if is_path else
                            "no such file, and no built-in scenario of that name",
                            hint="'hoshikage simulate --list' names the built-ins") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(spec, None, f"cannot read it: {exc}") from None
    return parse(text, spec, path.stem)


def parse(text: str, source: str, name: str) -> Scenario:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ScenarioError(source, line, f"not valid YAML: {exc.problem}") from None
    return _Reader(source).scenario(node, name)


def parse_offset(value: object) -> float:
    """A signed duration: '-60d', '+1h', '1d12h', '0s', or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("an offset, not a boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not an offset")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        try:
            return sign * parse_duration(text[1:] if text.startswith(("+", "-")) else text)
        except ValueError:
            pass
    raise ValueError(f"{value!r} is not an offset (use e.g. -60d, -1h, 0s, 2d)")


class _Reader(NodeReader):
    """YAML nodes to a Scenario; every error names the source and the line."""

    def __init__(self, source: str) -> None:
        super().__init__(lambda line, message: ScenarioError(source, line, message))
        self.source = source

    def scenario(self, node: yaml.Node | None, name: str) -> Scenario:
        top = self.mapping(node, "the scenario", TOP_KEYS)
        if "models" not in top:
            raise self.fail(node, "the scenario has no 'models:'")
        description = ""
        if "description" in top:
            description = str(self.value(top["description"][1]) or "").strip()
        policy = self.policy(top["cache"][1]) if "cache" in top else CachePolicy()
        weights = self.weights(top["rank"][1]) if "rank" in top else Weights()
        disk_free = (self.convert(top["disk_free"][1], "disk_free", parse_size)
                     if "disk_free" in top else UNLIMITED)
        if "disk_free" in top and disk_free > MAX_SIZE:
            raise self.fail(top["disk_free"][1], f"disk_free {fmt.size(disk_free)} is more "
                                                 f"than {fmt.size(MAX_SIZE)}: leave it out for "
                                                 "a disk without a limit")
        models = tuple(self.model(knode, vnode) for _, (knode, vnode)
                       in self.mapping(top["models"][1], "models").items())
        steps = self.steps(top["steps"][1]) if "steps" in top else (Step("0s", 0.0),)
        expect = (self.expect(top["expect"][1], steps, {m.name for m in models})
                  if "expect" in top else {})
        return Scenario(name, self.source, description, policy, weights, disk_free, models,
                        steps, expect)

    def policy(self, node: yaml.Node) -> CachePolicy:
        # The manifest's keys, so a cache: section can be pasted in; dir means nothing here.
        items = self.mapping(node, "cache", tuple(CACHE_FIELDS))
        return CachePolicy(**self.fields(
            items, {k: v for k, v in CACHE_FIELDS.items() if k != "dir"}, "cache: "))

    def model(self, knode: yaml.Node, node: yaml.Node) -> SimModel:
        name = str(knode.value) if isinstance(knode, yaml.ScalarNode) else ""
        if not NAME_RE.match(name):
            raise self.fail(knode, f"model name '{name}' is not a valid name "
                                   "(letters, digits, '.', '_', ':', '-'; at most 100)")
        what = f"model '{name}'"
        items = self.mapping(node, what, MODEL_KEYS)
        if "size" not in items:
            raise self.fail(knode, f"{what} needs 'size:' (e.g. 8G)")
        size = self.convert(items["size"][1], f"{what}: size", parse_size)
        if size > MAX_SIZE:  # past it, sizes stand for nothing a disk holds
            raise self.fail(items["size"][1], f"{what}: size {fmt.size(size)} is more than "
                                              f"{fmt.size(MAX_SIZE)}")
        runtime = (self.convert(items["runtime"][1], f"{what}: runtime", parse_duration)
                   if "runtime" in items else DEFAULT_RUNTIME)
        flags = {key: self.boolean(items[key][1], f"{what}: {key}")
                 for key in ("cached", "pinned", "fast") if key in items}
        if flags.get("cached") and flags.get("fast"):
            raise self.fail(items["fast"][0], f"{what}: a model whose source is on the cache's "
                                              "disk (fast) has no cached copy")
        uses: list[SimUse] = []
        if "uses" in items:
            for entry in self.seq(items["uses"][1], f"{what}: uses"):
                uses.extend(self.use(entry, what, runtime))
            uses.sort(key=lambda u: u.at)
            for earlier, later in pairwise(uses):
                if earlier.at + earlier.runtime > later.at:
                    raise self.fail(items["uses"][1],
                                    f"{what}: uses overlap: the one at {span(earlier.at)} runs "
                                    f"until {span(earlier.at + earlier.runtime)}, past the "
                                    f"next at {span(later.at)} (a model runs once at a time)")
        return SimModel(name, size, tuple(uses), **flags)

    def use(self, node: yaml.Node, what: str, runtime: float) -> list[SimUse]:
        if not isinstance(node, yaml.MappingNode):
            return [SimUse(self.convert(node, f"{what}: uses", parse_offset), runtime)]
        items = self.mapping(node, f"{what}: a use", USE_KEYS)
        if "at" not in items:
            raise self.fail(node, f"{what}: a use needs 'at:', an offset such as -2d")
        at = self.convert(items["at"][1], f"{what}: at", parse_offset)
        if "runtime" in items:
            runtime = self.convert(items["runtime"][1], f"{what}: runtime", parse_duration)
        count = 1
        if "count" in items:
            value = self.number(items["count"][1], f"{what}: count")
            count = int(value)
            if count != value or not 1 <= count <= MAX_REPEAT:
                raise self.fail(items["count"][1], f"{what}: count must be a whole number "
                                                   f"from 1 to {MAX_REPEAT}")
        every = 0.0
        if "every" in items:
            every = self.convert(items["every"][1], f"{what}: every", parse_duration)
        if count > 1 and every <= 0:
            raise self.fail(node, f"{what}: a use with count: needs 'every:', the time "
                                  "between the repeats")
        crashed = ("crashed" in items
                   and self.boolean(items["crashed"][1], f"{what}: crashed"))
        return [SimUse(at + i * every, runtime, crashed) for i in range(count)]

    def steps(self, node: yaml.Node) -> tuple[Step, ...]:
        steps: list[Step] = []
        for item in self.seq(node, "steps"):
            at = self.convert(item, "steps", parse_offset)
            if steps and at <= steps[-1].at:
                raise self.fail(item, f"steps must go forward in time: {item.value} is not "
                                      f"after {steps[-1].label}")
            steps.append(Step(str(item.value), at))
        if not steps:
            raise self.fail(node, "steps must name at least one time, e.g. [0s]")
        return tuple(steps)

    def expect(self, node: yaml.Node, steps: tuple[Step, ...],
               models: set[str]) -> dict[float, dict[str, frozenset[str]]]:
        by_time = {s.at: s for s in steps}
        out: dict[float, dict[str, frozenset[str]]] = {}
        for key, (knode, vnode) in self.mapping(node, "expect").items():
            at = self.convert(knode, "expect", parse_offset)
            if at not in by_time:
                raise self.fail(knode, f"expect: '{key}' is not one of the steps "
                                       f"({', '.join(s.label for s in steps)})")
            if at in out:
                raise self.fail(knode, f"expect: step {key} appears twice")
            actions: dict[str, frozenset[str]] = {}
            for action, (_, lnode) in self.mapping(vnode, f"expect: {key}",
                                                   ACTIONS).items():
                names: list[str] = []
                for item in self.seq(lnode, f"expect: {key}: {action}"):
                    name = str(item.value) if isinstance(item, yaml.ScalarNode) else ""
                    if name not in models:
                        raise self.fail(item, f"expect: {key}: {action}: '{name}' is not one "
                                              "of the models")
                    names.append(name)
                actions[action] = frozenset(names)
            out[at] = actions
        return out


def span(seconds: float) -> str:
    """Seconds as the offsets are written: -60d, 1d12h, 0s."""
    sign, rest = ("-" if seconds < 0 else ""), abs(seconds)
    parts = []
    for unit, length in (("d", DAY), ("h", 3600.0), ("m", 60.0)):
        if rest >= length:
            count = int(rest // length)
            parts.append(f"{count}{unit}")
            rest -= count * length
    if rest or not parts:
        parts.append(f"{rest:g}s")
    return sign + "".join(parts)
