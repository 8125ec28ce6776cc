"""The usage statistics file, /var/lib/hoshikage/stats.json: per model, the last loads and
how long each ran. One writer at a time (flock); replaced atomically.

Every reader validates what it reads: a file or an entry of the wrong shape is reported and
left out, never a crash (a cold start ranks models from this file). The writer keeps what it
would drop aside (stats.json.bad-TIMESTAMP) before it writes the good entries back, so no
history is lost without a trace."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hoshikage_sd import statefile
from hoshikage_sd.files import write_atomic
from hoshikage_sd.manifest.model import DEFAULT_WEIGHTS, Weights
from hoshikage_sd.policy.rank import ModelStats, Use, rank

STATS_VERSION = 1
logger = logging.getLogger("hoshikage")


@dataclass
class Reading:
    """What a read of the file found: the good entries, the bad ones (by name, as they
    were), and what is wrong, one sentence each. `whole`: the file as a whole is unusable
    (not JSON, or not the shape of a stats file); all of it goes aside."""

    stats: dict[str, ModelStats] = field(default_factory=dict)
    bad: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    whole: bool = False


def _number(value: object, what: str, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if not statefile.is_number(value) or float(value) < 0:  # type: ignore[arg-type]
        raise ValueError(f"{what} is {statefile.kind_of(value)} ({value!r:.40}), "
                         "not a number >= 0")
    return float(value)  # type: ignore[arg-type]


def entry(data: object) -> ModelStats:
    """One model's entry, or ValueError saying what is wrong with it."""
    if not isinstance(data, dict):
        raise ValueError(f"expected an object, found {statefile.kind_of(data)}")
    uses = data.get("uses", [])
    if not isinstance(uses, list):
        raise ValueError(f"'uses' is {statefile.kind_of(uses)}, not a list")
    parsed = []
    for i, use in enumerate(uses, 1):
        if not isinstance(use, dict):
            raise ValueError(f"use {i} is {statefile.kind_of(use)}, not an object")
        at = _number(use.get("at"), f"use {i}: 'at'")
        assert at is not None
        parsed.append(Use(at, _number(use.get("runtime"), f"use {i}: 'runtime'", True)))
    total_uses = data.get("total_uses", 0)
    if not isinstance(total_uses, int) or isinstance(total_uses, bool) or total_uses < 0:
        raise ValueError(f"'total_uses' is {statefile.kind_of(total_uses)} "
                         f"({total_uses!r:.40}), not a whole number >= 0")
    total_runtime = _number(data.get("total_runtime", 0.0), "'total_runtime'")
    assert total_runtime is not None
    return ModelStats(uses=tuple(parsed), total_uses=total_uses, total_runtime=total_runtime,
                      last_load_seconds=_number(data.get("last_load_seconds"),
                                                "'last_load_seconds'", True))


def parse(data: object) -> Reading:
    """The file's decoded JSON into good entries, bad entries and what is wrong."""
    if not isinstance(data, dict):
        return Reading(problems=[f"expected an object with 'models', found "
                                 f"{statefile.kind_of(data)}"], whole=True)
    models = data.get("models", {})
    if not isinstance(models, dict):
        return Reading(problems=[f"'models' is {statefile.kind_of(models)}, not an object"],
                       whole=True)
    reading = Reading()
    for name, value in models.items():
        try:
            reading.stats[name] = entry(value)
        except ValueError as exc:
            reading.bad[name] = value
            reading.problems.append(f"model '{name}': {exc}")
    return reading


class StatsFile:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "stats.json"

    def examine(self) -> Reading:
        """Read and validate, reporting what is wrong (once per version of the file)."""
        data, problem = statefile.read_json(self.path)
        if problem is not None:
            reading = Reading(problems=[problem], whole=True)
        elif data is None:  # no file yet
            return Reading()
        else:
            reading = parse(data)
        for text in reading.problems:
            statefile.report(self.path, f"{self.path}: {text} (left out)")
        return reading

    def read(self) -> dict[str, ModelStats]:
        return self.examine().stats

    def write(self, stats: Mapping[str, ModelStats]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": STATS_VERSION,
                "models": {name: asdict(s) for name, s in sorted(stats.items())}}
        write_atomic(self.path, json.dumps(data, indent=1) + "\n")

    def _keep_aside(self, reading: Reading) -> None:
        """Before the good entries are written back: what would be dropped goes aside."""
        if reading.whole:
            # One this process cannot read (permissions) raises here: writing over it
            # would lose it.
            try:
                content = self.path.read_bytes()
            except FileNotFoundError:
                return
        elif reading.bad:
            content = (json.dumps({"version": STATS_VERSION, "models": reading.bad},
                                  indent=1) + "\n").encode()
        else:
            return
        aside = statefile.keep_aside(self.path, content)
        logger.warning("%s: %s kept aside in %s: %s", self.path,
                       "the whole file" if reading.whole else
                       f"{len(reading.bad)} bad entr{'y' if len(reading.bad) == 1 else 'ies'}",
                       aside.name, "; ".join(reading.problems))

    @contextlib.contextmanager
    def update(self) -> Iterator[dict[str, ModelStats]]:
        """Read, let the caller change the dict, write back: one writer at a time."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(".stats.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            reading = self.examine()
            stats = reading.stats
            yield stats
            self._keep_aside(reading)
            self.write(stats)
        finally:
            os.close(fd)

    def record_load(self, name: str, load_seconds: float | None = None) -> None:
        with self.update() as stats:
            stats[name] = stats.get(name, ModelStats()).with_load(time.time(), load_seconds)

    def record_stop(self, name: str, last_request_end: float | None = None) -> None:
        """The unit stopped; it was in use until its last request ended (or until now)."""
        with self.update() as stats:
            if name in stats:
                stats[name] = stats[name].with_stop(last_request_end or time.time())

    def ranks(self, now: float | None = None, w: Weights = DEFAULT_WEIGHTS,
              running: Collection[str] = ()) -> dict[str, float]:
        now = time.time() if now is None else now
        return {name: rank(s, now, w, name in running) for name, s in self.read().items()}
