"""The manifest as the router reads it, at start (before its HTTP front is imported) and on
every reload, and whether it changed (Changes)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from hoshikage_sd import lastgood
from hoshikage_sd.manifest import Config, load, names
from hoshikage_sd.router.headstart import index

logger = logging.getLogger("hoshikage")


def load_config(source: Path) -> Config:
    """The manifest with the CLI's names over it; HoshikageError (file:line, what is wrong)
    when the manifest cannot be used. A good one is kept (hoshikage_sd/lastgood.py): the last
    good manifest that the units the router starts fall back to, the parse that they and
    the next router read instead of parsing while its files are as they were, and the name
    index that the next router's head start resolves the waking request with
    (headstart/index.py). A names.json of the wrong shape is reported and what is usable of
    it applies (names.effective): it never stops the router. The router that parses logs
    the manifest's warnings: once for its files as they are, not at each start."""
    config = lastgood.load(source)
    if config is not None:
        return config  # what a parse of these same files would give, kept whole
    began = time.time()
    config = names.effective(load(source))
    lastgood.save(config, began, index.build)
    for warning in config.warnings:
        logger.warning("%s", warning)
    return config


def refresh_index(config: Config) -> None:
    """The name index of `config` written again (lastgood.refresh): a model's estimate,
    remembered once it started, lets the next head start admit it."""
    lastgood.refresh(config, index.build)


class Changes:
    """Has the manifest, the CLI's names file or the API keys file changed? Their identity
    (inode, size, mtime) against what it was when last looked at, at most once a second
    unless forced: a change in any reloads. `paths`: those files now (a reload may move
    them)."""

    def __init__(self, paths: Callable[[], Iterable[Path | None]]) -> None:
        self._paths = paths
        self._seen = self._identity()
        self.checked = time.monotonic()

    def _identity(self) -> tuple[tuple[int, int, int] | None, ...]:
        out: list[tuple[int, int, int] | None] = []
        for path in self._paths():
            if path is None:
                continue
            try:
                st = os.stat(path)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    def changed(self, force: bool = False) -> bool:
        """Time to reload: forced, or (looked at once a second at most) a file changed."""
        now = time.monotonic()
        if not force and now - self.checked < 1.0:
            return False
        self.checked = now
        current = self._identity()
        if current == self._seen and not force:
            return False
        self._seen = current
        return True
