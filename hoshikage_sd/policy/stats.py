"""The usage statistics file, /var/lib/hoshikage/stats.json: per model, the last loads and
how long each ran. One writer at a time (flock); replaced atomically."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path

from hoshikage_sd.files import write_atomic
from hoshikage_sd.manifest.model import DEFAULT_WEIGHTS, Weights
from hoshikage_sd.policy.rank import ModelStats, Use, rank

STATS_VERSION = 1


class StatsFile:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "stats.json"

    def read(self) -> dict[str, ModelStats]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        out = {}
        for name, entry in (data.get("models") or {}).items():
            with contextlib.suppress(TypeError, KeyError, ValueError):
                out[name] = ModelStats(
                    uses=tuple(Use(float(u["at"]), None if u.get("runtime") is None
                                   else float(u["runtime"])) for u in entry.get("uses", [])),
                    total_uses=int(entry.get("total_uses", 0)),
                    total_runtime=float(entry.get("total_runtime", 0.0)),
                    last_load_seconds=entry.get("last_load_seconds"))
        return out

    def write(self, stats: Mapping[str, ModelStats]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": STATS_VERSION,
                "models": {name: asdict(s) for name, s in sorted(stats.items())}}
        write_atomic(self.path, json.dumps(data, indent=1) + "\n")

    @contextlib.contextmanager
    def update(self) -> Iterator[dict[str, ModelStats]]:
        """Read, let the caller change the dict, write back: one writer at a time."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(".stats.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            stats = self.read()
            yield stats
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
