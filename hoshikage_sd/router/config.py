"""The manifest as the router reads it, at start (before its HTTP front is imported) and on
every reload."""

from __future__ import annotations

import time
from pathlib import Path

from hoshikage_sd import lastgood
from hoshikage_sd.manifest import Config, load, names
from hoshikage_sd.router.headstart import index


def load_config(source: Path) -> Config:
    """The manifest with the CLI's names over it; HoshikageError (file:line, what is wrong)
    when the manifest cannot be used. A good one is kept (hoshikage_sd/lastgood.py): the last
    good manifest that the units the router starts fall back to, the parse that they and
    the next router read instead of parsing while its files are as they were, and the name
    index that the next router's head start resolves the waking request with
    (headstart/index.py). A names.json of the wrong shape is reported and what is usable of
    it applies (names.effective): it never stops the router."""
    config = lastgood.load(source)
    if config is not None:
        return config  # what a parse of these same files would give, kept whole
    began = time.time()
    config = names.effective(load(source))
    lastgood.save(config, began, index.build)
    return config


def refresh_index(config: Config) -> None:
    """The name index of `config` written again (lastgood.refresh): a model's estimate,
    remembered once it started, lets the next head start admit it."""
    lastgood.refresh(config, index.build)
